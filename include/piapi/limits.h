/* Per-member limits, in this process: concurrency with a queue, requests
 * per minute (a sliding window), tokens per UTC day and daily / monthly
 * budgets (against the member's tally), the model allow-list.
 *
 * Design. State lives per member name (so it survives reloads) under one
 * mutex: the sliding log of admissions of the last minute, the requests
 * in flight and a FIFO of waiters. A request is admitted (in flight, its
 * admission logged) or refused with a reason, or, when the member is at
 * concurrentRequests, it waits for a slot for at most queueMs:
 *
 *  - on the event loop's thread (nearly every request: its body is whole
 *    in the socket and not read yet) it is parked: a waiter record with a
 *    timer for queueMs and a watch for the FastCGI connection's hang-up
 *    (EPOLLRDHUP only: the unread body keeps the socket readable) is put
 *    in the queue and admit() returns QUEUED; no thread and no loop time
 *    is spent until one of three things happens: a request of the member
 *    ends and hands its slot to the queue's head (from any thread: a post
 *    to the loop), the timer fires (refused: concurrency), or the web
 *    server closes the connection (the client gave up: GONE, out of the
 *    queue). Then `resume` runs on the loop's thread, once;
 *  - on a pool thread (a body larger than 64 KiB or still arriving, which
 *    is already read by a thread) it waits on that thread, bounded by
 *    queueMs, as such a request already does for a request slot.
 *
 * A slot handed to a waiter is counted in flight at once, so a request
 * arriving meanwhile cannot take it (first come, first served); the
 * window is checked when the slot is handed over, so a queued request
 * never goes past requestsPerMinute either. */
#ifndef PIAPI_LIMITS_H
#define PIAPI_LIMITS_H

#include <stddef.h>
#include <stdint.h>

#include "piapi/config.h"
#include "piapi/util.h"

enum piapi_limit {
    PIAPI_LIMIT_NONE,
    PIAPI_LIMIT_CONCURRENCY,
    PIAPI_LIMIT_PER_MINUTE,
    PIAPI_LIMIT_TOKENS_PER_DAY,
    PIAPI_LIMIT_DAILY_BUDGET,
    PIAPI_LIMIT_MONTHLY_BUDGET,
    PIAPI_LIMIT_MODEL,
    PIAPI_LIMIT_N
};

/* The metric label and log value: "requests_per_minute", ... */
const char *piapi_limits_name(enum piapi_limit l);

struct piapi_limits_refusal {
    enum piapi_limit limit;
    int status;                 /* 429, or 403 for the model */
    unsigned retry_after;       /* seconds, >= 1 (429 only) */
    char message[224];          /* names the limit and when it resets */
};

enum piapi_limits_verdict {
    PIAPI_LIMITS_ADMITTED,      /* in flight: release it at its end */
    PIAPI_LIMITS_REFUSED,       /* *r says why */
    PIAPI_LIMITS_QUEUED,        /* parked: resume() will say */
    PIAPI_LIMITS_GONE           /* (resume only) the client left while queued */
};

/* What an admitted request holds: its slot, and with Redis its lease
 * there ("" when admitted by this instance alone). Zeroed by the caller
 * before admit(). */
struct piapi_limits_slot {
    int held;
    char lease[48];
};

/* Runs on the loop's thread once a parked request's wait ends: r is the
 * refusal when v is REFUSED, else NULL. */
typedef void (*piapi_limits_resume)(void *arg, enum piapi_limits_verdict v,
                                    const struct piapi_limits_refusal *r);

/* Checks u's limits at `now` (unix seconds) for a new request. fd: its
 * FastCGI connection (watched for a hang-up while parked). redis: the
 * config's settings.redis or NULL. QUEUED only on the loop's thread;
 * *slot is filled when admitted (now or at resume) and must stay valid
 * until then. */
enum piapi_limits_verdict piapi_limits_admit(const struct piapi_user *u, double now,
                                             const char *redis, int fd,
                                             piapi_limits_resume resume, void *arg,
                                             struct piapi_limits_slot *slot,
                                             struct piapi_limits_refusal *r);
/* An admitted request of `user` ended: its slot goes to the next waiter,
 * its lease back to Redis. */
void piapi_limits_release(const char *user, struct piapi_limits_slot *slot);

/* The model allow-list: 0 when `model` ("" or NULL: none named) may be
 * used by u, else -1 with the 403 in *r. */
int piapi_limits_model(const struct piapi_user *u, const char *model,
                       struct piapi_limits_refusal *r);
/* The same for a request body (NULL: too large to read whole, refused
 * when u has a list): its top-level "model", and a body that looks like
 * JSON but cannot be read, or a model that cannot, refused (403) when u
 * has a list. Not JSON at all (a multipart upload): no model to check. */
int piapi_limits_model_body(const struct piapi_user *u, const char *body, size_t len,
                            struct piapi_limits_refusal *r);

/* For GET /usage: u's limits and what is left of each, a JSON member
 * `"limits":{...}` appended to out (with a leading comma); nothing for a
 * member without any limit. */
void piapi_limits_usage_json(const struct piapi_user *u, double now, struct piapi_buf *out);

/* Counts a refusal (piapi_limited_total); the model's is counted by the
 * caller, which alone knows when it happens. */
void piapi_limits_count(const char *user, enum piapi_limit l);

/* piapi_limited_total{user,limit}, piapi_user_in_flight{user},
 * piapi_user_spend_usd{user,period}, piapi_queue_wait_seconds: for
 * piapi_metrics_set_extra_probe. */
void piapi_limits_render_metrics(struct piapi_buf *out);

/* A request's usage, as it ended (any thread): added to the member's
 * shared totals of the day and month when Redis is configured (`redis`,
 * the config's settings.redis; NULL: nothing to do). Lost for Redis,
 * never for the local tally, while Redis is down. */
void piapi_limits_spent(const char *user, const char *redis, double now, int64_t tokens,
                        double cost);

/* On the loop at shutdown: leases and the Redis connection go. */
void piapi_limits_stop(void);

/* Forgets every member's state (tests, shutdown); no request may be
 * waiting. */
void piapi_limits_reset(void);

/* ---- the sliding window, on its own for tests ---------------------- */

/* The times of the last `cap` admissions, oldest first (a ring). */
struct piapi_limits_window {
    double *t;
    uint32_t cap, head, n;
};

/* Resizes to cap (keeping the newest admissions); cap 0 frees. */
void piapi_limits_window_resize(struct piapi_limits_window *w, uint32_t cap);
/* 0 and the admission noted when fewer than cap fell in (now - span, now];
 * else -1 and *wait the seconds until the oldest of them leaves. */
int piapi_limits_window_take(struct piapi_limits_window *w, double now, double span,
                             double *wait);
/* Whether take() would succeed, without noting anything. */
int piapi_limits_window_full(struct piapi_limits_window *w, double now, double span,
                             double *wait);
/* How many admissions fell in (now - span, now]. */
uint32_t piapi_limits_window_count(struct piapi_limits_window *w, double now, double span);

#endif
