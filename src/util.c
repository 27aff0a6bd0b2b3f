/* Allocation, bounded parsing, constant-time compare, hashing, clocks and
 * the growable buffer shared by all modules. */
#include "piapi/util.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

static void oom(void)
{
    static const char msg[] = "piapi: out of memory\n";
    ssize_t r = write(2, msg, sizeof msg - 1);
    (void)r;
    abort();
}

void *piapi_xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        oom();
    return p;
}

void *piapi_xcalloc(size_t count, size_t size)
{
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p)
        oom();
    return p;
}

void *piapi_xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (!q)
        oom();
    return q;
}

char *piapi_xstrdup(const char *s)
{
    return piapi_xstrndup(s, strlen(s));
}

char *piapi_xstrndup(const char *s, size_t n)
{
    char *p = piapi_xmalloc(n + 1);
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

int piapi_parse_u64(const char *s, uint64_t min, uint64_t max, uint64_t *out)
{
    uint64_t v = 0;

    if (!s || !*s)
        return -1;
    for (const char *p = s; *p; p++) {
        if (*p < '0' || *p > '9')
            return -1;
        unsigned d = (unsigned)(*p - '0');
        if (v > (UINT64_MAX - d) / 10)
            return -1;
        v = v * 10 + d;
    }
    if (v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

int piapi_hex_digit(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

int piapi_pct_byte(const char *s, size_t n)
{
    int h, l;
    if (n < 3 || s[0] != '%' || (h = piapi_hex_digit(s[1])) < 0 ||
        (l = piapi_hex_digit(s[2])) < 0)
        return -1;
    return h * 16 + l;
}

int piapi_ct_equal(const void *a, size_t alen, const void *b, size_t blen)
{
    const volatile unsigned char *x = a;
    const volatile unsigned char *y = b;
    unsigned char diff = alen != blen;
    size_t n = alen < blen ? alen : blen;

    /* Compare over the shorter length and fold the length mismatch in, so
     * the time never depends on where the first differing byte sits. */
    for (size_t i = 0; i < n; i++)
        diff |= x[i] ^ y[i];
    return diff == 0;
}

/* SipHash-2-4: keyed, so table positions of member keys or client-chosen
 * strings cannot be predicted or flooded. */
static uint64_t sip_k0, sip_k1;
static pthread_once_t sip_once = PTHREAD_ONCE_INIT;

static void sip_seed(void)
{
    uint64_t k[2] = { 0x736f6d6570736575ULL, 0x646f72616e646f6dULL };
    if (getrandom(k, sizeof k, 0) != (ssize_t)sizeof k) {
        k[0] ^= (uint64_t)time(NULL);
        k[1] ^= (uint64_t)getpid();
    }
    sip_k0 = k[0];
    sip_k1 = k[1];
}

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                     \
    do {                                                             \
        v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);    \
        v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                       \
        v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                       \
        v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);    \
    } while (0)

uint64_t piapi_hash(const void *data, size_t len)
{
    const unsigned char *in = data;
    pthread_once(&sip_once, sip_seed);
    uint64_t v0 = 0x736f6d6570736575ULL ^ sip_k0;
    uint64_t v1 = 0x646f72616e646f6dULL ^ sip_k1;
    uint64_t v2 = 0x6c7967656e657261ULL ^ sip_k0;
    uint64_t v3 = 0x7465646279746573ULL ^ sip_k1;
    uint64_t b = (uint64_t)len << 56;
    size_t i = 0;

    for (; i + 8 <= len; i += 8) {
        uint64_t m;
        memcpy(&m, in + i, 8);
        v3 ^= m;
        SIPROUND;
        SIPROUND;
        v0 ^= m;
    }
    for (size_t j = 0; i + j < len; j++)
        b |= (uint64_t)in[i + j] << (8 * j);
    v3 ^= b;
    SIPROUND;
    SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

static double clock_seconds(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

double piapi_now_mono(void) { return clock_seconds(CLOCK_MONOTONIC); }
double piapi_now_real(void) { return clock_seconds(CLOCK_REALTIME); }

/* Days since 1970-01-01 and the proleptic Gregorian calendar, by eras of
 * 400 years (146,097 days) counted from 0000-03-01, so that February,
 * the odd month, ends each year. */
void piapi_utc_date(double t, int *year, int *month, int *day)
{
    int64_t days = (int64_t)(t / 86400.0);
    if ((double)days * 86400.0 > t)
        days--;  /* toward the earlier day before 1970 */
    int64_t z = days + 719468;
    int64_t era = (z >= 0 ? z : z - 146096) / 146097;
    int64_t doe = z - era * 146097;
    int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    int64_t mp = (5 * doy + 2) / 153;
    *day = (int)(doy - (153 * mp + 2) / 5 + 1);
    *month = (int)(mp < 10 ? mp + 3 : mp - 9);
    *year = (int)(yoe + era * 400 + (*month <= 2));
}

double piapi_utc_midnight(int year, int month, int day)
{
    int64_t y = year - (month <= 2);
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (month > 2 ? month - 3 : month + 9) + 2) / 5 + day - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return (double)(era * 146097 + doe - 719468) * 86400.0;
}

size_t piapi_u64_str(char *buf, uint64_t v)
{
    char digits[20];
    size_t n = 0, len = 0;
    do
        digits[n++] = (char)('0' + v % 10);
    while ((v /= 10) != 0);
    while (n)
        buf[len++] = digits[--n];
    buf[len] = '\0';
    return len;
}

void piapi_buf_reserve(struct piapi_buf *b, size_t extra)
{
    if (b->len + extra + 1 <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1)
        cap *= 2;
    /* Not realloc: a buffer may hold a secret (an upstream URL with the
     * key in its query), and the old copy must not stay readable in freed
     * memory. Growth is rare, so the copy costs nothing that shows. */
    char *data = piapi_xmalloc(cap);
    if (b->data) {
        memcpy(data, b->data, b->len + 1);
        explicit_bzero(b->data, b->cap);
        free(b->data);
    }
    b->data = data;
    b->cap = cap;
}

void piapi_buf_append(struct piapi_buf *b, const void *p, size_t n)
{
    piapi_buf_reserve(b, n);
    if (n)
        memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
}

void piapi_buf_puts(struct piapi_buf *b, const char *s)
{
    piapi_buf_append(b, s, strlen(s));
}

void piapi_buf_putc(struct piapi_buf *b, char c)
{
    piapi_buf_append(b, &c, 1);
}

void piapi_buf_printf(struct piapi_buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n <= 0)
        return;
    piapi_buf_reserve(b, (size_t)n);
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

void piapi_buf_reset(struct piapi_buf *b)
{
    b->len = 0;
    if (b->data)
        b->data[0] = '\0';
}

void piapi_buf_dispose(struct piapi_buf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

void piapi_buf_wipe(struct piapi_buf *b)
{
    if (b->data)
        explicit_bzero(b->data, b->cap);
    piapi_buf_dispose(b);
}
