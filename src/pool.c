/* FastCGI connections: accepted on the event loop, served there when the
 * request is already whole in the socket, else handed to a pool thread.
 * A kept connection (fastcgi_keep_conn) goes back to the loop after each
 * request and waits there for the next one, so no thread is ever parked on
 * an idle connection. Every pool thread owns a worker (curl handles,
 * buffers) for its whole life. A request counts as active, and holds its
 * request slot, until it ends: on the loop, or on a pool thread. */
#include "piapi/pool.h"

#include <errno.h>
#include <fcntl.h>
#include <fcgiapp.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "piapi/config.h"
#include "piapi/fcgi_conn.h"
#include "piapi/log.h"
#include "piapi/loop.h"
#include "piapi/metrics.h"
#include "piapi/proxy.h"
#include "piapi/request.h"
#include "piapi/util.h"

/* A request the loop may read: params plus a body the proxy reads whole. */
#define PEEK_MAX (PIAPI_PROXY_INLINE_BODY_MAX + 32 * 1024)
/* Connections taken per wake-up of the loop, so transfers are not starved. */
#define ACCEPT_BATCH 64
/* The loop may accept a connection before the web server has written the
 * request: it waits this long for the rest, then hands it to a thread. */
#define ARRIVAL_MS 50
/* A connection whose request was answered before its body was all read
 * is drained on the loop for at most this long and this much (see
 * linger), then closed. */
#define LINGER_MS 10000
#define LINGER_BYTES_MAX (64 * 1024 * 1024)
/* Drained per wake-up, so the loop serves the others in between. */
#define LINGER_BATCH (1024 * 1024)

/* A connection's request, and what the pool knows about it. */
struct conn {
    FCGX_Request req;           /* first: the pool hands out &req */
    int accepted;               /* FCGX_Accept_r has read the request */
};

struct job {
    FCGX_Request *req;          /* its request read by the loop or not (conn.accepted) */
    struct job *next;
};

static struct {
    struct piapi_pool_opts o;
    unsigned cap;               /* threads at most */
    pthread_attr_t attr;
    pthread_mutex_t lock;       /* threads[], spawning, the job queue */
    pthread_cond_t work;        /* a job was queued, or stopping */
    pthread_t *threads;
    atomic_uint nthreads;
    struct job *jobs, **jobs_tail;
    atomic_uint njobs;
    atomic_uint waiting;        /* threads waiting for a job */
    atomic_uint active;         /* requests accepted and not ended */
    atomic_uint serving;        /* threads busy with a request */
    sem_t request_slots;
    atomic_int stopping;
    atomic_int aborting;
    struct piapi_worker *loop_worker;  /* for requests served on the loop */
    char *peek;                 /* PEEK_MAX bytes, the loop's */
} pool = { .lock = PTHREAD_MUTEX_INITIALIZER, .work = PTHREAD_COND_INITIALIZER };

static void *worker_main(void *arg);

static void probe(unsigned *busy, unsigned *idle)
{
    unsigned n = atomic_load(&pool.nthreads), b = atomic_load(&pool.serving);
    *busy = b;
    *idle = n > b ? n - b : 0;
}

static int spawn_locked(char *err, size_t errlen)
{
    unsigned n = atomic_load(&pool.nthreads);
    if (n >= pool.cap || atomic_load(&pool.stopping))
        return 0;
    int rc = pthread_create(&pool.threads[n], &pool.attr, worker_main, NULL);
    if (rc != 0) {
        if (err)
            snprintf(err, errlen, "pthread_create: %s", strerror(rc));
        return -1;
    }
    atomic_store(&pool.nthreads, n + 1);
    return 0;
}

/* ---- request slots ----------------------------------------------------- */

/* A request slot now, or within the queue timeout. */
static int take_request_slot(void)
{
    if (sem_trywait(&pool.request_slots) == 0)
        return 1;
    piapi_metrics_pool_saturated();
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += pool.o.queue_timeout_ms / 1000;
    ts.tv_nsec += (long)(pool.o.queue_timeout_ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    int rc;
    while ((rc = sem_timedwait(&pool.request_slots, &ts)) != 0 && errno == EINTR)
        ;
    return rc == 0;
}

static void take_connection(int fd);

static struct conn *conn_of(FCGX_Request *req)
{
    return (struct conn *)((char *)req - offsetof(struct conn, req));
}

/* ---- lingering close --------------------------------------------------- */

/* The web server may still be sending a body piapi answered without
 * reading (a 401, 404 or 413 on a large upload). A close() now would make
 * its writes fail (nginx: 502 instead of piapi's answer). So the
 * connection is half-closed, which tells the web server nothing more
 * comes (it closes once it has the answer), and read until it closes, on
 * the loop and never blocking: what libfcgi's own close does, blocking a
 * thread for up to 2 s per wait and with no byte limit. Reading the body
 * to its FCGI_STDIN end instead would keep the connection usable, but
 * cost the whole upload and the record framing; piapi cannot see where
 * libfcgi's read-ahead stopped in it. */
struct drain {
    double deadline;
    uint64_t bytes;
};

static void drain_more(int fd, void *arg, int timed_out);

static void linger_wait(int fd, struct drain *l)
{
    int ms = (int)((l->deadline - piapi_now_mono()) * 1000.0);
    if (ms > 0 && piapi_loop_await(fd, ms, drain_more, l) == 0)
        return;
    close(fd);
    free(l);
}

/* 1 while there may be more to read (the socket is empty for now). */
static int drain_batch(int fd, struct drain *l)
{
    for (size_t batch = 0; batch < LINGER_BATCH;) {
        ssize_t n = recv(fd, pool.peek, PEEK_MAX, MSG_DONTWAIT);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return errno == EAGAIN || errno == EWOULDBLOCK;
        if (n == 0)
            return 0;  /* the web server closed it */
        l->bytes += (uint64_t)n;
        batch += (size_t)n;
        if (l->bytes > LINGER_BYTES_MAX)
            return 0;  /* past the cap: close, whatever that costs */
    }
    return 1;
}

/* A hang-up, the deadline or shutdown (timed_out) ends it at once. */
static void drain_more(int fd, void *arg, int timed_out)
{
    struct drain *l = arg;
    if (!timed_out && drain_batch(fd, l)) {
        linger_wait(fd, l);
        return;
    }
    close(fd);
    free(l);
}

static void linger_connection(void *arg)
{
    int fd = (int)(intptr_t)arg;
    struct drain *l = piapi_xmalloc(sizeof *l);
    l->deadline = piapi_now_mono() + LINGER_MS / 1000.0;
    l->bytes = 0;
    shutdown(fd, SHUT_WR);
    drain_more(fd, l, 0);
}

/* A kept connection's next request, or its end. */
static void next_request(int fd, void *arg, int closed)
{
    (void)arg;
    if (closed)
        close(fd);
    else
        take_connection(fd);
}

static void keep_connection(void *arg)
{
    int fd = (int)(intptr_t)arg;
    if (atomic_load(&pool.stopping) || piapi_loop_await(fd, -1, next_request, NULL) != 0)
        close(fd);
}

/* req's request has ended. libfcgi left its connection open if the web
 * server keeps it: the loop waits for the next request on it. If it is
 * open otherwise (see piapi_request_handle), it lingers. */
static void release_connection(FCGX_Request *req)
{
    int fd = piapi_fcgi_fd(req);
    void (*next)(void *) = piapi_fcgi_kept(req) ? keep_connection : linger_connection;
    free(conn_of(req));
    if (fd >= 0 && piapi_loop_post(next, (void *)(intptr_t)fd) != 0)
        close(fd);
}

/* The connection goes back before the request stops counting as active,
 * so a shutdown's drain cannot end between the two. */
static void request_over(FCGX_Request *req)
{
    release_connection(req);
    sem_post(&pool.request_slots);
    atomic_fetch_sub(&pool.active, 1);
}

/* /healthz and /metrics: they took no request slot. */
static void local_over(FCGX_Request *req)
{
    release_connection(req);
    atomic_fetch_sub(&pool.active, 1);
}

/* ---- the job queue ----------------------------------------------------- */

/* A request for this connection has not been read yet. libfcgi reads it
 * in FCGX_Accept_r, which with a connection already open (as for a kept
 * one) reads from it instead of accepting. */
static FCGX_Request *request_for(int fd)
{
    struct conn *c = piapi_xcalloc(1, sizeof *c);
    piapi_fcgi_init(&c->req, fd);
    return &c->req;
}

static void enqueue(FCGX_Request *req)
{
    struct job *j = piapi_xmalloc(sizeof *j);
    j->req = req;
    j->next = NULL;
    pthread_mutex_lock(&pool.lock);
    *pool.jobs_tail = j;
    pool.jobs_tail = &j->next;
    unsigned queued = atomic_fetch_add(&pool.njobs, 1) + 1;
    if (queued > atomic_load(&pool.waiting) && spawn_locked(NULL, 0) != 0)
        piapi_log_msg(PIAPI_LOG_WARN, "pool cannot add a thread", NULL, NULL);
    pthread_cond_signal(&pool.work);
    pthread_mutex_unlock(&pool.lock);
}

/* The next connection to serve; NULL once stopping and none is left. */
static FCGX_Request *next_job(void)
{
    FCGX_Request *req = NULL;

    pthread_mutex_lock(&pool.lock);
    while (!pool.jobs && !atomic_load(&pool.stopping)) {
        atomic_fetch_add(&pool.waiting, 1);
        pthread_cond_wait(&pool.work, &pool.lock);
        atomic_fetch_sub(&pool.waiting, 1);
    }
    struct job *j = pool.jobs;
    if (j) {
        pool.jobs = j->next;
        if (!pool.jobs)
            pool.jobs_tail = &pool.jobs;
        atomic_fetch_sub(&pool.njobs, 1);
        req = j->req;
        free(j);
    }
    pthread_mutex_unlock(&pool.lock);
    return req;
}

/* ---- pool threads ------------------------------------------------------ */

/* libfcgi's reads of the params block: they wait at most the body's idle
 * timeout for a byte (the body's reads set their own; a kept connection
 * may still carry a short one from its last request). */
static void arm_params_timeout(int fd)
{
    struct piapi_config *cfg = piapi_config_current();
    uint32_t ms = cfg ? piapi_config_settings(cfg)->body_idle_timeout_ms : 30000;
    piapi_config_release(cfg);
    struct timeval tv = { .tv_sec = ms / 1000, .tv_usec = (suseconds_t)(ms % 1000) * 1000 };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
}

/* Reads the connection's request (libfcgi's reads block) unless the loop
 * did, and serves it. /healthz and /metrics never wait for a slot. */
static void serve_connection(struct piapi_worker *w, FCGX_Request *req)
{
    if (!conn_of(req)->accepted) {
        arm_params_timeout(piapi_fcgi_fd(req));
        if (FCGX_Accept_r(req) != 0) {  /* malformed or cut: libfcgi closed it */
            free(conn_of(req));
            return;
        }
    }
    atomic_fetch_add(&pool.active, 1);
    atomic_fetch_add(&pool.serving, 1);
    if (piapi_request_is_local(req)) {
        piapi_request_handle(w, req, local_over);
    } else if (take_request_slot()) {
        piapi_request_handle(w, req, request_over);
    } else {
        piapi_request_reject(w, req, 503, "gateway saturated; retry shortly",
                             "pool_saturated");
        release_connection(req);
        atomic_fetch_sub(&pool.active, 1);
    }
    atomic_fetch_sub(&pool.serving, 1);
}

static void *worker_main(void *arg)
{
    (void)arg;
    struct piapi_worker *w = piapi_request_worker_create(&pool.stopping, &pool.aborting);
    FCGX_Request *req;

    while ((req = next_job()))
        serve_connection(w, req);
    piapi_request_worker_destroy(w);
    return NULL;
}

/* ---- the event loop's side --------------------------------------------- */

/* PIAPI_FCGI_WHOLE when the socket already holds the whole request, with
 * a body the proxy reads ahead whole: only then can the loop let libfcgi
 * read it, whose reads block and here find everything there, and the
 * transfer run on the loop. */
static enum piapi_fcgi_arrival in_socket(FCGX_Request *req)
{
    /* Shorter than the read-ahead buffer: then the proxy sees the body's
     * end whatever CONTENT_LENGTH says, and never streams it. */
    return piapi_fcgi_in_socket(req, pool.peek, PEEK_MAX,
                                PIAPI_PROXY_INLINE_BODY_MAX - 1);
}

/* Reads the request (all in the socket, so libfcgi's reads do not
 * block) and serves it here: /healthz and /metrics at once, others when a
 * request slot is free, else a thread waits for one. */
static void serve_here(FCGX_Request *req)
{
    if (FCGX_Accept_r(req) != 0) {  /* malformed: libfcgi closed it */
        free(conn_of(req));
        return;
    }
    conn_of(req)->accepted = 1;
    if (piapi_request_is_local(req)) {
        atomic_fetch_add(&pool.active, 1);
        piapi_request_handle(pool.loop_worker, req, local_over);
        return;
    }
    if (sem_trywait(&pool.request_slots) != 0) {
        enqueue(req);  /* a thread waits for a slot, up to the queue timeout */
        return;
    }
    atomic_fetch_add(&pool.active, 1);
    piapi_request_handle(pool.loop_worker, req, request_over);
}

struct arrival_wait {
    FCGX_Request *req;
    double deadline;
};

static void consider(struct arrival_wait *a, enum piapi_fcgi_arrival st);

static void more_arrived(int fd, void *arg, int timed_out)
{
    struct arrival_wait *a = arg;
    (void)fd;
    if (timed_out) {
        enqueue(a->req);
        free(a);
        return;
    }
    consider(a, in_socket(a->req));
}

/* Serves the request here once it is whole, or hands it to a thread. */
static void consider(struct arrival_wait *a, enum piapi_fcgi_arrival st)
{
    int fd = piapi_fcgi_fd(a->req);
    switch (st) {
    case PIAPI_FCGI_WHOLE:
        serve_here(a->req);
        free(a);
        return;
    case PIAPI_FCGI_PARTIAL: {
        int ms = (int)((a->deadline - piapi_now_mono()) * 1000.0);
        if (ms > 0 && piapi_loop_await(fd, ms, more_arrived, a) == 0)
            return;
        break;
    }
    case PIAPI_FCGI_UNFIT:
        break;
    }
    enqueue(a->req);
    free(a);
}

static void take_connection(int fd)
{
    FCGX_Request *req = request_for(fd);
    enum piapi_fcgi_arrival st = in_socket(req);

    if (st == PIAPI_FCGI_WHOLE) {
        serve_here(req);
        return;
    }
    struct arrival_wait *a = piapi_xmalloc(sizeof *a);
    a->req = req;
    a->deadline = piapi_now_mono() + ARRIVAL_MS / 1000.0;
    consider(a, st);
}

void piapi_pool_connection_ready(int listen_fd)
{
    for (int i = 0; i < ACCEPT_BATCH; i++) {
        if (atomic_load(&pool.stopping)) {
            piapi_loop_pause(listen_fd, -1);
            /* Idle kept connections close now, so the web server stops
             * sending on them; a request still arriving goes to a thread. */
            piapi_loop_expire_awaits();
            return;
        }
        int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd >= 0) {
            take_connection(fd);
            continue;
        }
        switch (errno) {
        case EAGAIN:
            return;
        case EINTR:
        case ECONNABORTED:
        case EPROTO:
            continue;
        case EMFILE:
        case ENFILE:
        case ENOBUFS:
        case ENOMEM:
            /* Connections wait in the backlog until descriptors free up. */
            piapi_log_msg(PIAPI_LOG_WARN, "cannot accept, retrying in 100 ms",
                          "error", strerror(errno));
            piapi_loop_pause(listen_fd, 100);
            return;
        default:
            piapi_log_msg(PIAPI_LOG_ERROR, "accept failed; no longer accepting",
                          "error", strerror(errno));
            piapi_loop_pause(listen_fd, -1);
            return;
        }
    }
}

/* ---- life cycle -------------------------------------------------------- */

int piapi_pool_start(const struct piapi_pool_opts *o, char *err, size_t errlen)
{
    pool.o = *o;
    pool.cap = o->max_requests + o->extra_threads;
    pool.jobs_tail = &pool.jobs;
    pool.threads = piapi_xcalloc(pool.cap, sizeof *pool.threads);
    pool.peek = piapi_xmalloc(PEEK_MAX);
    int fl = fcntl(o->fd, F_GETFL);
    if (fl < 0 || fcntl(o->fd, F_SETFL, fl | O_NONBLOCK) != 0) {
        snprintf(err, errlen, "listening socket: %s", strerror(errno));
        return -1;
    }
    if (sem_init(&pool.request_slots, 0, o->max_requests) != 0) {
        snprintf(err, errlen, "sem_init: %s", strerror(errno));
        return -1;
    }
    pthread_attr_init(&pool.attr);
    if (pthread_attr_setstacksize(&pool.attr, o->stack_size) != 0) {
        snprintf(err, errlen, "invalid thread stack size %zu", o->stack_size);
        return -1;
    }
    pool.loop_worker = piapi_request_worker_create(&pool.stopping, &pool.aborting);
    piapi_metrics_set_pool_probe(probe);

    unsigned initial = pool.cap < 2 ? pool.cap : 2;
    pthread_mutex_lock(&pool.lock);
    int rc = 0;
    for (unsigned i = 0; i < initial && rc == 0; i++)
        rc = spawn_locked(err, errlen);
    pthread_mutex_unlock(&pool.lock);
    return rc;
}

void piapi_pool_stop_accepting(void)
{
    if (atomic_exchange(&pool.stopping, 1))
        return;
    /* Makes the listening socket readable, so the loop sees `stopping`
     * at once, and turns new connections away. */
    shutdown(pool.o.fd, SHUT_RDWR);
    pthread_mutex_lock(&pool.lock);
    pthread_cond_broadcast(&pool.work);
    pthread_mutex_unlock(&pool.lock);
}

unsigned piapi_pool_active(void)
{
    return atomic_load(&pool.active);
}

void piapi_pool_abort(void)
{
    atomic_store(&pool.aborting, 1);
}

void piapi_pool_join(void)
{
    pthread_mutex_lock(&pool.lock);
    unsigned n = atomic_load(&pool.nthreads);
    pthread_mutex_unlock(&pool.lock);
    for (unsigned i = 0; i < n; i++)
        pthread_join(pool.threads[i], NULL);
    /* Queued after the last thread left: close them unanswered. */
    while (pool.jobs) {
        struct job *j = pool.jobs;
        pool.jobs = j->next;
        FCGX_Free(j->req, 1);
        free(conn_of(j->req));
        free(j);
    }
    piapi_metrics_set_pool_probe(NULL);
    piapi_request_worker_destroy(pool.loop_worker);
    free(pool.threads);
    free(pool.peek);
    pool.threads = NULL;
    sem_destroy(&pool.request_slots);
    pthread_attr_destroy(&pool.attr);
}
