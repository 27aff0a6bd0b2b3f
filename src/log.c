/* JSON lines. A line is built in the caller's stack space. It then leaves
 * with one write(2) by the caller, or, once the writer thread runs, is
 * queued in memory and written in batches: many request threads appending
 * to one file contend on it, and that write is most of what a log line
 * costs. Lines stay whole either way. */
#include "piapi/log.h"
#include "piapi/json.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static _Atomic int log_fd = STDERR_FILENO;
static _Atomic int log_min = PIAPI_LOG_INFO;

/* open/reopen/close may race each other (the SIGUSR1 thread against
 * shutdown); writers never take this lock. */
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static char *log_path;          /* NULL while logging to stderr */

/* Past this much queued text the writer is behind the log device: callers
 * wait for room (back-pressure) rather than grow the queue without bound
 * or write around it, which would reorder a thread's own lines. */
#define QUEUE_MAX (4u << 20)
/* After a batch the writer stays awake this long, collecting lines, so
 * under load a request line costs no wake-up; other lines, or this much
 * piled up, wake it early. */
#define LINGER_NS (20 * 1000000L)
#define LINGER_MAX (256u << 10)

static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    pthread_cond_t room;        /* the writer took the queue */
    pthread_t thread;
    _Atomic int running;
    int stop;
    int busy;                   /* writing or lingering: no need to wake it */
    struct piapi_buf queue;
} writer = { .lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER,
              .room = PTHREAD_COND_INITIALIZER };

static void write_all(int fd, const char *p, size_t n);

static const char *const level_names[] = {
    [PIAPI_LOG_DEBUG] = "debug",
    [PIAPI_LOG_INFO] = "info",
    [PIAPI_LOG_WARN] = "warn",
    [PIAPI_LOG_ERROR] = "error",
};

static int open_file(const char *path)
{
    return open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
}

/* Puts the new file behind the fd writers use. Once a file is ours its fd
 * number never changes: dup3() replaces what the number refers to in one
 * step, so a writer that loaded the number just before can only write to
 * the old file or the new one. Swapping numbers and closing the old one
 * would let that writer hit whatever socket the kernel hands the freed
 * number to next. Called with log_lock held. */
static int install_fd(int fd)
{
    if (!log_path) {
        atomic_store_explicit(&log_fd, fd, memory_order_release);
        return 0;
    }
    int cur = atomic_load_explicit(&log_fd, memory_order_relaxed);
    int r;
    while ((r = dup3(fd, cur, O_CLOEXEC)) < 0 && (errno == EINTR || errno == EBUSY))
        ;
    int saved = errno;
    close(fd);
    errno = saved;
    return r < 0 ? -1 : 0;
}

int piapi_log_open(const char *path, enum piapi_log_level min_level)
{
    atomic_store_explicit(&log_min, (int)min_level, memory_order_relaxed);
    if (!path) {
        piapi_log_close();
        return 0;
    }
    int fd = open_file(path);
    if (fd < 0)
        return -1;
    pthread_mutex_lock(&log_lock);
    int r = install_fd(fd);
    if (r == 0) {
        char *copy = piapi_xstrdup(path);
        free(log_path);
        log_path = copy;
    }
    pthread_mutex_unlock(&log_lock);
    return r;
}

int piapi_log_reopen(void)
{
    int r = 0;

    pthread_mutex_lock(&log_lock);
    if (log_path) {
        int fd = open_file(log_path);
        r = fd < 0 ? -1 : install_fd(fd);
    }
    pthread_mutex_unlock(&log_lock);
    return r;
}

static void *writer_main(void *arg)
{
    struct piapi_buf batch = {0};
    sigset_t all;

    (void)arg;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    pthread_mutex_lock(&writer.lock);
    for (;;) {
        while (!writer.queue.len && !writer.stop) {
            writer.busy = 0;
            pthread_cond_wait(&writer.wake, &writer.lock);
        }
        if (!writer.queue.len)
            break;
        writer.busy = 1;
        struct piapi_buf t = batch;
        batch = writer.queue;
        writer.queue = t;
        pthread_cond_broadcast(&writer.room);
        pthread_mutex_unlock(&writer.lock);
        write_all(atomic_load_explicit(&log_fd, memory_order_acquire), batch.data, batch.len);
        piapi_buf_reset(&batch);
        pthread_mutex_lock(&writer.lock);
        if (!writer.stop && writer.queue.len < LINGER_MAX) {
            struct timespec until;
            clock_gettime(CLOCK_REALTIME, &until);
            until.tv_nsec += LINGER_NS;
            if (until.tv_nsec >= 1000000000L) {
                until.tv_sec++;
                until.tv_nsec -= 1000000000L;
            }
            pthread_cond_timedwait(&writer.wake, &writer.lock, &until);
        }
    }
    writer.busy = 0;
    pthread_mutex_unlock(&writer.lock);
    piapi_buf_dispose(&batch);
    return NULL;
}

int piapi_log_start_writer(void)
{
    if (atomic_load(&writer.running))
        return 0;
    writer.stop = 0;
    if (pthread_create(&writer.thread, NULL, writer_main, NULL) != 0)
        return -1;
    atomic_store(&writer.running, 1);
    return 0;
}

/* Writes what is queued and stops the writer; later lines go out
 * directly again. */
static void stop_writer(void)
{
    if (!atomic_load(&writer.running))
        return;
    pthread_mutex_lock(&writer.lock);
    atomic_store(&writer.running, 0);
    writer.stop = 1;
    pthread_cond_signal(&writer.wake);
    pthread_cond_broadcast(&writer.room);
    pthread_mutex_unlock(&writer.lock);
    pthread_join(writer.thread, NULL);
    piapi_buf_dispose(&writer.queue);
}

/* 1 when the writer took the line. */
static int enqueue(const char *p, size_t n, int urgent)
{
    int taken = 0;

    if (!atomic_load_explicit(&writer.running, memory_order_relaxed))
        return 0;
    pthread_mutex_lock(&writer.lock);
    while (atomic_load(&writer.running) && writer.queue.len &&
           writer.queue.len + n > QUEUE_MAX)
        pthread_cond_wait(&writer.room, &writer.lock);
    if (atomic_load(&writer.running)) {
        piapi_buf_append(&writer.queue, p, n);
        if (!writer.busy || urgent || writer.queue.len >= LINGER_MAX)
            pthread_cond_signal(&writer.wake);
        taken = 1;
    }
    pthread_mutex_unlock(&writer.lock);
    return taken;
}

/* Back to stderr. Unlike reopen this frees the fd number, so it belongs
 * after the threads that log have stopped. */
void piapi_log_close(void)
{
    stop_writer();
    pthread_mutex_lock(&log_lock);
    if (log_path) {
        int old = atomic_exchange_explicit(&log_fd, STDERR_FILENO,
                                           memory_order_acq_rel);
        close(old);
        free(log_path);
        log_path = NULL;
    }
    pthread_mutex_unlock(&log_lock);
}

int piapi_log_level_parse(const char *s)
{
    if (!s)
        return -1;
    for (size_t i = 0; i < sizeof level_names / sizeof level_names[0]; i++)
        if (strcmp(s, level_names[i]) == 0)
            return (int)i;
    return -1;
}

int piapi_log_enabled(enum piapi_log_level level)
{
    return (int)level >= atomic_load_explicit(&log_min, memory_order_relaxed);
}

/* Makes room for `extra` bytes (plus the NUL). The first growth moves the
 * line from the inline stack space to the heap: piapi_buf_reserve() would
 * realloc() the stack array. */
static void line_reserve(struct piapi_log_line *l, size_t extra)
{
    struct piapi_buf *b = &l->buf;

    if (b->len + extra + 1 <= b->cap)
        return;
    if (b->data != l->inline_space) {
        piapi_buf_reserve(b, extra);
        return;
    }
    size_t cap = 2 * b->cap;
    while (cap < b->len + extra + 1)
        cap *= 2;
    char *heap = piapi_xmalloc(cap);
    memcpy(heap, b->data, b->len + 1);
    b->data = heap;
    b->cap = cap;
}

/* Appends `,"key":` and reserves `value_max` more bytes for the value, so
 * the appends that follow never reallocate the inline space. */
static int line_key(struct piapi_log_line *l, const char *key, size_t value_max)
{
    if (!l->buf.data || !key)
        return 0;
    size_t klen = strlen(key);
    line_reserve(l, 2 + piapi_json_string_bound(key, klen) + value_max);
    piapi_buf_putc(&l->buf, ',');
    piapi_json_string(&l->buf, key, klen);
    piapi_buf_putc(&l->buf, ':');
    return 1;
}

static void line_raw(struct piapi_log_line *l, const char *key,
                     const char *text, size_t len)
{
    if (line_key(l, key, len))
        piapi_buf_append(&l->buf, text, len);
}

/* RFC 3339, UTC, milliseconds: 2026-11-30T08:15:06.123Z (24 bytes). */
static size_t format_ts(char *out, size_t size)
{
    struct timespec ts;
    struct tm tm;

    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    int n = snprintf(out, size, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
                     tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000);
    return n < 0 ? 0 : (size_t)n < size ? (size_t)n : size - 1;
}

int piapi_log_begin(struct piapi_log_line *l, enum piapi_log_level level,
                    const char *msg)
{
    char ts[64];

    if (!piapi_log_enabled(level)) {
        l->buf.data = NULL;     /* the other calls become no-ops */
        return 0;
    }
    l->buf.data = l->inline_space;
    l->buf.len = 0;
    l->buf.cap = sizeof l->inline_space;
    l->inline_space[0] = '\0';

    size_t tslen = format_ts(ts, sizeof ts);
    const char *name = (unsigned)level < sizeof level_names / sizeof level_names[0]
                       ? level_names[level] : "error";
    size_t mlen = msg ? strlen(msg) : 0;
    line_reserve(l, 40 + tslen + piapi_json_string_bound(msg, mlen));
    piapi_buf_append(&l->buf, "{\"ts\":\"", 7);
    piapi_buf_append(&l->buf, ts, tslen);
    piapi_buf_append(&l->buf, "\",\"level\":\"", 11);
    piapi_buf_puts(&l->buf, name);
    piapi_buf_append(&l->buf, "\",\"msg\":", 8);
    if (msg)
        piapi_json_string(&l->buf, msg, mlen);
    else
        piapi_buf_append(&l->buf, "null", 4);
    return 1;
}

void piapi_log_strn(struct piapi_log_line *l, const char *key,
                    const char *val, size_t len)
{
    if (!val) {
        line_raw(l, key, "null", 4);
        return;
    }
    if (line_key(l, key, piapi_json_string_bound(val, len)))
        piapi_json_string(&l->buf, val, len);
}

void piapi_log_str(struct piapi_log_line *l, const char *key, const char *val)
{
    piapi_log_strn(l, key, val, val ? strlen(val) : 0);
}

void piapi_log_int(struct piapi_log_line *l, const char *key, int64_t val)
{
    char num[24];
    int n = snprintf(num, sizeof num, "%" PRId64, val);
    line_raw(l, key, num, (size_t)n);
}

/* %.3f of DBL_MAX is 313 bytes. JSON has no nan/inf, so those are
 * null. piapi never calls setlocale(), so the point stays a point. */
static void log_number(struct piapi_log_line *l, const char *key, const char *fmt,
                       double val)
{
    char num[400];

    if (!isfinite(val)) {
        line_raw(l, key, "null", 4);
        return;
    }
    int n = snprintf(num, sizeof num, fmt, val);
    if (n > 0 && (size_t)n < sizeof num)
        line_raw(l, key, num, (size_t)n);
    else
        line_raw(l, key, "null", 4);
}

void piapi_log_double(struct piapi_log_line *l, const char *key, double val)
{
    log_number(l, key, "%.3f", val);
}

void piapi_log_amount(struct piapi_log_line *l, const char *key, double val)
{
    log_number(l, key, "%.9f", val);
}

void piapi_log_bool(struct piapi_log_line *l, const char *key, int val)
{
    line_raw(l, key, val ? "true" : "false", val ? 4 : 5);
}

/* One write(2) per line: O_APPEND writes to a file, and pipe writes up to
 * PIPE_BUF, land whole; the loop only finishes a line a signal or a full
 * disk cut short. */
static void write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return;     /* nowhere left to report it */
        }
        p += w;
        n -= (size_t)w;
    }
}

static void end_line(struct piapi_log_line *l, int urgent)
{
    if (!l->buf.data)
        return;
    line_reserve(l, 2);
    piapi_buf_append(&l->buf, "}\n", 2);
    int saved = errno;      /* callers log right after a failure; keep its errno */
    if (!enqueue(l->buf.data, l->buf.len, urgent))
        write_all(atomic_load_explicit(&log_fd, memory_order_acquire),
                  l->buf.data, l->buf.len);
    errno = saved;
    if (l->buf.data != l->inline_space)
        free(l->buf.data);
    l->buf.data = NULL;
}

void piapi_log_end(struct piapi_log_line *l)
{
    end_line(l, 1);
}

void piapi_log_end_batched(struct piapi_log_line *l)
{
    end_line(l, 0);
}

void piapi_log_msg(enum piapi_log_level level, const char *msg,
                   const char *key, const char *val)
{
    struct piapi_log_line l;

    if (!piapi_log_begin(&l, level, msg))
        return;
    if (key)
        piapi_log_str(&l, key, val);
    piapi_log_end(&l);
}
