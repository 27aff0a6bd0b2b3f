/* JSON lines: one object per line, each written whole (one write() by its
 * caller, or queued for the writer thread) so lines never interleave. Lower layers never log; request,
 * watcher, pool and main do. */
#ifndef PIAPI_LOG_H
#define PIAPI_LOG_H

#include <stdint.h>
#include "piapi/util.h"

enum piapi_log_level {
    PIAPI_LOG_DEBUG,
    PIAPI_LOG_INFO,
    PIAPI_LOG_WARN,
    PIAPI_LOG_ERROR
};

/* path NULL = stderr. Returns 0, or -1 with errno when the file cannot be
 * opened (stderr stays in use). */
int piapi_log_open(const char *path, enum piapi_log_level min_level);
/* Starts a writer thread: from then on lines are queued in memory and
 * written in batches instead of by each caller (a line still lands whole;
 * a caller waits only when 4 MiB are queued, i.e. the log device is slower
 * than the log). Call it after
 * open(), before the threads that log; close() writes what is queued and
 * stops it. Without it every line is written by its caller. */
int piapi_log_start_writer(void);
/* For logrotate (SIGUSR1): reopens the file given to open(); no-op on stderr. */
int piapi_log_reopen(void);
void piapi_log_close(void);
/* "debug|info|warn|error" → level; -1 when unknown. */
int piapi_log_level_parse(const char *s);
int piapi_log_enabled(enum piapi_log_level level);

/* A line under construction; lives on the caller's stack:
 *   struct piapi_log_line l;
 *   if (piapi_log_begin(&l, PIAPI_LOG_INFO, "request completed")) {
 *       piapi_log_str(&l, "user", name);
 *       piapi_log_int(&l, "status", 200);
 *       piapi_log_end(&l);
 *   }
 * begin() returns 0 (and the rest must be skipped) when the level is
 * filtered out. Every line gets ts (RFC 3339 UTC, milliseconds), level, msg. */
struct piapi_log_line {
    struct piapi_buf buf;
    char inline_space[1024];
};

int piapi_log_begin(struct piapi_log_line *l, enum piapi_log_level level,
                    const char *msg);
void piapi_log_str(struct piapi_log_line *l, const char *key, const char *val);  /* NULL → null */
void piapi_log_strn(struct piapi_log_line *l, const char *key, const char *val, size_t len);
void piapi_log_int(struct piapi_log_line *l, const char *key, int64_t val);
void piapi_log_double(struct piapi_log_line *l, const char *key, double val);  /* 3 decimals */
void piapi_log_amount(struct piapi_log_line *l, const char *key, double val);  /* 9 decimals: USD */
void piapi_log_bool(struct piapi_log_line *l, const char *key, int val);
void piapi_log_end(struct piapi_log_line *l);
/* The same, for lines written at request rate: the line may wait up to
 * 20 ms for the writer thread's next batch instead of waking it. */
void piapi_log_end_batched(struct piapi_log_line *l);

/* One-liner for lines with at most one extra string field (key may be NULL). */
void piapi_log_msg(enum piapi_log_level level, const char *msg,
                   const char *key, const char *val);

#endif
