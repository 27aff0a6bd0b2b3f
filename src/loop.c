/* The event loop (loop.h). Transfers: a request that arrived whole runs
 * its upstream transfer here, through libcurl's multi socket API, so a
 * request costs no thread sleeping on its upstream, a thousand streams
 * cost no thousand threads, and all transfers to one origin share one
 * upstream connection cache. The listening socket is watched here too
 * (pool.c decides what to do with each connection).
 *
 * Everything below runs on the loop thread, except proxy_loop_submit()
 * and piapi_loop_post() (also called by pool threads) and
 * piapi_loop_start/stop(). */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "piapi/loop.h"
#include "proxy_xfer.h"

/* Idle easy handles kept for reuse (each holds a download buffer). */
#define SPARE_MAX 64
/* Upstream connections kept at most per origin, idle or not; see
 * origin_for(). */
#define CACHE_MAX 256
/* Origins with a multi handle of their own; any more share the last. */
#define ORIGINS_MAX 16
#define ORIGIN_KEY_MAX 128
/* The sweep over every transfer's timers (head and idle timeouts, SSE
 * pings) runs at most this often, and at least this often while any
 * transfer runs: a timer fires up to SWEEP_MAX_S late. */
#define SWEEP_MIN_S 0.010
#define SWEEP_MAX_S 0.050
/* libcurl 7.88 checks every idle connection of a cache (a poll() each) at
 * most once a second, for as long as one may be reused: its default
 * CURLOPT_MAXAGE_CONN, 118 s. See prune(). */
#define PRUNE_EVERY_S 1.0
#define PRUNE_FOR_S 120.0
#define EVENTS_MAX 64

/* What an epoll registration points at; each owner starts with it. */
enum kind { K_WAKE, K_SOCK, K_XFER, K_WATCH, K_AWAIT };

/* One upstream origin (scheme://host:port): a multi handle, so a
 * connection cache, of its own. libcurl 7.88 walks the whole cache of a
 * multi handle, origin by origin, each time a transfer leaves it; with one
 * handle for all, a request to one provider also walked past every idle
 * connection to the others. */
struct origin {
    char key[ORIGIN_KEY_MAX];   /* the URL up to its path */
    CURLM *multi;
    double deadline;            /* libcurl's timer; < 0: none */
    double used_at;             /* a transfer last started */
    double pruned_at;           /* libcurl last pruned the cache, or later */
    int pruned_now;             /* a transfer of this round runs the prune */
    int pruning;                /* the pruner is in the multi handle */
    CURL *pruner;               /* see prune() */
};

struct lxfer {
    enum kind kind;
    struct origin *o;
    struct xfer x;
    struct lxfer *prev, *next;  /* running transfers */
    struct lxfer *link;         /* submission queue, dirty list, graveyard */
    int watched;                /* the FastCGI fd is in the epoll set */
    int dirty;
    int dead;
    char body[];                /* copy of the request body */
};

/* A socket libcurl asked us to watch, by fd number. When libcurl is done
 * with a connection for now (it goes back to the cache) the socket stays
 * in the epoll set, so reusing it costs one epoll_ctl instead of two. */
struct csock {
    enum kind kind;
    struct origin *o;           /* whose multi handle it belongs to */
    curl_socket_t fd;
    uint32_t events;            /* what it is armed for */
    int parked;                 /* libcurl removed it: not its event */
};

struct watch {                  /* the listening socket */
    enum kind kind;
    int fd;
    void (*ready)(int fd);
    double resume_at;           /* paused until then; < 0: not paused */
};

struct post {                   /* see piapi_loop_post() */
    void (*fn)(void *arg);
    void *arg;
    struct post *next;
};

struct await {                  /* see piapi_loop_await() */
    enum kind kind;
    int fd;
    void (*cb)(int fd, void *arg, int timed_out);
    void *arg;
    double deadline;
    struct await *prev, *next;  /* waiting */
    struct await *grave;
    int dead;
};

static struct {
    pthread_t thread;
    int started;                /* the thread runs (start/stop only) */
    int epfd, evfd;
    struct origin origins[ORIGINS_MAX];
    unsigned norigins;
    long cache_max;             /* CURLMOPT_MAXCONNECTS of each */
    int can_prune;              /* see prune() */
    size_t budget;              /* see xfer.budget; from the first socket */

    /* Submissions: a lock-free stack, newest first. The loop takes all
     * of it at once. `sleeping` is set while the loop may block in
     * epoll_wait: only then does a submitter pay for a wake-up.
     * `submitting` and `closed` let stop() wait out a submitter that
     * checked `closed` just before it was set. */
    _Atomic(struct lxfer *) queue;
    atomic_int sleeping;
    atomic_int submitting;
    atomic_int closed;
    atomic_int stop;

    struct lxfer *running;      /* list of running transfers */
    unsigned nrunning;
    struct lxfer *dirty;
    struct lxfer *grave;        /* freed after the epoll batch */
    struct csock **socks;       /* by fd number */
    size_t nsocks;
    double next_sweep;
    CURL *spare[SPARE_MAX];
    unsigned nspare;
    struct watch watch;
    struct await *awaits;       /* list of waits for a request's arrival */
    struct await *await_grave;

    /* Calls posted by other threads (rare: a kept connection whose request
     * ended on a pool thread): a lock-free stack like `queue`, taken whole;
     * each call stands alone, so their order does not matter. */
    _Atomic(struct post *) posts;
} loop = { .closed = 1 };  /* until started */

static enum kind wake_tag = K_WAKE;
static _Thread_local int on_loop_thread;

static void wake(void)
{
    uint64_t one = 1;
    ssize_t r = write(loop.evfd, &one, sizeof one);
    (void)r;
}

/* ---- libcurl's side ------------------------------------------------- */

static struct csock *sock_for(curl_socket_t fd)
{
    if ((size_t)fd >= loop.nsocks) {
        size_t n = loop.nsocks ? loop.nsocks : 64;
        while (n <= (size_t)fd)
            n *= 2;
        loop.socks = piapi_xrealloc(loop.socks, n * sizeof *loop.socks);
        memset(loop.socks + loop.nsocks, 0, (n - loop.nsocks) * sizeof *loop.socks);
        loop.nsocks = n;
    }
    struct csock *cs = loop.socks[fd];
    if (!cs) {
        cs = piapi_xcalloc(1, sizeof *cs);
        cs->kind = K_SOCK;
        cs->fd = fd;
        loop.socks[fd] = cs;
    }
    return cs;
}

static void arm(struct csock *cs, uint32_t events)
{
    struct epoll_event ev = { .events = events, .data.ptr = cs };
    if (epoll_ctl(loop.epfd, EPOLL_CTL_MOD, cs->fd, &ev) != 0 && errno == ENOENT)
        epoll_ctl(loop.epfd, EPOLL_CTL_ADD, cs->fd, &ev);
    cs->events = events;
}

static int on_socket(CURL *e, curl_socket_t fd, int what, void *ud, void *sockp)
{
    (void)e;
    if (fd < 0)
        return 0;
    struct csock *cs = sock_for(fd);
    cs->o = ud;
    if (what == CURL_POLL_REMOVE) {
        cs->parked = 1;
        return 0;
    }
    uint32_t want = (what & CURL_POLL_IN ? EPOLLIN : 0u) |
                    (what & CURL_POLL_OUT ? EPOLLOUT : 0u);
    cs->parked = 0;
    /* New to libcurl's socket hash: it may be a new socket behind a
     * number we knew (a closed socket leaves the epoll set silently), so
     * arm it whatever we remember. */
    if (!sockp)
        curl_multi_assign(cs->o->multi, fd, cs);
    else if (want == cs->events)
        return 0;
    arm(cs, want);
    return 0;
}

static int on_timer(CURLM *m, long timeout_ms, void *ud)
{
    (void)m;
    struct origin *o = ud;
    o->deadline = timeout_ms < 0 ? -1 : piapi_now_mono() + timeout_ms / 1000.0;
    return 0;
}

static void curl_act(struct origin *o, curl_socket_t fd, int flags)
{
    int running;
    curl_multi_socket_action(o->multi, fd, flags, &running);
}

/* The origin of url, found or added (loop thread only). */
static struct origin *origin_for(const char *url)
{
    const char *host = strstr(url, "://");
    size_t n = host ? (size_t)(host + 3 - url) + strcspn(host + 3, "/?#") : strlen(url);
    if (n >= ORIGIN_KEY_MAX)
        n = ORIGIN_KEY_MAX - 1;
    for (unsigned i = 0; i < loop.norigins; i++) {
        struct origin *o = &loop.origins[i];
        if (strncmp(o->key, url, n) == 0 && o->key[n] == '\0')
            return o;
    }
    if (loop.norigins == ORIGINS_MAX)
        return &loop.origins[ORIGINS_MAX - 1];
    struct origin *o = &loop.origins[loop.norigins];
    o->multi = curl_multi_init();
    if (!o->multi)
        abort();
    memcpy(o->key, url, n);
    o->key[n] = '\0';
    o->deadline = -1;
    o->used_at = o->pruned_at = -HUGE_VAL;
    curl_multi_setopt(o->multi, CURLMOPT_SOCKETFUNCTION, on_socket);
    curl_multi_setopt(o->multi, CURLMOPT_SOCKETDATA, o);
    curl_multi_setopt(o->multi, CURLMOPT_TIMERFUNCTION, on_timer);
    curl_multi_setopt(o->multi, CURLMOPT_TIMERDATA, o);
    /* libcurl's default cache shrinks with the transfers running, so a
     * burst's connections would all close as it ends. But the walk above
     * costs about 0.1 us a connection (cache-cold): 1,000 idle connections
     * after a burst of streams cost 100 us on every later request. The
     * bound keeps the walk short; above it, connections close after use. */
    curl_multi_setopt(o->multi, CURLMOPT_MAXCONNECTS, loop.cache_max);
    loop.norigins++;
    return o;
}

/* ---- transfers ------------------------------------------------------ */

static CURL *take_easy(void)
{
    if (loop.nspare)
        return loop.spare[--loop.nspare];
    CURL *e = curl_easy_init();
    if (!e)
        abort();
    return e;
}

static void give_easy(CURL *e)
{
    if (loop.nspare < SPARE_MAX)
        loop.spare[loop.nspare++] = e;
    else
        curl_easy_cleanup(e);
}

static struct lxfer *owner(struct xfer *x)
{
    return (struct lxfer *)((char *)x - offsetof(struct lxfer, x));
}

/* Short transfers end before anyone watches their client: the sweep
 * adds the FastCGI fd of those still running, and close() removes it. */
static void watch(struct lxfer *lx, int writable)
{
    struct epoll_event ev = {
        .events = EPOLLRDHUP | (lx->x.stdin_eof ? EPOLLIN : 0u) |
                  (writable ? EPOLLOUT : 0u),
        .data.ptr = lx,
    };
    epoll_ctl(loop.epfd, lx->watched ? EPOLL_CTL_MOD : EPOLL_CTL_ADD,
              lx->x.t->fcgi->ipcFd, &ev);
    lx->watched = 1;
}

static void on_blocked(struct xfer *x)
{
    watch(owner(x), 1);
}

static void on_queued(struct xfer *x)
{
    struct lxfer *lx = owner(x);
    if (!lx->dirty) {
        lx->dirty = 1;
        lx->link = loop.dirty;
        loop.dirty = lx;
    }
}

static void lower_sweep(double t)
{
    double floor = piapi_now_mono() + SWEEP_MIN_S;
    if (t < floor)
        t = floor;
    if (t < loop.next_sweep)
        loop.next_sweep = t;
}

static void start(struct lxfer *lx)
{
    struct xfer *x = &lx->x;

    if (!loop.budget) {
        int sndbuf = 0;
        socklen_t len = sizeof sndbuf;
        getsockopt(x->t->fcgi->ipcFd, SOL_SOCKET, SO_SNDBUF, &sndbuf, &len);
        loop.budget = sndbuf > 8192 ? (size_t)sndbuf / 2 : 4096;
    }
    x->body = lx->body;
    x->easy = take_easy();
    x->budget = loop.budget;
    x->blocked = on_blocked;
    x->queued = on_queued;
    xfer_setup(x);
    curl_easy_setopt(x->easy, CURLOPT_PRIVATE, lx);
    struct origin *o = lx->o = origin_for(x->t->url);
    o->used_at = piapi_now_mono();
    if (o->used_at >= o->pruned_at + PRUNE_EVERY_S)
        o->pruned_now = 1;

    lx->prev = NULL;
    lx->next = loop.running;
    if (lx->next)
        lx->next->prev = lx;
    loop.running = lx;
    loop.nrunning++;
    curl_multi_add_handle(o->multi, x->easy);
    lower_sweep(x->start + SWEEP_MAX_S);
}

static void finish(struct lxfer *lx, enum verdict v, CURLcode rc)
{
    struct xfer *x = &lx->x;
    struct piapi_transfer *t = x->t;

    /* Removing an unfinished transfer closes its connection, which is what
     * tells the upstream to stop generating. */
    curl_multi_remove_handle(lx->o->multi, x->easy);
    if (lx->prev)
        lx->prev->next = lx->next;
    else
        loop.running = lx->next;
    if (lx->next)
        lx->next->prev = lx->prev;
    loop.nrunning--;
    lx->dead = 1;
    /* A kept FastCGI connection outlives the transfer: it must not stay
     * in the epoll set pointing at lx (any other closes, which removes it). */
    if (lx->watched && t->fcgi->keepConnection)
        epoll_ctl(loop.epfd, EPOLL_CTL_DEL, t->fcgi->ipcFd, NULL);
    xfer_end(x, v, rc);
    give_easy(x->easy);
    piapi_buf_dispose(&x->head);
    t->done(t);  /* ends the FastCGI request: t is gone after this */
    if (!lx->dirty) {  /* else the dirty list still holds it */
        lx->link = loop.grave;
        loop.grave = lx;
    }
}

static void client_event(struct lxfer *lx, uint32_t ev)
{
    if (lx->dead)
        return;
    if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
        finish(lx, CLIENT_GONE, CURLE_OK);
        return;
    }
    if ((ev & EPOLLOUT) && lx->x.paused) {
        lx->x.paused = 0;
        lx->x.unchecked = 0;
        lx->x.last_upstream = piapi_now_mono();
        watch(lx, 0);
        curl_easy_pause(lx->x.easy, CURLPAUSE_CONT);
    }
}

static void run_posts(void)
{
    struct post *p = atomic_load(&loop.posts) ? atomic_exchange(&loop.posts, NULL) : NULL;
    while (p) {
        struct post *n = p->next;
        p->fn(p->arg);
        free(p);
        p = n;
    }
}

static void take_submitted(void)
{
    struct lxfer *q = atomic_exchange(&loop.queue, NULL);

    /* Newest first in the queue: reverse, to start them in order. */
    struct lxfer *in_order = NULL;
    while (q) {
        struct lxfer *n = q->link;
        q->link = in_order;
        in_order = q;
        q = n;
    }
    while (in_order) {
        struct lxfer *n = in_order->link;
        start(in_order);
        in_order = n;
    }
}

/* When the prune of an origin's cache is due and no transfer has run it.
 * < 0: none is. */
static double prune_due(const struct origin *o)
{
    if (!loop.can_prune || o->pruning || o->used_at + PRUNE_FOR_S < o->pruned_at)
        return -1;
    return o->pruned_at + PRUNE_EVERY_S;
}

/* libcurl prunes an origin's cache (one poll() per idle connection: 1 to
 * 3 ms for the 256 a burst of streams leaves) on the path of the first
 * transfer to start a second or more after the last prune. A request
 * that comes after a pause would pay for it before its upstream request
 * goes out. So when a prune is due and no transfer has started, the loop
 * starts one that runs the prune and nothing else: it needs a connection,
 * and the one it asks for (a UNIX socket at /dev/null, which no cached
 * connection matches and no proxy applies to) fails at once. */
static void prune(struct origin *o)
{
    o->pruned_now = 1;  /* done, or tried: the next try is a second away */
    if (!o->pruner) {
        char url[ORIGIN_KEY_MAX + 1];
        snprintf(url, sizeof url, "%s/", o->key);
        o->pruner = curl_easy_init();
        if (!o->pruner)
            return;
        curl_easy_setopt(o->pruner, CURLOPT_UNIX_SOCKET_PATH, "/dev/null");
        curl_easy_setopt(o->pruner, CURLOPT_URL, url);
        curl_easy_setopt(o->pruner, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(o->pruner, CURLOPT_CONNECTTIMEOUT_MS, 1000L);
    }
    if (curl_multi_add_handle(o->multi, o->pruner) == CURLM_OK)
        o->pruning = 1;
}

/* libcurl's timers that are due, a few rounds at most per origin. A
 * transfer started since the last round runs its first steps here, the
 * prune among them. */
static void run_timers(void)
{
    for (unsigned i = 0; i < loop.norigins; i++) {
        struct origin *o = &loop.origins[i];
        double due = prune_due(o);
        if (!o->pruned_now && due >= 0 && due <= piapi_now_mono())
            prune(o);
        for (int rounds = 0; rounds < 4; rounds++) {
            if (o->deadline < 0 || o->deadline > piapi_now_mono())
                break;
            o->deadline = -1;
            curl_act(o, CURL_SOCKET_TIMEOUT, 0);
        }
        if (o->pruned_now) {  /* now, or a moment ago: never too early */
            o->pruned_at = piapi_now_mono();
            o->pruned_now = 0;
        }
    }
}

static void reap_done(void)
{
    for (unsigned i = 0; i < loop.norigins; i++) {
        struct origin *o = &loop.origins[i];
        CURLMsg *m;
        int left;
        while ((m = curl_multi_info_read(o->multi, &left))) {
            if (m->msg != CURLMSG_DONE)
                continue;
            if (m->easy_handle == o->pruner) {
                curl_multi_remove_handle(o->multi, o->pruner);
                o->pruning = 0;
                continue;
            }
            struct lxfer *lx = NULL;
            CURLcode rc = m->data.result;
            curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&lx);
            if (lx && !lx->dead)
                finish(lx, RUNNING, rc);
        }
    }
}

static void end_await(struct await *a, int timed_out)
{
    epoll_ctl(loop.epfd, EPOLL_CTL_DEL, a->fd, NULL);
    if (a->prev)
        a->prev->next = a->next;
    else
        loop.awaits = a->next;
    if (a->next)
        a->next->prev = a->prev;
    a->dead = 1;
    a->grave = loop.await_grave;  /* may still be in this batch */
    loop.await_grave = a;
    a->cb(a->fd, a->arg, timed_out);
}

static void sweep(double now)
{
    double next = now + (loop.nrunning ? SWEEP_MAX_S : POLL_SLICE_MS / 1000.0);
    struct lxfer *lx = loop.running;
    while (lx) {
        struct lxfer *n = lx->next;
        enum verdict v = xfer_timers(&lx->x, now, &next);
        if (v != RUNNING)
            finish(lx, v, CURLE_OK);
        else if (!lx->watched)
            watch(lx, 0);
        lx = n;
    }
    struct await *a = loop.awaits;
    while (a) {
        struct await *n = a->next;
        if (now >= a->deadline)
            end_await(a, 1);
        else if (a->deadline < next)
            next = a->deadline;
        a = n;
    }
    loop.next_sweep = next > now + SWEEP_MIN_S ? next : now + SWEEP_MIN_S;
}

/* Every chunk libcurl handed over in this round leaves now, in one write
 * per transfer. A transfer that ended took its last bytes along with
 * FCGI_END_REQUEST already. */
static void flush_dirty(void)
{
    while (loop.dirty) {
        struct lxfer *lx = loop.dirty;
        loop.dirty = lx->link;
        lx->dirty = 0;
        if (lx->dead) {
            lx->link = loop.grave;
            loop.grave = lx;
        } else if (xfer_flush(&lx->x) != 0) {
            finish(lx, CLIENT_GONE, CURLE_OK);
        }
    }
}

static void bury(void)
{
    while (loop.await_grave) {
        struct await *a = loop.await_grave;
        loop.await_grave = a->grave;
        free(a);
    }
    while (loop.grave) {
        struct lxfer *lx = loop.grave;
        loop.grave = lx->link;
        free(lx);
    }
}

static int wait_ms(double now)
{
    double until = loop.next_sweep;
    for (unsigned i = 0; i < loop.norigins; i++) {
        double d = loop.origins[i].deadline;
        if (d >= 0 && d < until)
            until = d;
        d = prune_due(&loop.origins[i]);
        if (d >= 0 && d < until)
            until = d;
    }
    if (loop.watch.resume_at >= 0 && loop.watch.resume_at < until)
        until = loop.watch.resume_at;
    if (until <= now)
        return 0;
    int ms = (int)((until - now) * 1000.0) + 1;
    return ms > POLL_SLICE_MS ? POLL_SLICE_MS : ms;
}

static void dispatch(struct epoll_event *ev)
{
    enum kind *k = ev->data.ptr;
    if (*k == K_WAKE) {
        uint64_t n;
        ssize_t r = read(loop.evfd, &n, sizeof n);
        (void)r;
    } else if (*k == K_SOCK) {
        struct csock *cs = (struct csock *)k;
        if (cs->parked) {
            /* e.g. the upstream closed an idle connection: out of the set
             * (a hang-up is reported even when armed for nothing), until
             * libcurl reuses or closes it */
            epoll_ctl(loop.epfd, EPOLL_CTL_DEL, cs->fd, NULL);
            cs->events = 0;
            return;
        }
        int flags = 0;
        if (ev->events & (EPOLLIN | EPOLLHUP | EPOLLRDHUP))
            flags |= CURL_CSELECT_IN;
        if (ev->events & EPOLLOUT)
            flags |= CURL_CSELECT_OUT;
        if (ev->events & EPOLLERR)
            flags |= CURL_CSELECT_ERR;
        curl_act(cs->o, cs->fd, flags);
    } else if (*k == K_AWAIT) {
        struct await *a = (struct await *)k;
        if (!a->dead)  /* a hang-up ends the wait like its deadline */
            end_await(a, (ev->events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0);
    } else if (*k == K_WATCH) {
        struct watch *w = (struct watch *)k;
        if (w->ready && w->resume_at < 0)
            w->ready(w->fd);
    } else {
        client_event((struct lxfer *)k, ev->events);
    }
}

static void add_watch(void)
{
    struct epoll_event ev = { .events = EPOLLIN, .data.ptr = &loop.watch };
    epoll_ctl(loop.epfd, EPOLL_CTL_ADD, loop.watch.fd, &ev);
}

static void *loop_main(void *arg)
{
    (void)arg;
    struct epoll_event ev[EVENTS_MAX];

    on_loop_thread = 1;
    for (;;) {
        int stopping = atomic_load(&loop.stop);
        double now = piapi_now_mono();
        if (stopping)
            lower_sweep(now);  /* the abort flag is set: end them */
        atomic_store(&loop.sleeping, 1);
        int ms = atomic_load(&loop.queue) ? 0 : wait_ms(now);
        int n = epoll_wait(loop.epfd, ev, EVENTS_MAX, ms);
        atomic_store(&loop.sleeping, 0);
        for (int i = 0; i < n; i++)
            dispatch(&ev[i]);
        if (loop.watch.resume_at >= 0 && piapi_now_mono() >= loop.watch.resume_at) {
            loop.watch.resume_at = -1;
            add_watch();
        }
        run_posts();
        take_submitted();
        run_timers();
        reap_done();
        now = piapi_now_mono();
        if (now >= loop.next_sweep)
            sweep(now);
        flush_dirty();
        bury();
        if (stopping)  /* nothing is left to arrive: the drain is over */
            piapi_loop_expire_awaits();
        /* A submitter counted in `submitting` has not queued yet; once it
         * is 0, every submission made before `closed` is in the queues. */
        if (stopping && !loop.nrunning && !loop.awaits &&
            !atomic_load(&loop.submitting) && !atomic_load(&loop.queue) &&
            !atomic_load(&loop.posts))
            break;
    }
    return NULL;
}

/* ---- the other threads' side ---------------------------------------- */

int proxy_loop_submit(struct xfer *x)
{
    struct lxfer *lx = piapi_xmalloc(sizeof *lx + x->inline_len);
    memset(lx, 0, sizeof *lx);
    lx->kind = K_XFER;
    lx->x = *x;
    memcpy(lx->body, x->body, x->inline_len);

    atomic_fetch_add(&loop.submitting, 1);
    if (atomic_load(&loop.closed) && !on_loop_thread) {
        atomic_fetch_sub(&loop.submitting, 1);
        free(lx);
        return -1;
    }
    lx->link = atomic_load(&loop.queue);
    while (!atomic_compare_exchange_weak(&loop.queue, &lx->link, lx))
        ;
    if (atomic_exchange(&loop.sleeping, 0))
        wake();
    /* Last: until then the loop cannot stop and close its eventfd. */
    atomic_fetch_sub(&loop.submitting, 1);
    return 0;
}

int piapi_loop_await(int fd, int timeout_ms, void (*cb)(int fd, void *arg, int timed_out),
                     void *arg)
{
    struct await *a = piapi_xcalloc(1, sizeof *a);
    *a = (struct await){
        .kind = K_AWAIT, .fd = fd, .cb = cb, .arg = arg,
        .deadline = timeout_ms < 0 ? HUGE_VAL : piapi_now_mono() + timeout_ms / 1000.0,
    };
    struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP, .data.ptr = a };
    if (epoll_ctl(loop.epfd, EPOLL_CTL_ADD, fd, &ev) != 0) {
        free(a);
        return -1;
    }
    a->next = loop.awaits;
    if (a->next)
        a->next->prev = a;
    loop.awaits = a;
    if (timeout_ms >= 0)
        lower_sweep(a->deadline);
    return 0;
}

int piapi_loop_post(void (*fn)(void *arg), void *arg)
{
    if (on_loop_thread) {
        fn(arg);
        return 0;
    }
    atomic_fetch_add(&loop.submitting, 1);
    if (atomic_load(&loop.closed)) {
        atomic_fetch_sub(&loop.submitting, 1);
        return -1;
    }
    struct post *p = piapi_xmalloc(sizeof *p);
    *p = (struct post){ .fn = fn, .arg = arg };
    p->next = atomic_load(&loop.posts);
    while (!atomic_compare_exchange_weak(&loop.posts, &p->next, p))
        ;
    wake();
    atomic_fetch_sub(&loop.submitting, 1);
    return 0;
}

void piapi_loop_expire_awaits(void)
{
    while (loop.awaits)
        end_await(loop.awaits, 1);
}

void piapi_loop_pause(int fd, int ms)
{
    if (fd != loop.watch.fd || !loop.watch.ready)
        return;  /* not watched, or for good already */
    epoll_ctl(loop.epfd, EPOLL_CTL_DEL, fd, NULL);
    loop.watch.resume_at = ms < 0 ? -1 : piapi_now_mono() + ms / 1000.0;
    if (ms < 0)
        loop.watch.ready = NULL;
}

int piapi_loop_start(unsigned max_transfers, int listen_fd, void (*ready)(int fd),
                     char *err, size_t errlen)
{
    loop.next_sweep = piapi_now_mono() + POLL_SLICE_MS / 1000.0;
    loop.cache_max = max_transfers < CACHE_MAX ? (long)max_transfers : CACHE_MAX;
    /* Without them the pruner would reach the origin. */
    loop.can_prune = (curl_version_info(CURLVERSION_NOW)->features & CURL_VERSION_UNIX_SOCKETS) != 0;
    loop.epfd = epoll_create1(EPOLL_CLOEXEC);
    loop.evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (loop.epfd < 0 || loop.evfd < 0) {
        snprintf(err, errlen, "event loop: %s", strerror(errno));
        return -1;
    }
    struct epoll_event ev = { .events = EPOLLIN, .data.ptr = &wake_tag };
    epoll_ctl(loop.epfd, EPOLL_CTL_ADD, loop.evfd, &ev);
    loop.watch = (struct watch){
        .kind = K_WATCH, .fd = listen_fd, .ready = ready, .resume_at = -1
    };
    add_watch();
    int rc = pthread_create(&loop.thread, NULL, loop_main, NULL);
    if (rc != 0) {
        snprintf(err, errlen, "event loop: pthread_create: %s", strerror(rc));
        return -1;
    }
    loop.started = 1;
    atomic_store(&loop.closed, 0);
    return 0;
}

void piapi_loop_stop(void)
{
    atomic_store(&loop.closed, 1);
    if (!loop.started)
        return;
    atomic_store(&loop.stop, 1);
    wake();
    pthread_join(loop.thread, NULL);
    while (loop.nspare)
        curl_easy_cleanup(loop.spare[--loop.nspare]);
    for (unsigned i = 0; i < loop.norigins; i++) {
        struct origin *o = &loop.origins[i];
        if (o->pruning)
            curl_multi_remove_handle(o->multi, o->pruner);
        curl_multi_cleanup(o->multi);
        if (o->pruner)
            curl_easy_cleanup(o->pruner);
    }
    loop.norigins = 0;
    for (size_t i = 0; i < loop.nsocks; i++)
        free(loop.socks[i]);
    free(loop.socks);
    close(loop.epfd);
    close(loop.evfd);
    loop.started = 0;
}
