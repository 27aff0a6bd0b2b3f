/* Prometheus metrics: one static registry of families, labelled series in a
 * fixed open-addressing table, exposition text format 0.0.4.
 *
 * Recording is lock-free once a series exists: slots and list links are
 * published with release stores and read with acquire loads, never removed,
 * and every cell is an _Atomic uint64_t bumped with a relaxed add. Only the
 * first sighting of a label set takes create_lock. Histogram sums are kept
 * as integer microseconds, so concurrent adds are exact and need no CAS
 * loop; the scrape turns them back into seconds. */
#include "piapi/metrics.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#define MAX_LABELS   4
#define TABLE_SLOTS  4096           /* power of two */
/* Three quarters full keeps probe chains short; the slots above the limit
 * hold the per-family "other" series, so those can always be created. */
#define MAX_SERIES   (TABLE_SLOTS / 4 * 3)
#define OVERFLOW     "other"

/* Buckets for LLM traffic: a cached or refused call answers in
 * milliseconds, a long streamed completion runs for minutes. */
#define BUCKETS 16
static const double bucket_bound[BUCKETS] = {
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
    300, 600,
};
static const char *const bucket_le[BUCKETS + 1] = {
    "le=\"0.005\"", "le=\"0.01\"", "le=\"0.025\"", "le=\"0.05\"", "le=\"0.1\"",
    "le=\"0.25\"", "le=\"0.5\"", "le=\"1\"", "le=\"2.5\"", "le=\"5\"", "le=\"10\"",
    "le=\"30\"", "le=\"60\"", "le=\"120\"", "le=\"300\"", "le=\"600\"", "le=\"+Inf\"",
};
/* Histogram cells: one per bucket (not cumulative), +Inf, then the sum. */
#define HIST_INF   BUCKETS
#define HIST_SUM   (BUCKETS + 1)
#define HIST_CELLS (BUCKETS + 2)

enum family_id {
    F_BUILD_INFO,
    F_START_TIME,
    F_REQUESTS,
    F_LATENCY,
    F_TTFB,
    F_USER_REQUESTS,
    F_REQUEST_BYTES,
    F_RESPONSE_BYTES,
    F_UPSTREAM_ERRORS,
    F_IN_FLIGHT,
    F_POOL_THREADS,
    F_POOL_SATURATED,
    F_RELOADS,
    F_RELOAD_TIME,
    F_CONFIG_INFO,
    F_TOKENS,
    F_COST,
    F_USAGE_INCOMPLETE,
    F_USAGE_DB_ERRORS,
    F_ATTEMPTS,
    F_FAILOVERS,
    F_COOLING,
    F_COUNT
};

enum kind { COUNTER, GAUGE, HISTOGRAM };
static const char *const kind_name[] = { "counter", "gauge", "histogram" };

/* A family either owns labelled series in the table (samples == NULL) or
 * renders its few fixed samples itself. */
struct family {
    const char *name;
    const char *help;
    enum kind kind;
    unsigned nlabels;
    const char *labels[MAX_LABELS];
    void (*samples)(struct piapi_buf *out, const struct family *f);
};

static void render_build_info(struct piapi_buf *out, const struct family *f);
static void render_start_time(struct piapi_buf *out, const struct family *f);
static void render_in_flight(struct piapi_buf *out, const struct family *f);
static void render_pool_threads(struct piapi_buf *out, const struct family *f);
static void render_pool_saturated(struct piapi_buf *out, const struct family *f);
static void render_reloads(struct piapi_buf *out, const struct family *f);
static void render_reload_time(struct piapi_buf *out, const struct family *f);
static void render_config_info(struct piapi_buf *out, const struct family *f);
static void render_cost(struct piapi_buf *out, const struct family *f);
static void render_usage_db_errors(struct piapi_buf *out, const struct family *f);
static void render_cooling(struct piapi_buf *out, const struct family *f);

/* The registry, in exposition order. Names and labels are contracts that
 * dashboards and alerts rely on. */
static const struct family families[F_COUNT] = {
    [F_BUILD_INFO] = { "piapi_build_info",
        "piapi build information, always 1.", GAUGE, 0, {0},
        render_build_info },
    [F_START_TIME] = { "piapi_process_start_time_seconds",
        "Start time of the process since the Unix epoch in seconds.", GAUGE,
        0, {0}, render_start_time },
    [F_REQUESTS] = { "piapi_requests_total",
        "Requests answered, by service type and HTTP status class.", COUNTER,
        2, { "service_type", "status_class" }, NULL },
    [F_LATENCY] = { "piapi_request_latency_seconds",
        "Whole-request latency in seconds, until the last byte was sent.",
        HISTOGRAM, 1, { "service_type" }, NULL },
    [F_TTFB] = { "piapi_upstream_ttfb_seconds",
        "Seconds until the first byte of the upstream response.", HISTOGRAM,
        2, { "service_type", "provider" }, NULL },
    [F_USER_REQUESTS] = { "piapi_user_requests_total",
        "Requests of authenticated team members.", COUNTER, 3,
        { "user", "service_type", "status_class" }, NULL },
    [F_REQUEST_BYTES] = { "piapi_request_bytes_total",
        "Request body bytes sent upstream.", COUNTER, 1, { "service_type" },
        NULL },
    [F_RESPONSE_BYTES] = { "piapi_response_bytes_total",
        "Response body bytes sent to clients.", COUNTER, 1, { "service_type" },
        NULL },
    [F_UPSTREAM_ERRORS] = { "piapi_upstream_errors_total",
        "Failed upstream transfers, by provider and reason.", COUNTER, 2,
        { "provider", "reason" }, NULL },
    [F_IN_FLIGHT] = { "piapi_requests_in_flight",
        "Requests being served right now.", GAUGE, 0, {0}, render_in_flight },
    [F_POOL_THREADS] = { "piapi_pool_threads",
        "Responder threads, by state (busy: reading, routing or running a blocking transfer).", GAUGE, 1, { "state" },
        render_pool_threads },
    [F_POOL_SATURATED] = { "piapi_pool_saturated_total",
        "Times a request found every request slot (--threads) taken.", COUNTER, 0, {0},
        render_pool_saturated },
    [F_RELOADS] = { "piapi_config_reloads_total",
        "Configuration loads, by result.", COUNTER, 1, { "result" },
        render_reloads },
    [F_RELOAD_TIME] = { "piapi_config_last_reload_success_timestamp_seconds",
        "Time of the last successful configuration load since the Unix epoch "
        "in seconds.", GAUGE, 0, {0}, render_reload_time },
    [F_CONFIG_INFO] = { "piapi_config_info",
        "Hash of the configuration in use, always 1.", GAUGE, 1, { "hash" },
        render_config_info },
    [F_TOKENS] = { "piapi_tokens_total",
        "Tokens the upstream reported, by member, service type, model and kind "
        "(input: uncached input; output: reasoning included).", COUNTER, 4,
        { "user", "service_type", "model", "kind" }, NULL },
    [F_COST] = { "piapi_cost_usd_total",
        "Cost in USD of those tokens, by the configured pricing.", COUNTER, 3,
        { "user", "service_type", "model" }, render_cost },
    [F_USAGE_INCOMPLETE] = { "piapi_usage_incomplete_total",
        "Answers that ended before their final usage (cut streams).", COUNTER, 1,
        { "service_type" }, NULL },
    [F_USAGE_DB_ERRORS] = { "piapi_usage_db_errors_total",
        "Usage ledger rows that could not be written (or a ledger that could not "
        "be opened).", COUNTER, 0, {0}, render_usage_db_errors },
    [F_ATTEMPTS] = { "piapi_upstream_attempts_total",
        "Upstream attempts, by candidate (provider, key) and outcome.", COUNTER, 3,
        { "provider", "key", "outcome" }, NULL },
    [F_FAILOVERS] = { "piapi_failovers_total",
        "Requests that went to more than one candidate.", COUNTER, 1,
        { "service_type" }, NULL },
    [F_COOLING] = { "piapi_candidate_cooling",
        "1 while a candidate (provider, key) is skipped after a failure.", GAUGE, 2,
        { "provider", "key" }, render_cooling },
};

struct series {
    uint64_t hash;
    enum family_id family;
    char *values[MAX_LABELS];       /* raw label values, for lookup */
    char *text;                     /* escaped `name="value",...`, for render */
    size_t text_len;
    _Atomic(struct series *) next;  /* the family's list, creation order */
    _Atomic uint64_t cells[];       /* 1 for a counter, HIST_CELLS for a histogram */
};

static _Atomic(struct series *) slots[TABLE_SLOTS];
static atomic_bool table_full;
static pthread_mutex_t create_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned series_count;                       /* under create_lock */
static struct {
    _Atomic(struct series *) head;
    struct series *tail;                            /* under create_lock */
} lists[F_COUNT];

/* Unlabelled state. */
static char *build_version;
static double start_time;
static _Atomic int64_t in_flight;
static _Atomic uint64_t pool_saturated;
static _Atomic uint64_t reloads_ok, reloads_failed;
static _Atomic uint64_t reload_time_ms;
static _Atomic(piapi_metrics_pool_probe) pool_probe;
static _Atomic(piapi_metrics_count_probe) usage_db_probe;
static _Atomic(piapi_metrics_cooling_probe) cooling_probe;
/* Model names seen in answers: the first MODELS_MAX become label values,
 * the rest "other". Published like series: the name before the count. */
#define MODELS_MAX 64
#define MODEL_LEN_MAX 100
static char *models[MODELS_MAX];
static atomic_uint nmodels;                         /* written under create_lock */
static pthread_mutex_t info_lock = PTHREAD_MUTEX_INITIALIZER;
static char *config_hash;                           /* under info_lock */

/* ---- label sets and the series table ---------------------------------- */

/* FNV-1a over the family and the NUL-terminated values. Not seeded: label
 * values come from the config, never from clients (metrics.h), and the
 * table is bounded whatever the hash does. */
static uint64_t key_hash(enum family_id f, const char *const *v)
{
    uint64_t h = 0xcbf29ce484222325ULL;

    h = (h ^ (uint64_t)f) * 0x100000001b3ULL;
    for (unsigned i = 0; i < families[f].nlabels; i++) {
        const unsigned char *p = (const unsigned char *)v[i];
        do
            h = (h ^ *p) * 0x100000001b3ULL;
        while (*p++);
    }
    return h;
}

static bool key_equal(const struct series *s, enum family_id f,
                      const char *const *v, uint64_t h)
{
    if (s->hash != h || s->family != f)
        return false;
    for (unsigned i = 0; i < families[f].nlabels; i++)
        if (strcmp(s->values[i], v[i]) != 0)
            return false;
    return true;
}

/* Returns the series, or NULL with *free_slot set to where it would go.
 * The table never holds more than MAX_SERIES + F_COUNT series, so an
 * empty slot always ends the probe. */
static struct series *probe(enum family_id f, const char *const *v,
                            uint64_t h, size_t *free_slot)
{
    size_t i = h & (TABLE_SLOTS - 1);

    for (;;) {
        struct series *s = atomic_load_explicit(&slots[i], memory_order_acquire);
        if (!s) {
            *free_slot = i;
            return NULL;
        }
        if (key_equal(s, f, v, h))
            return s;
        i = (i + 1) & (TABLE_SLOTS - 1);
    }
}

/* Label values per the text format: backslash, quote and newline escaped.
 * They are valid UTF-8 already: they come from the YAML config, and libyaml
 * rejects anything else (including escaped surrogates). */
static void put_label_value(struct piapi_buf *b, const char *s)
{
    for (const char *run = s;; s++) {
        const char *esc = *s == '\\' ? "\\\\" : *s == '"' ? "\\\""
                        : *s == '\n' ? "\\n" : NULL;
        if (!esc && *s)
            continue;
        piapi_buf_append(b, run, (size_t)(s - run));
        if (!*s)
            return;
        piapi_buf_append(b, esc, 2);
        run = s + 1;
    }
}

static struct series *series_new(enum family_id f, const char *const *v,
                                 uint64_t h)
{
    const struct family *fam = &families[f];
    size_t ncells = fam->kind == HISTOGRAM ? HIST_CELLS : 1;
    struct series *s = piapi_xcalloc(1, sizeof *s + ncells * sizeof s->cells[0]);
    struct piapi_buf text = {0};

    s->hash = h;
    s->family = f;
    atomic_init(&s->next, NULL);
    for (size_t i = 0; i < ncells; i++)
        atomic_init(&s->cells[i], 0);
    for (unsigned i = 0; i < fam->nlabels; i++) {
        s->values[i] = piapi_xstrdup(v[i]);
        if (i)
            piapi_buf_putc(&text, ',');
        piapi_buf_puts(&text, fam->labels[i]);
        piapi_buf_append(&text, "=\"", 2);
        put_label_value(&text, v[i]);
        piapi_buf_putc(&text, '"');
    }
    s->text = text.data ? text.data : piapi_xstrdup("");
    s->text_len = text.len;
    return s;
}

static void series_free(struct series *s)
{
    for (unsigned i = 0; i < MAX_LABELS; i++)
        free(s->values[i]);
    free(s->text);
    free(s);
}

/* Publishes a fully built series: readers that see the pointer see its
 * contents (release here, acquire in probe and render). */
static void publish(struct series *s, size_t slot)
{
    if (lists[s->family].tail)
        atomic_store_explicit(&lists[s->family].tail->next, s, memory_order_release);
    else
        atomic_store_explicit(&lists[s->family].head, s, memory_order_release);
    lists[s->family].tail = s;
    atomic_store_explicit(&slots[slot], s, memory_order_release);
    series_count++;
}

/* Slow path: the label set was not there a moment ago. Past MAX_SERIES
 * only the overflow series may still be created. */
static struct series *create(enum family_id f, const char *const *v,
                             uint64_t h, bool is_overflow)
{
    size_t slot;

    pthread_mutex_lock(&create_lock);
    struct series *s = probe(f, v, h, &slot);
    if (!s) {
        if (is_overflow || series_count < MAX_SERIES) {
            s = series_new(f, v, h);
            publish(s, slot);
        } else {
            atomic_store_explicit(&table_full, true, memory_order_release);
        }
    }
    pthread_mutex_unlock(&create_lock);
    return s;
}

static struct series *overflow_series(enum family_id f)
{
    static const char *const other[MAX_LABELS] = { OVERFLOW, OVERFLOW, OVERFLOW };
    uint64_t h = key_hash(f, other);
    size_t slot;
    struct series *s = probe(f, other, h, &slot);

    return s ? s : create(f, other, h, true);
}

static struct series *series_get(enum family_id f, const char *const *v)
{
    uint64_t h = key_hash(f, v);
    size_t slot;
    struct series *s = probe(f, v, h, &slot);

    if (s)
        return s;
    if (!atomic_load_explicit(&table_full, memory_order_acquire))
        s = create(f, v, h, false);
    return s ? s : overflow_series(f);
}

/* ---- recording ---------------------------------------------------------- */

static void counter_add(enum family_id f, const char *const *v, uint64_t n)
{
    struct series *s = series_get(f, v);
    atomic_fetch_add_explicit(&s->cells[0], n, memory_order_relaxed);
}

static void histogram_observe(enum family_id f, const char *const *v, double x)
{
    struct series *s = series_get(f, v);
    size_t i = 0;

    if (!(x >= 0))              /* negative or NaN: a clock step, count as 0 */
        x = 0;
    while (i < BUCKETS && x > bucket_bound[i])     /* le is inclusive */
        i++;
    /* Past ~31 years the µs sum would overflow the conversion; clamp. */
    uint64_t us = x < 1e9 ? (uint64_t)(x * 1e6 + 0.5) : UINT64_C(1000000000000000);
    atomic_fetch_add_explicit(&s->cells[i], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&s->cells[HIST_SUM], us, memory_order_relaxed);
}

static const char *status_class(int status)
{
    static const char *const classes[] = { "2xx", "3xx", "4xx", "5xx" };
    return status >= 200 && status <= 599 ? classes[status / 100 - 2] : "other";
}

static const char *or_unknown(const char *s)
{
    return s ? s : PIAPI_METRICS_UNKNOWN;
}

void piapi_metrics_request(const struct piapi_metrics_request *m)
{
#ifdef PIAPI_BENCH_NO_REQUEST_METRICS
    /* Only for `make bench`'s A/B of what recording costs per request. */
    (void)m;
    return;
#endif
    const char *svc = or_unknown(m->service_type);
    const char *cls = status_class(m->status);

    counter_add(F_REQUESTS, (const char *[]){ svc, cls }, 1);
    histogram_observe(F_LATENCY, (const char *[]){ svc }, m->latency_s);
    if (m->ttfb_s >= 0)
        histogram_observe(F_TTFB, (const char *[]){ svc, or_unknown(m->provider) },
                          m->ttfb_s);
    if (m->user)
        counter_add(F_USER_REQUESTS, (const char *[]){ m->user, svc, cls }, 1);
    counter_add(F_REQUEST_BYTES, (const char *[]){ svc }, m->bytes_in);
    counter_add(F_RESPONSE_BYTES, (const char *[]){ svc }, m->bytes_out);
}

/* A label value for a model an upstream named: bounded in number and
 * in what it may contain (a model name, not arbitrary bytes). */
static bool model_name_ok(const char *m)
{
    size_t n = strlen(m);
    if (!n || n > MODEL_LEN_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)m[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              strchr("-._:/@+", c)))
            return false;
    }
    return true;
}

static const char *model_label(const char *m)
{
    if (!m || !model_name_ok(m))
        return OVERFLOW;
    unsigned n = atomic_load_explicit(&nmodels, memory_order_acquire);
    for (unsigned i = 0; i < n; i++)
        if (strcmp(models[i], m) == 0)
            return models[i];
    if (n >= MODELS_MAX)
        return OVERFLOW;
    const char *found = NULL;
    pthread_mutex_lock(&create_lock);
    n = atomic_load_explicit(&nmodels, memory_order_relaxed);
    for (unsigned i = 0; i < n && !found; i++)
        if (strcmp(models[i], m) == 0)
            found = models[i];
    if (!found && n < MODELS_MAX) {
        models[n] = piapi_xstrdup(m);
        found = models[n];
        atomic_store_explicit(&nmodels, n + 1, memory_order_release);
    }
    pthread_mutex_unlock(&create_lock);
    return found ? found : OVERFLOW;
}

void piapi_metrics_usage(const struct piapi_metrics_usage *u)
{
    const char *svc = or_unknown(u->service_type);
    const char *user = or_unknown(u->user);
    const char *model = model_label(u->model);
    static const char *const kinds[] = { "input", "output", "cache_read", "cache_write" };
    const int64_t counts[] = { u->input, u->output, u->cache_read, u->cache_write };

    for (size_t i = 0; i < 4; i++)
        if (counts[i] > 0)
            counter_add(F_TOKENS, (const char *[]){ user, svc, model, kinds[i] },
                        (uint64_t)counts[i]);
    if (u->priced) {
        /* nano-dollars: integer adds stay exact under concurrency */
        double nano = u->cost_usd * 1e9 + 0.5;
        counter_add(F_COST, (const char *[]){ user, svc, model },
                    nano > 0 && nano < 1e18 ? (uint64_t)nano : 0);
    }
    if (!u->complete)
        counter_add(F_USAGE_INCOMPLETE, (const char *[]){ svc }, 1);
}

void piapi_metrics_upstream_error(const char *provider, const char *reason)
{
    static const char *const reasons[] = {
        "connect", "timeout", "reset", "tls", "client_abort", "idle_timeout",
        "protocol",
    };
    const char *r = "other";

    for (size_t i = 0; reason && i < sizeof reasons / sizeof reasons[0]; i++)
        if (strcmp(reason, reasons[i]) == 0)
            r = reasons[i];
    counter_add(F_UPSTREAM_ERRORS, (const char *[]){ or_unknown(provider), r }, 1);
}

void piapi_metrics_attempt(const char *provider, const char *key, const char *outcome)
{
    static const char *const outcomes[] = {
        "ok", "status_429", "status_5xx", "status_529", "overloaded", "connect",
        "timeout", "tls", "reset",
    };
    const char *o = "other";

    for (size_t i = 0; outcome && i < sizeof outcomes / sizeof outcomes[0]; i++)
        if (strcmp(outcome, outcomes[i]) == 0)
            o = outcomes[i];
    counter_add(F_ATTEMPTS, (const char *[]){ or_unknown(provider), or_unknown(key), o }, 1);
}

void piapi_metrics_failover(const char *service_type)
{
    counter_add(F_FAILOVERS, (const char *[]){ or_unknown(service_type) }, 1);
}

void piapi_metrics_set_cooling_probe(piapi_metrics_cooling_probe probe_fn)
{
    atomic_store_explicit(&cooling_probe, probe_fn, memory_order_release);
}

void piapi_metrics_config_reload(int ok, const char *hash)
{
    atomic_fetch_add_explicit(ok ? &reloads_ok : &reloads_failed, 1,
                              memory_order_relaxed);
    if (!ok)
        return;
    atomic_store_explicit(&reload_time_ms, (uint64_t)(piapi_now_real() * 1000),
                          memory_order_relaxed);
    if (!hash)
        return;
    pthread_mutex_lock(&info_lock);
    if (!config_hash || strcmp(config_hash, hash) != 0) {
        free(config_hash);
        config_hash = piapi_xstrdup(hash);
    }
    pthread_mutex_unlock(&info_lock);
}

void piapi_metrics_in_flight(int delta)
{
    atomic_fetch_add_explicit(&in_flight, delta, memory_order_relaxed);
}

void piapi_metrics_pool_saturated(void)
{
    atomic_fetch_add_explicit(&pool_saturated, 1, memory_order_relaxed);
}

void piapi_metrics_set_pool_probe(piapi_metrics_pool_probe probe_fn)
{
    atomic_store_explicit(&pool_probe, probe_fn, memory_order_release);
}

void piapi_metrics_set_usage_db_probe(piapi_metrics_count_probe probe_fn)
{
    atomic_store_explicit(&usage_db_probe, probe_fn, memory_order_release);
}

/* Re-initialising drops every series and value: only safe while no other
 * thread records, which "before threads start" guarantees. */
void piapi_metrics_init(const char *version)
{
    for (size_t i = 0; i < TABLE_SLOTS; i++) {
        struct series *s = atomic_load_explicit(&slots[i], memory_order_relaxed);
        if (s)
            series_free(s);
        atomic_store_explicit(&slots[i], NULL, memory_order_relaxed);
    }
    memset(lists, 0, sizeof lists);
    series_count = 0;
    atomic_store(&table_full, false);
    atomic_store(&in_flight, 0);
    atomic_store(&pool_saturated, 0);
    atomic_store(&reloads_ok, 0);
    atomic_store(&reloads_failed, 0);
    atomic_store(&reload_time_ms, 0);
    atomic_store(&pool_probe, NULL);
    atomic_store(&usage_db_probe, NULL);
    for (unsigned i = 0; i < MODELS_MAX; i++) {
        free(models[i]);
        models[i] = NULL;
    }
    atomic_store(&nmodels, 0);
    free(config_hash);
    config_hash = NULL;
    free(build_version);
    build_version = piapi_xstrdup(version ? version : PIAPI_METRICS_UNKNOWN);
    start_time = piapi_now_real();
}

/* ---- exposition --------------------------------------------------------- */

/* Hand-rolled number formatting: a scrape of a few hundred histograms is
 * thousands of lines, and printf would dominate it. */
static void put_u64(struct piapi_buf *b, uint64_t v)
{
    char tmp[20];
    size_t n = 0;

    do {
        tmp[sizeof tmp - ++n] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    piapi_buf_append(b, tmp + sizeof tmp - n, n);
}

static void put_i64(struct piapi_buf *b, int64_t v)
{
    if (v < 0) {
        piapi_buf_putc(b, '-');
        put_u64(b, (uint64_t)0 - (uint64_t)v);
    } else {
        put_u64(b, (uint64_t)v);
    }
}

/* A fixed-point value given in 10^-digits units, e.g. µs as seconds. */
static void put_fixed(struct piapi_buf *b, uint64_t v, unsigned digits)
{
    uint64_t scale = 1;
    char frac[20];

    for (unsigned i = 0; i < digits; i++)
        scale *= 10;
    put_u64(b, v / scale);
    piapi_buf_putc(b, '.');
    v %= scale;
    for (unsigned i = digits; i-- > 0; v /= 10)
        frac[i] = (char)('0' + v % 10);
    piapi_buf_append(b, frac, digits);
}

/* name[suffix]{labels[,extra]} ; the caller appends the value and "\n". */
static void put_sample_name(struct piapi_buf *b, const char *name,
                            const char *suffix, const char *labels,
                            size_t labels_len, const char *extra)
{
    piapi_buf_puts(b, name);
    if (suffix)
        piapi_buf_puts(b, suffix);
    if (!labels_len && !extra) {
        piapi_buf_putc(b, ' ');
        return;
    }
    piapi_buf_putc(b, '{');
    piapi_buf_append(b, labels, labels_len);
    if (extra) {
        if (labels_len)
            piapi_buf_putc(b, ',');
        piapi_buf_puts(b, extra);
    }
    piapi_buf_append(b, "} ", 2);
}

static void put_u64_sample(struct piapi_buf *b, const char *name,
                           const char *labels, uint64_t v)
{
    put_sample_name(b, name, NULL, labels, labels ? strlen(labels) : 0, NULL);
    put_u64(b, v);
    piapi_buf_putc(b, '\n');
}

static void render_histogram(struct piapi_buf *b, const char *name,
                             const struct series *s)
{
    uint64_t cum = 0;

    for (size_t i = 0; i <= BUCKETS; i++) {
        cum += atomic_load_explicit(&s->cells[i], memory_order_relaxed);
        put_sample_name(b, name, "_bucket", s->text, s->text_len, bucket_le[i]);
        put_u64(b, cum);
        piapi_buf_putc(b, '\n');
    }
    put_sample_name(b, name, "_sum", s->text, s->text_len, NULL);
    put_fixed(b, atomic_load_explicit(&s->cells[HIST_SUM], memory_order_relaxed), 6);
    piapi_buf_putc(b, '\n');
    /* _count is the +Inf bucket by definition; deriving it from the same
     * snapshot keeps the two equal even while requests are recorded. */
    put_sample_name(b, name, "_count", s->text, s->text_len, NULL);
    put_u64(b, cum);
    piapi_buf_putc(b, '\n');
}

static void render_series(struct piapi_buf *b, enum family_id f)
{
    const struct family *fam = &families[f];

    for (struct series *s = atomic_load_explicit(&lists[f].head, memory_order_acquire);
         s; s = atomic_load_explicit(&s->next, memory_order_acquire)) {
        if (fam->kind == HISTOGRAM) {
            render_histogram(b, fam->name, s);
        } else {
            put_sample_name(b, fam->name, NULL, s->text, s->text_len, NULL);
            put_u64(b, atomic_load_explicit(&s->cells[0], memory_order_relaxed));
            piapi_buf_putc(b, '\n');
        }
    }
}

static void render_build_info(struct piapi_buf *b, const struct family *f)
{
    struct piapi_buf labels = {0};

    piapi_buf_puts(&labels, "version=\"");
    put_label_value(&labels, build_version ? build_version : PIAPI_METRICS_UNKNOWN);
    piapi_buf_putc(&labels, '"');
    put_u64_sample(b, f->name, labels.data, 1);
    piapi_buf_dispose(&labels);
}

static void render_start_time(struct piapi_buf *b, const struct family *f)
{
    put_sample_name(b, f->name, NULL, NULL, 0, NULL);
    put_fixed(b, (uint64_t)(start_time * 1000), 3);
    piapi_buf_putc(b, '\n');
}

static void render_in_flight(struct piapi_buf *b, const struct family *f)
{
    put_sample_name(b, f->name, NULL, NULL, 0, NULL);
    put_i64(b, atomic_load_explicit(&in_flight, memory_order_relaxed));
    piapi_buf_putc(b, '\n');
}

static void render_pool_threads(struct piapi_buf *b, const struct family *f)
{
    piapi_metrics_pool_probe fn = atomic_load_explicit(&pool_probe,
                                                       memory_order_acquire);
    unsigned busy = 0, idle = 0;

    if (fn)
        fn(&busy, &idle);
    put_u64_sample(b, f->name, "state=\"busy\"", busy);
    put_u64_sample(b, f->name, "state=\"idle\"", idle);
}

static void render_pool_saturated(struct piapi_buf *b, const struct family *f)
{
    put_u64_sample(b, f->name, NULL,
                   atomic_load_explicit(&pool_saturated, memory_order_relaxed));
}

static void render_reloads(struct piapi_buf *b, const struct family *f)
{
    put_u64_sample(b, f->name, "result=\"success\"",
                   atomic_load_explicit(&reloads_ok, memory_order_relaxed));
    put_u64_sample(b, f->name, "result=\"failure\"",
                   atomic_load_explicit(&reloads_failed, memory_order_relaxed));
}

static void render_reload_time(struct piapi_buf *b, const struct family *f)
{
    put_sample_name(b, f->name, NULL, NULL, 0, NULL);
    put_fixed(b, atomic_load_explicit(&reload_time_ms, memory_order_relaxed), 3);
    piapi_buf_putc(b, '\n');
}

static void render_config_info(struct piapi_buf *b, const struct family *f)
{
    pthread_mutex_lock(&info_lock);
    if (config_hash) {
        struct piapi_buf labels = {0};
        piapi_buf_puts(&labels, "hash=\"");
        put_label_value(&labels, config_hash);
        piapi_buf_putc(&labels, '"');
        put_u64_sample(b, f->name, labels.data, 1);
        piapi_buf_dispose(&labels);
    }
    pthread_mutex_unlock(&info_lock);
}

static void render_cost(struct piapi_buf *b, const struct family *f)
{
    for (struct series *s = atomic_load_explicit(&lists[F_COST].head, memory_order_acquire);
         s; s = atomic_load_explicit(&s->next, memory_order_acquire)) {
        put_sample_name(b, f->name, NULL, s->text, s->text_len, NULL);
        put_fixed(b, atomic_load_explicit(&s->cells[0], memory_order_relaxed), 9);
        piapi_buf_putc(b, '\n');
    }
}

static void render_usage_db_errors(struct piapi_buf *b, const struct family *f)
{
    piapi_metrics_count_probe fn = atomic_load_explicit(&usage_db_probe,
                                                        memory_order_acquire);
    put_u64_sample(b, f->name, NULL, fn ? fn() : 0);
}

static _Atomic(piapi_metrics_render_probe) extra_probe;

void piapi_metrics_set_extra_probe(piapi_metrics_render_probe probe_fn)
{
    atomic_store_explicit(&extra_probe, probe_fn, memory_order_release);
}

struct cooling_out {
    struct piapi_buf *b;
    const char *name;
};

static void emit_cooling(void *ud, const char *provider, const char *key, int cooling)
{
    struct cooling_out *o = ud;
    struct piapi_buf labels = {0};
    piapi_buf_puts(&labels, "provider=\"");
    put_label_value(&labels, provider);
    piapi_buf_puts(&labels, "\",key=\"");
    put_label_value(&labels, key);
    piapi_buf_putc(&labels, '"');
    put_u64_sample(o->b, o->name, labels.data, cooling ? 1 : 0);
    piapi_buf_dispose(&labels);
}

static void render_cooling(struct piapi_buf *b, const struct family *f)
{
    piapi_metrics_cooling_probe fn = atomic_load_explicit(&cooling_probe,
                                                          memory_order_acquire);
    struct cooling_out o = { b, f->name };
    if (fn)
        fn(emit_cooling, &o);
}

void piapi_metrics_render(struct piapi_buf *out)
{
    piapi_buf_reserve(out, 16384);
    for (size_t i = 0; i < F_COUNT; i++) {
        const struct family *f = &families[i];
        piapi_buf_append(out, "# HELP ", 7);
        piapi_buf_puts(out, f->name);
        piapi_buf_putc(out, ' ');
        piapi_buf_puts(out, f->help);
        piapi_buf_append(out, "\n# TYPE ", 8);
        piapi_buf_puts(out, f->name);
        piapi_buf_putc(out, ' ');
        piapi_buf_puts(out, kind_name[f->kind]);
        piapi_buf_putc(out, '\n');
        if (f->samples)
            f->samples(out, f);
        else
            render_series(out, (enum family_id)i);
    }
    piapi_metrics_render_probe extra = atomic_load_explicit(&extra_probe,
                                                            memory_order_acquire);
    if (extra)
        extra(out);
}
