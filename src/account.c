/* One request's usage, settled once at its end and recorded everywhere
 * from the same numbers, so the log, the metrics, the ledger and
 * GET /usage never disagree. */
#include "piapi/account.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "piapi/json.h"
#include "piapi/ledger.h"
#include "piapi/metrics.h"
#include "piapi/tally.h"
#include "piapi/util.h"

/* The ledger in use (resolved path), NULL when none; under ledger_lock. */
static pthread_mutex_t ledger_lock = PTHREAD_MUTEX_INITIALIZER;
static char *ledger_path;

/* Models warned about for having no price: once each, and no more than
 * this many names (they come from upstream answers). */
#define WARNED_MAX 256

static pthread_mutex_t warned_lock = PTHREAD_MUTEX_INITIALIZER;
static char *warned[WARNED_MAX];
static size_t nwarned;

static void warn_unpriced(const char *model)
{
    int first = 1;
    pthread_mutex_lock(&warned_lock);
    for (size_t i = 0; i < nwarned && first; i++)
        first = strcmp(warned[i], model) != 0;
    if (first && nwarned < WARNED_MAX)
        warned[nwarned++] = piapi_xstrdup(model);
    else
        first = 0;
    pthread_mutex_unlock(&warned_lock);
    if (first)
        piapi_log_msg(PIAPI_LOG_WARN, "model has no price: its tokens are counted "
                      "without a cost (add it to pricing:)", "model", model);
}

/* USD for the counts at per-million prices. The 1-hour part of the cache
 * writes has its own price. */
static double cost_of(const struct piapi_usage *u, const struct piapi_price *p)
{
    int64_t write_5m = u->cache_write - u->cache_write_1h;
    if (write_5m < 0)
        write_5m = 0;
    return ((double)u->input * p->input + (double)u->output * p->output +
            (double)u->cache_read * p->cache_read + (double)write_5m * p->cache_write +
            (double)u->cache_write_1h * p->cache_write_1h) / 1e6;
}

void piapi_account_settle(struct piapi_account *a)
{
    const struct piapi_usage *u = a->usage;
    a->expected = a->shape != PIAPI_USAGE_NONE && a->status >= 200 && a->status <= 299;
    a->complete = !a->expected || u->complete;
    a->model = u->model[0] ? u->model : a->request_model;
    a->priced = 0;
    a->cost_usd = 0;
    if (!a->expected || !a->model[0] || !a->cfg)
        return;
    const struct piapi_price *p = piapi_config_find_price(a->cfg, a->model);
    if (!p) {
        warn_unpriced(a->model);
        return;
    }
    a->priced = 1;
    a->cost_usd = cost_of(u, p);
}

void piapi_account_log(const struct piapi_account *a, struct piapi_log_line *l)
{
    const struct piapi_usage *u = a->usage;
    if (!a->expected)
        return;
    if (a->model[0])
        piapi_log_str(l, "model", a->model);
    piapi_log_int(l, "input_tokens", u->input);
    piapi_log_int(l, "output_tokens", u->output);
    piapi_log_int(l, "cache_read_tokens", u->cache_read);
    piapi_log_int(l, "cache_write_tokens", u->cache_write);
    if (u->cache_write_1h)
        piapi_log_int(l, "cache_write_1h_tokens", u->cache_write_1h);
    if (a->priced)
        piapi_log_amount(l, "cost_usd", a->cost_usd);
    piapi_log_bool(l, "usage_complete", a->complete);
}

static void record_ledger(const struct piapi_account *a, double now)
{
    const struct piapi_usage *u = a->usage;
    struct piapi_ledger_row row = {
        .ts = now,
        .input = u->input, .output = u->output,
        .cache_read = u->cache_read, .cache_write = u->cache_write,
        .cache_write_1h = u->cache_write_1h,
        .cost_usd = a->cost_usd, .priced = a->priced,
        .status = a->status, .complete = a->complete,
    };
    snprintf(row.request_id, sizeof row.request_id, "%s", a->request_id);
    snprintf(row.user, sizeof row.user, "%s", a->user);
    snprintf(row.service_type, sizeof row.service_type, "%s", a->service_type);
    snprintf(row.provider, sizeof row.provider, "%s", a->provider);
    snprintf(row.key_name, sizeof row.key_name, "%s", a->key_name);
    snprintf(row.model, sizeof row.model, "%s", a->model);
    piapi_ledger_record(&row);
}

void piapi_account_record(const struct piapi_account *a, double now)
{
    const struct piapi_usage *u = a->usage;
    if (a->expected) {
        struct piapi_metrics_usage m = {
            .user = a->user, .service_type = a->service_type,
            .model = u->model[0] ? u->model : NULL,  /* only answers name label values */
            .input = u->input, .output = u->output,
            .cache_read = u->cache_read, .cache_write = u->cache_write,
            .cost_usd = a->cost_usd, .priced = a->priced, .complete = a->complete,
        };
        piapi_metrics_usage(&m);
    }
    record_ledger(a, now);
    struct piapi_usage_totals one = {
        .requests = 1, .input = u->input, .output = u->output,
        .cache_read = u->cache_read, .cache_write = u->cache_write,
        .cache_write_1h = u->cache_write_1h, .cost_usd = a->cost_usd,
    };
    piapi_tally_add(a->user, now, &one);
}

static void put_period(struct piapi_buf *b, const char *name, const struct piapi_usage_totals *t)
{
    piapi_buf_printf(b, "\"%s\":{\"requests\":%llu,\"input_tokens\":%lld,"
                        "\"output_tokens\":%lld,\"cache_read_tokens\":%lld,"
                        "\"cache_write_tokens\":%lld,\"cost_usd\":%.9f}",
                     name, (unsigned long long)t->requests, (long long)t->input,
                     (long long)t->output, (long long)t->cache_read,
                     (long long)t->cache_write, t->cost_usd);
}

void piapi_account_usage_json(const char *user, double now, struct piapi_buf *out)
{
    struct piapi_usage_totals day, month;
    piapi_tally_get(user, now, &day, &month);
    piapi_buf_puts(out, "{\"user\":");
    piapi_json_string(out, user, strlen(user));
    piapi_buf_putc(out, ',');
    put_period(out, "today", &day);
    piapi_buf_putc(out, ',');
    put_period(out, "month", &month);
    piapi_buf_puts(out, "}\n");
}

/* ---- the ledger -------------------------------------------------------- */

char *piapi_account_ledger_path(const char *config_path, const char *usage_db)
{
    const char *slash = strrchr(config_path, '/');
    if (usage_db[0] == '/' || !slash)
        return piapi_xstrdup(usage_db);
    struct piapi_buf b = {0};
    piapi_buf_append(&b, config_path, (size_t)(slash - config_path) + 1);
    piapi_buf_puts(&b, usage_db);
    return b.data;
}

struct restore {
    double now;
    int month;
};

static void restore_one(void *ud, const char *user, const struct piapi_usage_totals *t)
{
    const struct restore *r = ud;
    struct piapi_usage_totals day, month;
    piapi_tally_get(user, r->now, &day, &month);
    if (r->month)
        piapi_tally_restore(user, r->now, &day, t);
    else
        piapi_tally_restore(user, r->now, t, &month);
}

/* The members' day and month so far, from what the ledger holds. */
static void restore_tallies(const char *path)
{
    struct restore r = { .now = piapi_now_real() };
    piapi_tally_reset();
    r.month = 1;
    int rc = piapi_ledger_sum_by_user(path, piapi_tally_month_start(r.now), restore_one, &r);
    r.month = 0;
    if (rc == 0)
        rc = piapi_ledger_sum_by_user(path, piapi_tally_day_start(r.now), restore_one, &r);
    if (rc != 0)
        piapi_log_msg(PIAPI_LOG_WARN, "usage ledger not read: members' usage today and "
                      "this month starts from zero", "path", path);
}

void piapi_account_follow(const char *config_path, const struct piapi_settings *s)
{
    char *path = s->usage_db ? piapi_account_ledger_path(config_path, s->usage_db) : NULL;
    pthread_mutex_lock(&ledger_lock);
    int same = (!path && !ledger_path) || (path && ledger_path && !strcmp(path, ledger_path));
    if (!same) {
        piapi_ledger_open(path);
        if (path)
            restore_tallies(path);
        free(ledger_path);
        ledger_path = path;
        path = NULL;
    }
    pthread_mutex_unlock(&ledger_lock);
    free(path);
}

void piapi_account_stop(void)
{
    pthread_mutex_lock(&ledger_lock);
    piapi_ledger_close();
    free(ledger_path);
    ledger_path = NULL;
    pthread_mutex_unlock(&ledger_lock);
}
