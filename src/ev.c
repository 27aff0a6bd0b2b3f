/* The general event loop (ev.h): epoll, a binary heap of timers, an
 * eventfd for wake-ups and a lock-free stack of posts.
 *
 * Wake-ups cost a write(2) on the posting thread and a read(2) and an
 * epoll round trip on the loop's, so a post pays for one only when the
 * loop may be asleep: `sleeping` is set just before epoll_wait and the
 * queue is checked after setting it, so a post either is seen by that
 * check or finds `sleeping` set and wakes the loop. */
#include "piapi/ev.h"

#include <errno.h>
#include <math.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "piapi/util.h"

#define EVENTS_MAX 64

struct piapi_ev {
    int epfd;
    struct piapi_ev_io wake;       /* the eventfd */
    struct piapi_ev_timer **heap;  /* min-heap on `at` */
    size_t nheap, capheap;
    struct piapi_ev_hook *hooks;
    _Atomic(struct piapi_ev_post *) posts;  /* newest first */
    atomic_int sleeping;
};

static _Thread_local const struct piapi_ev *current;

/* ---- timers ------------------------------------------------------------ */

static void heap_put(struct piapi_ev *ev, size_t i, struct piapi_ev_timer *t)
{
    ev->heap[i] = t;
    t->slot = i + 1;
}

static void sift_up(struct piapi_ev *ev, size_t i)
{
    struct piapi_ev_timer *t = ev->heap[i];
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (ev->heap[parent]->at <= t->at)
            break;
        heap_put(ev, i, ev->heap[parent]);
        i = parent;
    }
    heap_put(ev, i, t);
}

static void sift_down(struct piapi_ev *ev, size_t i)
{
    struct piapi_ev_timer *t = ev->heap[i];
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= ev->nheap)
            break;
        if (c + 1 < ev->nheap && ev->heap[c + 1]->at < ev->heap[c]->at)
            c++;
        if (t->at <= ev->heap[c]->at)
            break;
        heap_put(ev, i, ev->heap[c]);
        i = c;
    }
    heap_put(ev, i, t);
}

void piapi_ev_timer_stop(struct piapi_ev *ev, struct piapi_ev_timer *t)
{
    if (!t->slot)
        return;
    size_t i = t->slot - 1;
    struct piapi_ev_timer *last = ev->heap[--ev->nheap];
    t->slot = 0;
    if (last == t)
        return;
    heap_put(ev, i, last);
    sift_up(ev, i);
    sift_down(ev, last->slot - 1);
}

void piapi_ev_timer_set(struct piapi_ev *ev, struct piapi_ev_timer *t, double at)
{
    if (t->slot) {
        size_t i = t->slot - 1;
        t->at = at;
        sift_up(ev, i);
        sift_down(ev, t->slot - 1);
        return;
    }
    if (ev->nheap == ev->capheap) {
        ev->capheap = ev->capheap ? ev->capheap * 2 : 64;
        ev->heap = piapi_xrealloc(ev->heap, ev->capheap * sizeof *ev->heap);
    }
    t->at = at;
    heap_put(ev, ev->nheap++, t);
    sift_up(ev, ev->nheap - 1);
}

double piapi_ev_next_deadline(const struct piapi_ev *ev)
{
    return ev->nheap ? ev->heap[0]->at : HUGE_VAL;
}

/* A callback may arm, move or stop any timer, itself included. */
static void run_timers(struct piapi_ev *ev)
{
    double now = piapi_now_mono();
    while (ev->nheap && ev->heap[0]->at <= now) {
        struct piapi_ev_timer *t = ev->heap[0];
        piapi_ev_timer_stop(ev, t);
        t->cb(t);
    }
}

/* ---- file descriptors -------------------------------------------------- */

int piapi_ev_io_arm(struct piapi_ev *ev, struct piapi_ev_io *io, uint32_t events)
{
    struct epoll_event e = { .events = events, .data.ptr = io };

    if (io->in_set && epoll_ctl(ev->epfd, EPOLL_CTL_MOD, io->fd, &e) == 0) {
        io->events = events;
        return 0;
    }
    /* Not in the set, or its number was closed and so left the set
     * silently (ENOENT): add it. */
    if (io->in_set && errno != ENOENT)
        return -1;
    if (epoll_ctl(ev->epfd, EPOLL_CTL_ADD, io->fd, &e) != 0)
        return -1;
    io->in_set = 1;
    io->events = events;
    return 0;
}

void piapi_ev_io_stop(struct piapi_ev *ev, struct piapi_ev_io *io)
{
    if (!io->in_set)
        return;
    epoll_ctl(ev->epfd, EPOLL_CTL_DEL, io->fd, NULL);
    io->in_set = 0;
    io->events = 0;
}

/* ---- posts and wake-ups ------------------------------------------------- */

void piapi_ev_wake(struct piapi_ev *ev)
{
    uint64_t one = 1;
    ssize_t r = write(ev->wake.fd, &one, sizeof one);
    (void)r;  /* EAGAIN: the counter is full, the loop is awake anyway */
}

static void on_wake(struct piapi_ev_io *io, uint32_t events)
{
    uint64_t n;
    ssize_t r = read(io->fd, &n, sizeof n);
    (void)events;
    (void)r;
}

void piapi_ev_post(struct piapi_ev *ev, struct piapi_ev_post *p)
{
    p->next = atomic_load(&ev->posts);
    while (!atomic_compare_exchange_weak(&ev->posts, &p->next, p))
        ;
    if (current != ev && atomic_exchange(&ev->sleeping, 0))
        piapi_ev_wake(ev);
}

int piapi_ev_posts_pending(const struct piapi_ev *ev)
{
    return atomic_load(&ev->posts) != NULL;
}

void piapi_ev_gate_open(struct piapi_ev_gate *g, struct piapi_ev *ev)
{
    g->ev = ev;
    atomic_store(&g->open, 1);
}

void piapi_ev_gate_close(struct piapi_ev_gate *g)
{
    atomic_store(&g->open, 0);
    while (atomic_load(&g->inside))
        sched_yield();
}

int piapi_ev_gate_post(struct piapi_ev_gate *g, struct piapi_ev_post *p)
{
    atomic_fetch_add(&g->inside, 1);
    /* g->ev is read only while the gate is open or on the loop's own
     * thread: close() waits for `inside` before the loop may go. */
    int ok = atomic_load(&g->open) || (g->ev && current == g->ev);
    if (ok)
        piapi_ev_post(g->ev, p);
    atomic_fetch_sub(&g->inside, 1);
    return ok ? 0 : -1;
}

static void run_posts(struct piapi_ev *ev)
{
    struct piapi_ev_post *p = atomic_load(&ev->posts)
                                  ? atomic_exchange(&ev->posts, NULL) : NULL;
    struct piapi_ev_post *in_order = NULL;

    /* Newest first on the stack: reversed, they run in posting order. */
    while (p) {
        struct piapi_ev_post *n = p->next;
        p->next = in_order;
        in_order = p;
        p = n;
    }
    while (in_order) {
        struct piapi_ev_post *n = in_order->next;
        in_order->fn(in_order);
        in_order = n;
    }
}

/* ---- the round ---------------------------------------------------------- */

void piapi_ev_hook_add(struct piapi_ev *ev, struct piapi_ev_hook *h)
{
    struct piapi_ev_hook **tail = &ev->hooks;
    while (*tail)
        tail = &(*tail)->next;
    h->next = NULL;
    *tail = h;
}

static int sleep_ms(const struct piapi_ev *ev, int max_wait_ms)
{
    double until = piapi_ev_next_deadline(ev);
    if (until == HUGE_VAL)
        return max_wait_ms;
    double left = until - piapi_now_mono();
    if (left <= 0)
        return 0;
    /* Rounded up: waking a hair early would only spin once more. */
    double ms = ceil(left * 1000.0);
    if (max_wait_ms >= 0 && ms > max_wait_ms)
        return max_wait_ms;
    return ms > 86400000 ? 86400000 : (int)ms;
}

void piapi_ev_run_once(struct piapi_ev *ev, int max_wait_ms)
{
    struct epoll_event events[EVENTS_MAX];

    current = ev;
    atomic_store(&ev->sleeping, 1);
    int ms = atomic_load(&ev->posts) ? 0 : sleep_ms(ev, max_wait_ms);
    int n = epoll_wait(ev->epfd, events, EVENTS_MAX, ms);
    atomic_store(&ev->sleeping, 0);
    for (int i = 0; i < n; i++) {
        struct piapi_ev_io *io = events[i].data.ptr;
        io->cb(io, events[i].events);
    }
    run_posts(ev);
    run_timers(ev);
    for (struct piapi_ev_hook *h = ev->hooks; h; h = h->next)
        h->fn(h);
}

int piapi_ev_on_thread(const struct piapi_ev *ev)
{
    return current == ev;
}

/* ---- life ---------------------------------------------------------------- */

struct piapi_ev *piapi_ev_create(char *err, size_t errlen)
{
    struct piapi_ev *ev = piapi_xcalloc(1, sizeof *ev);

    ev->epfd = epoll_create1(EPOLL_CLOEXEC);
    ev->wake = (struct piapi_ev_io){ .cb = on_wake,
                                     .fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK) };
    if (ev->epfd < 0 || ev->wake.fd < 0 ||
        piapi_ev_io_arm(ev, &ev->wake, EPOLLIN) != 0) {
        snprintf(err, errlen, "event loop: %s", strerror(errno));
        piapi_ev_destroy(ev);
        return NULL;
    }
    return ev;
}

void piapi_ev_destroy(struct piapi_ev *ev)
{
    if (!ev)
        return;
    if (ev->epfd >= 0)
        close(ev->epfd);
    if (ev->wake.fd >= 0)
        close(ev->wake.fd);
    free(ev->heap);
    free(ev);
}
