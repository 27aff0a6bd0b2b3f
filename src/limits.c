/* Per-member limits in this process; the design is in limits.h. */
#include "piapi/limits.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>

#include "piapi/ev.h"
#include "piapi/json.h"
#include "piapi/loop.h"
#include "piapi/redis.h"
#include "piapi/tally.h"
#include "piapi/usage.h"

#define WINDOW_S 60.0
#define BUCKETS 64
#define DAY_S 86400.0

static const char *const names[PIAPI_LIMIT_N] = {
    [PIAPI_LIMIT_NONE] = "none",
    [PIAPI_LIMIT_CONCURRENCY] = "concurrency",
    [PIAPI_LIMIT_PER_MINUTE] = "requests_per_minute",
    [PIAPI_LIMIT_TOKENS_PER_DAY] = "tokens_per_day",
    [PIAPI_LIMIT_DAILY_BUDGET] = "daily_budget",
    [PIAPI_LIMIT_MONTHLY_BUDGET] = "monthly_budget",
    [PIAPI_LIMIT_MODEL] = "model",
};

const char *piapi_limits_name(enum piapi_limit l)
{
    return l > PIAPI_LIMIT_NONE && l < PIAPI_LIMIT_N ? names[l] : names[0];
}

/* ---- the sliding window ----------------------------------------------- */

/* Admissions older than the span leave from the front. */
static void window_prune(struct piapi_limits_window *w, double now, double span)
{
    while (w->n && w->t[w->head] <= now - span) {
        w->head = (w->head + 1) % w->cap;
        w->n--;
    }
}

void piapi_limits_window_resize(struct piapi_limits_window *w, uint32_t cap)
{
    if (cap == w->cap)
        return;
    double *t = cap ? piapi_xcalloc(cap, sizeof *t) : NULL;
    uint32_t keep = w->n < cap ? w->n : cap;
    for (uint32_t i = 0; i < keep; i++)
        t[i] = w->t[(w->head + w->n - keep + i) % w->cap];
    free(w->t);
    *w = (struct piapi_limits_window){ .t = t, .cap = cap, .head = 0, .n = keep };
}

uint32_t piapi_limits_window_count(struct piapi_limits_window *w, double now, double span)
{
    window_prune(w, now, span);
    return w->n;
}

int piapi_limits_window_full(struct piapi_limits_window *w, double now, double span,
                             double *wait)
{
    window_prune(w, now, span);
    if (w->n < w->cap)
        return 0;
    *wait = w->t[w->head] + span - now;
    return -1;
}

int piapi_limits_window_take(struct piapi_limits_window *w, double now, double span,
                             double *wait)
{
    if (piapi_limits_window_full(w, now, span, wait) != 0)
        return -1;
    w->t[(w->head + w->n) % w->cap] = now;
    w->n++;
    return 0;
}

/* ---- members ------------------------------------------------------------ */

enum wstate { WAITING, GRANTED, REFUSED };

struct waiter {
    struct piapi_ev_io io;          /* first: the io callback gets it */
    struct piapi_ev_timer timer;
    struct piapi_ev_post post;      /* the hand-over, on the loop */
    struct member *m;
    piapi_limits_resume resume;     /* NULL: a pool thread waits on `cond` */
    void *arg;
    struct piapi_limits_slot *slot; /* filled when granted */
    pthread_cond_t *cond;
    enum wstate state;              /* under the lock */
    int dead;                       /* resumed; loop thread only */
    struct piapi_limits_refusal ref;
    struct waiter *prev, *next;     /* the member's queue */
    struct waiter *grave;
    double since;                   /* queued at (monotonic) */
};

struct member {
    char *name;
    struct piapi_limits limits;     /* the latest seen (reloads) */
    struct piapi_limits_window window;
    uint32_t in_flight;
    uint64_t limited[PIAPI_LIMIT_N];  /* piapi_limited_total */
    struct waiter *head, *tail;
    /* the month's spend key has its expiry, set on that Redis connection
     * (loop thread only) */
    double expiring;
    uint64_t expiring_on;
    struct member *next;
};

/* piapi_queue_wait_seconds */
static const double wait_bounds[] = { 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30 };
#define WAIT_BUCKETS (sizeof wait_bounds / sizeof wait_bounds[0])

static struct {
    pthread_mutex_t lock;
    uint64_t wait_le[WAIT_BUCKETS];   /* non-cumulative; +Inf is count */
    uint64_t wait_count;
    double wait_sum;
    struct member *buckets[BUCKETS];
    struct waiter *grave;           /* loop thread only */
    struct piapi_ev_hook round_end;
    int hooked;
} lim = { .lock = PTHREAD_MUTEX_INITIALIZER };

/* Under the lock. */
static struct member *member_get(const char *name)
{
    size_t b = piapi_hash(name, strlen(name)) % BUCKETS;
    for (struct member *m = lim.buckets[b]; m; m = m->next)
        if (strcmp(m->name, name) == 0)
            return m;
    struct member *m = piapi_xcalloc(1, sizeof *m);
    m->name = piapi_xstrdup(name);
    m->next = lim.buckets[b];
    lim.buckets[b] = m;
    return m;
}

static unsigned whole_seconds(double s)
{
    double c = ceil(s);
    return c < 1 ? 1 : c > 1e9 ? 1000000000u : (unsigned)c;
}

static void refuse(struct piapi_limits_refusal *r, enum piapi_limit l, double wait,
                   const char *fmt, ...) __attribute__((format(printf, 4, 5)));

static void refuse(struct piapi_limits_refusal *r, enum piapi_limit l, double wait,
                   const char *fmt, ...)
{
    char what[160];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    r->limit = l;
    r->status = 429;
    r->retry_after = whole_seconds(wait);
    snprintf(r->message, sizeof r->message, "%s; resets in %u s", what, r->retry_after);
}

/* ---- period limits (tally) ---------------------------------------------- */

static double next_month(double now)
{
    int y, m, d;
    piapi_utc_date(now, &y, &m, &d);
    return m == 12 ? piapi_utc_midnight(y + 1, 1, 1) : piapi_utc_midnight(y, m + 1, 1);
}

/* tokensPerDay and the budgets: admitted while under them. */
static int check_periods(const struct piapi_user *u, double now,
                         struct piapi_limits_refusal *r)
{
    const struct piapi_limits *l = &u->limits;
    if (!l->tokens_per_day && !l->daily_usd && !l->monthly_usd)
        return 0;
    struct piapi_usage_totals day, month;
    piapi_tally_get(u->name, now, &day, &month);
    double to_day = piapi_tally_day_start(now) + DAY_S - now;
    int64_t tokens = day.input + day.output + day.cache_read + day.cache_write;
    if (l->tokens_per_day && tokens >= 0 && (uint64_t)tokens >= l->tokens_per_day) {
        refuse(r, PIAPI_LIMIT_TOKENS_PER_DAY, to_day,
               "token limit reached: %llu tokens per day (tokensPerDay), "
               "the UTC day", (unsigned long long)l->tokens_per_day);
        return -1;
    }
    if (l->daily_usd && day.cost_usd >= l->daily_usd) {
        refuse(r, PIAPI_LIMIT_DAILY_BUDGET, to_day,
               "daily budget reached: %.2f of %.2f USD (dailyBudgetUsd), the UTC day",
               day.cost_usd, l->daily_usd);
        return -1;
    }
    if (l->monthly_usd && month.cost_usd >= l->monthly_usd) {
        refuse(r, PIAPI_LIMIT_MONTHLY_BUDGET, next_month(now) - now,
               "monthly budget reached: %.2f of %.2f USD (monthlyBudgetUsd), the UTC month",
               month.cost_usd, l->monthly_usd);
        return -1;
    }
    return 0;
}

/* Under the lock: a wait ended, however. */
static void observe_wait(double since)
{
    double s = piapi_now_mono() - since;
    size_t i = 0;
    while (i < WAIT_BUCKETS && s > wait_bounds[i])
        i++;
    if (i < WAIT_BUCKETS)
        lim.wait_le[i]++;
    lim.wait_count++;
    lim.wait_sum += s;
}

/* ---- the queue ------------------------------------------------------------ */

static void unlink_waiter(struct member *m, struct waiter *w)
{
    if (w->prev)
        w->prev->next = w->next;
    else
        m->head = w->next;
    if (w->next)
        w->next->prev = w->prev;
    else
        m->tail = w->prev;
    w->prev = w->next = NULL;
}

static void refuse_concurrency(struct member *m, struct piapi_limits_refusal *r)
{
    refuse(r, PIAPI_LIMIT_CONCURRENCY, 1,
           "concurrency limit reached: %u requests in flight (concurrentRequests)",
           m->limits.concurrent);
}

/* Under the lock: the window, then a slot. */
static int take_slot(struct member *m, double now, struct piapi_limits_refusal *r)
{
    double wait;
    piapi_limits_window_resize(&m->window, m->limits.per_minute);
    if (m->limits.per_minute &&
        piapi_limits_window_take(&m->window, now, WINDOW_S, &wait) != 0) {
        refuse(r, PIAPI_LIMIT_PER_MINUTE, wait,
               "rate limit reached: %u requests per minute (requestsPerMinute)",
               m->limits.per_minute);
        return -1;
    }
    m->in_flight++;
    return 0;
}

static void free_grave(struct piapi_ev_hook *h)
{
    (void)h;
    while (lim.grave) {
        struct waiter *w = lim.grave;
        lim.grave = w->grave;
        free(w);
    }
}

/* On the loop: the wait is over (state says how, or the client left);
 * resume runs once, the record is freed at the round's end (an event of
 * this round may still point at it). */
static void end_wait(struct waiter *w, enum piapi_limits_verdict v)
{
    struct piapi_ev *ev = piapi_loop_ev();
    if (w->dead)
        return;
    w->dead = 1;
    piapi_ev_io_stop(ev, &w->io);
    piapi_ev_timer_stop(ev, &w->timer);
    w->grave = lim.grave;
    lim.grave = w;
    if (v == PIAPI_LIMITS_ADMITTED)
        w->slot->held = 1;
    w->resume(w->arg, v, v == PIAPI_LIMITS_REFUSED ? &w->ref : NULL);
}

static void handed_over(struct piapi_ev_post *p)
{
    struct waiter *w = (struct waiter *)((char *)p - offsetof(struct waiter, post));
    end_wait(w, w->state == GRANTED ? PIAPI_LIMITS_ADMITTED : PIAPI_LIMITS_REFUSED);
}

static void post_run(void *arg)
{
    handed_over(arg);
}

/* Under the lock: w's wait ended in state; tell its owner. */
static void wake(struct waiter *w)
{
    if (!w->resume) {
        pthread_cond_signal(w->cond);
        return;
    }
    if (piapi_loop_on_thread())
        piapi_ev_post(piapi_loop_ev(), &w->post);  /* at this round's end */
    else
        /* Fails only once the grace period is over and the loop stops:
         * the request is then dropped with the rest. */
        (void)piapi_loop_post(post_run, &w->post);
}

/* Under the lock: free slots go to the queue's head, in order. */
static void hand_over(struct member *m, double now)
{
    while (m->head && (!m->limits.concurrent || m->in_flight < m->limits.concurrent)) {
        struct waiter *w = m->head;
        unlink_waiter(m, w);
        observe_wait(w->since);
        w->state = take_slot(m, now, &w->ref) == 0 ? GRANTED : REFUSED;
        wake(w);
    }
}

static void waited_out(struct waiter *w, int gone)
{
    pthread_mutex_lock(&lim.lock);
    int mine = w->state == WAITING;
    if (mine) {
        unlink_waiter(w->m, w);
        observe_wait(w->since);
        w->state = REFUSED;
        refuse_concurrency(w->m, &w->ref);
    }
    pthread_mutex_unlock(&lim.lock);
    if (mine)  /* else the hand-over's post resumes it */
        end_wait(w, gone ? PIAPI_LIMITS_GONE : PIAPI_LIMITS_REFUSED);
}

static void on_timer(struct piapi_ev_timer *t)
{
    waited_out((struct waiter *)((char *)t - offsetof(struct waiter, timer)), 0);
}

static void on_hangup(struct piapi_ev_io *io, uint32_t events)
{
    struct waiter *w = (struct waiter *)io;
    (void)events;
    if (!w->dead)
        waited_out(w, 1);
}

static void enqueue(struct member *m, struct waiter *w)
{
    w->since = piapi_now_mono();
    w->m = m;
    w->state = WAITING;
    w->prev = m->tail;
    if (m->tail)
        m->tail->next = w;
    else
        m->head = w;
    m->tail = w;
}

/* Under the lock, on the loop: parked until resume. -1: the fd cannot be
 * watched (the request is refused as if its wait had ended). */
static int park(struct member *m, int fd, piapi_limits_resume resume, void *arg,
                struct piapi_limits_slot *slot)
{
    struct piapi_ev *ev = piapi_loop_ev();
    struct waiter *w = piapi_xcalloc(1, sizeof *w);
    w->io = (struct piapi_ev_io){ .cb = on_hangup, .fd = fd };
    w->timer.cb = on_timer;
    w->post.fn = handed_over;
    w->resume = resume;
    w->arg = arg;
    w->slot = slot;
    if (!lim.hooked) {
        lim.round_end.fn = free_grave;
        piapi_ev_hook_add(ev, &lim.round_end);
        lim.hooked = 1;
    }
    /* Only a hang-up: the body still unread keeps the socket readable. */
    if (fd < 0 || piapi_ev_io_arm(ev, &w->io, EPOLLRDHUP) != 0) {
        free(w);
        return -1;
    }
    piapi_ev_timer_set(ev, &w->timer, piapi_now_mono() + m->limits.queue_ms / 1000.0);
    enqueue(m, w);
    return 0;
}

/* Under the lock, on a pool thread: waits here, bounded. */
static enum piapi_limits_verdict wait_here(struct member *m,
                                           struct piapi_limits_refusal *r)
{
    pthread_cond_t cond;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&cond, &ca);
    pthread_condattr_destroy(&ca);
    struct waiter w = { .cond = &cond };
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    until.tv_sec += m->limits.queue_ms / 1000;
    until.tv_nsec += (long)(m->limits.queue_ms % 1000) * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    enqueue(m, &w);
    while (w.state == WAITING &&
           pthread_cond_timedwait(&cond, &lim.lock, &until) != ETIMEDOUT)
        ;
    if (w.state == WAITING) {
        unlink_waiter(m, &w);
        observe_wait(w.since);
        refuse_concurrency(m, &w.ref);
        w.state = REFUSED;
    }
    pthread_cond_destroy(&cond);
    if (w.state == GRANTED)
        return PIAPI_LIMITS_ADMITTED;
    *r = w.ref;
    return PIAPI_LIMITS_REFUSED;
}

/* This instance's own state: the window, the slots, the queue. */
static enum piapi_limits_verdict admit_local(const struct piapi_user *u, double now, int fd,
                                             piapi_limits_resume resume, void *arg,
                                             struct piapi_limits_slot *slot,
                                             struct piapi_limits_refusal *r)
{
    enum piapi_limits_verdict v = PIAPI_LIMITS_ADMITTED;
    pthread_mutex_lock(&lim.lock);
    struct member *m = member_get(u->name);
    m->limits = u->limits;
    /* A reload that raised the limit (or lifted it): the slots it added go
     * to those already waiting first. */
    hand_over(m, now);
    /* A reload that lowered the limit: requests in flight still count. */
    int full = m->limits.concurrent &&
               (m->in_flight >= m->limits.concurrent || m->head);
    if (!full) {
        if (take_slot(m, now, r) != 0)
            v = PIAPI_LIMITS_REFUSED;
    } else if (!m->limits.queue_ms) {
        refuse_concurrency(m, r);
        v = PIAPI_LIMITS_REFUSED;
    } else if (!piapi_loop_on_thread()) {
        v = wait_here(m, r);
    } else if (park(m, fd, resume, arg, slot) == 0) {
        v = PIAPI_LIMITS_QUEUED;
    } else {
        refuse_concurrency(m, r);
        v = PIAPI_LIMITS_REFUSED;
    }
    pthread_mutex_unlock(&lim.lock);
    if (v == PIAPI_LIMITS_ADMITTED)
        slot->held = 1;
    return v;
}

/* ---- shared through Redis ------------------------------------------------ */

/* With settings.redis, requests per minute and concurrency are decided by
 * Redis, atomically in one script per attempt (on the loop, the request
 * parked meanwhile): the window is a sorted set of admission times per
 * member, the slots a sorted set of leases scored by their expiry, which
 * this instance pushes forward every LEASE_REFRESH_S while it holds them;
 * a crashed instance's leases expire by themselves within LEASE_TTL_MS.
 * A member at concurrentRequests polls every RETRY_MS until queueMs (no
 * FIFO across instances). Redis unreachable, erring or slower than 50 ms:
 * this instance's local state decides (fail open). Token and money limits
 * stay on the local tally (restored from the ledger). A request on a pool
 * thread uses the local state. */
#define LEASE_TTL_MS 5000
#define LEASE_REFRESH_S 1.5
#define RETRY_MS 50

/* One call admits a member's requests of a loop round, in order, as if
 * each came alone: the Lua glue around a script and its redis.calls is
 * most of what an admission costs Redis, and it is paid once.
 * KEYS: window, leases, the member's spend of the month (a hash);
 * ARGV: requestsPerMinute, concurrentRequests, lease ttl (ms),
 * tokensPerDay, dailyBudgetUsd, monthlyBudgetUsd (in nano-USD; 0: no
 * limit), the day's token and nano-USD fields, then each request's lease
 * id. Answer {verdict, ms, admitted}: the first `admitted` requests are;
 * the rest get the verdict: 1 window full (ms until a place frees), 2
 * slots taken, 3, 4, 5 tokens, daily, monthly budget reached. A set is
 * pruned (admissions older than the window, a crashed instance's leases)
 * only when it looks too full, since a count that includes stale entries
 * and still has room has room; so each set holds at most its limit's
 * number of entries. */
static const char ADMIT_LUA[] =
    "local tpd, dusd, musd = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])\n"
    "if tpd > 0 or dusd > 0 or musd > 0 then\n"
    "  local v = redis.call('HMGET', KEYS[3], ARGV[7], ARGV[8], 'usd_nano')\n"
    "  if tpd > 0 and tonumber(v[1] or '0') >= tpd then return {3, 0, 0} end\n"
    "  if dusd > 0 and tonumber(v[2] or '0') >= dusd then return {4, 0, 0} end\n"
    "  if musd > 0 and tonumber(v[3] or '0') >= musd then return {5, 0, 0} end\n"
    "end\n"
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    "local rpm, conc, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])\n"
    "local n = #ARGV - 8\n"
    "local k, verdict, wait = n, 0, 0\n"
    "if conc > 0 then\n"
    "  local c = redis.call('ZCARD', KEYS[2])\n"
    "  if c + k > conc then\n"
    "    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)\n"
    "    c = redis.call('ZCARD', KEYS[2])\n"
    "    if c + k > conc then k = math.max(conc - c, 0); verdict = 2 end\n"
    "  end\n"
    "end\n"
    "if rpm > 0 then\n"
    "  local c = redis.call('ZCARD', KEYS[1])\n"
    "  if c + k > rpm then\n"
    "    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 60000)\n"
    "    c = redis.call('ZCARD', KEYS[1])\n"
    "    if c + k > rpm then\n"
    "      k = math.max(rpm - c, 0)\n"
    "      verdict = 1\n"
    "      local o = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')\n"
    "      wait = o[2] and tonumber(o[2]) + 60000 - now or 60000\n"
    "    end\n"
    "  end\n"
    "end\n"
    "if k > 0 then\n"
    "  local w, l = {}, {}\n"
    "  for i = 1, k do\n"
    "    w[2 * i - 1], w[2 * i] = now, ARGV[8 + i]\n"
    "    l[2 * i - 1], l[2 * i] = now + ttl, ARGV[8 + i]\n"
    "  end\n"
    "  if rpm > 0 then\n"
    "    redis.call('ZADD', KEYS[1], unpack(w))\n"
    "    redis.call('PEXPIRE', KEYS[1], 60000)\n"
    "  end\n"
    "  if conc > 0 then\n"
    "    redis.call('ZADD', KEYS[2], unpack(l))\n"
    "    redis.call('PEXPIRE', KEYS[2], ttl)\n"
    "  end\n"
    "end\n"
    "return {verdict, wait, k}\n";

static const char REFRESH_LUA[] =
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    "local n = redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1])\n"
    "redis.call('PEXPIRE', KEYS[1], ARGV[2])\n"
    "return n\n";

/* A lease this instance holds (loop thread only). */
struct lease {
    char key[160];
    char id[48];
    struct lease *next;
};

struct attempt {
    struct piapi_ev_io io;          /* first: a hang-up while waiting */
    struct piapi_ev_timer retry;
    const struct piapi_user *u;     /* the request's snapshot holds it */
    double now, give_up;            /* real; monotonic */
    int fd;
    piapi_limits_resume resume;
    void *arg;
    struct piapi_limits_slot *slot;
    int pending;                    /* a script call is out */
    int gone;                       /* the client left: end at the reply */
    int dead;
    struct attempt *grave;
    struct piapi_limits_refusal ref;
};

/* Admissions of one round, at most, and per Redis call. */
#define QUEUE_MAX 256
#define BATCH_MAX 32

/* Leases asked for whose answer never came (Redis slow, or gone with
 * the call out): the script may still have run, late, so each goes back
 * once Redis answers again, instead of holding a slot until it expires.
 * Beyond ORPHANS_MAX they are left to expire. */
#define ORPHANS_MAX 256

struct orphan {
    char key[160];
    char id[48];
};

static struct {
    struct orphan orphans[ORPHANS_MAX];
    size_t norphans;
    struct lease *leases;
    struct piapi_ev_timer refresh;
    uint64_t seq;
    char instance[17];
    struct attempt *grave;
    struct attempt *queued[QUEUE_MAX];  /* for the round's end */
    size_t nqueued;
    struct piapi_ev_hook round_end;
    int hooked;
} sh;

static void send_queued(void);

/* The round's end: its admissions go to Redis, the attempts that ended
 * are freed. */
static void end_round(struct piapi_ev_hook *h)
{
    (void)h;
    send_queued();
    while (sh.grave) {
        struct attempt *a = sh.grave;
        sh.grave = a->grave;
        free(a);
    }
}

static void key_of(char *out, size_t n, const char *kind, const char *user)
{
    snprintf(out, n, "piapi:%s:%s", kind, user);
}

/* "DD" and a NUL at p. */
static void two_digits(char *p, int v)
{
    p[0] = (char)('0' + v / 10);
    p[1] = (char)('0' + v % 10);
    p[2] = '\0';
}

/* The member's spend of the UTC month `now` is in, one hash: the day's
 * tokens and nano-USD as fields of the day (integers: sums stay exact,
 * and HINCRBY is cheaper than its float twin), and the month's nano-USD. */
struct spend_keys {
    char key[192], tokens[16], usd[16];
};

static void spend_keys(struct spend_keys *k, const char *user, double now)
{
    int y, m, d;
    piapi_utc_date(now, &y, &m, &d);
    snprintf(k->key, sizeof k->key, "piapi:spend:%s:%04d%02d", user, y, m);
    memcpy(k->tokens, "tokens:", 7);
    memcpy(k->usd, "usd_nano:", 9);
    two_digits(k->tokens + 7, d);
    two_digits(k->usd + 9, d);
}

/* USD in whole nano-USD, within what a Redis integer holds. */
static long long nano_usd(double usd)
{
    double n = usd * 1e9;
    return n <= 0 ? 0 : n >= 1e18 ? (long long)1e18 : (long long)(n + 0.5);
}

static void lease_refresh(struct piapi_ev_timer *t)
{
    char ttl[16];
    snprintf(ttl, sizeof ttl, "%d", LEASE_TTL_MS);
    for (struct lease *l = sh.leases; l; l = l->next) {
        const char *argv[] = { l->key, l->id, ttl };
        piapi_redis_eval_nowait(REFRESH_LUA, 1, 3, argv);
    }
    if (sh.leases)
        piapi_ev_timer_set(piapi_loop_ev(), t, piapi_now_mono() + LEASE_REFRESH_S);
}

static void lease_hold(const char *user, const char *id)
{
    struct lease *l = piapi_xcalloc(1, sizeof *l);
    key_of(l->key, sizeof l->key, "lease", user);
    snprintf(l->id, sizeof l->id, "%s", id);
    l->next = sh.leases;
    sh.leases = l;
    sh.refresh.cb = lease_refresh;
    if (!sh.refresh.slot)
        piapi_ev_timer_set(piapi_loop_ev(), &sh.refresh, piapi_now_mono() + LEASE_REFRESH_S);
}

/* On the loop: the lease goes back (whether Redis is up or not: a lease
 * not returned expires). */
static void lease_return(const char *user, const char *id)
{
    char key[160];
    key_of(key, sizeof key, "lease", user);
    for (struct lease **p = &sh.leases; *p; p = &(*p)->next)
        if (strcmp((*p)->id, id) == 0 && strcmp((*p)->key, key) == 0) {
            struct lease *l = *p;
            *p = l->next;
            free(l);
            break;
        }
    const char *argv[] = { "ZREM", key, id };
    piapi_redis_command_nowait(3, argv);
}

static void orphan(const char *user, const char *id)
{
    if (!id[0] || sh.norphans == ORPHANS_MAX)
        return;
    struct orphan *o = &sh.orphans[sh.norphans++];
    key_of(o->key, sizeof o->key, "lease", user);
    snprintf(o->id, sizeof o->id, "%s", id);
}

/* Before a call that Redis will answer in order after them. */
static void orphans_return(void)
{
    size_t kept = 0;
    for (size_t i = 0; i < sh.norphans; i++) {
        const char *argv[] = { "ZREM", sh.orphans[i].key, sh.orphans[i].id };
        if (piapi_redis_command_nowait(3, argv) != 0)
            sh.orphans[kept++] = sh.orphans[i];
    }
    sh.norphans = kept;
}

/* The member's whole name: a name cut short would name other keys. */
struct returned {
    char id[48];
    char user[];
};

static void return_posted(void *arg)
{
    struct returned *r = arg;
    lease_return(r->user, r->id);
    free(r);
}

static void attempt_end(struct attempt *a, enum piapi_limits_verdict v)
{
    struct piapi_ev *ev = piapi_loop_ev();
    a->dead = 1;
    piapi_ev_io_stop(ev, &a->io);
    piapi_ev_timer_stop(ev, &a->retry);
    a->grave = sh.grave;
    sh.grave = a;
    a->resume(a->arg, v, v == PIAPI_LIMITS_REFUSED ? &a->ref : NULL);
}

/* Redis could not say: this instance decides, as without Redis. */
static void fall_back(struct attempt *a)
{
    /* out of the epoll set first: a local wait watches the same fd */
    piapi_ev_io_stop(piapi_loop_ev(), &a->io);
    piapi_ev_timer_stop(piapi_loop_ev(), &a->retry);
    enum piapi_limits_verdict v = admit_local(a->u, a->now, a->fd, a->resume, a->arg,
                                              a->slot, &a->ref);
    if (v == PIAPI_LIMITS_QUEUED) {  /* the local queue resumes it */
        a->dead = 1;
        a->grave = sh.grave;
        sh.grave = a;
        return;
    }
    attempt_end(a, v);
}

static void try_shared(struct attempt *a);

/* Under the lock: an admission Redis granted is this instance's too, in
 * flight and in its own window: the requests it decides alone (read by a
 * pool thread, or while Redis is away) count what Redis admitted, so one
 * instance never goes past requestsPerMinute by mixing the two. */
static void local_admitted(struct member *m, const struct piapi_user *u, double now)
{
    double wait;
    m->in_flight++;
    m->limits = u->limits;
    piapi_limits_window_resize(&m->window, u->limits.per_minute);
    if (u->limits.per_minute)
        (void)piapi_limits_window_take(&m->window, now, WINDOW_S, &wait);
}

/* This instance's admissions are among those Redis counts: its own window
 * full (pool-thread admissions Redis never saw), the shared one is too. */
static int local_window_full(const struct piapi_user *u, double now,
                             struct piapi_limits_refusal *r)
{
    double wait;
    int full = 0;
    if (!u->limits.per_minute)
        return 0;
    pthread_mutex_lock(&lim.lock);
    struct member *m = member_get(u->name);
    m->limits = u->limits;
    piapi_limits_window_resize(&m->window, u->limits.per_minute);
    if (piapi_limits_window_full(&m->window, now, WINDOW_S, &wait) != 0) {
        refuse(r, PIAPI_LIMIT_PER_MINUTE, wait,
               "rate limit reached: %u requests per minute (requestsPerMinute)",
               u->limits.per_minute);
        full = 1;
    }
    pthread_mutex_unlock(&lim.lock);
    return full;
}

/* What Redis said of one attempt: ADMIT_LUA's verdict (0: admitted; <0:
 * no answer), wait_ms with a full window. */
static void attempt_verdict(struct attempt *a, long long verdict, long long wait_ms)
{
    a->pending = 0;
    if (a->gone) {
        if (verdict == 0)
            lease_return(a->u->name, a->slot->lease);
        else if (verdict < 0)
            orphan(a->u->name, a->slot->lease);
        a->slot->lease[0] = '\0';
        attempt_end(a, PIAPI_LIMITS_GONE);
        return;
    }
    switch (verdict) {
    case 0:
        pthread_mutex_lock(&lim.lock);
        local_admitted(member_get(a->u->name), a->u, a->now);
        pthread_mutex_unlock(&lim.lock);
        a->slot->held = 1;
        if (a->u->limits.concurrent)
            lease_hold(a->u->name, a->slot->lease);
        else
            a->slot->lease[0] = '\0';
        attempt_end(a, PIAPI_LIMITS_ADMITTED);
        return;
    case 1:
        refuse(&a->ref, PIAPI_LIMIT_PER_MINUTE, wait_ms / 1000.0,
               "rate limit reached: %u requests per minute (requestsPerMinute)",
               a->u->limits.per_minute);
        attempt_end(a, PIAPI_LIMITS_REFUSED);
        return;
    case 3:
    case 4:
    case 5: {
        /* the shared totals are over: say it as this instance would */
        static const enum piapi_limit which[] = { PIAPI_LIMIT_TOKENS_PER_DAY,
                                                  PIAPI_LIMIT_DAILY_BUDGET,
                                                  PIAPI_LIMIT_MONTHLY_BUDGET };
        enum piapi_limit l = which[verdict - 3];
        double to_day = piapi_tally_day_start(a->now) + DAY_S - a->now;
        if (l == PIAPI_LIMIT_TOKENS_PER_DAY)
            refuse(&a->ref, l, to_day, "token limit reached: %llu tokens per day "
                   "(tokensPerDay), the UTC day",
                   (unsigned long long)a->u->limits.tokens_per_day);
        else if (l == PIAPI_LIMIT_DAILY_BUDGET)
            refuse(&a->ref, l, to_day, "daily budget reached: %.2f USD (dailyBudgetUsd), "
                   "the UTC day", a->u->limits.daily_usd);
        else
            refuse(&a->ref, l, next_month(a->now) - a->now, "monthly budget reached: "
                   "%.2f USD (monthlyBudgetUsd), the UTC month", a->u->limits.monthly_usd);
        a->slot->lease[0] = '\0';
        attempt_end(a, PIAPI_LIMITS_REFUSED);
        return;
    }
    case 2:
        if (piapi_now_mono() + RETRY_MS / 1000.0 < a->give_up) {
            /* queued: a client that gives up leaves the queue (the first
             * call's sub-millisecond wait is not watched: arming the
             * watch costs two syscalls per request) */
            if (a->fd >= 0 && !a->io.in_set)
                piapi_ev_io_arm(piapi_loop_ev(), &a->io, EPOLLRDHUP);
            piapi_ev_timer_set(piapi_loop_ev(), &a->retry,
                               piapi_now_mono() + RETRY_MS / 1000.0);
            return;
        }
        refuse(&a->ref, PIAPI_LIMIT_CONCURRENCY, 1,
               "concurrency limit reached: %u requests in flight (concurrentRequests)",
               a->u->limits.concurrent);
        attempt_end(a, PIAPI_LIMITS_REFUSED);
        return;
    default:
        orphan(a->u->name, a->slot->lease);
        a->slot->lease[0] = '\0';
        fall_back(a);
    }
}

/* A member's attempts of a round, in one ADMIT_LUA call. */
struct batch {
    size_t n;
    struct attempt *a[BATCH_MAX];
};

static void on_batch_reply(void *arg, const struct redisReply *reply)
{
    struct batch *b = arg;
    long long verdict = piapi_redis_int(reply, 0, -1);
    long long wait_ms = piapi_redis_int(reply, 1, 1000);
    long long admitted = verdict < 0 ? 0 : piapi_redis_int(reply, 2, 0);
    for (size_t i = 0; i < b->n; i++)
        attempt_verdict(b->a[i], (long long)i < admitted ? 0 : verdict, wait_ms);
    free(b);
}

static void send_batch(struct batch *b)
{
    char rpm[24], conc[24], ttl[24], kw[160], kl[160], tok[24], dusd[24], musd[24];
    const char *argv[11 + BATCH_MAX];
    const struct attempt *first = b->a[0];
    const struct piapi_limits *l = &first->u->limits;
    struct spend_keys sk;
    piapi_u64_str(rpm, l->per_minute);
    piapi_u64_str(conc, l->concurrent);
    piapi_u64_str(ttl, LEASE_TTL_MS);
    piapi_u64_str(tok, l->tokens_per_day);
    piapi_u64_str(dusd, (uint64_t)nano_usd(l->daily_usd));
    piapi_u64_str(musd, (uint64_t)nano_usd(l->monthly_usd));
    spend_keys(&sk, first->u->name, first->now);
    key_of(kw, sizeof kw, "rpm", first->u->name);
    key_of(kl, sizeof kl, "lease", first->u->name);
    const char *fixed[] = { kw, kl, sk.key, rpm, conc, ttl, tok, dusd, musd, sk.tokens, sk.usd };
    memcpy(argv, fixed, sizeof fixed);
    for (size_t i = 0; i < b->n; i++)
        argv[11 + i] = b->a[i]->slot->lease;
    piapi_redis_eval(ADMIT_LUA, 3, (int)(11 + b->n), argv, on_batch_reply, b);
}

/* The round's attempts go, a call per member (per config snapshot: the
 * same limits), in the order they came. Their replies may come before
 * this returns (Redis away): the queue is copied out first. */
static void send_queued(void)
{
    struct attempt *q[QUEUE_MAX];
    size_t n = sh.nqueued;
    if (!n)
        return;
    memcpy(q, sh.queued, n * sizeof *q);
    sh.nqueued = 0;
    if (sh.norphans)
        orphans_return();
    for (size_t i = 0; i < n; i++) {
        if (!q[i])
            continue;
        const struct piapi_user *u = q[i]->u;
        struct batch *b = piapi_xcalloc(1, sizeof *b);
        for (size_t j = i; j < n && b->n < BATCH_MAX; j++)
            if (q[j] && q[j]->u == u) {
                b->a[b->n++] = q[j];
                q[j] = NULL;
            }
        send_batch(b);
    }
    piapi_redis_flush();
}

/* Queued for the round's end (send_queued, from the round-end hook). */
static void try_shared(struct attempt *a)
{
    size_t ilen = strlen(sh.instance);  /* 16 hex digits: ":" and a u64 fit */
    memcpy(a->slot->lease, sh.instance, ilen);
    a->slot->lease[ilen] = ':';
    piapi_u64_str(a->slot->lease + ilen + 1, ++sh.seq);
    a->pending = 1;
    if (sh.nqueued == QUEUE_MAX)
        send_queued();
    sh.queued[sh.nqueued++] = a;
}

static void on_retry(struct piapi_ev_timer *t)
{
    struct attempt *a = (struct attempt *)((char *)t - offsetof(struct attempt, retry));
    try_shared(a);
}

static void on_attempt_hangup(struct piapi_ev_io *io, uint32_t events)
{
    struct attempt *a = (struct attempt *)io;
    (void)events;
    if (a->dead)
        return;
    piapi_ev_io_stop(piapi_loop_ev(), &a->io);
    if (a->pending) {
        a->gone = 1;  /* the reply ends it (and returns a lease it got) */
        return;
    }
    a->slot->lease[0] = '\0';
    attempt_end(a, PIAPI_LIMITS_GONE);
}

static enum piapi_limits_verdict admit_shared(const struct piapi_user *u, double now, int fd,
                                              piapi_limits_resume resume, void *arg,
                                              struct piapi_limits_slot *slot)
{
    struct piapi_ev *ev = piapi_loop_ev();
    if (!sh.instance[0]) {
        uint64_t id = piapi_hash(&slot, sizeof slot) ^ (uint64_t)(piapi_now_real() * 1e6);
        snprintf(sh.instance, sizeof sh.instance, "%016llx", (unsigned long long)id);
    }
    if (!sh.hooked) {
        sh.round_end.fn = end_round;
        piapi_ev_hook_add(ev, &sh.round_end);
        sh.hooked = 1;
    }
    struct attempt *a = piapi_xcalloc(1, sizeof *a);
    *a = (struct attempt){
        .io = { .cb = on_attempt_hangup, .fd = fd },
        .retry = { .cb = on_retry },
        .u = u, .now = now, .fd = fd, .resume = resume, .arg = arg, .slot = slot,
        .give_up = piapi_now_mono() + u->limits.queue_ms / 1000.0,
    };
    try_shared(a);
    return PIAPI_LIMITS_QUEUED;  /* even when answered already: resume said so */
}

enum piapi_limits_verdict piapi_limits_admit(const struct piapi_user *u, double now,
                                             const char *redis, int fd,
                                             piapi_limits_resume resume, void *arg,
                                             struct piapi_limits_slot *slot,
                                             struct piapi_limits_refusal *r)
{
    if (check_periods(u, now, r) != 0)
        return PIAPI_LIMITS_REFUSED;
    int on_loop = piapi_loop_on_thread();
    const struct piapi_limits *l = &u->limits;
    if (on_loop && piapi_redis_want(redis) && resume &&
        (l->per_minute || l->concurrent || l->tokens_per_day || l->daily_usd ||
         l->monthly_usd))
        return local_window_full(u, now, r) ? PIAPI_LIMITS_REFUSED
                                            : admit_shared(u, now, fd, resume, arg, slot);
    return admit_local(u, now, fd, resume, arg, slot, r);
}

void piapi_limits_release(const char *user, struct piapi_limits_slot *slot)
{
    pthread_mutex_lock(&lim.lock);
    struct member *m = member_get(user);
    if (m->in_flight)
        m->in_flight--;
    hand_over(m, piapi_now_real());
    pthread_mutex_unlock(&lim.lock);
    slot->held = 0;
    if (!slot->lease[0])
        return;
    if (piapi_loop_on_thread()) {
        lease_return(user, slot->lease);
    } else {
        struct returned *rt = piapi_xcalloc(1, sizeof *rt + strlen(user) + 1);
        memcpy(rt->user, user, strlen(user) + 1);
        snprintf(rt->id, sizeof rt->id, "%s", slot->lease);
        if (piapi_loop_post(return_posted, rt) != 0)
            free(rt);  /* stopping: the lease expires */
    }
    slot->lease[0] = '\0';
}

struct spent {
    double now, cost;
    int64_t tokens;
    char user[];                /* whole, as the admission's keys have it */
};

/* 1 when the member's spend key of the month that expires at `at` has
 * no expiry yet on this connection, which it has from now on (at 0:
 * forget it). Once per member and month is enough: a key Redis lost with
 * a restart comes back on a new connection. */
static int spend_expiry_unset(const char *user, double at)
{
    uint64_t conn = piapi_redis_connection();
    pthread_mutex_lock(&lim.lock);
    struct member *m = member_get(user);
    int unset = m->expiring != at || m->expiring_on != conn;
    m->expiring = at;
    m->expiring_on = conn;
    pthread_mutex_unlock(&lim.lock);
    return unset;
}

/* Plain commands, not a script: nothing here needs to be atomic, and
 * Redis runs them for less. */
static void spent_on_loop(void *arg)
{
    struct spent *sp = arg;
    struct spend_keys sk;
    char tok[24], usd[24], month_end[24];
    spend_keys(&sk, sp->user, sp->now);
    double expires = next_month(sp->now) + DAY_S;
    piapi_u64_str(tok, sp->tokens > 0 ? (uint64_t)sp->tokens : 0);
    piapi_u64_str(usd, (uint64_t)nano_usd(sp->cost));
    piapi_u64_str(month_end, (uint64_t)expires);
    if (sp->tokens > 0) {
        const char *argv[] = { "HINCRBY", sk.key, sk.tokens, tok };
        piapi_redis_command_nowait(4, argv);
    }
    if (nano_usd(sp->cost) > 0) {
        const char *day[] = { "HINCRBY", sk.key, sk.usd, usd };
        const char *month[] = { "HINCRBY", sk.key, "usd_nano", usd };
        piapi_redis_command_nowait(4, day);
        piapi_redis_command_nowait(4, month);
    }
    if (spend_expiry_unset(sp->user, expires)) {
        const char *expire[] = { "EXPIREAT", sk.key, month_end };
        if (piapi_redis_command_nowait(3, expire) != 0)
            spend_expiry_unset(sp->user, 0);  /* not sent: next time */
    }
    free(sp);
}

void piapi_limits_spent(const char *user, const char *redis, double now, int64_t tokens,
                        double cost)
{
    if (!redis || (tokens <= 0 && cost <= 0))
        return;
    struct spent *sp = piapi_xcalloc(1, sizeof *sp + strlen(user) + 1);
    memcpy(sp->user, user, strlen(user) + 1);
    sp->now = now;
    sp->tokens = tokens;
    sp->cost = cost;
    if (piapi_loop_on_thread())
        spent_on_loop(sp);
    else if (piapi_loop_post(spent_on_loop, sp) != 0)
        free(sp);
}

void piapi_limits_stop(void)
{
    while (sh.leases) {
        struct lease *l = sh.leases;
        sh.leases = l->next;
        free(l);
    }
    piapi_ev_timer_stop(piapi_loop_ev(), &sh.refresh);
    piapi_redis_stop();
}

/* ---- the model allow-list ----------------------------------------------- */

int piapi_limits_model(const struct piapi_user *u, const char *model,
                       struct piapi_limits_refusal *r)
{
    if (!u->models || !model || !model[0])
        return 0;
    size_t len = strlen(model);
    for (size_t i = 0; i < u->nmodels; i++) {
        const struct piapi_model_pattern *p = &u->models[i];
        if (p->prefix ? len >= p->len && memcmp(model, p->s, p->len) == 0
                      : len == p->len && memcmp(model, p->s, len) == 0)
            return 0;
    }
    r->limit = PIAPI_LIMIT_MODEL;
    r->status = 403;
    r->retry_after = 0;
    snprintf(r->message, sizeof r->message,
             "model '%.120s' is not allowed for this key (models)", model);
    return -1;
}

/* A body the scanner could not read that an upstream's parser may still
 * take as JSON naming a model: one starting like JSON (malformed, or
 * followed by more: a streaming decoder stops after the first value), or
 * JSON in another encoding, which Python's json detects (a byte order
 * mark, UTF-16/32 with their NUL bytes). */
static int json_unread(const char *body, size_t len)
{
    size_t i = 0;
    const unsigned char *b = (const unsigned char *)body;
    if ((len >= 3 && b[0] == 0xef && b[1] == 0xbb && b[2] == 0xbf) ||
        (len >= 2 && ((b[0] == 0xfe && b[1] == 0xff) || (b[0] == 0xff && b[1] == 0xfe))) ||
        memchr(body, '\0', len < 4 ? len : 4))
        return 1;
    while (i < len && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r'))
        i++;
    return i < len && (b[i] == '{' || b[i] == '[');
}

static int refuse_model(struct piapi_limits_refusal *r, const char *why)
{
    *r = (struct piapi_limits_refusal){ .limit = PIAPI_LIMIT_MODEL, .status = 403 };
    snprintf(r->message, sizeof r->message, "%s", why);
    return -1;
}

int piapi_limits_model_body(const struct piapi_user *u, const char *body, size_t len,
                            struct piapi_limits_refusal *r)
{
    struct piapi_usage_request rq;
    if (!u->models)
        return 0;
    if (!body)
        return refuse_model(r, "request body too large to check its model against this "
                               "key's models");
    if (piapi_usage_scan_request(body, len, &rq) != 0)
        return json_unread(body, len)
            ? refuse_model(r, "request body is JSON piapi cannot read (not one UTF-8 "
                              "object): its model cannot be checked against this key's models")
            : 0;  /* not JSON (a multipart upload): no model to check */
    if (rq.model_unread)
        return refuse_model(r, "request's model is not a plain string of at most 127 "
                               "bytes: it cannot be checked against this key's models");
    return piapi_limits_model(u, rq.model, r);
}

/* ---- /usage --------------------------------------------------------------- */

static void put_left_int(struct piapi_buf *b, const char *name, uint64_t limit,
                         uint64_t used)
{
    if (!limit)
        return;
    piapi_buf_printf(b, ",\"%s\":{\"limit\":%llu,\"remaining\":%llu}", name,
                     (unsigned long long)limit,
                     (unsigned long long)(used < limit ? limit - used : 0));
}

static void put_left_usd(struct piapi_buf *b, const char *name, double limit, double used)
{
    if (!limit)
        return;
    piapi_buf_printf(b, ",\"%s\":{\"limit\":%.6f,\"remaining\":%.6f}", name, limit,
                     used < limit ? limit - used : 0.0);
}

void piapi_limits_usage_json(const struct piapi_user *u, double now, struct piapi_buf *out)
{
    const struct piapi_limits *l = &u->limits;
    struct piapi_usage_totals day, month;
    uint32_t recent = 0, in_flight = 0;
    if (!l->concurrent && !l->per_minute && !l->tokens_per_day && !l->daily_usd &&
        !l->monthly_usd && !u->models)
        return;  /* a member without limits: nothing to show */
    piapi_tally_get(u->name, now, &day, &month);
    pthread_mutex_lock(&lim.lock);
    struct member *m = member_get(u->name);
    in_flight = m->in_flight;
    recent = piapi_limits_window_count(&m->window, now, WINDOW_S);
    pthread_mutex_unlock(&lim.lock);
    int64_t tokens = day.input + day.output + day.cache_read + day.cache_write;
    piapi_buf_puts(out, ",\"limits\":{\"in_flight\":");
    piapi_buf_printf(out, "%u", in_flight);
    put_left_int(out, "concurrentRequests", l->concurrent, in_flight);
    if (l->concurrent)
        piapi_buf_printf(out, ",\"queueMs\":%u", l->queue_ms);
    put_left_int(out, "requestsPerMinute", l->per_minute, recent);
    put_left_int(out, "tokensPerDay", l->tokens_per_day, tokens > 0 ? (uint64_t)tokens : 0);
    put_left_usd(out, "dailyBudgetUsd", l->daily_usd, day.cost_usd);
    put_left_usd(out, "monthlyBudgetUsd", l->monthly_usd, month.cost_usd);
    if (u->models) {
        piapi_buf_puts(out, ",\"models\":[");
        for (size_t i = 0; i < u->nmodels; i++) {
            struct piapi_buf p = { 0 };
            piapi_buf_append(&p, u->models[i].s, u->models[i].len);
            if (u->models[i].prefix)
                piapi_buf_putc(&p, '*');
            if (i)
                piapi_buf_putc(out, ',');
            piapi_json_string(out, p.data, p.len);
            piapi_buf_dispose(&p);
        }
        piapi_buf_putc(out, ']');
    }
    piapi_buf_putc(out, '}');
}

/* ---- metrics -------------------------------------------------------------- */

void piapi_limits_count(const char *user, enum piapi_limit l)
{
    if (l <= PIAPI_LIMIT_NONE || l >= PIAPI_LIMIT_N)
        return;
    pthread_mutex_lock(&lim.lock);
    member_get(user)->limited[l]++;
    pthread_mutex_unlock(&lim.lock);
}

/* A member name as a label value (names come from the config). */
static void put_label(struct piapi_buf *b, const char *s)
{
    for (; *s; s++) {
        if (*s == '\\' || *s == '"')
            piapi_buf_putc(b, '\\');
        if (*s == '\n')
            piapi_buf_puts(b, "\\n");
        else
            piapi_buf_putc(b, *s);
    }
}

static void put_head(struct piapi_buf *b, const char *name, const char *help,
                     const char *type)
{
    piapi_buf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* Every member seen since start-up (a request or GET /usage). */
static void render_members(struct piapi_buf *b, double now)
{
    put_head(b, "piapi_limited_total", "Requests refused by a member's limit.", "counter");
    for (size_t k = 0; k < BUCKETS; k++)
        for (struct member *m = lim.buckets[k]; m; m = m->next)
            for (int l = PIAPI_LIMIT_NONE + 1; l < PIAPI_LIMIT_N; l++) {
                if (!m->limited[l])
                    continue;
                piapi_buf_puts(b, "piapi_limited_total{user=\"");
                put_label(b, m->name);
                piapi_buf_printf(b, "\",limit=\"%s\"} %llu\n", names[l],
                                 (unsigned long long)m->limited[l]);
            }
    put_head(b, "piapi_user_in_flight", "A member's requests admitted and not ended.",
             "gauge");
    for (size_t k = 0; k < BUCKETS; k++)
        for (struct member *m = lim.buckets[k]; m; m = m->next) {
            piapi_buf_puts(b, "piapi_user_in_flight{user=\"");
            put_label(b, m->name);
            piapi_buf_printf(b, "\"} %u\n", m->in_flight);
        }
    put_head(b, "piapi_user_spend_usd", "A member's cost this UTC day and month.", "gauge");
    for (size_t k = 0; k < BUCKETS; k++)
        for (struct member *m = lim.buckets[k]; m; m = m->next) {
            struct piapi_usage_totals day, month;
            piapi_tally_get(m->name, now, &day, &month);
            piapi_buf_puts(b, "piapi_user_spend_usd{user=\"");
            put_label(b, m->name);
            piapi_buf_printf(b, "\",period=\"day\"} %.9g\n", day.cost_usd);
            piapi_buf_puts(b, "piapi_user_spend_usd{user=\"");
            put_label(b, m->name);
            piapi_buf_printf(b, "\",period=\"month\"} %.9g\n", month.cost_usd);
        }
}

void piapi_limits_render_metrics(struct piapi_buf *b)
{
    pthread_mutex_lock(&lim.lock);
    render_members(b, piapi_now_real());
    put_head(b, "piapi_queue_wait_seconds",
             "Time a request waited in its member's queue for a slot.", "histogram");
    uint64_t cum = 0;
    for (size_t i = 0; i < WAIT_BUCKETS; i++) {
        cum += lim.wait_le[i];
        piapi_buf_printf(b, "piapi_queue_wait_seconds_bucket{le=\"%g\"} %llu\n",
                         wait_bounds[i], (unsigned long long)cum);
    }
    piapi_buf_printf(b, "piapi_queue_wait_seconds_bucket{le=\"+Inf\"} %llu\n"
                     "piapi_queue_wait_seconds_sum %.6f\n"
                     "piapi_queue_wait_seconds_count %llu\n",
                     (unsigned long long)lim.wait_count, lim.wait_sum,
                     (unsigned long long)lim.wait_count);
    pthread_mutex_unlock(&lim.lock);
    put_head(b, "piapi_redis_errors_total",
             "Redis failures (unreachable, slower than 50 ms, errors): local limits used.",
             "counter");
    piapi_buf_printf(b, "piapi_redis_errors_total %llu\n",
                     (unsigned long long)piapi_redis_errors());
}

void piapi_limits_reset(void)
{
    pthread_mutex_lock(&lim.lock);
    for (size_t b = 0; b < BUCKETS; b++) {
        while (lim.buckets[b]) {
            struct member *m = lim.buckets[b];
            lim.buckets[b] = m->next;
            piapi_limits_window_resize(&m->window, 0);
            free(m->name);
            free(m);
        }
    }
    pthread_mutex_unlock(&lim.lock);
}
