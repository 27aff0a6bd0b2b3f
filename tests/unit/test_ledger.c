/* ledger + usage_report: a real SQLite file in a temp directory per test,
 * written by the writer thread and read back on a connection of the test's
 * own, the way `piapi usage` and an operator's sqlite3 see it. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <ftw.h>
#include <math.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "piapi/ledger.h"
#include "piapi/log.h"
#include "piapi/usage_report.h"
#include "piapi/util.h"
#include "unit.h"

static char dir[64];
static char db_path[128];

/* ---- helpers ----------------------------------------------------------- */

static void sleep_ms(long ms)
{
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

static void setup(void)
{
    snprintf(dir, sizeof dir, "/tmp/piapi-ledger-XXXXXX");
    CU_ASSERT_FATAL(mkdtemp(dir) != NULL);
    snprintf(db_path, sizeof db_path, "%s/usage.db", dir);
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st; (void)flag; (void)ftw;
    return remove(path);
}

static void teardown(void)
{
    piapi_ledger_close();
    nftw(dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
}

/* 2026-03-01 + days, 00:00:00 UTC */
static double day(int days)
{
    struct tm tm = { .tm_year = 126, .tm_mon = 2, .tm_mday = 1 + days };
    return (double)timegm(&tm);
}

static struct piapi_ledger_row make_row(double ts, const char *user, const char *service,
                                        const char *model, int64_t in, int64_t out)
{
    struct piapi_ledger_row r = { .ts = ts, .input = in, .output = out, .status = 200,
                                  .complete = 1, .priced = 1, .cost_usd = 0.001 };
    snprintf(r.request_id, sizeof r.request_id, "req-%.0f-%s", ts * 1000, user);
    snprintf(r.user, sizeof r.user, "%s", user);
    snprintf(r.service_type, sizeof r.service_type, "%s", service);
    snprintf(r.provider, sizeof r.provider, "%s", strcmp(service, "cc") ? "openai" : "anthropic");
    snprintf(r.key_name, sizeof r.key_name, "main");
    snprintf(r.model, sizeof r.model, "%s", model);
    return r;
}

static sqlite3 *reader(const char *path)
{
    sqlite3 *db = NULL;
    CU_ASSERT_FATAL(sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK);
    sqlite3_busy_timeout(db, 5000);
    return db;
}

/* One integer from a query on a connection of our own; -1 on error. */
static int64_t query_int(const char *path, const char *sql)
{
    sqlite3 *db = reader(path);
    sqlite3_stmt *st = NULL;
    int64_t v = -1;

    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW)
        v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    sqlite3_close(db);
    return v;
}

static int64_t count_rows(const char *path)
{
    return query_int(path, "SELECT COUNT(*) FROM requests");
}

struct captured {
    char *out, *err;
    size_t out_len, err_len;
    int rc;
};

/* Runs piapi usage with argv (NULL-terminated, "usage" first). */
static struct captured report(const char *path, const char *const *args)
{
    struct captured c = {0};
    char *argv[16];
    int argc = 0;

    while (args[argc] && argc < 15) {
        argv[argc] = (char *)args[argc];
        argc++;
    }
    argv[argc] = NULL;
    FILE *out = open_memstream(&c.out, &c.out_len);
    FILE *err = open_memstream(&c.err, &c.err_len);
    c.rc = piapi_usage_report(path, argc, argv, out, err);
    fclose(out);
    fclose(err);
    return c;
}

static void captured_free(struct captured *c)
{
    free(c->out);
    free(c->err);
}

/* ---- writing ------------------------------------------------------------- */

static void test_rows_read_back_exactly(void)
{
    setup();
    struct piapi_ledger_row a = make_row(1772323200.125, "alice", "cc", "claude-sonnet-4-5", 1234, 567);
    a.cache_read = 89012;
    a.cache_write = 3456;
    a.cache_write_1h = 1200;
    a.cost_usd = 0.123456789;
    snprintf(a.request_id, sizeof a.request_id, "%s", "0123456789abcdef0123456789abcdef"
             "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
             "0123456789abcdef");  /* 128 characters, the longest */
    struct piapi_ledger_row b = make_row(1772323201.5, "bob \"o'neil\"", "cx", "", 0, 0);
    b.priced = 0;
    b.cost_usd = 9.0;           /* ignored: not priced */
    b.status = 502;
    b.complete = 0;
    uint64_t errors = piapi_ledger_errors();

    CU_ASSERT_EQUAL_FATAL(piapi_ledger_open(db_path), 0);
    piapi_ledger_record(&a);
    piapi_ledger_record(&b);
    piapi_ledger_flush();

    sqlite3 *db = reader(db_path);
    sqlite3_stmt *st = NULL;
    CU_ASSERT_FATAL(sqlite3_prepare_v2(db,
        "SELECT ts, request_id, user, service_type, provider, key_name, model, input,"
        " output, cache_read, cache_write, cache_write_1h, cost_usd, status, complete"
        " FROM requests ORDER BY id", -1, &st, NULL) == SQLITE_OK);
    const struct piapi_ledger_row *want[] = { &a, &b };
    for (int i = 0; i < 2; i++) {
        const struct piapi_ledger_row *w = want[i];
        CU_ASSERT_EQUAL_FATAL(sqlite3_step(st), SQLITE_ROW);
        CU_ASSERT(sqlite3_column_double(st, 0) == w->ts);
        CU_ASSERT_STRING_EQUAL((const char *)sqlite3_column_text(st, 1), w->request_id);
        CU_ASSERT_STRING_EQUAL((const char *)sqlite3_column_text(st, 2), w->user);
        CU_ASSERT_STRING_EQUAL((const char *)sqlite3_column_text(st, 3), w->service_type);
        CU_ASSERT_STRING_EQUAL((const char *)sqlite3_column_text(st, 4), w->provider);
        CU_ASSERT_STRING_EQUAL((const char *)sqlite3_column_text(st, 5), w->key_name);
        CU_ASSERT_STRING_EQUAL((const char *)sqlite3_column_text(st, 6), w->model);
        CU_ASSERT_EQUAL(sqlite3_column_int64(st, 7), w->input);
        CU_ASSERT_EQUAL(sqlite3_column_int64(st, 8), w->output);
        CU_ASSERT_EQUAL(sqlite3_column_int64(st, 9), w->cache_read);
        CU_ASSERT_EQUAL(sqlite3_column_int64(st, 10), w->cache_write);
        CU_ASSERT_EQUAL(sqlite3_column_int64(st, 11), w->cache_write_1h);
        if (w->priced) {
            CU_ASSERT(sqlite3_column_double(st, 12) == w->cost_usd);
        } else {
            CU_ASSERT_EQUAL(sqlite3_column_type(st, 12), SQLITE_NULL);
        }
        CU_ASSERT_EQUAL(sqlite3_column_int(st, 13), w->status);
        CU_ASSERT_EQUAL(sqlite3_column_int(st, 14), w->complete);
    }
    CU_ASSERT_EQUAL(sqlite3_step(st), SQLITE_DONE);
    sqlite3_finalize(st);
    sqlite3_close(db);

    CU_ASSERT_EQUAL(query_int(db_path, "PRAGMA user_version"), PIAPI_LEDGER_SCHEMA);
    CU_ASSERT_EQUAL(query_int(db_path, "SELECT journal_mode = 'wal' FROM pragma_journal_mode"), 1);
    CU_ASSERT_EQUAL(query_int(db_path, "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index'"
                                       " AND tbl_name = 'requests'"), 1);
    CU_ASSERT_EQUAL(piapi_ledger_errors(), errors);
    struct stat st_db;
    CU_ASSERT_FATAL(stat(db_path, &st_db) == 0);
    CU_ASSERT_EQUAL(st_db.st_mode & 0007, 0);   /* no access for every user */
    teardown();
}

/* A string filling its array without a terminator is cut, not overread. */
static void test_unterminated_strings_are_cut(void)
{
    setup();
    struct piapi_ledger_row r = make_row(day(0), "x", "cc", "m", 1, 1);
    memset(r.model, 'm', sizeof r.model);
    CU_ASSERT_EQUAL_FATAL(piapi_ledger_open(db_path), 0);
    piapi_ledger_record(&r);
    piapi_ledger_flush();
    CU_ASSERT_EQUAL(query_int(db_path, "SELECT length(model) FROM requests"),
                    (int64_t)sizeof r.model - 1);
    teardown();
}

static void test_record_without_ledger_is_a_noop(void)
{
    struct piapi_ledger_row r = make_row(day(0), "alice", "cc", "m", 1, 1);
    uint64_t errors = piapi_ledger_errors();

    piapi_ledger_record(&r);
    piapi_ledger_flush();
    piapi_ledger_close();
    piapi_ledger_close();
    CU_ASSERT_EQUAL(piapi_ledger_errors(), errors);
}

/* BATCH_SOON rows are written without waiting for the half-second. */
static void test_many_rows_are_written_sooner(void)
{
    setup();
    CU_ASSERT_EQUAL_FATAL(piapi_ledger_open(db_path), 0);
    struct piapi_ledger_row r = make_row(day(0), "alice", "cc", "m", 1, 1);
    double t0 = piapi_now_mono();
    for (int i = 0; i < 1024; i++)
        piapi_ledger_record(&r);
    int64_t n = 0;
    while (piapi_now_mono() - t0 < 0.4 && (n = count_rows(db_path)) != 1024)
        sleep_ms(10);
    CU_ASSERT_EQUAL(n, 1024);
    /* and a single row waits for the linger, then lands */
    piapi_ledger_record(&r);
    CU_ASSERT_EQUAL(count_rows(db_path), 1024);
    piapi_ledger_flush();
    CU_ASSERT_EQUAL(count_rows(db_path), 1025);
    teardown();
}

/* The crash bound: a row recorded and never flushed is committed (visible
 * to another connection, so a SIGKILL now would keep it) within a second. */
static void test_row_committed_within_a_second(void)
{
    setup();
    CU_ASSERT_EQUAL_FATAL(piapi_ledger_open(db_path), 0);
    struct piapi_ledger_row r = make_row(day(0), "alice", "cc", "m", 1, 1);
    piapi_ledger_record(&r);
    sleep_ms(1200);
    CU_ASSERT_EQUAL(count_rows(db_path), 1);
    teardown();
}

static void test_close_and_reopen_keep_the_rows(void)
{
    setup();
    struct piapi_ledger_row r = make_row(day(0), "alice", "cc", "m", 1, 1);

    CU_ASSERT_EQUAL_FATAL(piapi_ledger_open(db_path), 0);
    for (int i = 0; i < 3; i++)
        piapi_ledger_record(&r);
    piapi_ledger_close();           /* no flush: close writes what is queued */
    CU_ASSERT_EQUAL(count_rows(db_path), 3);
    CU_ASSERT_EQUAL_FATAL(piapi_ledger_open(db_path), 0);
    for (int i = 0; i < 2; i++)
        piapi_ledger_record(&r);
    piapi_ledger_close();
    char wal[160];
    snprintf(wal, sizeof wal, "%s-wal", db_path);
    CU_ASSERT(access(wal, F_OK) != 0);  /* checkpointed into the file at close */
    CU_ASSERT_EQUAL(count_rows(db_path), 5);
    teardown();
}

static void test_same_path_stays_other_path_switches(void)
{
    setup();
    char other[160];
    snprintf(other, sizeof other, "%s/other.db", dir);
    struct piapi_ledger_row r = make_row(day(0), "alice", "cc", "m", 1, 1);

    CU_ASSERT_EQUAL_FATAL(piapi_ledger_open(db_path), 0);
    piapi_ledger_record(&r);
    piapi_ledger_record(&r);
    CU_ASSERT_EQUAL(piapi_ledger_open(db_path), 0);     /* stays, keeps its queue */
    CU_ASSERT_EQUAL(piapi_ledger_open(other), 0);       /* the queue goes to the old one */
    for (int i = 0; i < 3; i++)
        piapi_ledger_record(&r);
    piapi_ledger_flush();
    CU_ASSERT_EQUAL(count_rows(db_path), 2);
    CU_ASSERT_EQUAL(count_rows(other), 3);
    CU_ASSERT_EQUAL(piapi_ledger_open(NULL), 0);        /* closes */
    piapi_ledger_record(&r);
    CU_ASSERT_EQUAL(count_rows(other), 3);
    teardown();
}

#define THREADS 8
#define PER_THREAD 500

static void *record_many(void *arg)
{
    char name[16];
    snprintf(name, sizeof name, "user%ld", (long)(intptr_t)arg);
    struct piapi_ledger_row r = make_row(day(0), name, "cc", "m", 1, 2);
    for (int i = 0; i < PER_THREAD; i++) {
        r.input = i;
        piapi_ledger_record(&r);
    }
    return NULL;
}

static void test_rows_from_many_threads_all_land(void)
{
    setup();
    pthread_t t[THREADS];
    uint64_t errors = piapi_ledger_errors();

    CU_ASSERT_EQUAL_FATAL(piapi_ledger_open(db_path), 0);
    for (long i = 0; i < THREADS; i++)
        CU_ASSERT_FATAL(pthread_create(&t[i], NULL, record_many, (void *)(intptr_t)i) == 0);
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);
    piapi_ledger_flush();
    CU_ASSERT_EQUAL(count_rows(db_path), THREADS * PER_THREAD);
    /* every thread's rows, each exactly once */
    CU_ASSERT_EQUAL(query_int(db_path, "SELECT COUNT(*) FROM (SELECT user, input FROM requests"
                                       " GROUP BY user, input HAVING COUNT(*) = 1)"),
                    THREADS * PER_THREAD);
    CU_ASSERT_EQUAL(query_int(db_path, "SELECT COUNT(DISTINCT user) FROM requests"), THREADS);
    CU_ASSERT_EQUAL(piapi_ledger_errors(), errors);
    teardown();
}

/* ---- failures --------------------------------------------------------------- */

static int count_log_lines(const char *path, const char *msg)
{
    FILE *f = fopen(path, "r");
    char *line = NULL;
    size_t cap = 0;
    int n = 0;

    if (!f)
        return 0;
    while (getline(&line, &cap, f) > 0) {
        cJSON *j = cJSON_Parse(line);
        const cJSON *m = cJSON_GetObjectItemCaseSensitive(j, "msg");
        n += cJSON_IsString(m) && strcmp(m->valuestring, msg) == 0;
        cJSON_Delete(j);
    }
    free(line);
    fclose(f);
    return n;
}

/* A directory that does not exist: open fails, every row is counted as
 * lost, recording never waits, and the outage is logged once. */
static void test_unopenable_database_counts_and_never_blocks(void)
{
    setup();
    char bad[160], log_path[160];
    snprintf(bad, sizeof bad, "%s/missing-dir/usage.db", dir);
    snprintf(log_path, sizeof log_path, "%s/log.jsonl", dir);
    CU_ASSERT_EQUAL_FATAL(piapi_log_open(log_path, PIAPI_LOG_INFO), 0);
    uint64_t errors = piapi_ledger_errors();

    CU_ASSERT_EQUAL(piapi_ledger_open(bad), -1);
    CU_ASSERT_EQUAL(piapi_ledger_errors(), errors + 1);
    struct piapi_ledger_row r = make_row(day(0), "alice", "cc", "m", 1, 1);
    double t0 = piapi_now_mono();
    for (int i = 0; i < 1000; i++)
        piapi_ledger_record(&r);
    CU_ASSERT(piapi_now_mono() - t0 < 0.5);
    piapi_ledger_flush();
    for (int i = 0; i < 10; i++)
        piapi_ledger_record(&r);
    piapi_ledger_flush();
    CU_ASSERT_EQUAL(piapi_ledger_errors(), errors + 1 + 1010);
    CU_ASSERT_EQUAL(count_log_lines(log_path, "usage db cannot be opened; retrying every 5 s, "
                                              "rows are dropped meanwhile"), 1);
    piapi_ledger_close();
    piapi_log_close();
    teardown();
}

/* Writes failing after the open (here a trigger refuses every insert, as a
 * full disk would): the batch is lost and counted, and the writer carries
 * on once the database takes rows again. */
static void test_write_errors_counted_writer_carries_on(void)
{
    setup();
    struct piapi_ledger_row r = make_row(day(0), "alice", "cc", "m", 1, 1);
    uint64_t errors = piapi_ledger_errors();
    sqlite3 *db = NULL;

    CU_ASSERT_EQUAL_FATAL(piapi_ledger_open(db_path), 0);
    CU_ASSERT_FATAL(sqlite3_open(db_path, &db) == SQLITE_OK);
    CU_ASSERT(sqlite3_exec(db, "CREATE TRIGGER refuse BEFORE INSERT ON requests"
                               " BEGIN SELECT RAISE(ABORT, 'disk says no'); END",
                           NULL, NULL, NULL) == SQLITE_OK);
    for (int i = 0; i < 5; i++)
        piapi_ledger_record(&r);
    piapi_ledger_flush();
    CU_ASSERT_EQUAL(piapi_ledger_errors(), errors + 5);
    CU_ASSERT_EQUAL(count_rows(db_path), 0);
    CU_ASSERT(sqlite3_exec(db, "DROP TRIGGER refuse", NULL, NULL, NULL) == SQLITE_OK);
    sqlite3_close(db);
    for (int i = 0; i < 3; i++)
        piapi_ledger_record(&r);
    piapi_ledger_flush();
    CU_ASSERT_EQUAL(count_rows(db_path), 3);
    CU_ASSERT_EQUAL(piapi_ledger_errors(), errors + 5);
    teardown();
}

/* The database held by someone else's write transaction: the writer
 * waits in its busy timeout with the first row, the queue fills to its
 * bound (8192 rows), rows past it are dropped and counted at once, and no
 * recorder ever waits. Once the lock is gone everything queued lands. */
static void test_full_queue_drops_and_counts(void)
{
    setup();
    struct piapi_ledger_row r = make_row(day(0), "alice", "cc", "m", 1, 1);
    uint64_t errors = piapi_ledger_errors();
    sqlite3 *db = NULL;
    enum { QUEUE = 8192, EXTRA = 100 };

    CU_ASSERT_EQUAL_FATAL(piapi_ledger_open(db_path), 0);
    CU_ASSERT_FATAL(sqlite3_open(db_path, &db) == SQLITE_OK);
    CU_ASSERT_FATAL(sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL) == SQLITE_OK);
    piapi_ledger_record(&r);
    sleep_ms(1500);             /* the writer took it (0.5 s) and waits for the lock */
    double t0 = piapi_now_mono();
    for (int i = 0; i < QUEUE + EXTRA; i++)
        piapi_ledger_record(&r);
    CU_ASSERT(piapi_now_mono() - t0 < 1.0);
    CU_ASSERT_EQUAL(piapi_ledger_errors() - errors, EXTRA);
    CU_ASSERT(sqlite3_exec(db, "COMMIT", NULL, NULL, NULL) == SQLITE_OK);
    sqlite3_close(db);
    piapi_ledger_flush();
    CU_ASSERT_EQUAL(count_rows(db_path), 1 + QUEUE);
    CU_ASSERT_EQUAL(piapi_ledger_errors() - errors, EXTRA);
    teardown();
}

/* ---- reading ---------------------------------------------------------------- */

/* The report's data set: three days, three members, two services, three
 * models (one unknown), priced and unpriced, complete and not. */
static void record_dataset(void)
{
    struct piapi_ledger_row r[5];

    r[0] = make_row(day(0) + 10, "alice", "cc", "claude-sonnet-4-5", 100, 20);
    r[0].cache_read = 1000, r[0].cache_write = 50, r[0].cache_write_1h = 10, r[0].cost_usd = 0.0125;
    r[1] = make_row(day(0) + 3600, "bob", "cx", "gpt-4o", 200, 40);
    r[1].cost_usd = 0.003;
    r[2] = make_row(day(1) + 5, "alice", "cx", "gpt-4o", 300, 60);
    r[2].cache_read = 100, r[2].cost_usd = 0.0045, r[2].complete = 0;
    r[3] = make_row(day(1) + 7200, "carol", "cc", "claude-sonnet-4-5", 400, 80);
    r[3].cache_write = 500, r[3].cache_write_1h = 500, r[3].priced = 0, r[3].status = 500;
    r[4] = make_row(day(2) + 1, "alice", "cc", "", 5, 0);
    r[4].priced = 0, r[4].status = 502, r[4].complete = 0;
    CU_ASSERT_EQUAL_FATAL(piapi_ledger_open(db_path), 0);
    for (int i = 0; i < 5; i++)
        piapi_ledger_record(&r[i]);
    piapi_ledger_flush();
}

struct expect {
    const char *group;
    double requests, input, output, cache_read, cache_write, cache_write_1h, cost_usd,
           incomplete, unpriced;
};

static void check_sums(const cJSON *o, const struct expect *e)
{
    static const char *const keys[] = { "requests", "input", "output", "cache_read",
        "cache_write", "cache_write_1h", "cost_usd", "incomplete", "unpriced" };
    const double *want = &e->requests;

    for (size_t k = 0; k < sizeof keys / sizeof keys[0]; k++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, keys[k]);
        CU_ASSERT_FATAL(cJSON_IsNumber(v));
        if (fabs(v->valuedouble - want[k]) > 1e-9) {
            printf("\n  %s %s: got %.9f, want %.9f\n", e->group ? e->group : "total",
                   keys[k], v->valuedouble, want[k]);
            CU_FAIL("sum differs");
        }
    }
}

static const struct expect total_all = { NULL, 5, 1005, 200, 1100, 550, 510, 0.02, 2, 2 };

static const struct {
    const char *by;
    struct expect groups[4];
} by_cases[] = {
    { "user", {
        { "alice", 3, 405, 80, 1100, 50, 10, 0.017, 2, 1 },
        { "bob", 1, 200, 40, 0, 0, 0, 0.003, 0, 0 },
        { "carol", 1, 400, 80, 0, 500, 500, 0, 0, 1 } } },
    { "model", {
        { "", 1, 5, 0, 0, 0, 0, 0, 1, 1 },
        { "claude-sonnet-4-5", 2, 500, 100, 1000, 550, 510, 0.0125, 0, 1 },
        { "gpt-4o", 2, 500, 100, 100, 0, 0, 0.0075, 1, 0 } } },
    { "service", {
        { "cc", 3, 505, 100, 1000, 550, 510, 0.0125, 1, 2 },
        { "cx", 2, 500, 100, 100, 0, 0, 0.0075, 1, 0 } } },
    { "day", {
        { "2026-03-01", 2, 300, 60, 1000, 50, 10, 0.0155, 0, 0 },
        { "2026-03-02", 2, 700, 140, 100, 500, 500, 0.0045, 1, 1 },
        { "2026-03-03", 1, 5, 0, 0, 0, 0, 0, 1, 1 } } },
};

static void test_report_json_groups_by_each_key(void)
{
    setup();
    record_dataset();
    for (size_t c = 0; c < sizeof by_cases / sizeof by_cases[0]; c++) {
        const char *args[] = { "usage", "--by", by_cases[c].by, "--json", NULL };
        struct captured out = report(db_path, args);   /* while the writer has it open */
        CU_ASSERT_EQUAL(out.rc, 0);
        CU_ASSERT_EQUAL(out.err_len, 0);
        cJSON *j = cJSON_Parse(out.out);
        CU_ASSERT_FATAL(j != NULL);
        CU_ASSERT_STRING_EQUAL(cJSON_GetObjectItem(j, "by")->valuestring, by_cases[c].by);
        CU_ASSERT(cJSON_IsNull(cJSON_GetObjectItem(j, "since")));
        CU_ASSERT(cJSON_IsNull(cJSON_GetObjectItem(j, "until")));
        const cJSON *groups = cJSON_GetObjectItem(j, "groups");
        int n = 0;
        while (n < 4 && by_cases[c].groups[n].group)
            n++;
        CU_ASSERT_EQUAL_FATAL(cJSON_GetArraySize(groups), n);
        for (int g = 0; g < n; g++) {
            const cJSON *o = cJSON_GetArrayItem(groups, g);
            CU_ASSERT_STRING_EQUAL(cJSON_GetObjectItem(o, "group")->valuestring,
                                   by_cases[c].groups[g].group);
            check_sums(o, &by_cases[c].groups[g]);
        }
        check_sums(cJSON_GetObjectItem(j, "total"), &total_all);
        cJSON_Delete(j);
        captured_free(&out);
    }
    teardown();
}

static void test_report_table_is_aligned(void)
{
    setup();
    record_dataset();
    const char *args[] = { "usage", NULL };
    struct captured out = report(db_path, args);
    CU_ASSERT_EQUAL(out.rc, 0);
    CU_ASSERT_STRING_EQUAL(out.out,
        "user   requests  input  output  cache_read  cache_write  cache_write_1h  cost_usd  incomplete\n"
        "alice         3    405      80        1100           50              10  0.017000           2\n"
        "bob           1    200      40           0            0               0  0.003000           0\n"
        "carol         1    400      80           0          500             500  0.000000           0\n"
        "TOTAL         5   1005     200        1100          550             510  0.020000           2\n"
        "(2 of these requests had no known price: counted as 0 cost)\n");
    captured_free(&out);

    const char *by_model[] = { "usage", "--by=model", NULL };
    out = report(db_path, by_model);
    CU_ASSERT_EQUAL(out.rc, 0);
    CU_ASSERT_STRING_EQUAL(out.out,
        "model              requests  input  output  cache_read  cache_write  cache_write_1h  cost_usd  incomplete\n"
        "(none)                    1      5       0           0            0               0  0.000000           1\n"
        "claude-sonnet-4-5         2    500     100        1000          550             510  0.012500           0\n"
        "gpt-4o                    2    500     100         100            0               0  0.007500           1\n"
        "TOTAL                     5   1005     200        1100          550             510  0.020000           2\n"
        "(2 of these requests had no known price: counted as 0 cost)\n");
    captured_free(&out);
    teardown();
}

/* --since and --until take whole UTC days, both inclusive. */
static void test_report_day_bounds_are_inclusive(void)
{
    setup();
    static const double offsets[] = { -0.001, 0, 86399.999, 86400 };  /* around day 0 */
    CU_ASSERT_EQUAL_FATAL(piapi_ledger_open(db_path), 0);
    for (size_t i = 0; i < 4; i++) {
        struct piapi_ledger_row r = make_row(day(0) + offsets[i], "alice", "cc", "m",
                                             1 << i, 0);
        piapi_ledger_record(&r);
    }
    piapi_ledger_flush();
    static const struct {
        const char *since, *until;
        double input;           /* bit i: row i counted */
    } cases[] = {
        { "2026-03-01", "2026-03-01", 2 + 4 },
        { "2026-03-01", NULL, 2 + 4 + 8 },
        { NULL, "2026-03-01", 1 + 2 + 4 },
        { "2026-02-28", "2026-02-28", 1 },
        { "2026-03-02", "2026-03-31", 8 },
        { NULL, NULL, 15 },
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const char *args[8] = { "usage", "--json" };
        int n = 2;
        if (cases[c].since)
            args[n++] = "--since", args[n++] = cases[c].since;
        if (cases[c].until)
            args[n++] = "--until", args[n++] = cases[c].until;
        struct captured out = report(db_path, args);
        CU_ASSERT_EQUAL(out.rc, 0);
        cJSON *j = cJSON_Parse(out.out);
        CU_ASSERT_FATAL(j != NULL);
        const cJSON *t = cJSON_GetObjectItem(j, "total");
        CU_ASSERT_EQUAL(cJSON_GetObjectItem(t, "input")->valuedouble, cases[c].input);
        const cJSON *since = cJSON_GetObjectItem(j, "since");
        if (cases[c].since) {
            CU_ASSERT(cJSON_IsString(since) && strcmp(since->valuestring, cases[c].since) == 0);
        }
        cJSON_Delete(j);
        captured_free(&out);
    }
    teardown();
}

static void test_report_bad_arguments(void)
{
    static const char *const cases[][6] = {
        { "usage", "--by", "member" },
        { "usage", "--by" },
        { "usage", "--since", "2026-13-01" },
        { "usage", "--since", "2026-02-29" },       /* not a leap year */
        { "usage", "--until", "2026-3-01" },
        { "usage", "--until", "yesterday" },
        { "usage", "--since", "2026-03-02", "--until", "2026-03-01" },
        { "usage", "--bogus" },
        { "usage", "extra" },
        { "usage", "--jsonx" },
    };
    setup();
    record_dataset();
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        struct captured out = report(db_path, cases[c]);
        if (out.rc != 2)
            printf("\n  case %zu: exit %d\n", c, out.rc);
        CU_ASSERT_EQUAL(out.rc, 2);
        CU_ASSERT_EQUAL(out.out_len, 0);
        CU_ASSERT(out.err_len > 0 && strncmp(out.err, "piapi usage: ", 13) == 0);
        captured_free(&out);
    }
    const char *leap[] = { "usage", "--since", "2028-02-29", "--config", "x.yaml", NULL };
    struct captured out = report(db_path, leap);
    CU_ASSERT_EQUAL(out.rc, 0);
    captured_free(&out);
    const char *help[] = { "usage", "--help", NULL };
    out = report(db_path, help);
    CU_ASSERT_EQUAL(out.rc, 0);
    CU_ASSERT(strstr(out.out, "usage: piapi usage") != NULL);
    captured_free(&out);
    teardown();
}

static void test_report_missing_database(void)
{
    setup();
    const char *args[] = { "usage", NULL };
    struct captured out = report(db_path, args);        /* not created */
    CU_ASSERT_EQUAL(out.rc, 1);
    CU_ASSERT(strstr(out.err, db_path) != NULL);
    CU_ASSERT(strstr(out.err, "No such file") != NULL);
    CU_ASSERT_EQUAL(out.out_len, 0);
    captured_free(&out);
    out = report(NULL, args);                           /* no settings.usageDb */
    CU_ASSERT_EQUAL(out.rc, 1);
    CU_ASSERT(strstr(out.err, "settings.usageDb") != NULL);
    captured_free(&out);
    FILE *f = fopen(db_path, "w");                      /* not a database */
    fputs("hello, this is not SQLite\n", f);
    fclose(f);
    out = report(db_path, args);
    CU_ASSERT_EQUAL(out.rc, 1);
    CU_ASSERT(out.err_len > 0);
    captured_free(&out);
    teardown();
}

struct seen {
    int n;
    char users[4][16];
    struct piapi_usage_totals t[4];
};

static void collect(void *ud, const char *user, const struct piapi_usage_totals *t)
{
    struct seen *s = ud;
    if (s->n < 4) {
        snprintf(s->users[s->n], sizeof s->users[0], "%s", user);
        s->t[s->n] = *t;
    }
    s->n++;
}

static void test_sum_by_user_since(void)
{
    setup();
    struct seen s = {0};

    /* no file yet: no rows, no error */
    CU_ASSERT_EQUAL(piapi_ledger_sum_by_user(db_path, 0, collect, &s), 0);
    CU_ASSERT_EQUAL(s.n, 0);
    record_dataset();
    CU_ASSERT_EQUAL(piapi_ledger_sum_by_user(db_path, day(1) + 5, collect, &s), 0);
    CU_ASSERT_EQUAL_FATAL(s.n, 2);
    CU_ASSERT_STRING_EQUAL(s.users[0], "alice");    /* day 1 + 5 (since is inclusive), day 2 */
    CU_ASSERT_EQUAL(s.t[0].requests, 2);
    CU_ASSERT_EQUAL(s.t[0].input, 305);
    CU_ASSERT_EQUAL(s.t[0].output, 60);
    CU_ASSERT_EQUAL(s.t[0].cache_read, 100);
    CU_ASSERT_EQUAL(s.t[0].cache_write, 0);
    CU_ASSERT(fabs(s.t[0].cost_usd - 0.0045) < 1e-12);
    CU_ASSERT_STRING_EQUAL(s.users[1], "carol");
    CU_ASSERT_EQUAL(s.t[1].requests, 1);
    CU_ASSERT_EQUAL(s.t[1].input, 400);
    CU_ASSERT_EQUAL(s.t[1].cache_write, 500);
    CU_ASSERT_EQUAL(s.t[1].cache_write_1h, 500);
    CU_ASSERT(s.t[1].cost_usd == 0);                 /* unpriced */

    uint64_t errors = piapi_ledger_errors();
    CU_ASSERT_EQUAL(piapi_ledger_sum_by_user(dir, 0, collect, &s), -1);  /* a directory */
    CU_ASSERT_EQUAL(piapi_ledger_errors(), errors + 1);
    teardown();
}

static const struct unit_case tests[] = {
    { "rows are read back exactly", test_rows_read_back_exactly },
    { "unterminated strings are cut", test_unterminated_strings_are_cut },
    { "record without a ledger is a no-op", test_record_without_ledger_is_a_noop },
    { "many rows are written sooner", test_many_rows_are_written_sooner },
    { "a row is committed within a second", test_row_committed_within_a_second },
    { "close and reopen keep the rows", test_close_and_reopen_keep_the_rows },
    { "same path stays, another path switches", test_same_path_stays_other_path_switches },
    { "rows from many threads all land", test_rows_from_many_threads_all_land },
    { "unopenable database: counted, never blocks", test_unopenable_database_counts_and_never_blocks },
    { "write errors counted, the writer carries on", test_write_errors_counted_writer_carries_on },
    { "a full queue drops and counts", test_full_queue_drops_and_counts },
    { "report JSON groups by each key", test_report_json_groups_by_each_key },
    { "report table is aligned", test_report_table_is_aligned },
    { "report day bounds are inclusive", test_report_day_bounds_are_inclusive },
    { "report bad arguments exit 2", test_report_bad_arguments },
    { "report missing database exits 1", test_report_missing_database },
    { "sum_by_user since", test_sum_by_user_since },
    { NULL, NULL },
};

UNIT_MAIN("ledger", tests)
