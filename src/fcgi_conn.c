/* FastCGI connections as libfcgi holds them (fcgi_conn.h): the one place
 * that reads or sets FCGX_Request's connection fields and libfcgi's
 * reader state. */
#include "piapi/fcgi_conn.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "piapi/util.h"

/* An unread request body is read and dropped up to this much, and only
 * as far as it arrives without waiting longer than SKIP_WAIT_S. */
#define SKIP_STDIN_MAX (1024 * 1024)
#define SKIP_WAIT_S 0.005

static _Thread_local int on_loop_thread;

void piapi_fcgi_mark_loop_thread(void)
{
    on_loop_thread = 1;
}

/* libfcgi 2.4's reader state (fcgiapp.c, FCGX_Stream_Data): its leading
 * fields, which say where the bytes it read ahead end. */
struct libfcgi_reader {
    unsigned char *buff;
    int bufflen;
    unsigned char *mBuff;
    unsigned char *buffStop;
};

/* Whether libfcgi holds bytes it read ahead past the current position:
 * the next record of this request, or, once the body's end was read, the
 * start of a next request, which a client that pipelines (sends it before
 * this answer; nginx never does) has already sent. libfcgi frees those
 * bytes with this request (see "server pipelining" in its FillBuffProc),
 * so that next request would never be answered. When the layout is not
 * the one expected, 0. */
static int read_ahead_left(const FCGX_Stream *in)
{
    const struct libfcgi_reader *d = in->data;

    if (!d || d->bufflen <= 0 || in->rdNext < d->buff || d->buffStop < in->rdNext ||
        d->buffStop > d->buff + d->bufflen)
        return 0;
    return d->buffStop > in->rdNext;
}

/* The loop thread may read only what is already there: in libfcgi's
 * buffer (the next record's bytes, past this record's content) or in the
 * socket. */
static void check_read_ready(const FCGX_Request *r)
{
#ifdef PIAPI_LOOP_CHECKS
    char c;
    if (on_loop_thread && r->ipcFd >= 0 && !read_ahead_left(r->in) &&
        recv(r->ipcFd, &c, 1, MSG_PEEK | MSG_DONTWAIT) < 0 && errno == EAGAIN) {
        fprintf(stderr, "piapi: the event loop would block reading fd %d\n", r->ipcFd);
        abort();
    }
#else
    (void)r;
#endif
}

void piapi_fcgi_init(FCGX_Request *r, int fd)
{
    FCGX_InitRequest(r, -1, 0);
    r->ipcFd = fd;
    r->keepConnection = 1;  /* FCGI_BEGIN_REQUEST sets the real value */
}

int piapi_fcgi_fd(const FCGX_Request *r)
{
    return r->ipcFd;
}

int piapi_fcgi_kept(const FCGX_Request *r)
{
    return r->keepConnection;
}

enum piapi_fcgi_arrival piapi_fcgi_in_socket(const FCGX_Request *r, char *buf,
                                             size_t cap, size_t body_max)
{
    ssize_t n = recv(r->ipcFd, buf, cap, MSG_PEEK | MSG_DONTWAIT);
    if (n <= 0)
        return n < 0 && errno == EAGAIN ? PIAPI_FCGI_PARTIAL : PIAPI_FCGI_UNFIT;
    return piapi_fcgi_arrival((const unsigned char *)buf, (size_t)n, cap, body_max);
}

/* ---- reading the body ------------------------------------------------ */

/* How long the next read() of the FastCGI socket may wait. libfcgi's
 * reads block; with SO_RCVTIMEO one that waits too long fails with
 * EAGAIN, which libfcgi keeps as the stream's error. */
static void arm_read_timeout(int fd, double secs, double *armed)
{
    if (secs == *armed)
        return;
    struct timeval tv = { .tv_sec = (time_t)secs };
    tv.tv_usec = (suseconds_t)((secs - (double)tv.tv_sec) * 1e6);
    if (tv.tv_sec == 0 && tv.tv_usec == 0)
        tv.tv_usec = 1;  /* 0 would mean "forever" */
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) == 0)
        *armed = secs;
}

int piapi_fcgi_read_body(FCGX_Request *r, char *buf, int n, double deadline,
                         double idle_s, double *armed)
{
    FCGX_Stream *in = r->in;
    int ready = (int)(in->stop - in->rdNext);  /* in libfcgi's buffer */

    if (ready > 0)
        return FCGX_GetStr(buf, n < ready ? n : ready, in);
    if (!in->isClosed) {
        double left = deadline - piapi_now_mono();
        if (left <= 0)
            return PIAPI_FCGI_BODY_TIMEOUT;
        check_read_ready(r);
        arm_read_timeout(r->ipcFd, idle_s < left ? idle_s : left, armed);
        /* One byte: libfcgi reads the socket only until some content has
         * arrived (each read waiting at most the timeout just set); the
         * rest of what that read brought is taken without another. */
        if (FCGX_GetStr(buf, 1, in) == 1) {
            ready = (int)(in->stop - in->rdNext);
            if (ready > n - 1)
                ready = n - 1;
            return 1 + (ready > 0 ? FCGX_GetStr(buf + 1, ready, in) : 0);
        }
    }
    int e = FCGX_GetError(in);
    if (e == 0)
        return 0;
    return e == EAGAIN || e == EWOULDBLOCK ? PIAPI_FCGI_BODY_TIMEOUT : PIAPI_FCGI_BODY_GONE;
}

/* ---- writing the answer ---------------------------------------------- */

size_t piapi_fcgi_send_budget(const FCGX_Request *r)
{
    int sndbuf = 0;
    socklen_t len = sizeof sndbuf;
    getsockopt(r->ipcFd, SOL_SOCKET, SO_SNDBUF, &sndbuf, &len);
    return sndbuf > 8192 ? (size_t)sndbuf / 2 : 4096;
}

int piapi_fcgi_writable(const FCGX_Request *r)
{
    struct pollfd pfd = { .fd = r->ipcFd, .events = POLLOUT };
    return poll(&pfd, 1, 0) == 1 && (pfd.revents & POLLOUT);
}

int piapi_fcgi_hung_up(const FCGX_Request *r)
{
    struct pollfd pfd = { .fd = r->ipcFd, .events = POLLRDHUP };
    if (pfd.fd < 0)
        return 0;
    return poll(&pfd, 1, 0) > 0 &&
           (pfd.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLIN));
}

/* A cut upstream answer must look cut to the client, not like a clean
 * end. Bytes outside any record make nginx drop the client connection;
 * lighttpd ignores them but treats a connection that closes without
 * FCGI_END_REQUEST as a failed response. So: both, and the END_REQUEST
 * libfcgi later tries to write goes nowhere. */
void piapi_fcgi_poison(FCGX_Request *r)
{
    static const char junk[8] = {0};
    int fd = r->ipcFd;
    FCGX_FFlush(r->out);
    if (fd >= 0) {
        ssize_t w = write(fd, junk, sizeof junk);
        (void)w;
        shutdown(fd, SHUT_RDWR);
    }
}

/* ---- the end of a request --------------------------------------------- */

/* An answer given before the body was read (401, 404, 413, ...) leaves
 * the web server still sending it. Closing now would fail its writes:
 * nginx then answers 502 instead of piapi's status (`writev() failed (32:
 * Broken pipe) while sending request to upstream`). So what has arrived
 * is read and dropped here, which on the event loop is all of it (the
 * loop serves only requests already whole in the socket); on a kept
 * connection the next request follows it. Returns 1 once the body's end
 * was read. */
static int skip_stdin(FCGX_Request *r)
{
    char buf[4096];
    double deadline = piapi_now_mono() + SKIP_WAIT_S, armed = 0;

    for (size_t skipped = 0; skipped < SKIP_STDIN_MAX;) {
        int got = piapi_fcgi_read_body(r, buf, sizeof buf, deadline, SKIP_WAIT_S, &armed);
        if (got <= 0)
            return got == 0;
        skipped += (size_t)got;
    }
    return 0;
}

/* Detached, libfcgi closes with a plain close() instead of shutdown() plus
 * a poll of up to 2 s for the web server to close first: both web servers
 * close on FCGI_END_REQUEST anyway. A body left unread past skip_stdin(),
 * or a pipelined next request libfcgi has swallowed, keeps the connection
 * open instead, with keepConnection 0: the pool half-closes it and drains
 * it on the event loop, without a thread. */
void piapi_fcgi_end(FCGX_Request *r)
{
    int kept = r->keepConnection, drained = skip_stdin(r);
    /* Bytes past the body's end: a pipelined request libfcgi swallowed, so
     * the connection must end after this answer. */
    int reuse = kept && drained && !read_ahead_left(r->in);
    if (!drained)
        FCGX_ClearError(r->in);  /* else libfcgi closes at once */
    r->keepConnection = kept || !drained;  /* libfcgi leaves it open */
    FCGX_Detach(r);
    FCGX_Finish_r(r);
    if (r->ipcFd >= 0)
        r->keepConnection = reuse;
}
