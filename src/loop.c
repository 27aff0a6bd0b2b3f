/* The gateway's event loop (loop.h): one thread running a general event
 * loop (ev.h) with three clients: the listening socket (pool.c decides
 * what to do with each connection), waits for a connection's next request,
 * and the upstream transfers (upstream.c).
 *
 * Everything below runs on the loop thread, except piapi_loop_post() (also
 * called by pool threads) and piapi_loop_start/stop(). */
#include "piapi/loop.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>

#include "piapi/ev.h"
#include "piapi/fcgi_conn.h"
#include "piapi/util.h"
#include "upstream.h"

/* Upper bound on one sleep, so a stop is seen promptly. */
#define ROUND_MAX_MS 1000

struct watch {                  /* the listening socket */
    struct piapi_ev_io io;
    void (*ready)(int fd);
    struct piapi_ev_timer resume;  /* paused until then */
};

struct post {                   /* see piapi_loop_post() */
    struct piapi_ev_post p;
    void (*fn)(void *arg);
    void *arg;
};

struct await {                  /* see piapi_loop_await() */
    struct piapi_ev_io io;
    struct piapi_ev_timer deadline;
    void (*cb)(int fd, void *arg, int timed_out);
    void *arg;
    struct await *prev, *next;  /* waiting */
    struct await *grave;
    int dead;
};

static struct {
    pthread_t thread;
    int started;                /* the thread runs (start/stop only) */
    struct piapi_ev *ev;
    struct piapi_ev_gate gate;  /* posts from pool threads */
    atomic_int stop;
    struct watch watch;
    struct await *awaits;       /* list of waits for a request's arrival */
    struct await *await_grave;
    struct piapi_ev_hook round_end;
} loop;

static _Thread_local int on_loop_thread;

/* ---- the listening socket ------------------------------------------- */

static void on_listen(struct piapi_ev_io *io, uint32_t events)
{
    (void)events;
    if (loop.watch.ready)
        loop.watch.ready(io->fd);
}

static void on_resume(struct piapi_ev_timer *t)
{
    (void)t;
    piapi_ev_io_arm(loop.ev, &loop.watch.io, EPOLLIN);
}

void piapi_loop_pause(int fd, int ms)
{
    if (fd != loop.watch.io.fd || !loop.watch.ready)
        return;  /* not watched, or for good already */
    piapi_ev_io_stop(loop.ev, &loop.watch.io);
    if (ms < 0) {
        piapi_ev_timer_stop(loop.ev, &loop.watch.resume);
        loop.watch.ready = NULL;
    } else {
        piapi_ev_timer_set(loop.ev, &loop.watch.resume, piapi_now_mono() + ms / 1000.0);
    }
}

/* ---- waiting for a connection's next request ------------------------ */

static void end_await(struct await *a, int timed_out)
{
    piapi_ev_io_stop(loop.ev, &a->io);
    piapi_ev_timer_stop(loop.ev, &a->deadline);
    if (a->prev)
        a->prev->next = a->next;
    else
        loop.awaits = a->next;
    if (a->next)
        a->next->prev = a->prev;
    a->dead = 1;
    a->grave = loop.await_grave;  /* may still be in this round's events */
    loop.await_grave = a;
    a->cb(a->io.fd, a->arg, timed_out);
}

static void on_await_io(struct piapi_ev_io *io, uint32_t events)
{
    struct await *a = (struct await *)io;
    if (!a->dead)  /* a hang-up ends the wait like its deadline */
        end_await(a, (events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0);
}

static void on_await_deadline(struct piapi_ev_timer *t)
{
    end_await((struct await *)((char *)t - offsetof(struct await, deadline)), 1);
}

int piapi_loop_await(int fd, int timeout_ms, void (*cb)(int fd, void *arg, int timed_out),
                     void *arg)
{
    struct await *a = piapi_xcalloc(1, sizeof *a);
    *a = (struct await){
        .io = { .cb = on_await_io, .fd = fd },
        .deadline = { .cb = on_await_deadline },
        .cb = cb, .arg = arg,
    };
    if (piapi_ev_io_arm(loop.ev, &a->io, EPOLLIN | EPOLLRDHUP) != 0) {
        free(a);
        return -1;
    }
    a->next = loop.awaits;
    if (a->next)
        a->next->prev = a;
    loop.awaits = a;
    if (timeout_ms >= 0)
        piapi_ev_timer_set(loop.ev, &a->deadline, piapi_now_mono() + timeout_ms / 1000.0);
    return 0;
}

void piapi_loop_expire_awaits(void)
{
    while (loop.awaits)
        end_await(loop.awaits, 1);
}

static void on_round_end(struct piapi_ev_hook *h)
{
    (void)h;
    while (loop.await_grave) {
        struct await *a = loop.await_grave;
        loop.await_grave = a->grave;
        free(a);
    }
}

/* ---- calls from other threads --------------------------------------- */

static void run_post(struct piapi_ev_post *p)
{
    struct post *post = (struct post *)p;
    post->fn(post->arg);
    free(post);
}

int piapi_loop_post(void (*fn)(void *arg), void *arg)
{
    if (on_loop_thread) {
        fn(arg);
        return 0;
    }
    struct post *p = piapi_xmalloc(sizeof *p);
    *p = (struct post){ .p = { .fn = run_post }, .fn = fn, .arg = arg };
    if (piapi_ev_gate_post(&loop.gate, &p->p) != 0) {
        free(p);
        return -1;
    }
    return 0;
}

struct piapi_ev *piapi_loop_ev(void)
{
    return loop.ev;
}

int piapi_loop_on_thread(void)
{
    return on_loop_thread;
}

/* ---- the thread ------------------------------------------------------ */

static void *loop_main(void *arg)
{
    (void)arg;
    on_loop_thread = 1;
    piapi_fcgi_mark_loop_thread();
    for (;;) {
        int stopping = atomic_load(&loop.stop);
        if (stopping)
            upstream_expedite();  /* the abort flag is set: end them */
        piapi_ev_run_once(loop.ev, ROUND_MAX_MS);
        if (stopping)  /* nothing is left to arrive: the drain is over */
            piapi_loop_expire_awaits();
        /* Both gates are closed once stopping: what is queued is all. */
        if (stopping && !upstream_running() && !loop.awaits &&
            !piapi_ev_posts_pending(loop.ev))
            break;
    }
    on_round_end(NULL);
    return NULL;
}

int piapi_loop_start(unsigned max_transfers, int listen_fd, void (*ready)(int fd),
                     char *err, size_t errlen)
{
    loop.ev = piapi_ev_create(err, errlen);
    if (!loop.ev)
        return -1;
    loop.watch = (struct watch){
        .io = { .cb = on_listen, .fd = listen_fd },
        .ready = ready,
        .resume = { .cb = on_resume },
    };
    if (piapi_ev_io_arm(loop.ev, &loop.watch.io, EPOLLIN) != 0) {
        snprintf(err, errlen, "event loop: watching the listening socket: %s",
                 strerror(errno));
        goto fail;
    }
    loop.round_end.fn = on_round_end;
    piapi_ev_hook_add(loop.ev, &loop.round_end);
    upstream_start(loop.ev, max_transfers);
    piapi_ev_gate_open(&loop.gate, loop.ev);
    int rc = pthread_create(&loop.thread, NULL, loop_main, NULL);
    if (rc != 0) {
        snprintf(err, errlen, "event loop: pthread_create: %s", strerror(rc));
        upstream_close();
        piapi_ev_gate_close(&loop.gate);
        upstream_stop();
        goto fail;
    }
    loop.started = 1;
    return 0;
fail:
    piapi_ev_destroy(loop.ev);
    loop.ev = NULL;
    return -1;
}

void piapi_loop_stop(void)
{
    if (!loop.started)
        return;
    /* Closed before the stop flag: the loop's last round then sees every
     * call another thread will ever post. */
    upstream_close();
    piapi_ev_gate_close(&loop.gate);
    atomic_store(&loop.stop, 1);
    piapi_ev_wake(loop.ev);
    pthread_join(loop.thread, NULL);
    upstream_stop();
    piapi_ev_destroy(loop.ev);
    loop.ev = NULL;
    loop.started = 0;
}
