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
#include "piapi/tally.h"

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
    return piapi_tally_month_start(piapi_tally_month_start(now) + 32 * DAY_S);
}

/* tokensPerDay and the budgets: admitted while under them. */
static int check_periods(const struct piapi_user *u, double now,
                         struct piapi_limits_refusal *r)
{
    const struct piapi_limits *l = &u->limits;
    if (!l->tokens_per_day && !l->daily_usd && !l->monthly_usd)
        return 0;
    struct piapi_tally day, month;
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
static int park(struct member *m, int fd, piapi_limits_resume resume, void *arg)
{
    struct piapi_ev *ev = piapi_loop_ev();
    struct waiter *w = piapi_xcalloc(1, sizeof *w);
    w->io = (struct piapi_ev_io){ .cb = on_hangup, .fd = fd };
    w->timer.cb = on_timer;
    w->post.fn = handed_over;
    w->resume = resume;
    w->arg = arg;
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

enum piapi_limits_verdict piapi_limits_admit(const struct piapi_user *u, double now,
                                             int fd, piapi_limits_resume resume,
                                             void *arg, struct piapi_limits_refusal *r)
{
    if (check_periods(u, now, r) != 0)
        return PIAPI_LIMITS_REFUSED;
    enum piapi_limits_verdict v = PIAPI_LIMITS_ADMITTED;
    pthread_mutex_lock(&lim.lock);
    struct member *m = member_get(u->name);
    m->limits = u->limits;
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
    } else if (park(m, fd, resume, arg) == 0) {
        v = PIAPI_LIMITS_QUEUED;
    } else {
        refuse_concurrency(m, r);
        v = PIAPI_LIMITS_REFUSED;
    }
    pthread_mutex_unlock(&lim.lock);
    return v;
}

void piapi_limits_release(const char *user)
{
    pthread_mutex_lock(&lim.lock);
    struct member *m = member_get(user);
    if (m->in_flight)
        m->in_flight--;
    hand_over(m, piapi_now_real());
    pthread_mutex_unlock(&lim.lock);
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
    struct piapi_tally day, month;
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
            struct piapi_tally day, month;
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
