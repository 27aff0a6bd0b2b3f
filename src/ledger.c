/* The usage ledger. Request threads (and the event loop) copy a row into a
 * queue under a mutex; one writer thread owns the SQLite connection and
 * commits the queue in one transaction per batch, half a second after the
 * first row of the batch arrived or as soon as BATCH_SOON rows wait. The
 * path is switched by the writer too (open() asks and waits), so rows
 * recorded before a switch land in the database they were recorded for,
 * and every SQLite call of the writing connection happens on one thread.
 *
 * Failures never reach a request: a database that cannot be opened is
 * logged once per outage and retried at most every RETRY_OPEN_S while its
 * rows are dropped; a failed batch is rolled back and its rows counted as
 * lost. Everything lost is counted in piapi_ledger_errors(). */
#include "ledger_int.h"
#include "piapi/log.h"
#include "piapi/util.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define QUEUE_MAX 8192          /* ~6 MiB of rows: seconds of a stalled disk */
#define BATCH_SOON 1024         /* this many waiting: write now */
#define LINGER_S 0.5            /* the longest a row waits for its commit */
#define RETRY_OPEN_S 5.0
#define ERROR_LOG_S 10.0        /* at most one line about lost rows this often */
#define BUSY_TIMEOUT_MS 5000    /* a reader's checkpoint or another writer */

/* Version 1. Later versions migrate from PRAGMA user_version upwards.
 * cost_usd is NULL for a request no price was known for. */
static const char schema_v1[] =
    "CREATE TABLE requests ("
    " id INTEGER PRIMARY KEY,"
    " ts REAL NOT NULL,"
    " request_id TEXT NOT NULL,"
    " user TEXT NOT NULL,"
    " service_type TEXT NOT NULL,"
    " provider TEXT NOT NULL,"
    " key_name TEXT NOT NULL,"
    " model TEXT NOT NULL,"
    " input INTEGER NOT NULL,"
    " output INTEGER NOT NULL,"
    " cache_read INTEGER NOT NULL,"
    " cache_write INTEGER NOT NULL,"
    " cache_write_1h INTEGER NOT NULL,"
    " cost_usd REAL,"
    " status INTEGER NOT NULL,"
    " complete INTEGER NOT NULL);"
    "CREATE INDEX requests_ts ON requests(ts);"
    "PRAGMA user_version = 1;";

static const char insert_sql[] =
    "INSERT INTO requests (ts, request_id, user, service_type, provider, key_name,"
    " model, input, output, cache_read, cache_write, cache_write_1h, cost_usd,"
    " status, complete) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)";

static _Atomic uint64_t ledger_errors;
/* record()'s check without the lock while no ledger is configured. */
static _Atomic int accepting;

/* Shared between recorders, open/flush/close and the writer. */
static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;            /* to the writer (CLOCK_MONOTONIC) */
    pthread_cond_t done;            /* from the writer: a batch or switch handled */
    pthread_t thread;
    int running;                    /* the writer thread exists */
    int stop;
    struct piapi_ledger_row *queue;
    size_t len, cap;
    double first_at;                /* monotonic arrival of queue[0] */
    uint64_t dropped;               /* queue full since the writer last looked (counted) */
    uint64_t accepted, handled;     /* rows queued / written or lost, ever */
    uint64_t flush_upto;            /* write up to this row now */
    uint64_t switch_asked, switch_done;
    char *switch_path;              /* owned here until the writer takes it */
    int db_open;                    /* the writer's database is open */
} L = { .lock = PTHREAD_MUTEX_INITIALIZER };

/* Serialises open and close, and owns the path they compare against. */
static pthread_mutex_t ctl_lock = PTHREAD_MUTEX_INITIALIZER;
static char *ctl_path;

/* The writer thread's own state: only it touches this. */
struct sink {
    sqlite3 *db;
    sqlite3_stmt *insert;
    char *path;                     /* NULL: no ledger */
    double last_try;                /* monotonic time of the last open */
    int failing;                    /* the outage was logged: log the recovery */
    uint64_t lost_unlogged;
    double next_log;                /* monotonic time the next loss may be logged */
};

/* ---- SQLite helpers (fill err, never log) --------------------------------- */

static void db_error(sqlite3 *db, int rc, char *err, size_t errlen)
{
    snprintf(err, errlen, "%s", db ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
}

static int db_exec(sqlite3 *db, const char *sql, char *err, size_t errlen)
{
    int rc = sqlite3_exec(db, sql, NULL, NULL, NULL);
    if (rc != SQLITE_OK) {
        db_error(db, rc, err, errlen);
        return -1;
    }
    return 0;
}

static int db_user_version(sqlite3 *db, int *version, char *err, size_t errlen)
{
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &st, NULL);
    if (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        *version = sqlite3_column_int(st, 0);
        sqlite3_finalize(st);
        return 0;
    }
    db_error(db, rc, err, errlen);
    sqlite3_finalize(st);
    return -1;
}

/* Creates the schema in a fresh file; refuses a newer one, whose columns
 * this piapi does not know. BEGIN IMMEDIATE: two piapi starting on one file
 * must not both create it. */
static int db_migrate(sqlite3 *db, char *err, size_t errlen)
{
    int version;

    if (db_exec(db, "BEGIN IMMEDIATE", err, errlen) != 0)
        return -1;
    if (db_user_version(db, &version, err, errlen) != 0)
        goto fail;
    if (version > PIAPI_LEDGER_SCHEMA) {
        snprintf(err, errlen, "ledger schema version %d is newer than this piapi's (%d)",
                 version, PIAPI_LEDGER_SCHEMA);
        goto fail;
    }
    if (version == 0 && db_exec(db, schema_v1, err, errlen) != 0)
        goto fail;
    if (db_exec(db, "COMMIT", err, errlen) != 0)
        goto fail;
    return 0;
fail:
    sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
    return -1;
}

int piapi_ledger_check_path(const char *path)
{
    struct stat sb;
    if (stat(path, &sb) != 0)
        return errno == ENOENT ? 0 : -1;
    if (S_ISREG(sb.st_mode))
        return 0;
    errno = S_ISDIR(sb.st_mode) ? EISDIR : EINVAL;
    return -1;
}

static void path_error(char *err, size_t errlen)
{
    snprintf(err, errlen, "%s", errno == EINVAL ? "not a regular file" : strerror(errno));
}

/* WAL: readers (piapi usage) never block the writer nor it them.
 * synchronous=NORMAL: a commit is safe from a crash of the process without
 * an fsync; only a power loss can take the last commits. */
static int db_open_writer(const char *path, sqlite3 **dbp, sqlite3_stmt **insp,
                          char *err, size_t errlen)
{
    sqlite3 *db = NULL;
    sqlite3_stmt *ins = NULL;
    if (piapi_ledger_check_path(path) != 0) {
        path_error(err, errlen);
        return -1;
    }
    /* Member names and their spending are nobody else's business: a new
     * file is made 0640 (SQLite gives its -wal and -shm the same mode),
     * not SQLite's 0644. Errors are SQLite's to report. */
    int fd = open(path, O_RDONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0640);
    if (fd >= 0)
        close(fd);
    int rc = sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE |
                             SQLITE_OPEN_NOMUTEX, NULL);
    if (rc != SQLITE_OK) {
        db_error(db, rc, err, errlen);
        goto fail;
    }
    sqlite3_busy_timeout(db, BUSY_TIMEOUT_MS);
    if (db_exec(db, "PRAGMA journal_mode=WAL", err, errlen) != 0 ||
        db_exec(db, "PRAGMA synchronous=NORMAL", err, errlen) != 0 ||
        db_migrate(db, err, errlen) != 0)
        goto fail;
    rc = sqlite3_prepare_v3(db, insert_sql, -1, SQLITE_PREPARE_PERSISTENT, &ins, NULL);
    if (rc != SQLITE_OK) {
        db_error(db, rc, err, errlen);
        goto fail;
    }
    *dbp = db;
    *insp = ins;
    return 0;
fail:
    sqlite3_close(db);
    return -1;
}

static int bind_row(sqlite3_stmt *st, const struct piapi_ledger_row *r)
{
    int i = 1, rc = SQLITE_OK;

    rc |= sqlite3_bind_double(st, i++, r->ts);
    rc |= sqlite3_bind_text(st, i++, r->request_id, -1, SQLITE_STATIC);
    rc |= sqlite3_bind_text(st, i++, r->user, -1, SQLITE_STATIC);
    rc |= sqlite3_bind_text(st, i++, r->service_type, -1, SQLITE_STATIC);
    rc |= sqlite3_bind_text(st, i++, r->provider, -1, SQLITE_STATIC);
    rc |= sqlite3_bind_text(st, i++, r->key_name, -1, SQLITE_STATIC);
    rc |= sqlite3_bind_text(st, i++, r->model, -1, SQLITE_STATIC);
    rc |= sqlite3_bind_int64(st, i++, r->input);
    rc |= sqlite3_bind_int64(st, i++, r->output);
    rc |= sqlite3_bind_int64(st, i++, r->cache_read);
    rc |= sqlite3_bind_int64(st, i++, r->cache_write);
    rc |= sqlite3_bind_int64(st, i++, r->cache_write_1h);
    rc |= r->priced ? sqlite3_bind_double(st, i++, r->cost_usd) : sqlite3_bind_null(st, i++);
    rc |= sqlite3_bind_int(st, i++, r->status);
    rc |= sqlite3_bind_int(st, i++, r->complete ? 1 : 0);
    return rc == SQLITE_OK ? 0 : -1;
}

/* One transaction; on any failure nothing of the batch stays. */
static int db_insert_all(sqlite3 *db, sqlite3_stmt *ins,
                         const struct piapi_ledger_row *rows, size_t n,
                         char *err, size_t errlen)
{
    if (db_exec(db, "BEGIN IMMEDIATE", err, errlen) != 0)
        return -1;
    for (size_t i = 0; i < n; i++) {
        int rc = bind_row(ins, &rows[i]) == 0 ? sqlite3_step(ins) : SQLITE_MISUSE;
        if (rc != SQLITE_DONE)
            db_error(db, rc, err, errlen);
        sqlite3_reset(ins);
        if (rc != SQLITE_DONE)
            goto fail;
    }
    if (db_exec(db, "COMMIT", err, errlen) != 0)
        goto fail;
    return 0;
fail:
    sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
    return -1;
}

/* ---- the writer's sink ------------------------------------------------------ */

static void sink_close(struct sink *s)
{
    sqlite3_finalize(s->insert);
    sqlite3_close(s->db);       /* checkpoints the WAL */
    s->insert = NULL;
    s->db = NULL;
}

static void log_path_line(enum piapi_log_level level, const char *msg, const char *path,
                          const char *error, int64_t rows_lost)
{
    struct piapi_log_line l;

    if (!piapi_log_begin(&l, level, msg))
        return;
    piapi_log_str(&l, "path", path);
    if (error)
        piapi_log_str(&l, "error", error);
    if (rows_lost >= 0)
        piapi_log_int(&l, "rows_lost", rows_lost);
    piapi_log_end(&l);
}

/* Logged once per outage: a request rate of lines would drown the log. */
static int sink_open(struct sink *s)
{
    char err[256];

    s->last_try = piapi_now_mono();
    if (db_open_writer(s->path, &s->db, &s->insert, err, sizeof err) == 0) {
        log_path_line(PIAPI_LOG_INFO, "usage db open", s->path, NULL,
                      s->failing ? (int64_t)s->lost_unlogged : -1);
        if (s->failing)
            s->lost_unlogged = 0;
        s->failing = 0;
        return 0;
    }
    atomic_fetch_add_explicit(&ledger_errors, 1, memory_order_relaxed);
    if (!s->failing)
        log_path_line(PIAPI_LOG_ERROR, "usage db cannot be opened; retrying every 5 s, "
                      "rows are dropped meanwhile", s->path, err, -1);
    s->failing = 1;
    return -1;
}

static void sink_switch(struct sink *s, char *path)
{
    sink_close(s);
    free(s->path);
    s->path = path;
    s->failing = 0;
    s->lost_unlogged = 0;
    if (path)
        sink_open(s);
}

/* Rows that will never be written, already counted. While the database is
 * down the outage line said it all (why NULL); other losses get a line at
 * most every ERROR_LOG_S, with what was lost since the last. */
static void sink_note_lost(struct sink *s, uint64_t n, const char *why)
{
    double now = piapi_now_mono();

    s->lost_unlogged += n;
    if (!why || now < s->next_log)
        return;
    log_path_line(PIAPI_LOG_ERROR, "usage rows not written", s->path ? s->path : "",
                  why, (int64_t)s->lost_unlogged);
    s->lost_unlogged = 0;
    s->next_log = now + ERROR_LOG_S;
}

static void sink_lost(struct sink *s, uint64_t n, const char *why)
{
    atomic_fetch_add_explicit(&ledger_errors, n, memory_order_relaxed);
    sink_note_lost(s, n, why);
}

static void sink_write(struct sink *s, const struct piapi_ledger_row *rows, size_t n)
{
    char err[256];

    if (!n)
        return;
    if (!s->db && s->path && piapi_now_mono() - s->last_try >= RETRY_OPEN_S)
        sink_open(s);
    if (!s->db) {
        sink_lost(s, n, NULL);
        return;
    }
    if (db_insert_all(s->db, s->insert, rows, n, err, sizeof err) != 0)
        sink_lost(s, n, err);
}

/* ---- the writer thread ------------------------------------------------------ */

static void deadline_ts(double at, struct timespec *ts)
{
    ts->tv_sec = (time_t)at;
    ts->tv_nsec = (long)((at - (double)ts->tv_sec) * 1e9);
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

/* Called with L.lock held. */
static int work_due(void)
{
    if (L.stop || L.switch_asked != L.switch_done)
        return 1;
    if (!L.len)
        return 0;
    return L.len >= BATCH_SOON || L.flush_upto > L.handled ||
           piapi_now_mono() >= L.first_at + LINGER_S;
}

static void wait_for_work(void)
{
    while (!work_due()) {
        if (L.len) {
            struct timespec until;
            deadline_ts(L.first_at + LINGER_S, &until);
            pthread_cond_timedwait(&L.wake, &L.lock, &until);
        } else {
            pthread_cond_wait(&L.wake, &L.lock);
        }
    }
}

static void *writer_main(void *arg)
{
    struct sink s = {0};
    struct piapi_ledger_row *batch = NULL;
    size_t batch_cap = 0;
    sigset_t all;

    (void)arg;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    pthread_mutex_lock(&L.lock);
    for (;;) {
        wait_for_work();
        /* Take the queue and give back the previous batch's array. */
        struct piapi_ledger_row *rows = L.queue;
        size_t n = L.len, cap = L.cap;
        L.queue = batch;
        L.cap = batch_cap;
        L.len = 0;
        batch = rows;
        batch_cap = cap;
        uint64_t dropped = L.dropped, gen = L.switch_asked;
        L.dropped = 0;
        char *path = NULL;
        int sw = gen != L.switch_done;
        if (sw) {
            path = L.switch_path;
            L.switch_path = NULL;
        }
        pthread_mutex_unlock(&L.lock);

        if (dropped)
            sink_note_lost(&s, dropped, "queue full: the database is slower than the requests");
        sink_write(&s, batch, n);
        if (sw)
            sink_switch(&s, path);

        pthread_mutex_lock(&L.lock);
        L.handled += n;
        L.switch_done = gen;
        L.db_open = s.db != NULL;
        pthread_cond_broadcast(&L.done);
        if (L.stop && !L.len && L.switch_asked == L.switch_done)
            break;
    }
    pthread_mutex_unlock(&L.lock);
    sink_switch(&s, NULL);
    free(batch);
    return NULL;
}

/* The wake condition waits on CLOCK_MONOTONIC: a clock step must not
 * delay (or hurry) a batch. */
static void init_once(void)
{
    pthread_condattr_t a;

    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(&L.wake, &a);
    pthread_condattr_destroy(&a);
    pthread_cond_init(&L.done, NULL);
}

/* Called with ctl_lock held. */
static int start_writer(void)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    int rc;

    pthread_once(&once, init_once);
    pthread_mutex_lock(&L.lock);
    L.stop = 0;
    rc = pthread_create(&L.thread, NULL, writer_main, NULL);
    L.running = rc == 0;
    pthread_mutex_unlock(&L.lock);
    if (rc != 0) {
        piapi_log_msg(PIAPI_LOG_ERROR, "usage ledger writer thread not started", "error",
                      strerror(rc));
        atomic_fetch_add_explicit(&ledger_errors, 1, memory_order_relaxed);
        return -1;
    }
    return 0;
}

/* Hands path to the writer and waits until it is open (or failed). Called
 * with ctl_lock held. */
static int switch_to(const char *path)
{
    pthread_mutex_lock(&L.lock);
    free(L.switch_path);
    L.switch_path = piapi_xstrdup(path);
    uint64_t gen = ++L.switch_asked;
    pthread_cond_signal(&L.wake);
    while (L.switch_done < gen)
        pthread_cond_wait(&L.done, &L.lock);
    int ok = L.db_open;
    pthread_mutex_unlock(&L.lock);
    return ok ? 0 : -1;
}

static void close_locked(void)
{
    pthread_mutex_lock(&L.lock);
    if (!L.running) {
        pthread_mutex_unlock(&L.lock);
        return;
    }
    atomic_store(&accepting, 0);
    L.stop = 1;
    pthread_cond_signal(&L.wake);
    pthread_mutex_unlock(&L.lock);
    pthread_join(L.thread, NULL);

    pthread_mutex_lock(&L.lock);
    L.running = 0;
    L.db_open = 0;
    free(L.queue);
    L.queue = NULL;
    L.len = L.cap = 0;
    pthread_cond_broadcast(&L.done);
    pthread_mutex_unlock(&L.lock);
    free(ctl_path);
    ctl_path = NULL;
}

int piapi_ledger_open(const char *path)
{
    int rc;

    if (!path) {
        piapi_ledger_close();
        return 0;
    }
    pthread_mutex_lock(&ctl_lock);
    if (ctl_path && strcmp(ctl_path, path) == 0) {
        pthread_mutex_lock(&L.lock);
        int open_now = L.db_open;
        pthread_mutex_unlock(&L.lock);
        if (open_now) {
            pthread_mutex_unlock(&ctl_lock);
            return 0;
        }
    }
    if (!ctl_path && start_writer() != 0) {
        pthread_mutex_unlock(&ctl_lock);
        return -1;
    }
    rc = switch_to(path);
    free(ctl_path);
    ctl_path = piapi_xstrdup(path);
    atomic_store(&accepting, 1);
    pthread_mutex_unlock(&ctl_lock);
    return rc;
}

void piapi_ledger_close(void)
{
    pthread_mutex_lock(&ctl_lock);
    close_locked();
    pthread_mutex_unlock(&ctl_lock);
}

/* Strings the caller did not terminate are cut at their array's end
 * rather than read past it. */
static void terminate_strings(struct piapi_ledger_row *r)
{
    r->request_id[sizeof r->request_id - 1] = '\0';
    r->user[sizeof r->user - 1] = '\0';
    r->service_type[sizeof r->service_type - 1] = '\0';
    r->provider[sizeof r->provider - 1] = '\0';
    r->key_name[sizeof r->key_name - 1] = '\0';
    r->model[sizeof r->model - 1] = '\0';
}

void piapi_ledger_record(const struct piapi_ledger_row *row)
{
    if (!atomic_load_explicit(&accepting, memory_order_relaxed))
        return;
    pthread_mutex_lock(&L.lock);
    if (!L.running || L.stop) {
        pthread_mutex_unlock(&L.lock);
        return;
    }
    if (L.len == QUEUE_MAX) {
        L.dropped++;            /* for the writer's log line */
        atomic_fetch_add_explicit(&ledger_errors, 1, memory_order_relaxed);
        pthread_mutex_unlock(&L.lock);
        return;
    }
    if (L.len == L.cap) {
        L.cap = L.cap ? L.cap * 2 : 64;
        L.queue = piapi_xrealloc(L.queue, L.cap * sizeof *L.queue);
    }
    L.queue[L.len] = *row;
    terminate_strings(&L.queue[L.len]);
    L.accepted++;
    /* The writer sleeps untimed while the queue is empty: the first row
     * starts its clock; BATCH_SOON rows cut the wait short. */
    if (++L.len == 1) {
        L.first_at = piapi_now_mono();
        pthread_cond_signal(&L.wake);
    } else if (L.len == BATCH_SOON) {
        pthread_cond_signal(&L.wake);
    }
    pthread_mutex_unlock(&L.lock);
}

void piapi_ledger_flush(void)
{
    pthread_mutex_lock(&L.lock);
    if (L.running) {
        uint64_t upto = L.accepted;
        if (upto > L.flush_upto)
            L.flush_upto = upto;
        pthread_cond_signal(&L.wake);
        while (L.running && L.handled < upto)
            pthread_cond_wait(&L.done, &L.lock);
    }
    pthread_mutex_unlock(&L.lock);
}

uint64_t piapi_ledger_errors(void)
{
    return atomic_load_explicit(&ledger_errors, memory_order_relaxed);
}

/* ---- reading ---------------------------------------------------------------- */

static const char sum_sql[] =
    "SELECT user, " LEDGER_SUM_COLUMNS
    " FROM requests WHERE ts >= ?1 GROUP BY user ORDER BY user";

void ledger_read_totals(sqlite3_stmt *st, int col, struct piapi_usage_totals *t)
{
    *t = (struct piapi_usage_totals){
        .requests = (uint64_t)sqlite3_column_int64(st, col),
        .input = sqlite3_column_int64(st, col + 1),
        .output = sqlite3_column_int64(st, col + 2),
        .cache_read = sqlite3_column_int64(st, col + 3),
        .cache_write = sqlite3_column_int64(st, col + 4),
        .cache_write_1h = sqlite3_column_int64(st, col + 5),
        .cost_usd = sqlite3_column_double(st, col + 6),
    };
}

void piapi_usage_totals_add(struct piapi_usage_totals *to,
                            const struct piapi_usage_totals *one)
{
    to->requests += one->requests;
    to->input += one->input;
    to->output += one->output;
    to->cache_read += one->cache_read;
    to->cache_write += one->cache_write;
    to->cache_write_1h += one->cache_write_1h;
    to->cost_usd += one->cost_usd;
}

static int sum_rows(sqlite3 *db, double since,
                    void (*cb)(void *, const char *, const struct piapi_usage_totals *),
                    void *ud, char *err, size_t errlen)
{
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(db, sum_sql, -1, &st, NULL);

    if (rc == SQLITE_OK)
        rc = sqlite3_bind_double(st, 1, since);
    while (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        struct piapi_usage_totals t;
        ledger_read_totals(st, 1, &t);
        const char *user = (const char *)sqlite3_column_text(st, 0);
        cb(ud, user ? user : "", &t);
        rc = SQLITE_OK;
    }
    if (rc != SQLITE_DONE)
        db_error(db, rc, err, errlen);
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : -1;
}

int piapi_ledger_sum_by_user(const char *path, double since,
                             void (*cb)(void *ud, const char *user,
                                        const struct piapi_usage_totals *t),
                             void *ud)
{
    sqlite3 *db = NULL;
    char err[256];
    int version, rc;

    if (access(path, F_OK) != 0 && errno == ENOENT)
        return 0;
    if (piapi_ledger_check_path(path) != 0) {
        path_error(err, sizeof err);
        goto fail;
    }
    rc = sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, NULL);
    if (rc != SQLITE_OK) {
        db_error(db, rc, err, sizeof err);
        goto fail;
    }
    sqlite3_busy_timeout(db, BUSY_TIMEOUT_MS);
    if (db_user_version(db, &version, err, sizeof err) != 0)
        goto fail;
    if (version > PIAPI_LEDGER_SCHEMA) {
        snprintf(err, sizeof err, "ledger schema version %d is newer than this piapi's (%d)",
                 version, PIAPI_LEDGER_SCHEMA);
        goto fail;
    }
    if (version > 0 && sum_rows(db, since, cb, ud, err, sizeof err) != 0)
        goto fail;
    sqlite3_close(db);
    return 0;
fail:
    sqlite3_close(db);
    atomic_fetch_add_explicit(&ledger_errors, 1, memory_order_relaxed);
    log_path_line(PIAPI_LOG_ERROR, "usage db cannot be read", path, err, -1);
    return -1;
}
