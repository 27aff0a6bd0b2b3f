/* The usage ledger: one row per request in an embedded SQLite database
 * (settings.usageDb) that survives restarts. Rows are copied into a bounded
 * queue in memory and a writer thread commits them in batches, so recording
 * never waits on the disk. The database is in WAL mode with
 * synchronous=NORMAL: a row is committed at most half a second after it was
 * recorded (sooner when many wait), so a crash of piapi (SIGKILL included)
 * loses at most the last second, and close() loses nothing. A power loss
 * may also take the commits since the last WAL checkpoint.
 *
 * A row holds counts and names, never a body or a key. A database that
 * cannot be opened or written is logged (once per outage, or at most every
 * 10 s for write errors) and counted in piapi_ledger_errors(); it never
 * fails a request. */
#ifndef PIAPI_LEDGER_H
#define PIAPI_LEDGER_H

#include <stdint.h>

/* The ledger's schema version (PRAGMA user_version of the database). */
#define PIAPI_LEDGER_SCHEMA 1

/* One request. Strings are NUL-terminated; the caller truncates longer
 * values to fit. Empty strings are stored as they are (''). */
struct piapi_ledger_row {
    double ts;                    /* unix seconds, UTC (when it ended) */
    char request_id[129];         /* the X-Request-ID answered */
    char user[128];               /* member name */
    char service_type[64];
    char provider[128];
    char key_name[128];           /* the provider key's name, never the key */
    char model[128];              /* "" when unknown */
    int64_t input;                /* token counts as the provider reported */
    int64_t output;
    int64_t cache_read;
    int64_t cache_write;          /* all cache writes, cache_write_1h included */
    int64_t cache_write_1h;       /* the part of cache_write kept for an hour */
    double cost_usd;
    int priced;                   /* 0: no price known, cost stored as NULL */
    int status;                   /* HTTP status answered */
    int complete;                 /* 0: the answer ended early (abort, cut stream) */
};

/* Opens the database at path (creating it and its schema, WAL,
 * synchronous=NORMAL, a busy timeout) and starts the writer thread. The
 * same path again keeps the open ledger (or retries the open now if it is
 * failing); another path first writes what is queued to the old database
 * and closes it; NULL is close(). May wait on the disk: call it from
 * start-up or a reload, never from the event loop.
 * Returns 0 when the database is open; -1 when it could not be opened,
 * which is logged and counted: the writer keeps the path, drops (and
 * counts) rows meanwhile and retries the open at most every 5 s. */
int piapi_ledger_open(const char *path);

/* Queues a copy of row. Never waits on the disk: past 8192 queued rows
 * the row is dropped and counted as an error. A no-op when no ledger is
 * open. Callable from any thread. */
void piapi_ledger_record(const struct piapi_ledger_row *row);

/* Writes every row recorded before the call and returns when they are
 * committed (or counted as lost). */
void piapi_ledger_flush(void);

/* flush(), then stops the writer and closes the database. Safe when never
 * opened, and twice. */
void piapi_ledger_close(void);

/* piapi_usage_db_errors_total: every failed open attempt and every row
 * that was recorded but could not be written (queue full, no database,
 * write error). Monotonic over the process's life. */
uint64_t piapi_ledger_errors(void);

struct piapi_usage_totals {
    uint64_t requests;
    int64_t input, output, cache_read, cache_write, cache_write_1h;
    double cost_usd;              /* unpriced rows count 0 */
};

/* to += one, field by field. */
void piapi_usage_totals_add(struct piapi_usage_totals *to,
                            const struct piapi_usage_totals *one);

/* Per-member totals of the rows with ts >= since, read on a connection of
 * its own (blocking; meant for start-up, to restore today's and this
 * month's numbers). cb runs once per member, in name order; user is valid
 * only during the call. A database file that does not exist yet has no
 * rows: 0 without calls. -1 when it cannot be read, logged (path and
 * SQLite's message) and counted like the writer's errors. */
int piapi_ledger_sum_by_user(const char *path, double since,
                             void (*cb)(void *ud, const char *user,
                                        const struct piapi_usage_totals *t),
                             void *ud);

/* Whether path may be opened as a database: 0 when it does not exist or
 * is a regular file (through symlinks), else -1 with errno set (EISDIR,
 * or EINVAL for a FIFO, socket or device). SQLite would block forever
 * opening a FIFO with no writer, hanging start-up, a reload or
 * `piapi usage`; it is refused before SQLite sees it. */
int piapi_ledger_check_path(const char *path);

#endif
