/* Small helpers every module uses: allocation that aborts on OOM, bounded
 * number parsing, constant-time comparison, clocks and a growable buffer. */
#ifndef PIAPI_UTIL_H
#define PIAPI_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* Allocation failure is not recoverable in a gateway thread; these abort
 * instead of returning NULL so callers carry no untested NULL branches. */
void *piapi_xmalloc(size_t n);
void *piapi_xcalloc(size_t count, size_t size);
void *piapi_xrealloc(void *p, size_t n);
char *piapi_xstrdup(const char *s);
char *piapi_xstrndup(const char *s, size_t n);

/* Parses a whole decimal string into [min, max]. 0 on success, -1 on any
 * junk, sign, overflow or range error (never partially consumes). */
int piapi_parse_u64(const char *s, uint64_t min, uint64_t max, uint64_t *out);

/* 0-15 for a hex digit of either case, else -1. */
int piapi_hex_digit(int c);
/* The byte a "%XY" at s spells (n bytes left), or -1 when s does not
 * start a well-formed escape. */
int piapi_pct_byte(const char *s, size_t n);

/* 1 when equal; time depends only on the lengths, never on the contents. */
int piapi_ct_equal(const void *a, size_t alen, const void *b, size_t blen);

/* Seeded 64-bit hash (process-random seed) for tables keyed by secrets or
 * client input, so bucket positions reveal nothing useful. */
uint64_t piapi_hash(const void *data, size_t len);

double piapi_now_mono(void);   /* seconds, CLOCK_MONOTONIC */
double piapi_now_real(void);   /* seconds since the epoch */

/* The UTC calendar date of t (seconds since the epoch), month 1-12, and
 * back: 00:00 UTC of a date. Arithmetic only: gmtime_r and timegm take
 * libc's time zone lock, and these run for every request with limits. */
void piapi_utc_date(double t, int *year, int *month, int *day);
double piapi_utc_midnight(int year, int month, int day);

/* v in decimal at buf (room for 21 bytes), NUL-terminated; its length. */
size_t piapi_u64_str(char *buf, uint64_t v);

/* Growable byte buffer, always NUL-terminated after data[len]. The owner
 * calls piapi_buf_dispose(); a zeroed struct is an empty buffer. */
struct piapi_buf {
    char *data;
    size_t len;
    size_t cap;
};

void piapi_buf_reserve(struct piapi_buf *b, size_t extra);
void piapi_buf_append(struct piapi_buf *b, const void *p, size_t n);
void piapi_buf_puts(struct piapi_buf *b, const char *s);
void piapi_buf_putc(struct piapi_buf *b, char c);
void piapi_buf_printf(struct piapi_buf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void piapi_buf_reset(struct piapi_buf *b);
void piapi_buf_dispose(struct piapi_buf *b);
/* Dispose for a buffer that held a secret: every byte it had is zeroed. */
void piapi_buf_wipe(struct piapi_buf *b);

#endif
