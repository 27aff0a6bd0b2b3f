/* config_watch: a real watcher thread on a real temp directory, driven by
 * every way operators and tools replace a file.
 * Each edit must show up in piapi_config_current() within a second and
 * produce exactly one "config reloaded" line in the JSON log. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "piapi/config.h"
#include "piapi/config_apply.h"
#include "piapi/config_watch.h"
#include "piapi/log.h"
#include "piapi/metrics.h"
#include "piapi/util.h"
#include "unit.h"

#define PROVIDER_SECRET "sk-provider-secret-do-not-log"
#define INVALID_USER_KEY "piapi-member-key-duplicated"
#define SETTLE_MS 300   /* > debounce (100 ms): later reloads would show by then */

static char log_path[64];
static char dir[64];        /* the watched directory of the current test */
static char cfg_path[128];  /* dir/config.yaml */

/* ---- helpers ----------------------------------------------------------- */

static void sleep_ms(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

static void user_key(char *out, size_t size, int version)
{
    snprintf(out, size, "piapi-member-key-v%d", version);
}

/* A valid config whose only member key names the version. */
static void config_text(struct piapi_buf *b, int version)
{
    char key[64];

    user_key(key, sizeof key, version);
    piapi_buf_printf(b,
        "providers:\n"
        "  - name: openai\n"
        "    apiKeys:\n"
        "      main: " PROVIDER_SECRET "\n"
        "    services:\n"
        "      - type: cx\n"
        "        baseUrl: https://api.openai.com/v1\n"
        "        auth:\n"
        "          mode: header\n"
        "          name: Authorization\n"
        "          prefix: \"Bearer \"\n"
        "users:\n"
        "  - name: alice\n"
        "    apiKey: %s\n"
        "    providerName: openai\n"
        "    providerKeyName: main\n", key);
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    CU_ASSERT_FATAL(f != NULL);
    CU_ASSERT(fputs(text, f) >= 0);
    CU_ASSERT(fclose(f) == 0);
}

static void write_version(const char *path, int version)
{
    struct piapi_buf b = { 0 };
    config_text(&b, version);
    write_file(path, b.data);
    piapi_buf_dispose(&b);
}

static int run(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Shell commands are how operators edit: sed -i, cp, mv, touch. */
static int run(const char *fmt, ...)
{
    char cmd[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    return system(cmd);
}

static int live_has_version(int version)
{
    char key[64];
    struct piapi_config *cfg = piapi_config_current();
    int found;

    user_key(key, sizeof key, version);
    found = cfg && piapi_config_find_user(cfg, key, strlen(key)) != NULL;
    piapi_config_release(cfg);
    return found;
}

/* Polls for up to timeout_ms; returns 1 once the version is live. */
static int wait_for_version(int version, long timeout_ms)
{
    for (long t = 0; t <= timeout_ms; t += 10) {
        if (live_has_version(version))
            return 1;
        sleep_ms(10);
    }
    return 0;
}

/* Reads the JSON log and counts lines with this msg.
 * *last (when given) receives the last such line; the caller deletes it. */
static int count_lines(const char *msg, cJSON **last)
{
    FILE *f = fopen(log_path, "r");
    char *line = NULL;
    size_t cap = 0;
    int n = 0;

    if (last)
        *last = NULL;
    if (!f)
        return 0;
    while (getline(&line, &cap, f) > 0) {
        cJSON *j = cJSON_Parse(line);
        CU_ASSERT(j != NULL);  /* every line is valid JSON */
        const cJSON *m = cJSON_GetObjectItemCaseSensitive(j, "msg");
        if (cJSON_IsString(m) && strcmp(m->valuestring, msg) == 0) {
            n++;
            if (last) {
                cJSON_Delete(*last);
                *last = j;
                j = NULL;
            }
        }
        cJSON_Delete(j);
    }
    free(line);
    fclose(f);
    return n;
}

/* Polls the log for up to 1 s until it holds `n` lines with this msg. */
static int wait_for_lines(const char *msg, int n)
{
    for (int t = 0; t <= 1000; t += 10) {
        if (count_lines(msg, NULL) >= n)
            return 1;
        sleep_ms(10);
    }
    return 0;
}

static int reloads(void)
{
    return count_lines("config reloaded", NULL);
}

static const char *field_str(const cJSON *j, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* piapi_config_reloads_total{result="<result>"} from a real scrape. */
static long reload_metric(const char *result)
{
    struct piapi_buf out = { 0 };
    char needle[96];
    long v = -1;

    piapi_metrics_render(&out);
    snprintf(needle, sizeof needle,
             "\npiapi_config_reloads_total{result=\"%s\"} ", result);
    const char *p = out.data ? strstr(out.data, needle) : NULL;
    if (p)
        v = strtol(p + strlen(needle), NULL, 10);
    piapi_buf_dispose(&out);
    return v;
}

static int log_contains(const char *needle)
{
    FILE *f = fopen(log_path, "r");
    char *line = NULL;
    size_t cap = 0;
    int found = 0;

    if (!f)
        return 0;
    while (!found && getline(&line, &cap, f) > 0)
        found = strstr(line, needle) != NULL;
    free(line);
    fclose(f);
    return found;
}

/* Once per process: the JSON log every assertion reads, the metrics
 * registry, and a umask that keeps the loader's "readable by others"
 * warning out of tests that do not ask for it. */
static void open_log_once(void)
{
    if (log_path[0])
        return;
    umask(077);
    piapi_metrics_init("test");
    snprintf(log_path, sizeof log_path, "/tmp/piapi-cw-log-%d.jsonl", (int)getpid());
    unlink(log_path);
    CU_ASSERT_FATAL(piapi_log_open(log_path, PIAPI_LOG_DEBUG) == 0);
}

/* Applies `path` the way main does at start-up, then starts the watcher. */
static void start_on(const char *path)
{
    char err[256] = "";

    CU_ASSERT_FATAL(piapi_config_apply(path, PIAPI_APPLY_STARTUP) == 0);
    CU_ASSERT_FATAL(piapi_config_watch_start(path, err, sizeof err) == 0);
}

/* Fresh dir with config.yaml at version 1, watched. */
static void setup(void)
{
    open_log_once();
    snprintf(dir, sizeof dir, "/tmp/piapi-cw-XXXXXX");
    CU_ASSERT_FATAL(mkdtemp(dir) != NULL);
    snprintf(cfg_path, sizeof cfg_path, "%s/config.yaml", dir);
    write_version(cfg_path, 1);
    start_on(cfg_path);
}

static void teardown(void)
{
    double t0 = piapi_now_mono();
    piapi_config_watch_stop();
    CU_ASSERT(piapi_now_mono() - t0 < 1.0);  /* stop is prompt */
    piapi_config_publish(NULL);             /* every snapshot released */
    run("rm -rf '%s'", dir);
    /* Whatever else happened, no secret may have reached the log. */
    CU_ASSERT(!log_contains(PROVIDER_SECRET));
    CU_ASSERT(!log_contains(INVALID_USER_KEY));
    CU_ASSERT(!log_contains("piapi-member-key-v"));
}

/* The edit produced `version` within 1 s and exactly one reload. */
static void expect_one_reload(int before, int version)
{
    CU_ASSERT(wait_for_version(version, 1000));
    sleep_ms(SETTLE_MS);
    CU_ASSERT_EQUAL(reloads(), before + 1);
    CU_ASSERT(live_has_version(version));
}

/* ---- edit styles ------------------------------------------------------- */

/* A slow in-place writer: two writes 50 ms apart on one open file. With
 * IN_MODIFY in the mask the half-written file would be loaded (and fail). */
static void test_in_place_write(void)
{
    struct piapi_buf b = { 0 };
    setup();
    int before = reloads();
    int failed = count_lines("config reload failed", NULL);

    config_text(&b, 2);
    FILE *f = fopen(cfg_path, "w");
    CU_ASSERT_FATAL(f != NULL);
    fwrite(b.data, 1, b.len / 2, f);
    fflush(f);
    sleep_ms(50);
    fwrite(b.data + b.len / 2, 1, b.len - b.len / 2, f);
    fclose(f);
    piapi_buf_dispose(&b);

    expect_one_reload(before, 2);
    CU_ASSERT_EQUAL(count_lines("config reload failed", NULL), failed);
    teardown();
}

static void test_rename_over(void)
{
    char tmp[160];
    setup();
    int before = reloads();

    long ok = reload_metric("success");

    snprintf(tmp, sizeof tmp, "%s/.config.yaml.tmp", dir);
    write_version(tmp, 2);
    CU_ASSERT_FATAL(rename(tmp, cfg_path) == 0);
    expect_one_reload(before, 2);
    CU_ASSERT_EQUAL(reload_metric("success"), ok + 1);
    teardown();
}

static void test_sed_in_place(void)
{
    setup();
    int before = reloads();

    CU_ASSERT(run("sed -i 's/member-key-v1/member-key-v2/' '%s'", cfg_path) == 0);
    expect_one_reload(before, 2);
    teardown();
}

static void test_cp_over(void)
{
    char other[160];
    setup();
    int before = reloads();

    snprintf(other, sizeof other, "%s/new.yaml", dir);
    write_version(other, 2);
    CU_ASSERT(run("cp '%s' '%s'", other, cfg_path) == 0);
    expect_one_reload(before, 2);
    teardown();
}

static void test_mv_from_other_dir(void)
{
    char odir[64] = "/tmp/piapi-cw-other-XXXXXX";
    char other[160];
    setup();
    int before = reloads();

    CU_ASSERT_FATAL(mkdtemp(odir) != NULL);
    snprintf(other, sizeof other, "%s/config.yaml", odir);
    write_version(other, 2);
    CU_ASSERT(run("mv '%s' '%s'", other, cfg_path) == 0);
    expect_one_reload(before, 2);
    rmdir(odir);
    teardown();
}

/* Removal keeps serving (with a warning); the recreated file reloads. */
static void test_delete_then_recreate(void)
{
    setup();
    int before = reloads();
    int removed = count_lines("config file removed; keeping the current config", NULL);

    CU_ASSERT_FATAL(unlink(cfg_path) == 0);
    CU_ASSERT(wait_for_lines("config file removed; keeping the current config",
                             removed + 1));
    sleep_ms(SETTLE_MS);
    CU_ASSERT_EQUAL(count_lines("config file removed; keeping the current config",
                                NULL), removed + 1);
    CU_ASSERT_EQUAL(reloads(), before);
    CU_ASSERT(live_has_version(1));

    write_version(cfg_path, 2);
    expect_one_reload(before, 2);
    teardown();
}

/* Kubernetes ConfigMap volume: config.yaml -> ..data/config.yaml and
 * ..data -> ..v1; an update renames a new ..data symlink into place, and
 * no event ever names config.yaml. */
static void test_configmap_swap(void)
{
    char path[192], link[192], data[160];

    open_log_once();
    snprintf(dir, sizeof dir, "/tmp/piapi-cw-XXXXXX");
    CU_ASSERT_FATAL(mkdtemp(dir) != NULL);
    snprintf(path, sizeof path, "%s/..v1", dir);
    CU_ASSERT_FATAL(mkdir(path, 0700) == 0);
    snprintf(path, sizeof path, "%s/..v1/config.yaml", dir);
    write_version(path, 1);
    snprintf(data, sizeof data, "%s/..data", dir);
    CU_ASSERT_FATAL(symlink("..v1", data) == 0);
    snprintf(cfg_path, sizeof cfg_path, "%s/config.yaml", dir);
    CU_ASSERT_FATAL(symlink("..data/config.yaml", cfg_path) == 0);
    start_on(cfg_path);
    int before = reloads();

    snprintf(path, sizeof path, "%s/..v2", dir);
    CU_ASSERT_FATAL(mkdir(path, 0700) == 0);
    snprintf(path, sizeof path, "%s/..v2/config.yaml", dir);
    write_version(path, 2);
    snprintf(link, sizeof link, "%s/..data_tmp", dir);
    CU_ASSERT_FATAL(symlink("..v2", link) == 0);
    CU_ASSERT_FATAL(rename(link, data) == 0);
    snprintf(path, sizeof path, "%s/..v1", dir);
    CU_ASSERT(run("rm -rf '%s'", path) == 0);

    expect_one_reload(before, 2);
    teardown();
}

/* A burst of replacements becomes one reload of the final content. */
static void test_burst_is_debounced(void)
{
    char tmp[160];
    setup();
    int before = reloads();

    snprintf(tmp, sizeof tmp, "%s/.burst.tmp", dir);
    for (int v = 2; v <= 4; v++) {
        write_version(tmp, v);
        CU_ASSERT_FATAL(rename(tmp, cfg_path) == 0);
        sleep_ms(20);
    }
    expect_one_reload(before, 4);
    teardown();
}

/* ---- what must not reload ---------------------------------------------- */

static void test_touch_does_not_reload(void)
{
    setup();
    int before = reloads();
    int unchanged = count_lines("config unchanged", NULL);
    int skipped = count_lines("config file unchanged; not reloading", NULL);
    int failed = count_lines("config reload failed", NULL);
    long ok = reload_metric("success");

    CU_ASSERT(run("touch '%s'", cfg_path) == 0);
    CU_ASSERT(chmod(cfg_path, 0640) == 0);  /* ATTRIB again */
    CU_ASSERT(wait_for_lines("config file unchanged; not reloading", skipped + 1));
    sleep_ms(SETTLE_MS);
    CU_ASSERT_EQUAL(reloads(), before);
    CU_ASSERT_EQUAL(count_lines("config reload failed", NULL), failed);
    /* Not even a reload that finds nothing new: the bytes decide first. */
    CU_ASSERT_EQUAL(count_lines("config unchanged", NULL), unchanged);
    CU_ASSERT(count_lines("config file unchanged; not reloading", NULL) > skipped);
    CU_ASSERT_EQUAL(reload_metric("success"), ok);
    CU_ASSERT(live_has_version(1));
    teardown();
}

/* Other files in the directory are none of our business. */
static void test_unrelated_file_ignored(void)
{
    char other[160];
    setup();
    int before = reloads();
    int skipped = count_lines("config file unchanged; not reloading", NULL);

    snprintf(other, sizeof other, "%s/other.yaml", dir);
    write_version(other, 2);
    sleep_ms(SETTLE_MS);
    CU_ASSERT_EQUAL(reloads(), before);
    /* not even looked at */
    CU_ASSERT_EQUAL(count_lines("config file unchanged; not reloading", NULL),
                    skipped);
    teardown();
}

/* Valid YAML, three mistakes (two of them in one user). */
static const char invalid_config[] =
    "providers:\n"
    "  - name: openai\n"
    "    apiKeys:\n"
    "      main: " PROVIDER_SECRET "\n"
    "    services:\n"
    "      - type: cx\n"
    "        baseUrl: https://api.openai.com/v1\n"
    "users:\n"
    "  - name: alice\n"
    "    apiKey: " INVALID_USER_KEY "\n"
    "    providerName: nosuch\n"
    "    providerKeyName: main\n"
    "  - name: bob\n"
    "    apiKey: " INVALID_USER_KEY "\n"
    "    providerName: openai\n"
    "    providerKeyName: nokey\n";

/* An invalid edit keeps the old snapshot and says why; fixing it reloads. */
static void test_invalid_edit_keeps_old(void)
{
    cJSON *line = NULL;
    setup();
    int before = reloads();
    int failed = count_lines("config reload failed", NULL);
    struct piapi_config *old = piapi_config_current();
    long bad = reload_metric("failure");

    write_file(cfg_path, invalid_config);
    CU_ASSERT(wait_for_lines("config reload failed", failed + 1));
    sleep_ms(SETTLE_MS);
    CU_ASSERT_EQUAL(reload_metric("failure"), bad + 1);
    CU_ASSERT_EQUAL(count_lines("config reload failed", &line), failed + 1);
    CU_ASSERT_FATAL(line != NULL);
    CU_ASSERT_STRING_EQUAL(field_str(line, "level"), "error");
    CU_ASSERT_STRING_EQUAL(field_str(line, "trigger"), "inotify");
    /* Every problem, each naming its place, on one line. */
    const char *error = field_str(line, "error");
    CU_ASSERT_FATAL(error != NULL);
    CU_ASSERT(strstr(error, "config.yaml:11: users[0].providerName") != NULL);
    CU_ASSERT(strstr(error, "; ") != NULL);
    CU_ASSERT(strstr(error, "users[1].providerKeyName") != NULL);
    CU_ASSERT(strchr(error, '\n') == NULL);
    cJSON_Delete(line);

    struct piapi_config *now = piapi_config_current();
    CU_ASSERT_PTR_EQUAL(now, old);
    piapi_config_release(now);
    piapi_config_release(old);
    CU_ASSERT_EQUAL(reloads(), before);

    write_version(cfg_path, 2);
    expect_one_reload(before, 2);
    teardown();
}

/* ---- the reload routine (what SIGHUP calls) ---------------------------- */

static void test_reload_fields(void)
{
    cJSON *line = NULL;
    setup();

    write_version(cfg_path, 2);
    CU_ASSERT(wait_for_version(2, 1000));
    sleep_ms(SETTLE_MS);
    CU_ASSERT(count_lines("config reloaded", &line) > 0);
    CU_ASSERT_FATAL(line != NULL);
    struct piapi_config *cfg = piapi_config_current();
    CU_ASSERT_STRING_EQUAL(field_str(line, "level"), "info");
    CU_ASSERT_STRING_EQUAL(field_str(line, "trigger"), "inotify");
    CU_ASSERT_STRING_EQUAL(field_str(line, "hash"), piapi_config_hash(cfg));
    CU_ASSERT(cJSON_GetObjectItemCaseSensitive(line, "providers")->valueint == 1);
    CU_ASSERT(cJSON_GetObjectItemCaseSensitive(line, "services")->valueint == 1);
    CU_ASSERT(cJSON_GetObjectItemCaseSensitive(line, "users")->valueint == 1);
    piapi_config_release(cfg);
    cJSON_Delete(line);
    teardown();
}

/* Loader warnings are logged one per line; they do not stop the reload. */
static void test_warnings_logged(void)
{
    cJSON *line = NULL;
    setup();
    int warnings = count_lines("config warning", NULL);
    int before = reloads();

    CU_ASSERT_FATAL(chmod(cfg_path, 0644) == 0);  /* "readable by others" */
    write_version(cfg_path, 2);
    expect_one_reload(before, 2);
    CU_ASSERT(count_lines("config warning", &line) > warnings);
    CU_ASSERT_FATAL(line != NULL);
    CU_ASSERT_STRING_EQUAL(field_str(line, "level"), "warn");
    CU_ASSERT_STRING_EQUAL(field_str(line, "trigger"), "inotify");
    CU_ASSERT(field_str(line, "warning") != NULL);
    cJSON_Delete(line);
    teardown();
}

static void test_sighup_unchanged_no_swap(void)
{
    cJSON *line = NULL;
    setup();
    int before = reloads();
    int unchanged = count_lines("config unchanged", NULL);
    struct piapi_config *old = piapi_config_current();
    long ok = reload_metric("success");

    CU_ASSERT_EQUAL(piapi_config_apply(cfg_path, PIAPI_APPLY_SIGHUP), 0);
    /* A reload that finds nothing new still counts as a success. */
    CU_ASSERT_EQUAL(reload_metric("success"), ok + 1);
    CU_ASSERT_EQUAL(reloads(), before);
    CU_ASSERT_EQUAL(count_lines("config unchanged", &line), unchanged + 1);
    CU_ASSERT_FATAL(line != NULL);
    CU_ASSERT_STRING_EQUAL(field_str(line, "trigger"), "sighup");
    cJSON_Delete(line);
    struct piapi_config *now = piapi_config_current();
    CU_ASSERT_PTR_EQUAL(now, old);
    piapi_config_release(now);
    piapi_config_release(old);
    teardown();
}

static void test_sighup_failure(void)
{
    cJSON *line = NULL;
    char missing[160];
    setup();
    int failed = count_lines("config reload failed", NULL);

    snprintf(missing, sizeof missing, "%s/nope.yaml", dir);
    CU_ASSERT_EQUAL(piapi_config_apply(missing, PIAPI_APPLY_SIGHUP), -1);
    CU_ASSERT_EQUAL(count_lines("config reload failed", &line), failed + 1);
    CU_ASSERT_FATAL(line != NULL);
    CU_ASSERT_STRING_EQUAL(field_str(line, "trigger"), "sighup");
    CU_ASSERT(field_str(line, "error") != NULL && field_str(line, "error")[0]);
    cJSON_Delete(line);
    CU_ASSERT(live_has_version(1));
    teardown();
}

/* ---- the watcher's own life -------------------------------------------- */

/* The directory renamed away and recreated: the watch is re-added on the
 * 1 s retry timer and the new file loaded. */
static void test_directory_replaced(void)
{
    char moved[96];
    setup();
    int before = reloads();

    snprintf(moved, sizeof moved, "%s.old", dir);
    CU_ASSERT_FATAL(rename(dir, moved) == 0);
    sleep_ms(50);
    CU_ASSERT_FATAL(mkdir(dir, 0700) == 0);
    write_version(cfg_path, 2);
    CU_ASSERT(wait_for_version(2, 2000));
    sleep_ms(SETTLE_MS);
    CU_ASSERT_EQUAL(reloads(), before + 1);
    CU_ASSERT(count_lines("config directory watch restored", NULL) > 0);
    run("rm -rf '%s'", moved);
    teardown();
}

/* A FIFO put in the file's place must not hang the watcher (or stop). */
static void test_fifo_does_not_hang(void)
{
    char fifo[160];
    setup();
    int before = reloads();
    int unreadable = count_lines("config file unreadable; keeping the current config",
                                 NULL);

    snprintf(fifo, sizeof fifo, "%s/fifo", dir);
    CU_ASSERT_FATAL(mkfifo(fifo, 0600) == 0);
    CU_ASSERT_FATAL(rename(fifo, cfg_path) == 0);
    CU_ASSERT(wait_for_lines("config file unreadable; keeping the current config",
                             unreadable + 1));
    CU_ASSERT_EQUAL(reloads(), before);
    CU_ASSERT(live_has_version(1));
    teardown();  /* asserts that stop is prompt */
}

/* Stop while a debounced check is pending still returns at once. */
static void test_stop_is_prompt(void)
{
    setup();
    write_version(cfg_path, 2);
    sleep_ms(20);
    double t0 = piapi_now_mono();
    piapi_config_watch_stop();
    CU_ASSERT(piapi_now_mono() - t0 < 0.5);
    piapi_config_watch_stop();  /* twice is fine */
    teardown();
}

static void test_start_errors(void)
{
    char err[256] = "";

    piapi_config_watch_stop();  /* never started: a no-op */
    CU_ASSERT_EQUAL(piapi_config_watch_start("/nonexistent-piapi-dir/config.yaml",
                                             err, sizeof err), -1);
    CU_ASSERT(strstr(err, "/nonexistent-piapi-dir") != NULL);

    setup();
    err[0] = '\0';
    CU_ASSERT_EQUAL(piapi_config_watch_start(cfg_path, err, sizeof err), -1);
    CU_ASSERT(err[0] != '\0');
    teardown();
}

static const struct unit_case cases[] = {
    { "in-place write (slow writer)", test_in_place_write },
    { "temp file renamed over", test_rename_over },
    { "sed -i", test_sed_in_place },
    { "cp over", test_cp_over },
    { "mv from another directory", test_mv_from_other_dir },
    { "delete then recreate", test_delete_then_recreate },
    { "ConfigMap symlink swap", test_configmap_swap },
    { "burst debounced into one reload", test_burst_is_debounced },
    { "touch does not reload", test_touch_does_not_reload },
    { "unrelated file ignored", test_unrelated_file_ignored },
    { "invalid edit keeps the old snapshot", test_invalid_edit_keeps_old },
    { "reload log fields", test_reload_fields },
    { "load warnings logged", test_warnings_logged },
    { "sighup, unchanged: no swap", test_sighup_unchanged_no_swap },
    { "sighup, failure", test_sighup_failure },
    { "directory replaced: watch re-added", test_directory_replaced },
    { "FIFO in place of the file", test_fifo_does_not_hang },
    { "stop is prompt", test_stop_is_prompt },
    { "start errors", test_start_errors },
    { NULL, NULL },
};

static int run_all(void)
{
    int rc = unit_run("config_watch", cases);
    piapi_log_close();
    if (log_path[0])
        unlink(log_path);
    return rc;
}

int main(void)
{
    return run_all();
}
