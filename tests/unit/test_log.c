/* JSON lines logger: every line in the file must be one whole JSON object
 * with ts/level/msg first, whatever the values and however many threads. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <regex.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "piapi/log.h"
#include "unit.h"

#define FFFD "\xEF\xBF\xBD"

static char dir[64];
static char path[128];

static void remove_dir(void)
{
    unlink(path);
    rmdir(dir);
}

static void fresh_file(void)
{
    if (!dir[0]) {
        snprintf(dir, sizeof dir, "/tmp/piapi-test-log-XXXXXX");
        CU_ASSERT_PTR_NOT_NULL_FATAL(mkdtemp(dir));
        atexit(remove_dir);
    }
    snprintf(path, sizeof path, "%s/piapi.log", dir);
    unlink(path);
}

static char *slurp(const char *p, size_t *len)
{
    FILE *f = fopen(p, "rb");
    if (!f)
        return NULL;
    size_t cap = 4096, n = 0, r;
    char *data = malloc(cap);
    while ((r = fread(data + n, 1, cap - n - 1, f)) > 0) {
        n += r;
        if (cap - n - 1 == 0)
            data = realloc(data, cap *= 2);
    }
    fclose(f);
    data[n] = '\0';
    *len = n;
    return data;
}

/* Splits the file into lines, checks each is complete (ends in \n) and
 * parses as an object; returns the parsed lines (NULL-terminated). */
static cJSON **read_lines(const char *p, size_t *count)
{
    size_t len;
    char *data = slurp(p, &len);
    cJSON **lines = calloc(1, sizeof *lines);
    *count = 0;
    if (!data)
        return lines;
    CU_ASSERT_TRUE(len == 0 || data[len - 1] == '\n');
    char *save = NULL;
    for (char *s = strtok_r(data, "\n", &save); s; s = strtok_r(NULL, "\n", &save)) {
        cJSON *v = cJSON_Parse(s);
        CU_ASSERT_TRUE(cJSON_IsObject(v));
        if (!v) {
            fprintf(stderr, "\n  unparsable line: %.200s\n", s);
            continue;
        }
        lines = realloc(lines, (*count + 2) * sizeof *lines);
        lines[(*count)++] = v;
        lines[*count] = NULL;
    }
    free(data);
    return lines;
}

static void free_lines(cJSON **lines)
{
    for (cJSON **l = lines; *l; l++)
        cJSON_Delete(*l);
    free(lines);
}

static const char *str_field(const cJSON *o, const char *key)
{
    return cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(o, key));
}

static void test_level_parse(void)
{
    static const struct { const char *in; int want; } t[] = {
        { "debug", PIAPI_LOG_DEBUG }, { "info", PIAPI_LOG_INFO },
        { "warn", PIAPI_LOG_WARN }, { "error", PIAPI_LOG_ERROR },
        { "INFO", -1 }, { "warning", -1 }, { "", -1 }, { "inf", -1 },
        { NULL, -1 },
    };
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++)
        CU_ASSERT_EQUAL(piapi_log_level_parse(t[i].in), t[i].want);
}

/* ts, level, msg come first, then fields in call order, with their types. */
static void test_line_shape(void)
{
    fresh_file();
    CU_ASSERT_EQUAL_FATAL(piapi_log_open(path, PIAPI_LOG_DEBUG), 0);
    time_t before = time(NULL);
    struct piapi_log_line l;
    CU_ASSERT_TRUE_FATAL(piapi_log_begin(&l, PIAPI_LOG_INFO, "request completed"));
    piapi_log_str(&l, "user", "alice");
    piapi_log_int(&l, "status", 200);
    piapi_log_double(&l, "latency_ms", 12.34567);
    piapi_log_str(&l, "upstream_key", NULL);
    piapi_log_strn(&l, "path", "/piapi/chat/v1?x", 12);
    piapi_log_int(&l, "min", INT64_MIN);
    piapi_log_int(&l, "max", INT64_MAX);
    piapi_log_double(&l, "nan", NAN);
    piapi_log_double(&l, "inf", -INFINITY);
    piapi_log_double(&l, "neg", -0.5);
    piapi_log_end(&l);
    piapi_log_close();

    size_t n;
    cJSON **lines = read_lines(path, &n);
    CU_ASSERT_EQUAL_FATAL(n, 1);
    static const char *const order[] = {
        "ts", "level", "msg", "user", "status", "latency_ms", "upstream_key",
        "path", "min", "max", "nan", "inf", "neg", NULL
    };
    const cJSON *f = lines[0]->child;
    for (size_t i = 0; order[i]; i++, f = f ? f->next : NULL) {
        CU_ASSERT_PTR_NOT_NULL_FATAL(f);
        CU_ASSERT_STRING_EQUAL(f->string, order[i]);
    }
    CU_ASSERT_PTR_NULL(f);

    regex_t re;
    CU_ASSERT_EQUAL_FATAL(regcomp(&re, "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:"
                                  "[0-9]{2}:[0-9]{2}\\.[0-9]{3}Z$",
                                  REG_EXTENDED | REG_NOSUB), 0);
    const char *ts = str_field(lines[0], "ts");
    CU_ASSERT_PTR_NOT_NULL_FATAL(ts);
    CU_ASSERT_EQUAL(regexec(&re, ts, 0, NULL, 0), 0);
    regfree(&re);
    struct tm tm = {0};
    CU_ASSERT_PTR_NOT_NULL_FATAL(strptime(ts, "%Y-%m-%dT%H:%M:%S", &tm));
    time_t t = timegm(&tm);
    CU_ASSERT_TRUE(t >= before - 1 && t <= time(NULL) + 1);

    CU_ASSERT_STRING_EQUAL(str_field(lines[0], "level"), "info");
    CU_ASSERT_STRING_EQUAL(str_field(lines[0], "msg"), "request completed");
    CU_ASSERT_STRING_EQUAL(str_field(lines[0], "user"), "alice");
    CU_ASSERT_STRING_EQUAL(str_field(lines[0], "path"), "/piapi/chat/");
    CU_ASSERT_EQUAL(cJSON_GetObjectItem(lines[0], "status")->valueint, 200);
    CU_ASSERT_TRUE(cJSON_IsNull(cJSON_GetObjectItem(lines[0], "upstream_key")));
    CU_ASSERT_TRUE(cJSON_IsNull(cJSON_GetObjectItem(lines[0], "nan")));
    CU_ASSERT_TRUE(cJSON_IsNull(cJSON_GetObjectItem(lines[0], "inf")));
    free_lines(lines);

    /* The exact text of the numbers, which cJSON would round. */
    size_t len;
    char *raw = slurp(path, &len);
    CU_ASSERT_PTR_NOT_NULL(strstr(raw, "\"latency_ms\":12.346,"));
    CU_ASSERT_PTR_NOT_NULL(strstr(raw, "\"min\":-9223372036854775808,"));
    CU_ASSERT_PTR_NOT_NULL(strstr(raw, "\"max\":9223372036854775807,"));
    CU_ASSERT_PTR_NOT_NULL(strstr(raw, "\"neg\":-0.500}\n"));
    free(raw);

    struct stat st;
    mode_t mask = umask(0);
    umask(mask);
    CU_ASSERT_EQUAL(stat(path, &st), 0);
    CU_ASSERT_EQUAL(st.st_mode & 0777, 0640 & ~mask);
}

static void test_level_filter(void)
{
    fresh_file();
    CU_ASSERT_EQUAL_FATAL(piapi_log_open(path, PIAPI_LOG_WARN), 0);
    CU_ASSERT_FALSE(piapi_log_enabled(PIAPI_LOG_DEBUG));
    CU_ASSERT_FALSE(piapi_log_enabled(PIAPI_LOG_INFO));
    CU_ASSERT_TRUE(piapi_log_enabled(PIAPI_LOG_WARN));
    CU_ASSERT_TRUE(piapi_log_enabled(PIAPI_LOG_ERROR));

    struct piapi_log_line l;
    CU_ASSERT_FALSE(piapi_log_begin(&l, PIAPI_LOG_INFO, "dropped"));
    piapi_log_msg(PIAPI_LOG_DEBUG, "dropped", "k", "v");
    piapi_log_msg(PIAPI_LOG_INFO, "dropped", NULL, NULL);
    piapi_log_msg(PIAPI_LOG_WARN, "kept warn", "k", "v");
    piapi_log_msg(PIAPI_LOG_ERROR, "kept error", NULL, NULL);
    piapi_log_close();

    size_t n;
    cJSON **lines = read_lines(path, &n);
    CU_ASSERT_EQUAL_FATAL(n, 2);
    CU_ASSERT_STRING_EQUAL(str_field(lines[0], "level"), "warn");
    CU_ASSERT_STRING_EQUAL(str_field(lines[0], "msg"), "kept warn");
    CU_ASSERT_STRING_EQUAL(str_field(lines[0], "k"), "v");
    CU_ASSERT_STRING_EQUAL(str_field(lines[1], "level"), "error");
    CU_ASSERT_EQUAL(cJSON_GetArraySize(lines[1]), 3);
    free_lines(lines);
}

/* A client-controlled value can neither break the line nor the JSON. */
static void test_hostile_values(void)
{
    static const char evil[] = "a\r\nb\"c\\d\x00\x1b[2J\xFF\xC0\xAF\xED\xA0\x80}\n{\"ts\":1";
    fresh_file();
    CU_ASSERT_EQUAL_FATAL(piapi_log_open(path, PIAPI_LOG_DEBUG), 0);
    struct piapi_log_line l;
    CU_ASSERT_TRUE_FATAL(piapi_log_begin(&l, PIAPI_LOG_ERROR, "bad\nmsg\""));
    piapi_log_strn(&l, "path", evil, sizeof evil - 1);
    piapi_log_str(&l, "we\"ird\nkey", "v");
    piapi_log_end(&l);
    piapi_log_close();

    size_t len;
    char *raw = slurp(path, &len);
    CU_ASSERT_PTR_NOT_NULL_FATAL(raw);
    CU_ASSERT_PTR_EQUAL(strchr(raw, '\n'), raw + len - 1);
    CU_ASSERT_PTR_NULL(strchr(raw, '\r'));
    free(raw);

    size_t n;
    cJSON **lines = read_lines(path, &n);
    CU_ASSERT_EQUAL_FATAL(n, 1);
    CU_ASSERT_STRING_EQUAL(str_field(lines[0], "msg"), "bad\nmsg\"");
    /* cJSON stops at the decoded NUL: check up to it. */
    CU_ASSERT_STRING_EQUAL(str_field(lines[0], "path"), "a\r\nb\"c\\d");
    CU_ASSERT_STRING_EQUAL(str_field(lines[0], "we\"ird\nkey"), "v");
    free_lines(lines);

    /* Without the NUL the whole value decodes, invalid bytes as U+FFFD. */
    fresh_file();
    CU_ASSERT_EQUAL_FATAL(piapi_log_open(path, PIAPI_LOG_DEBUG), 0);
    piapi_log_msg(PIAPI_LOG_INFO, "m", "v", evil + 9);
    piapi_log_close();
    lines = read_lines(path, &n);
    CU_ASSERT_EQUAL_FATAL(n, 1);
    CU_ASSERT_STRING_EQUAL(str_field(lines[0], "v"),
        "\x1b[2J" FFFD FFFD FFFD FFFD FFFD FFFD "}\n{\"ts\":1");
    free_lines(lines);
}

/* Lines far past the inline space (and past PIPE_BUF) arrive intact. */
static void test_long_lines(void)
{
    static const size_t sizes[] = { 1000, 1023, 1024, 5000, 9000, 70000 };
    fresh_file();
    CU_ASSERT_EQUAL_FATAL(piapi_log_open(path, PIAPI_LOG_DEBUG), 0);
    char *val = malloc(70001);
    for (size_t i = 0; i < 70000; i++)
        val[i] = (char)('a' + i % 26);
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        struct piapi_log_line l;
        CU_ASSERT_TRUE_FATAL(piapi_log_begin(&l, PIAPI_LOG_INFO, "long"));
        piapi_log_int(&l, "n", (int64_t)sizes[i]);
        piapi_log_strn(&l, "a", val, sizes[i]);
        piapi_log_strn(&l, "b", "\n\n\n\n", 4);   /* grows 6x worst case */
        piapi_log_strn(&l, "c", val, sizes[i] / 2);
        piapi_log_end(&l);
    }
    piapi_log_close();

    size_t n;
    cJSON **lines = read_lines(path, &n);
    CU_ASSERT_EQUAL_FATAL(n, sizeof sizes / sizeof sizes[0]);
    for (size_t i = 0; i < n; i++) {
        const char *a = str_field(lines[i], "a"), *c = str_field(lines[i], "c");
        CU_ASSERT_PTR_NOT_NULL_FATAL(a);
        CU_ASSERT_PTR_NOT_NULL_FATAL(c);
        CU_ASSERT_EQUAL(strlen(a), sizes[i]);
        CU_ASSERT_EQUAL(memcmp(a, val, sizes[i]), 0);
        CU_ASSERT_EQUAL(strlen(c), sizes[i] / 2);
        CU_ASSERT_STRING_EQUAL(str_field(lines[i], "b"), "\n\n\n\n");
    }
    free_lines(lines);
    free(val);
}

/* logrotate: rename, reopen, and new lines go to a new file at the path. */
static void test_reopen_after_rename(void)
{
    char rotated[160];
    fresh_file();
    snprintf(rotated, sizeof rotated, "%s.1", path);
    unlink(rotated);
    CU_ASSERT_EQUAL_FATAL(piapi_log_open(path, PIAPI_LOG_INFO), 0);
    piapi_log_msg(PIAPI_LOG_INFO, "one", NULL, NULL);
    CU_ASSERT_EQUAL_FATAL(rename(path, rotated), 0);
    piapi_log_msg(PIAPI_LOG_INFO, "two", NULL, NULL);
    CU_ASSERT_EQUAL(piapi_log_reopen(), 0);
    piapi_log_msg(PIAPI_LOG_INFO, "three", NULL, NULL);
    CU_ASSERT_EQUAL(piapi_log_reopen(), 0);     /* reopening again is harmless */
    piapi_log_msg(PIAPI_LOG_INFO, "four", NULL, NULL);

    /* A failed open keeps the current file. */
    CU_ASSERT_EQUAL(piapi_log_open("/nonexistent-dir/x.log", PIAPI_LOG_INFO), -1);
    CU_ASSERT_EQUAL(errno, ENOENT);
    piapi_log_msg(PIAPI_LOG_INFO, "five", NULL, NULL);
    piapi_log_close();
    CU_ASSERT_EQUAL(piapi_log_reopen(), 0);     /* no-op on stderr */

    size_t n;
    cJSON **lines = read_lines(rotated, &n);
    CU_ASSERT_EQUAL_FATAL(n, 2);
    CU_ASSERT_STRING_EQUAL(str_field(lines[0], "msg"), "one");
    CU_ASSERT_STRING_EQUAL(str_field(lines[1], "msg"), "two");
    free_lines(lines);
    lines = read_lines(path, &n);
    CU_ASSERT_EQUAL_FATAL(n, 3);
    CU_ASSERT_STRING_EQUAL(str_field(lines[0], "msg"), "three");
    CU_ASSERT_STRING_EQUAL(str_field(lines[1], "msg"), "four");
    CU_ASSERT_STRING_EQUAL(str_field(lines[2], "msg"), "five");
    free_lines(lines);
    unlink(rotated);
}

#define THREADS 8
#define PER_THREAD 2000

static char pad[6000];

static void *writer(void *arg)
{
    int id = (int)(intptr_t)arg;
    for (int i = 0; i < PER_THREAD; i++) {
        struct piapi_log_line l;
        if (!piapi_log_begin(&l, PIAPI_LOG_INFO, "concurrent"))
            continue;
        piapi_log_int(&l, "thread", id);
        piapi_log_int(&l, "seq", i);
        /* Mix short lines and ones that spill to the heap. */
        piapi_log_strn(&l, "pad", pad, (size_t)(i * 37 + id * 101) % 5000);
        piapi_log_end(&l);
        if (id == 0 && i % 500 == 250)
            piapi_log_reopen();     /* same file: lines must not be lost */
    }
    return NULL;
}

static int next[THREADS];

static void concurrent_writers(int with_writer_thread)
{
    pthread_t t[THREADS];
    memset(pad, 'x', sizeof pad - 1);
    memset(next, 0, sizeof next);
    fresh_file();
    CU_ASSERT_EQUAL_FATAL(piapi_log_open(path, PIAPI_LOG_INFO), 0);
    if (with_writer_thread)
        CU_ASSERT_EQUAL_FATAL(piapi_log_start_writer(), 0);
    for (int i = 0; i < THREADS; i++)
        pthread_create(&t[i], NULL, writer, (void *)(intptr_t)i);
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);
    piapi_log_close();

    size_t n;
    cJSON **lines = read_lines(path, &n);
    CU_ASSERT_EQUAL(n, THREADS * PER_THREAD);
    int in_order = 1;
    for (size_t i = 0; i < n; i++) {
        int id = cJSON_GetObjectItem(lines[i], "thread")->valueint;
        int seq = cJSON_GetObjectItem(lines[i], "seq")->valueint;
        const char *pad = str_field(lines[i], "pad");
        CU_ASSERT_FATAL(id >= 0 && id < THREADS && pad);
        CU_ASSERT_EQUAL(strlen(pad), (size_t)(seq * 37 + id * 101) % 5000);
        in_order &= seq == next[id]++;
    }
    CU_ASSERT_TRUE(in_order);
    free_lines(lines);
}

static void test_concurrent_writers(void)
{
    concurrent_writers(0);
}

/* The writer thread batches lines: still every line whole, each thread's
 * lines in order, nothing lost once close() has drained the queue. */
static void test_concurrent_writers_batched(void)
{
    concurrent_writers(1);
}

static const struct unit_case tests[] = {
    { "level parse", test_level_parse },
    { "line shape and types", test_line_shape },
    { "level filter", test_level_filter },
    { "hostile values", test_hostile_values },
    { "long lines", test_long_lines },
    { "reopen after rename", test_reopen_after_rename },
    { "8 concurrent writers", test_concurrent_writers },
    { "8 concurrent writers, writer thread", test_concurrent_writers_batched },
    { NULL, NULL }
};

UNIT_MAIN("log", tests)
