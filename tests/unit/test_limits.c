/* The per-member limits with an injected clock: the sliding window (no
 * 2x at a minute boundary, resizing on reload), the model allow-list,
 * admission order and the queue's hand-over off the event loop (a pool
 * thread's bounded wait). */
#include <pthread.h>
#include <string.h>
#include <unistd.h>

#include "piapi/limits.h"
#include "piapi/tally.h"
#include "unit.h"

#define SPAN 60.0

/* Off the loop, without Redis: a slot is only counted (no lease). */
static enum piapi_limits_verdict admit(const struct piapi_user *u, double now,
                                       struct piapi_limits_refusal *r)
{
    struct piapi_limits_slot slot = { 0 };
    return piapi_limits_admit(u, now, NULL, -1, NULL, NULL, &slot, r);
}

static void release(const char *user)
{
    struct piapi_limits_slot slot = { .held = 1 };
    piapi_limits_release(user, &slot);
}

static void test_window_allows_n_per_span(void)
{
    struct piapi_limits_window w = { 0 };
    double wait = 0;
    piapi_limits_window_resize(&w, 3);
    CU_ASSERT_EQUAL(piapi_limits_window_take(&w, 1000.0, SPAN, &wait), 0);
    CU_ASSERT_EQUAL(piapi_limits_window_take(&w, 1010.0, SPAN, &wait), 0);
    CU_ASSERT_EQUAL(piapi_limits_window_take(&w, 1020.0, SPAN, &wait), 0);
    CU_ASSERT_EQUAL(piapi_limits_window_take(&w, 1030.0, SPAN, &wait), -1);
    CU_ASSERT_DOUBLE_EQUAL(wait, 30.0, 1e-9);   /* until 1000 + 60 */
    /* still full just before the oldest leaves, free at its exact end */
    CU_ASSERT_EQUAL(piapi_limits_window_take(&w, 1059.999, SPAN, &wait), -1);
    CU_ASSERT_EQUAL(piapi_limits_window_take(&w, 1060.0, SPAN, &wait), 0);
    CU_ASSERT_EQUAL(piapi_limits_window_count(&w, 1060.0, SPAN), 3);
    piapi_limits_window_resize(&w, 0);
    CU_ASSERT_PTR_NULL(w.t);
}

/* A fixed window would let N through at :59 and N more at :00. */
static void test_window_no_double_at_minute_boundary(void)
{
    struct piapi_limits_window w = { 0 };
    double wait, t0 = 6000.0;   /* a minute boundary */
    int admitted = 0;
    piapi_limits_window_resize(&w, 5);
    for (int i = 0; i < 10; i++)     /* a burst just before the boundary */
        admitted += piapi_limits_window_take(&w, t0 - 1.0 + i * 0.01, SPAN, &wait) == 0;
    for (int i = 0; i < 10; i++)     /* and just after it */
        admitted += piapi_limits_window_take(&w, t0 + 0.5 + i * 0.01, SPAN, &wait) == 0;
    CU_ASSERT_EQUAL(admitted, 5);
    /* any 60 s, sliding: over two minutes in 1 s steps, never more than 5 */
    struct piapi_limits_window v = { 0 };
    double log[200];
    int n = 0;
    piapi_limits_window_resize(&v, 5);
    for (double t = 0; t < 180.0; t += 0.5)
        if (piapi_limits_window_take(&v, t, SPAN, &wait) == 0)
            log[n++] = t;
    CU_ASSERT_EQUAL(n, 15);
    for (int i = 5; i < n; i++)
        CU_ASSERT(log[i] - log[i - 5] >= SPAN);
    piapi_limits_window_resize(&w, 0);
    piapi_limits_window_resize(&v, 0);
}

static void test_window_resize_keeps_newest(void)
{
    struct piapi_limits_window w = { 0 };
    double wait;
    piapi_limits_window_resize(&w, 4);
    for (int i = 0; i < 4; i++)
        CU_ASSERT_EQUAL(piapi_limits_window_take(&w, 100.0 + i, SPAN, &wait), 0);
    piapi_limits_window_resize(&w, 2);   /* a reload lowered the limit */
    CU_ASSERT_EQUAL(w.n, 2);
    CU_ASSERT_EQUAL(piapi_limits_window_take(&w, 110.0, SPAN, &wait), -1);
    CU_ASSERT_DOUBLE_EQUAL(wait, 102.0 + SPAN - 110.0, 1e-9);
    piapi_limits_window_resize(&w, 6);
    CU_ASSERT_EQUAL(w.n, 2);
    CU_ASSERT_EQUAL(piapi_limits_window_take(&w, 110.0, SPAN, &wait), 0);
    piapi_limits_window_resize(&w, 0);
}

static const struct piapi_model_pattern patterns[] = {
    { "claude-sonnet-4", 15, true },
    { "gpt-5-mini", 10, false },
};

static void test_model_allow_list(void)
{
    struct piapi_user u = { .name = "m", .models = patterns, .nmodels = 2 };
    struct piapi_limits_refusal r;
    static const struct { const char *model; int ok; } cases[] = {
        { "claude-sonnet-4-5", 1 }, { "claude-sonnet-4", 1 }, { "gpt-5-mini", 1 },
        { "gpt-5-mini-2", 0 }, { "gpt-5", 0 }, { "claude-opus-4", 0 },
        { "", 1 }, { NULL, 1 },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int got = piapi_limits_model(&u, cases[i].model, &r) == 0;
        CU_ASSERT_EQUAL(got, cases[i].ok);
        if (!cases[i].ok) {
            CU_ASSERT_EQUAL(r.status, 403);
            CU_ASSERT_EQUAL(r.limit, PIAPI_LIMIT_MODEL);
            CU_ASSERT_PTR_NOT_NULL(strstr(r.message, cases[i].model));
        }
    }
    struct piapi_user any = { .name = "any" };
    CU_ASSERT_EQUAL(piapi_limits_model(&any, "whatever", &r), 0);
    struct piapi_user none = { .name = "none", .models = patterns, .nmodels = 0 };
    CU_ASSERT_EQUAL(piapi_limits_model(&none, "gpt-5-mini", &r), -1);
}

static void test_rpm_refusal_names_reset(void)
{
    struct piapi_user u = { .name = "unit-rpm", .limits = { .per_minute = 2 } };
    struct piapi_limits_refusal r;
    double t = 50000.25;
    piapi_limits_reset();
    CU_ASSERT_EQUAL(admit(&u, t, &r), PIAPI_LIMITS_ADMITTED);
    CU_ASSERT_EQUAL(admit(&u, t + 20, &r), PIAPI_LIMITS_ADMITTED);
    CU_ASSERT_EQUAL(admit(&u, t + 30, &r), PIAPI_LIMITS_REFUSED);
    CU_ASSERT_EQUAL(r.limit, PIAPI_LIMIT_PER_MINUTE);
    CU_ASSERT_EQUAL(r.status, 429);
    CU_ASSERT_EQUAL(r.retry_after, 30);
    CU_ASSERT_PTR_NOT_NULL(strstr(r.message, "requestsPerMinute"));
    CU_ASSERT_PTR_NOT_NULL(strstr(r.message, "resets in 30 s"));
    /* a refusal takes nothing: at t + 60 the first has left */
    CU_ASSERT_EQUAL(admit(&u, t + 60, &r), PIAPI_LIMITS_ADMITTED);
    for (int i = 0; i < 3; i++)
        release(u.name);
    piapi_limits_reset();
}

static void test_periods_from_the_tally(void)
{
    double now = 1767225600.0 + 3600.0 * 23.5;   /* 2026-01-01 23:30 UTC */
    struct piapi_user u = { .name = "unit-day", .limits = { .tokens_per_day = 100 } };
    struct piapi_limits_refusal r;
    struct piapi_usage_totals one = { .requests = 1, .input = 60, .output = 39 };
    piapi_tally_reset();
    piapi_limits_reset();
    piapi_tally_add(u.name, now, &one);
    CU_ASSERT_EQUAL(admit(&u, now, &r), PIAPI_LIMITS_ADMITTED);
    struct piapi_usage_totals more = { .requests = 1, .cache_read = 1 };
    piapi_tally_add(u.name, now, &more);   /* 100: reached */
    CU_ASSERT_EQUAL(admit(&u, now, &r), PIAPI_LIMITS_REFUSED);
    CU_ASSERT_EQUAL(r.limit, PIAPI_LIMIT_TOKENS_PER_DAY);
    CU_ASSERT_EQUAL(r.retry_after, 1800);   /* until midnight UTC */
    /* a new day starts from zero */
    CU_ASSERT_EQUAL(admit(&u, now + 1800, &r),
                    PIAPI_LIMITS_ADMITTED);

    struct piapi_user m = { .name = "unit-month", .limits = { .monthly_usd = 1.0 } };
    struct piapi_usage_totals cost = { .requests = 1, .cost_usd = 1.0 };
    piapi_tally_add(m.name, now, &cost);
    CU_ASSERT_EQUAL(admit(&m, now, &r), PIAPI_LIMITS_REFUSED);
    CU_ASSERT_EQUAL(r.limit, PIAPI_LIMIT_MONTHLY_BUDGET);
    CU_ASSERT_EQUAL(r.retry_after, 31 * 86400 - 23 * 3600 - 1800);   /* to Feb 1 */
    for (int i = 0; i < 2; i++)
        release(u.name);
    piapi_tally_reset();
    piapi_limits_reset();
}

/* Off the loop a waiter waits on its own thread, bounded by queueMs. */
struct waiter_arg {
    const struct piapi_user *u;
    enum piapi_limits_verdict v;
    struct piapi_limits_refusal r;
};

static void *wait_for_slot(void *p)
{
    struct waiter_arg *a = p;
    a->v = admit(a->u, piapi_now_real(), &a->r);
    return NULL;
}

static void test_queue_hand_over_on_threads(void)
{
    struct piapi_user u = { .name = "unit-conc",
                            .limits = { .concurrent = 1, .queue_ms = 2000 } };
    struct piapi_limits_refusal r;
    piapi_limits_reset();
    CU_ASSERT_EQUAL(admit(&u, piapi_now_real(), &r),
                    PIAPI_LIMITS_ADMITTED);
    struct waiter_arg a = { .u = &u };
    pthread_t th;
    pthread_create(&th, NULL, wait_for_slot, &a);
    usleep(100 * 1000);
    release(u.name);   /* the slot goes to the waiter */
    pthread_join(th, NULL);
    CU_ASSERT_EQUAL(a.v, PIAPI_LIMITS_ADMITTED);

    /* now held by the waiter: a short queue runs out */
    struct piapi_user s = u;
    s.limits.queue_ms = 100;
    double t0 = piapi_now_mono();
    CU_ASSERT_EQUAL(admit(&s, piapi_now_real(), &r),
                    PIAPI_LIMITS_REFUSED);
    CU_ASSERT(piapi_now_mono() - t0 >= 0.09);
    CU_ASSERT_EQUAL(r.limit, PIAPI_LIMIT_CONCURRENCY);
    CU_ASSERT_EQUAL(r.retry_after, 1);
    /* no queue at all: refused at once */
    s.limits.queue_ms = 0;
    CU_ASSERT_EQUAL(admit(&s, piapi_now_real(), &r),
                    PIAPI_LIMITS_REFUSED);
    release(u.name);
    struct piapi_buf b = { 0 };
    piapi_limits_render_metrics(&b);
    CU_ASSERT_PTR_NOT_NULL(strstr(b.data, "piapi_user_in_flight{user=\"unit-conc\"} 0\n"));
    CU_ASSERT_PTR_NOT_NULL(strstr(b.data, "piapi_queue_wait_seconds_count 2\n"));
    piapi_buf_dispose(&b);
    piapi_limits_reset();
}

static const struct unit_case cases[] = {
    { "window allows N per span", test_window_allows_n_per_span },
    { "window: no 2x at a minute boundary", test_window_no_double_at_minute_boundary },
    { "window resize keeps the newest", test_window_resize_keeps_newest },
    { "model allow-list", test_model_allow_list },
    { "rpm refusal names its reset", test_rpm_refusal_names_reset },
    { "tokens and budgets from the tally", test_periods_from_the_tally },
    { "queue hand-over on threads", test_queue_hand_over_on_threads },
    { NULL, NULL },
};

UNIT_MAIN("limits", cases)
