/* The libcurl multi driver on the event loop (upstream.h). Everything here
 * runs on the loop's thread, except upstream_submit() and
 * upstream_close(). */
#include "upstream.h"

#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>

#include "piapi/fcgi_conn.h"
#include "piapi/util.h"

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

/* One upstream origin (scheme://host:port): a multi handle, so a
 * connection cache, of its own. libcurl 7.88 walks the whole cache of a
 * multi handle, origin by origin, each time a transfer leaves it; with one
 * handle for all, a request to one provider also walked past every idle
 * connection to the others. */
struct origin {
    char key[ORIGIN_KEY_MAX];   /* the URL up to its path */
    CURLM *multi;
    struct piapi_ev_timer timer;  /* libcurl's */
    double deadline;            /* libcurl's timer; < 0: none */
    struct piapi_ev_timer prune_timer;
    double used_at;             /* a transfer last started */
    double pruned_at;           /* libcurl last pruned the cache, or later */
    int pruned_now;             /* a transfer of this round runs the prune */
    int pruning;                /* the pruner is in the multi handle */
    CURL *pruner;               /* see prune() */
};

struct lxfer {
    struct piapi_ev_post submit;
    struct piapi_ev_io client;  /* the FastCGI connection */
    struct origin *o;
    struct xfer x;
    struct lxfer *prev, *next;  /* running transfers */
    struct lxfer *link;         /* dirty list, graveyard */
    int dirty;
    int dead;
    char body[];                /* copy of the request body */
};

/* A socket libcurl asked us to watch, by fd number. When libcurl is done
 * with a connection for now (it goes back to the cache) the socket stays
 * in the epoll set, so reusing it costs one epoll_ctl instead of two. */
struct csock {
    struct piapi_ev_io io;
    struct origin *o;           /* whose multi handle it belongs to */
    int parked;                 /* libcurl removed it: not its event */
};

static struct {
    struct piapi_ev *ev;
    struct piapi_ev_gate gate;  /* submissions from pool threads */
    struct origin origins[ORIGINS_MAX];
    unsigned norigins;
    long cache_max;             /* CURLMOPT_MAXCONNECTS of each */
    int can_prune;              /* see prune() */
    size_t budget;              /* see xfer.budget; from the first socket */
    struct lxfer *running;      /* list of running transfers */
    unsigned nrunning;
    struct lxfer *dirty;
    struct lxfer *grave;        /* freed at the round's end */
    struct csock **socks;       /* by fd number */
    size_t nsocks;
    struct piapi_ev_timer sweep;
    struct piapi_ev_hook round_end;
    CURL *spare[SPARE_MAX];
    unsigned nspare;
} up;

/* ---- libcurl's side ------------------------------------------------- */

static void curl_act(struct origin *o, curl_socket_t fd, int flags)
{
    int running;
    curl_multi_socket_action(o->multi, fd, flags, &running);
}

static void on_csock(struct piapi_ev_io *io, uint32_t events)
{
    struct csock *cs = (struct csock *)io;
    if (cs->parked) {
        /* e.g. the upstream closed an idle connection: out of the set (a
         * hang-up is reported even when armed for nothing), until libcurl
         * reuses or closes it */
        piapi_ev_io_stop(up.ev, io);
        return;
    }
    int flags = 0;
    if (events & (EPOLLIN | EPOLLHUP | EPOLLRDHUP))
        flags |= CURL_CSELECT_IN;
    if (events & EPOLLOUT)
        flags |= CURL_CSELECT_OUT;
    if (events & EPOLLERR)
        flags |= CURL_CSELECT_ERR;
    curl_act(cs->o, io->fd, flags);
}

static struct csock *sock_for(curl_socket_t fd)
{
    if ((size_t)fd >= up.nsocks) {
        size_t n = up.nsocks ? up.nsocks : 64;
        while (n <= (size_t)fd)
            n *= 2;
        up.socks = piapi_xrealloc(up.socks, n * sizeof *up.socks);
        memset(up.socks + up.nsocks, 0, (n - up.nsocks) * sizeof *up.socks);
        up.nsocks = n;
    }
    struct csock *cs = up.socks[fd];
    if (!cs) {
        cs = piapi_xcalloc(1, sizeof *cs);
        cs->io = (struct piapi_ev_io){ .cb = on_csock, .fd = fd };
        up.socks[fd] = cs;
    }
    return cs;
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
    else if (want == cs->io.events)
        return 0;
    piapi_ev_io_arm(up.ev, &cs->io, want);
    return 0;
}

/* libcurl's timers that are due, a few rounds at most: a transfer started
 * in this round runs its first steps here, the prune among them. */
static void run_curl_timers(struct origin *o)
{
    for (int rounds = 0; rounds < 4; rounds++) {
        if (o->deadline < 0 || o->deadline > piapi_now_mono())
            break;
        o->deadline = -1;
        piapi_ev_timer_stop(up.ev, &o->timer);
        curl_act(o, CURL_SOCKET_TIMEOUT, 0);
    }
}

static void on_curl_timer(struct piapi_ev_timer *t)
{
    run_curl_timers((struct origin *)((char *)t - offsetof(struct origin, timer)));
}

static int on_timer(CURLM *m, long timeout_ms, void *ud)
{
    (void)m;
    struct origin *o = ud;
    if (timeout_ms < 0) {
        o->deadline = -1;
        piapi_ev_timer_stop(up.ev, &o->timer);
        return 0;
    }
    o->deadline = piapi_now_mono() + timeout_ms / 1000.0;
    piapi_ev_timer_set(up.ev, &o->timer, o->deadline);
    return 0;
}

static void on_prune_timer(struct piapi_ev_timer *t);

/* The origin of url, found or added. */
static struct origin *origin_for(const char *url)
{
    const char *host = strstr(url, "://");
    size_t n = host ? (size_t)(host + 3 - url) + strcspn(host + 3, "/?#") : strlen(url);
    if (n >= ORIGIN_KEY_MAX)
        n = ORIGIN_KEY_MAX - 1;
    for (unsigned i = 0; i < up.norigins; i++) {
        struct origin *o = &up.origins[i];
        if (strncmp(o->key, url, n) == 0 && o->key[n] == '\0')
            return o;
    }
    if (up.norigins == ORIGINS_MAX)
        return &up.origins[ORIGINS_MAX - 1];
    struct origin *o = &up.origins[up.norigins];
    o->multi = curl_multi_init();
    if (!o->multi)
        abort();
    memcpy(o->key, url, n);
    o->key[n] = '\0';
    o->deadline = -1;
    o->timer.cb = on_curl_timer;
    o->prune_timer.cb = on_prune_timer;
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
    curl_multi_setopt(o->multi, CURLMOPT_MAXCONNECTS, up.cache_max);
    up.norigins++;
    return o;
}

/* ---- pruning the connection caches ------------------------------------ */

/* When the prune of an origin's cache is due and no transfer has run it.
 * < 0: none is. */
static double prune_due(const struct origin *o)
{
    if (!up.can_prune || o->pruning || o->used_at + PRUNE_FOR_S < o->pruned_at)
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

static void on_prune_timer(struct piapi_ev_timer *t)
{
    struct origin *o = (struct origin *)((char *)t - offsetof(struct origin, prune_timer));
    if (!o->pruned_now)
        prune(o);
    run_curl_timers(o);
}

/* At the round's end: a prune this round (a transfer's or the pruner's)
 * counts from now, never too early; the next one is armed. */
static void schedule_prunes(void)
{
    for (unsigned i = 0; i < up.norigins; i++) {
        struct origin *o = &up.origins[i];
        if (o->pruned_now) {
            o->pruned_at = piapi_now_mono();
            o->pruned_now = 0;
        }
        double due = prune_due(o);
        if (due < 0)
            piapi_ev_timer_stop(up.ev, &o->prune_timer);
        else if (!o->prune_timer.slot || o->prune_timer.at != due)
            piapi_ev_timer_set(up.ev, &o->prune_timer, due);
    }
}

/* ---- transfers ------------------------------------------------------ */

static CURL *take_easy(void)
{
    if (up.nspare)
        return up.spare[--up.nspare];
    CURL *e = curl_easy_init();
    if (!e)
        abort();
    return e;
}

static void give_easy(CURL *e)
{
    if (up.nspare < SPARE_MAX)
        up.spare[up.nspare++] = e;
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
    uint32_t events = EPOLLRDHUP | (lx->x.stdin_eof ? EPOLLIN : 0u) |
                      (writable ? EPOLLOUT : 0u);
    piapi_ev_io_arm(up.ev, &lx->client, events);
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
        lx->link = up.dirty;
        up.dirty = lx;
    }
}

static void lower_sweep(double t)
{
    double floor = piapi_now_mono() + SWEEP_MIN_S;
    if (t < floor)
        t = floor;
    if (!up.sweep.slot || t < up.sweep.at)
        piapi_ev_timer_set(up.ev, &up.sweep, t);
}

static void add(struct lxfer *lx)
{
    struct xfer *x = &lx->x;
    xfer_setup(x);
    curl_easy_setopt(x->easy, CURLOPT_PRIVATE, lx);
    struct origin *o = lx->o = origin_for(x->t->url);
    o->used_at = piapi_now_mono();
    if (o->used_at >= o->pruned_at + PRUNE_EVERY_S)
        o->pruned_now = 1;
    curl_multi_add_handle(o->multi, x->easy);
}

/* An attempt that failed before anything reached the client goes to the
 * next candidate, with the same body, within the request's own timeouts
 * (x->start stays). A client that left, a shutdown, the request's own
 * head timeout: never. 1 when the transfer goes on. */
static int fail_over(struct lxfer *lx, enum verdict v, CURLcode rc)
{
    struct xfer *x = &lx->x;
    struct piapi_transfer *t = x->t;
    const char *why = x->failover;

    if (v != RUNNING || !x->can_fail_over || !t->pick || x->client_gone)
        return 0;
    if (!why) {
        why = xfer_failed_outcome(x, rc);
        if (!why || !t->pick(t))
            return 0;
    }
    double retry_after = t->retry_after;
    curl_multi_remove_handle(lx->o->multi, x->easy);
    xfer_rearm(x);
    if (!t->retry(t, why, retry_after))
        return 0;
    xfer_choose_body(x);
    add(lx);
    return 1;
}

static void finish(struct lxfer *lx, enum verdict v, CURLcode rc)
{
    struct xfer *x = &lx->x;
    struct piapi_transfer *t = x->t;

    if (fail_over(lx, v, rc))
        return;

    /* Removing an unfinished transfer closes its connection, which is what
     * tells the upstream to stop generating. */
    curl_multi_remove_handle(lx->o->multi, x->easy);
    if (lx->prev)
        lx->prev->next = lx->next;
    else
        up.running = lx->next;
    if (lx->next)
        lx->next->prev = lx->prev;
    up.nrunning--;
    lx->dead = 1;
    /* A kept FastCGI connection outlives the transfer: it must not stay
     * in the epoll set pointing at lx (any other closes, which removes it). */
    if (piapi_fcgi_kept(t->fcgi))
        piapi_ev_io_stop(up.ev, &lx->client);
    xfer_end(x, v, rc);
    give_easy(x->easy);
    piapi_buf_dispose(&x->head);
    t->done(t);  /* ends the FastCGI request: t is gone after this */
    if (!lx->dirty) {  /* else the dirty list still holds it */
        lx->link = up.grave;
        up.grave = lx;
    }
}

static void on_client(struct piapi_ev_io *io, uint32_t ev)
{
    struct lxfer *lx = (struct lxfer *)((char *)io - offsetof(struct lxfer, client));
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

/* A submitted transfer's first round on the loop. */
static void start(struct piapi_ev_post *p)
{
    struct lxfer *lx = (struct lxfer *)p;
    struct xfer *x = &lx->x;

    if (!up.budget)
        up.budget = piapi_fcgi_send_budget(x->t->fcgi);
    x->easy = take_easy();
    x->budget = up.budget;
    x->blocked = on_blocked;
    x->queued = on_queued;
    x->can_fail_over = 1;
    lx->client = (struct piapi_ev_io){ .cb = on_client, .fd = piapi_fcgi_fd(x->t->fcgi) };
    lx->prev = NULL;
    lx->next = up.running;
    if (lx->next)
        lx->next->prev = lx;
    up.running = lx;
    up.nrunning++;
    add(lx);
    lower_sweep(x->start + SWEEP_MAX_S);
}

static void reap_done(void)
{
    for (unsigned i = 0; i < up.norigins; i++) {
        struct origin *o = &up.origins[i];
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

/* Every transfer's timers (head and idle timeouts, SSE pings), and the
 * FastCGI fd of those that outlived their first moments gets watched. */
static void on_sweep(struct piapi_ev_timer *t)
{
    double now = piapi_now_mono(), next = now + SWEEP_MAX_S;
    struct lxfer *lx = up.running;
    (void)t;
    while (lx) {
        struct lxfer *n = lx->next;
        enum verdict v = xfer_timers(&lx->x, now, &next);
        if (v != RUNNING)
            finish(lx, v, CURLE_OK);
        else if (!lx->client.in_set)
            watch(lx, 0);
        lx = n;
    }
    if (up.nrunning)
        lower_sweep(next);
}

/* Every chunk libcurl handed over in this round leaves now, in one write
 * per transfer. A transfer that ended took its last bytes along with
 * FCGI_END_REQUEST already. */
static void flush_dirty(void)
{
    while (up.dirty) {
        struct lxfer *lx = up.dirty;
        up.dirty = lx->link;
        lx->dirty = 0;
        if (lx->dead) {
            lx->link = up.grave;
            up.grave = lx;
        } else if (xfer_flush(&lx->x) != 0) {
            finish(lx, CLIENT_GONE, CURLE_OK);
        }
    }
}

/* After every event of the round was dispatched: none points at these. */
static void bury(void)
{
    while (up.grave) {
        struct lxfer *lx = up.grave;
        up.grave = lx->link;
        free(lx);
    }
}

static void on_round_end(struct piapi_ev_hook *h)
{
    (void)h;
    reap_done();
    schedule_prunes();
    flush_dirty();
    bury();
}

/* ---- the loop's owner ---------------------------------------------- */

void upstream_start(struct piapi_ev *ev, unsigned max_transfers)
{
    up.ev = ev;
    up.cache_max = max_transfers < CACHE_MAX ? (long)max_transfers : CACHE_MAX;
    /* Without them the pruner would reach the origin. */
    up.can_prune = (curl_version_info(CURLVERSION_NOW)->features &
                    CURL_VERSION_UNIX_SOCKETS) != 0;
    up.sweep.cb = on_sweep;
    up.round_end.fn = on_round_end;
    piapi_ev_hook_add(ev, &up.round_end);
    piapi_ev_gate_open(&up.gate, ev);
}

int upstream_submit(struct xfer *x)
{
    /* A rewritten body in both spellings, for xfer_choose_body(). */
    size_t size = x->usage_body ? x->usage_len + x->plain_len : x->inline_len;
    struct lxfer *lx = piapi_xmalloc(sizeof *lx + size);
    memset(lx, 0, sizeof *lx);
    lx->submit.fn = start;
    lx->x = *x;
    lx->x.body = lx->body;
    if (x->usage_body) {
        memcpy(lx->body, x->usage_body, x->usage_len);
        memcpy(lx->body + x->usage_len, x->plain_body, x->plain_len);
        lx->x.usage_body = lx->body;
        lx->x.plain_body = lx->body + x->usage_len;
        xfer_choose_body(&lx->x);
    } else {
        memcpy(lx->body, x->body, x->inline_len);
    }
    if (piapi_ev_gate_post(&up.gate, &lx->submit) != 0) {
        free(lx);
        return -1;
    }
    return 0;
}

void upstream_close(void)
{
    piapi_ev_gate_close(&up.gate);
}

unsigned upstream_running(void)
{
    return up.nrunning;
}

void upstream_expedite(void)
{
    if (up.nrunning)
        lower_sweep(piapi_now_mono());
}

void upstream_stop(void)
{
    while (up.nspare)
        curl_easy_cleanup(up.spare[--up.nspare]);
    for (unsigned i = 0; i < up.norigins; i++) {
        struct origin *o = &up.origins[i];
        if (o->pruning)
            curl_multi_remove_handle(o->multi, o->pruner);
        curl_multi_cleanup(o->multi);
        if (o->pruner)
            curl_easy_cleanup(o->pruner);
    }
    up.norigins = 0;
    for (size_t i = 0; i < up.nsocks; i++)
        free(up.socks[i]);
    free(up.socks);
    up.socks = NULL;
    up.nsocks = 0;
    up.ev = NULL;
}
