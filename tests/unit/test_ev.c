/* ev: the general event loop on its own: fd handlers with the events
 * they were armed for, a re-armed closed number, timers in deadline order
 * (moved, stopped, armed from a callback), posts from other threads in
 * order and with a wake-up from a sleep, end-of-round hooks, and a gate
 * for posts from threads that may outlive the loop. */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "piapi/ev.h"
#include "piapi/util.h"
#include "unit.h"

static struct piapi_ev *new_ev(void)
{
    char err[128];
    struct piapi_ev *ev = piapi_ev_create(err, sizeof err);
    CU_ASSERT_PTR_NOT_NULL_FATAL(ev);
    return ev;
}

/* ---- fds */

struct seen_io {
    struct piapi_ev_io io;
    int calls;
    uint32_t last;
};

static void on_io(struct piapi_ev_io *io, uint32_t events)
{
    struct seen_io *s = (struct seen_io *)io;
    s->calls++;
    s->last = events;
}

static void test_io(void)
{
    struct piapi_ev *ev = new_ev();
    int sv[2];
    CU_ASSERT_FATAL(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    struct seen_io s = { .io = { .cb = on_io, .fd = sv[0] } };

    CU_ASSERT_EQUAL(piapi_ev_io_arm(ev, &s.io, EPOLLIN), 0);
    piapi_ev_run_once(ev, 0);
    CU_ASSERT_EQUAL(s.calls, 0);                 /* nothing to read */
    CU_ASSERT_EQUAL(write(sv[1], "x", 1), 1);
    piapi_ev_run_once(ev, 1000);
    CU_ASSERT_EQUAL(s.calls, 1);
    CU_ASSERT(s.last & EPOLLIN);

    CU_ASSERT_EQUAL(piapi_ev_io_arm(ev, &s.io, EPOLLOUT), 0);  /* moved */
    piapi_ev_run_once(ev, 1000);
    CU_ASSERT_EQUAL(s.calls, 2);
    CU_ASSERT(s.last & EPOLLOUT);
    CU_ASSERT_EQUAL(s.io.events, EPOLLOUT);

    piapi_ev_io_stop(ev, &s.io);
    piapi_ev_run_once(ev, 0);
    CU_ASSERT_EQUAL(s.calls, 2);
    CU_ASSERT_EQUAL(s.io.in_set, 0);
    piapi_ev_io_stop(ev, &s.io);                 /* twice is fine */

    /* The number is closed behind the loop's back (it leaves the epoll
     * set) and reused: arming it again adds it. */
    CU_ASSERT_EQUAL(piapi_ev_io_arm(ev, &s.io, EPOLLIN), 0);
    close(sv[0]);
    close(sv[1]);
    CU_ASSERT_FATAL(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    if (sv[0] != s.io.fd) {                      /* numbers are reused lowest first */
        CU_ASSERT_EQUAL(dup2(sv[0], s.io.fd), s.io.fd);
        close(sv[0]);
        sv[0] = s.io.fd;
    }
    CU_ASSERT_EQUAL(write(sv[1], "y", 1), 1);
    CU_ASSERT_EQUAL(piapi_ev_io_arm(ev, &s.io, EPOLLIN), 0);
    piapi_ev_run_once(ev, 1000);
    CU_ASSERT_EQUAL(s.calls, 3);
    piapi_ev_io_stop(ev, &s.io);
    close(sv[0]);
    close(sv[1]);
    piapi_ev_destroy(ev);
}

/* ---- timers */

struct order {
    struct piapi_ev_timer t;
    int id;
    int *log;
    int *n;
};

static void on_timer(struct piapi_ev_timer *t)
{
    struct order *o = (struct order *)t;
    o->log[(*o->n)++] = o->id;
}

static void test_timer_order(void)
{
    struct piapi_ev *ev = new_ev();
    enum { N = 40 };
    struct order o[N];
    int log[N], n = 0;
    double now = piapi_now_mono();

    /* Deadlines in the past, out of order; some moved, some stopped. */
    for (int i = 0; i < N; i++) {
        o[i] = (struct order){ .t = { .cb = on_timer }, .id = i, .log = log, .n = &n };
        piapi_ev_timer_set(ev, &o[i].t, now - 1.0 + ((i * 17) % N) / 1000.0);
    }
    piapi_ev_timer_set(ev, &o[5].t, now - 2.0);  /* first now */
    piapi_ev_timer_stop(ev, &o[7].t);
    piapi_ev_timer_stop(ev, &o[7].t);            /* twice is fine */
    piapi_ev_timer_set(ev, &o[9].t, now + 3600); /* not due */
    CU_ASSERT_DOUBLE_EQUAL(piapi_ev_next_deadline(ev), now - 2.0, 1e-9);
    piapi_ev_run_once(ev, 0);
    CU_ASSERT_EQUAL(n, N - 2);
    CU_ASSERT_EQUAL(log[0], 5);
    for (int i = 1; i < n; i++) {
        double prev = now - 1.0 + ((log[i - 1] * 17) % N) / 1000.0;
        double cur = now - 1.0 + ((log[i] * 17) % N) / 1000.0;
        if (i > 1)
            CU_ASSERT(prev <= cur);
        CU_ASSERT(log[i] != 7 && log[i] != 9);
    }
    CU_ASSERT_DOUBLE_EQUAL(piapi_ev_next_deadline(ev), now + 3600, 1e-6);
    piapi_ev_timer_stop(ev, &o[9].t);
    CU_ASSERT(piapi_ev_next_deadline(ev) == HUGE_VAL);
    piapi_ev_destroy(ev);
}

struct rearm {
    struct piapi_ev_timer t;
    struct piapi_ev *ev;
    int fired;
};

static void on_rearm(struct piapi_ev_timer *t)
{
    struct rearm *r = (struct rearm *)t;
    if (++r->fired < 3)
        piapi_ev_timer_set(r->ev, t, piapi_now_mono() + 0.005);
}

/* A timer re-arming itself fires again, after its new deadline, and the
 * sleep ends for it. */
static void test_timer_rearm_and_sleep(void)
{
    struct piapi_ev *ev = new_ev();
    struct rearm r = { .t = { .cb = on_rearm }, .ev = ev };
    double t0 = piapi_now_mono();

    piapi_ev_timer_set(ev, &r.t, t0 + 0.005);
    for (int i = 0; i < 50 && r.fired < 3; i++)
        piapi_ev_run_once(ev, 1000);
    CU_ASSERT_EQUAL(r.fired, 3);
    double took = piapi_now_mono() - t0;
    CU_ASSERT(took >= 0.015);
    CU_ASSERT(took < 1.0);  /* the sleeps ended at the deadlines */
    piapi_ev_destroy(ev);
}

/* ---- posts */

struct counted_post {
    struct piapi_ev_post p;
    int id;
};

static int post_log[1000];
static atomic_int post_n;

static void on_post(struct piapi_ev_post *p)
{
    post_log[atomic_fetch_add(&post_n, 1)] = ((struct counted_post *)p)->id;
}

struct poster {
    struct piapi_ev *ev;
    struct counted_post posts[250];
    int base;
};

static void *post_many(void *arg)
{
    struct poster *ps = arg;
    for (int i = 0; i < 250; i++) {
        ps->posts[i] = (struct counted_post){ .p = { .fn = on_post }, .id = ps->base + i };
        piapi_ev_post(ps->ev, &ps->posts[i].p);
        if (i % 50 == 0)
            usleep(1000);  /* let the loop fall asleep in between */
    }
    return NULL;
}

/* Four threads post 250 each while the loop sleeps up to 5 s a round:
 * every post runs, each thread's in its order, and no sleep outlasts a
 * post (a lost wake-up would cost 5 s). */
static void test_posts_from_threads(void)
{
    struct piapi_ev *ev = new_ev();
    static struct poster ps[4];
    pthread_t th[4];

    atomic_store(&post_n, 0);
    for (int i = 0; i < 4; i++) {
        ps[i].ev = ev;
        ps[i].base = i * 1000;
        CU_ASSERT_FATAL(pthread_create(&th[i], NULL, post_many, &ps[i]) == 0);
    }
    double t0 = piapi_now_mono();
    while (atomic_load(&post_n) < 1000 && piapi_now_mono() - t0 < 20)
        piapi_ev_run_once(ev, 5000);
    CU_ASSERT(piapi_now_mono() - t0 < 4.0);
    for (int i = 0; i < 4; i++)
        pthread_join(th[i], NULL);
    CU_ASSERT_EQUAL(atomic_load(&post_n), 1000);
    int last[4] = { -1, -1, -1, -1 };
    for (int i = 0; i < 1000; i++) {
        int who = post_log[i] / 1000, seq = post_log[i] % 1000;
        CU_ASSERT(seq > last[who]);
        last[who] = seq;
    }
    CU_ASSERT_EQUAL(piapi_ev_posts_pending(ev), 0);
    piapi_ev_destroy(ev);
}

static struct piapi_ev_gate gate;

static void *post_through_gate(void *arg)
{
    static struct counted_post p = { .p = { .fn = on_post }, .id = 7 };
    (void)arg;
    return (void *)(intptr_t)piapi_ev_gate_post(&gate, &p.p);
}

/* A gate: closed before it opens and after it closes for other threads;
 * the loop's own thread may still post (work it is finishing). */
static void test_gate(void)
{
    struct piapi_ev *ev = new_ev();
    struct counted_post own = { .p = { .fn = on_post }, .id = 1 };
    pthread_t th;
    void *rc;

    atomic_store(&post_n, 0);
    CU_ASSERT_FATAL(pthread_create(&th, NULL, post_through_gate, NULL) == 0);
    pthread_join(th, &rc);
    CU_ASSERT_EQUAL((intptr_t)rc, -1);          /* not open yet */
    piapi_ev_gate_open(&gate, ev);
    CU_ASSERT_FATAL(pthread_create(&th, NULL, post_through_gate, NULL) == 0);
    pthread_join(th, &rc);
    CU_ASSERT_EQUAL((intptr_t)rc, 0);
    CU_ASSERT(piapi_ev_posts_pending(ev));
    piapi_ev_run_once(ev, 0);                   /* this is the loop's thread now */
    CU_ASSERT_EQUAL(atomic_load(&post_n), 1);
    CU_ASSERT_EQUAL(post_log[0], 7);

    piapi_ev_gate_close(&gate);
    CU_ASSERT_FATAL(pthread_create(&th, NULL, post_through_gate, NULL) == 0);
    pthread_join(th, &rc);
    CU_ASSERT_EQUAL((intptr_t)rc, -1);
    CU_ASSERT_EQUAL(piapi_ev_gate_post(&gate, &own.p), 0);
    piapi_ev_run_once(ev, 0);
    CU_ASSERT_EQUAL(atomic_load(&post_n), 2);
    CU_ASSERT_EQUAL(post_log[1], 1);
    CU_ASSERT(!piapi_ev_posts_pending(ev));
    piapi_ev_destroy(ev);
}

/* ---- hooks */

struct counted_hook {
    struct piapi_ev_hook h;
    int *log;
    int *n;
    int id;
};

static void on_hook(struct piapi_ev_hook *h)
{
    struct counted_hook *c = (struct counted_hook *)h;
    c->log[(*c->n)++] = c->id;
}

static void test_hooks_run_in_order_each_round(void)
{
    struct piapi_ev *ev = new_ev();
    int log[8], n = 0;
    struct counted_hook a = { .h = { .fn = on_hook }, .log = log, .n = &n, .id = 1 };
    struct counted_hook b = { .h = { .fn = on_hook }, .log = log, .n = &n, .id = 2 };

    piapi_ev_hook_add(ev, &a.h);
    piapi_ev_hook_add(ev, &b.h);
    piapi_ev_run_once(ev, 0);
    piapi_ev_run_once(ev, 0);
    CU_ASSERT_EQUAL(n, 4);
    CU_ASSERT(log[0] == 1 && log[1] == 2 && log[2] == 1 && log[3] == 2);
    CU_ASSERT(piapi_ev_on_thread(ev));
    piapi_ev_destroy(ev);
}

static const struct unit_case cases[] = {
    { "fd handlers: armed events, moved, stopped, reused number", test_io },
    { "timers fire in deadline order; moved and stopped ones", test_timer_order },
    { "a timer re-armed from its callback; sleeps end at deadlines", test_timer_rearm_and_sleep },
    { "posts from four threads: all run, each thread's in order", test_posts_from_threads },
    { "gate: closed before and after for other threads, open to the loop's", test_gate },
    { "end-of-round hooks, in order, every round", test_hooks_run_in_order_each_round },
    { NULL, NULL },
};

UNIT_MAIN("ev", cases)
