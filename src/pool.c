/* Responder threads. Every thread owns a worker (curl handles, buffers)
 * for its whole life, so connections to the upstream are reused. A
 * request counts as active, and holds its request slot, until it ends:
 * on its thread, or later on the proxy's event loop thread. */
#include "piapi/pool.h"

#include <errno.h>
#include <fcntl.h>
#include <fcgiapp.h>
#include <poll.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "piapi/log.h"
#include "piapi/metrics.h"
#include "piapi/request.h"
#include "piapi/util.h"

static struct {
    struct piapi_pool_opts o;
    unsigned cap;               /* threads at most: request slots + accepters */
    pthread_attr_t attr;
    pthread_mutex_t lock;       /* threads[] and spawning */
    pthread_t *threads;
    atomic_uint nthreads;
    atomic_uint active;         /* requests accepted and not ended */
    atomic_uint serving;        /* threads busy with a request */
    atomic_uint parked;         /* waiting for the next request on a kept connection */
    int wake[2];                /* pipe, readable once stopping: wakes parked threads */
    atomic_int in_accept;       /* threads inside accept() */
    sem_t request_slots;
    atomic_int stopping;
    atomic_int aborting;
} pool = { .lock = PTHREAD_MUTEX_INITIALIZER };

static void *worker_main(void *arg);

static void probe(unsigned *busy, unsigned *idle)
{
    unsigned n = atomic_load(&pool.nthreads), a = atomic_load(&pool.serving);
    *busy = a;
    *idle = n > a ? n - a : 0;  /* parked threads wait for work: idle */
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

/* Threads that could take a new connection: neither serving nor parked
 * on a kept connection. */
static int nobody_free(void)
{
    return atomic_load(&pool.serving) + atomic_load(&pool.parked) >=
           atomic_load(&pool.nthreads);
}

/* Called by a thread that just took a request: if nobody is left to
 * accept the next one, add a thread (up to the cap). Threads parked on
 * kept connections (fastcgi_keep_conn) count as taken, so idle kept
 * connections can never starve new ones. */
static void grow_if_needed(void)
{
    if (!nobody_free())
        return;
    pthread_mutex_lock(&pool.lock);
    if (nobody_free() && spawn_locked(NULL, 0) != 0)
        piapi_log_msg(PIAPI_LOG_WARN, "pool cannot add a thread", NULL, NULL);
    pthread_mutex_unlock(&pool.lock);
}

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

static void request_over(void)
{
    sem_post(&pool.request_slots);
    atomic_fetch_sub(&pool.active, 1);
}

/* 1 when the request (and req) went on to the event loop. */
static int serve(struct piapi_worker *w, FCGX_Request *req)
{
    int handed_over = 0;

    atomic_fetch_add(&pool.active, 1);
    atomic_fetch_add(&pool.serving, 1);
    grow_if_needed();
    if (take_request_slot()) {
        handed_over = piapi_request_handle(w, req, request_over);
    } else {
        piapi_request_reject(w, req, 503, "gateway saturated; retry shortly",
                             "pool_saturated");
        atomic_fetch_sub(&pool.active, 1);
    }
    atomic_fetch_sub(&pool.serving, 1);
    return handed_over;
}

/* With fastcgi_keep_conn the web server may send the next request on the
 * connection the last one used. The thread waits for it here, where it
 * can also be told to stop, instead of inside libfcgi's blocking read. */
#define KEPT_IDLE_MS 250

static int at_cap_and_full(void)
{
    return atomic_load(&pool.nthreads) >= pool.cap && nobody_free();
}

/* 0: a request arrived; 1: the connection was given up, accept anew;
 * < 0: stopping or an error. */
static int accept_kept(FCGX_Request *req)
{
    struct pollfd p[2] = {
        { .fd = req->ipcFd, .events = POLLIN },
        { .fd = pool.wake[0], .events = POLLIN },
    };
    int give_up = 0;

    atomic_fetch_add(&pool.parked, 1);
    grow_if_needed();
    for (;;) {
        int rc = poll(p, 2, KEPT_IDLE_MS);
        if (rc > 0 || (rc < 0 && errno != EINTR))
            break;
        /* Only when no thread can be added: a kept connection idle this
         * long gives its thread back to accept(), so connections waiting
         * in the backlog are not starved. */
        if (rc == 0 && at_cap_and_full()) {
            give_up = 1;
            break;
        }
    }
    atomic_fetch_sub(&pool.parked, 1);
    if (give_up || p[1].revents) {
        FCGX_Free(req, 1);  /* closes our kept connection, nobody else's */
        return give_up ? 1 : -1;
    }
    return FCGX_Accept_r(req);
}

/* Idle threads beyond the few in accept() wait on a most-recent-first
 * stack: the warmest thread is called in first, and only when the last
 * accepter has just taken a connection, so under load a request costs no
 * extra wake-up. */
struct idler {
    pthread_cond_t cv;
    int woken;
    struct idler *next;
};
static pthread_mutex_t idle_lock = PTHREAD_MUTEX_INITIALIZER;
static struct idler *idle_top;

static void idle_wait(struct idler *me)
{
    pthread_mutex_lock(&idle_lock);
    /* Re-checked under the lock: an accepter leaving after this point
     * finds us on the stack. */
    if (atomic_load(&pool.in_accept) > 0 && !atomic_load(&pool.stopping)) {
        me->woken = 0;
        me->next = idle_top;
        idle_top = me;
        while (!me->woken)
            pthread_cond_wait(&me->cv, &idle_lock);
    }
    pthread_mutex_unlock(&idle_lock);
}

static void idle_wake(int all)
{
    pthread_mutex_lock(&idle_lock);
    do {
        struct idler *t = idle_top;
        if (!t)
            break;
        idle_top = t->next;
        t->woken = 1;
        pthread_cond_signal(&t->cv);
    } while (all);
    pthread_mutex_unlock(&idle_lock);
}

static int accept_new(FCGX_Request *req)
{
    static _Thread_local struct idler me = { .cv = PTHREAD_COND_INITIALIZER };
    for (;;) {
        if (atomic_load(&pool.stopping))
            return -1;
        if (atomic_fetch_add(&pool.in_accept, 1) < (int)pool.o.accepters)
            break;
        atomic_fetch_sub(&pool.in_accept, 1);
        idle_wait(&me);
    }
    int rc = FCGX_Accept_r(req);
    if (atomic_fetch_sub(&pool.in_accept, 1) == 1)
        idle_wake(0);  /* nobody is accepting any more: call one in */
    return rc;
}

static FCGX_Request *new_request(void)
{
    FCGX_Request *req = piapi_xmalloc(sizeof *req);
    FCGX_InitRequest(req, pool.o.fd, 0);
    return req;
}

static void *worker_main(void *arg)
{
    (void)arg;
    struct piapi_worker *w = piapi_request_worker_create(&pool.stopping, &pool.aborting);
    FCGX_Request *req = new_request();

    for (;;) {
        int rc = req->ipcFd >= 0 ? accept_kept(req) : accept_new(req);
        if (rc > 0)
            continue;
        if (rc < 0) {
            if (atomic_load(&pool.stopping))
                break;
            /* EMFILE and friends: back off instead of spinning. */
            usleep(10000);
            continue;
        }
        if (serve(w, req))
            req = new_request();
    }
    FCGX_Free(req, 1);
    free(req);
    piapi_request_worker_destroy(w);
    return NULL;
}

int piapi_pool_start(const struct piapi_pool_opts *o, char *err, size_t errlen)
{
    pool.o = *o;
    pool.cap = o->max_requests + o->accepters;
    pool.threads = piapi_xcalloc(pool.cap, sizeof *pool.threads);
    if (pipe2(pool.wake, O_CLOEXEC) != 0) {
        snprintf(err, errlen, "pipe: %s", strerror(errno));
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
    piapi_metrics_set_pool_probe(probe);

    unsigned initial = o->accepters * 2 < pool.cap ? o->accepters * 2 : pool.cap;
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
    /* Wakes every thread blocked in accept(): it returns EINVAL at once
     *. */
    shutdown(pool.o.fd, SHUT_RDWR);
    idle_wake(1);
    /* Threads waiting on kept connections poll this pipe too. */
    ssize_t w = write(pool.wake[1], "x", 1);
    (void)w;
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
    piapi_metrics_set_pool_probe(NULL);
    free(pool.threads);
    close(pool.wake[0]);
    close(pool.wake[1]);
    pool.threads = NULL;
    sem_destroy(&pool.request_slots);
    pthread_attr_destroy(&pool.attr);
}
