/* Metrics registry and exposition: exact sample lines after known records,
 * bucket edges, escaping, family metadata, folding of unknown reasons and
 * of a full table, exact sums under 8 recording threads, and promtool. */
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "piapi/metrics.h"
#include "unit.h"

static char *render(void)
{
    struct piapi_buf b = {0};
    piapi_metrics_render(&b);
    return b.data;
}

static void request(const char *svc, const char *provider, const char *user,
                    int status, double latency, double ttfb,
                    uint64_t in, uint64_t out)
{
    struct piapi_metrics_request m = {
        .service_type = svc, .provider = provider, .user = user,
        .status = status, .latency_s = latency, .ttfb_s = ttfb,
        .bytes_in = in, .bytes_out = out,
    };
    piapi_metrics_request(&m);
}

/* The lines of `text` that contain `needle`, in order, compared to want. */
static void assert_lines(const char *text, const char *needle,
                         const char *const *want)
{
    size_t i = 0;
    for (const char *p = text; *p;) {
        const char *nl = strchr(p, '\n');
        size_t len = nl ? (size_t)(nl - p) : strlen(p);
        char *line = strndup(p, len);
        if (strstr(line, needle)) {
            if (!want[i] || strcmp(line, want[i]) != 0)
                fprintf(stderr, "\n  line %zu: got '%s'\n       want '%s'\n",
                        i, line, want[i] ? want[i] : "(end)");
            CU_ASSERT_PTR_NOT_NULL(want[i]);
            if (want[i]) {
                CU_ASSERT_STRING_EQUAL(line, want[i]);
                i++;
            }
        }
        free(line);
        p += len + (nl != NULL);
    }
    if (want[i])
        fprintf(stderr, "\n  missing line: '%s'\n", want[i]);
    CU_ASSERT_PTR_NULL(want[i]);
}

/* The value of the sample whose name+labels is exactly `series`; -1 if absent. */
static double sample(const char *text, const char *series)
{
    size_t n = strlen(series);
    for (const char *p = text; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : p)
        if (strncmp(p, series, n) == 0 && p[n] == ' ')
            return strtod(p + n + 1, NULL);
    return -1;
}

/* The next double above a positive finite x (nextafter without libm,
 * which the Makefile does not link). */
static double next_up(double x)
{
    uint64_t bits;
    memcpy(&bits, &x, sizeof bits);
    bits++;
    memcpy(&x, &bits, sizeof x);
    return x;
}

static double absd(double x)
{
    return x < 0 ? -x : x;
}

static void test_exact_exposition(void)
{
    piapi_metrics_init("1.2.3");
    request("chat", "p1", "alice", 200, 0.2, 0.05, 100, 1000);
    request("chat", "p1", NULL, 503, 1.5, -1, 10, 20);
    request("chat", "p1", "alice", 201, 700, 0.005, 0, 0);
    char *t = render();

    static const char *const want[] = {
        "piapi_requests_total{service_type=\"chat\",status_class=\"2xx\"} 2",
        "piapi_requests_total{service_type=\"chat\",status_class=\"5xx\"} 1",
        "piapi_request_latency_seconds_bucket{service_type=\"chat\",le=\"0.005\"} 0",
        "piapi_request_latency_seconds_bucket{service_type=\"chat\",le=\"0.01\"} 0",
        "piapi_request_latency_seconds_bucket{service_type=\"chat\",le=\"0.025\"} 0",
        "piapi_request_latency_seconds_bucket{service_type=\"chat\",le=\"0.05\"} 0",
        "piapi_request_latency_seconds_bucket{service_type=\"chat\",le=\"0.1\"} 0",
        "piapi_request_latency_seconds_bucket{service_type=\"chat\",le=\"0.25\"} 1",
        "piapi_request_latency_seconds_bucket{service_type=\"chat\",le=\"0.5\"} 1",
        "piapi_request_latency_seconds_bucket{service_type=\"chat\",le=\"1\"} 1",
        "piapi_request_latency_seconds_bucket{service_type=\"chat\",le=\"2.5\"} 2",
        "piapi_request_latency_seconds_bucket{service_type=\"chat\",le=\"5\"} 2",
        "piapi_request_latency_seconds_bucket{service_type=\"chat\",le=\"10\"} 2",
        "piapi_request_latency_seconds_bucket{service_type=\"chat\",le=\"30\"} 2",
        "piapi_request_latency_seconds_bucket{service_type=\"chat\",le=\"60\"} 2",
        "piapi_request_latency_seconds_bucket{service_type=\"chat\",le=\"120\"} 2",
        "piapi_request_latency_seconds_bucket{service_type=\"chat\",le=\"300\"} 2",
        "piapi_request_latency_seconds_bucket{service_type=\"chat\",le=\"600\"} 2",
        "piapi_request_latency_seconds_bucket{service_type=\"chat\",le=\"+Inf\"} 3",
        "piapi_request_latency_seconds_sum{service_type=\"chat\"} 701.700000",
        "piapi_request_latency_seconds_count{service_type=\"chat\"} 3",
        "piapi_upstream_ttfb_seconds_bucket{service_type=\"chat\",provider=\"p1\",le=\"0.005\"} 1",
        "piapi_upstream_ttfb_seconds_bucket{service_type=\"chat\",provider=\"p1\",le=\"0.01\"} 1",
        "piapi_upstream_ttfb_seconds_bucket{service_type=\"chat\",provider=\"p1\",le=\"0.025\"} 1",
        "piapi_upstream_ttfb_seconds_bucket{service_type=\"chat\",provider=\"p1\",le=\"0.05\"} 2",
        "piapi_upstream_ttfb_seconds_bucket{service_type=\"chat\",provider=\"p1\",le=\"0.1\"} 2",
        "piapi_upstream_ttfb_seconds_bucket{service_type=\"chat\",provider=\"p1\",le=\"0.25\"} 2",
        "piapi_upstream_ttfb_seconds_bucket{service_type=\"chat\",provider=\"p1\",le=\"0.5\"} 2",
        "piapi_upstream_ttfb_seconds_bucket{service_type=\"chat\",provider=\"p1\",le=\"1\"} 2",
        "piapi_upstream_ttfb_seconds_bucket{service_type=\"chat\",provider=\"p1\",le=\"2.5\"} 2",
        "piapi_upstream_ttfb_seconds_bucket{service_type=\"chat\",provider=\"p1\",le=\"5\"} 2",
        "piapi_upstream_ttfb_seconds_bucket{service_type=\"chat\",provider=\"p1\",le=\"10\"} 2",
        "piapi_upstream_ttfb_seconds_bucket{service_type=\"chat\",provider=\"p1\",le=\"30\"} 2",
        "piapi_upstream_ttfb_seconds_bucket{service_type=\"chat\",provider=\"p1\",le=\"60\"} 2",
        "piapi_upstream_ttfb_seconds_bucket{service_type=\"chat\",provider=\"p1\",le=\"120\"} 2",
        "piapi_upstream_ttfb_seconds_bucket{service_type=\"chat\",provider=\"p1\",le=\"300\"} 2",
        "piapi_upstream_ttfb_seconds_bucket{service_type=\"chat\",provider=\"p1\",le=\"600\"} 2",
        "piapi_upstream_ttfb_seconds_bucket{service_type=\"chat\",provider=\"p1\",le=\"+Inf\"} 2",
        "piapi_upstream_ttfb_seconds_sum{service_type=\"chat\",provider=\"p1\"} 0.055000",
        "piapi_upstream_ttfb_seconds_count{service_type=\"chat\",provider=\"p1\"} 2",
        "piapi_user_requests_total{user=\"alice\",service_type=\"chat\",status_class=\"2xx\"} 2",
        "piapi_request_bytes_total{service_type=\"chat\"} 110",
        "piapi_response_bytes_total{service_type=\"chat\"} 1020",
        NULL
    };
    assert_lines(t, "service_type=\"chat\"", want);

    static const char *const fixed[] = {
        "piapi_build_info{version=\"1.2.3\"} 1",
        "piapi_requests_in_flight 0",
        "piapi_pool_threads{state=\"busy\"} 0",
        "piapi_pool_threads{state=\"idle\"} 0",
        "piapi_pool_saturated_total 0",
        "piapi_config_reloads_total{result=\"success\"} 0",
        "piapi_config_reloads_total{result=\"failure\"} 0",
        "piapi_config_last_reload_success_timestamp_seconds 0.000",
        NULL
    };
    for (size_t i = 0; fixed[i]; i++) {
        if (!strstr(t, fixed[i]))
            fprintf(stderr, "\n  missing '%s'\n", fixed[i]);
        CU_ASSERT_PTR_NOT_NULL(strstr(t, fixed[i]));
    }
    double start = sample(t, "piapi_process_start_time_seconds");
    CU_ASSERT_TRUE(absd(start - (double)time(NULL)) < 5);
    CU_ASSERT_PTR_NULL(strstr(t, "piapi_config_info{"));
    CU_ASSERT_PTR_NULL(strstr(t, "piapi_upstream_errors_total{"));
    free(t);
}

/* le is inclusive: a value exactly on a bound lands in that bucket, the
 * next representable double above it in the next one. */
static void test_bucket_boundaries(void)
{
    static const double bounds[] = {
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
        300, 600,
    };
    static const char *const le[] = {
        "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5",
        "5", "10", "30", "60", "120", "300", "600",
    };
    size_t n = sizeof bounds / sizeof bounds[0];

    piapi_metrics_init("t");
    for (size_t i = 0; i < n; i++) {
        request("on", "p", NULL, 200, bounds[i], bounds[i], 0, 0);
        request("above", "p", NULL, 200, next_up(bounds[i]), -1, 0, 0);
    }
    request("odd", "p", NULL, 200, 0, -1, 0, 0);
    request("odd", "p", NULL, 200, -3, -1, 0, 0);      /* clock step */
    request("odd", "p", NULL, 200, NAN, -1, 0, 0);
    request("odd", "p", NULL, 200, INFINITY, -1, 0, 0);
    char *t = render();
    char name[160];
    for (size_t i = 0; i < n; i++) {
        snprintf(name, sizeof name, "piapi_request_latency_seconds_bucket"
                 "{service_type=\"on\",le=\"%s\"}", le[i]);
        CU_ASSERT_EQUAL(sample(t, name), (double)(i + 1));
        snprintf(name, sizeof name, "piapi_upstream_ttfb_seconds_bucket"
                 "{service_type=\"on\",provider=\"p\",le=\"%s\"}", le[i]);
        CU_ASSERT_EQUAL(sample(t, name), (double)(i + 1));
        snprintf(name, sizeof name, "piapi_request_latency_seconds_bucket"
                 "{service_type=\"above\",le=\"%s\"}", le[i]);
        CU_ASSERT_EQUAL(sample(t, name), (double)i);
    }
    CU_ASSERT_EQUAL(sample(t, "piapi_request_latency_seconds_bucket"
                           "{service_type=\"above\",le=\"+Inf\"}"), (double)n);
    CU_ASSERT_EQUAL(sample(t, "piapi_request_latency_seconds_bucket"
                           "{service_type=\"odd\",le=\"0.005\"}"), 3);
    CU_ASSERT_EQUAL(sample(t, "piapi_request_latency_seconds_count"
                           "{service_type=\"odd\"}"), 4);
    /* "above" never reports a TTFB, so it has no ttfb series at all. */
    CU_ASSERT_PTR_NULL(strstr(t, "piapi_upstream_ttfb_seconds_bucket{service_type=\"above\""));
    free(t);
}

static void test_label_escaping(void)
{
    piapi_metrics_init("v\"1\\");
    request("we\"ird\\svc\nx", "pro\"v", "bob \"the\" \\ user", 200, 0.1, 0.1, 1, 1);
    piapi_metrics_upstream_error("a\\b", "tls");
    piapi_metrics_config_reload(1, "h\"1\n");
    char *t = render();
    static const char *const present[] = {
        "piapi_build_info{version=\"v\\\"1\\\\\"} 1\n",
        "piapi_requests_total{service_type=\"we\\\"ird\\\\svc\\nx\",status_class=\"2xx\"} 1\n",
        "piapi_upstream_ttfb_seconds_count{service_type=\"we\\\"ird\\\\svc\\nx\",provider=\"pro\\\"v\"} 1\n",
        "piapi_user_requests_total{user=\"bob \\\"the\\\" \\\\ user\",service_type=\"we\\\"ird\\\\svc\\nx\",status_class=\"2xx\"} 1\n",
        "piapi_upstream_errors_total{provider=\"a\\\\b\",reason=\"tls\"} 1\n",
        "piapi_config_info{hash=\"h\\\"1\\n\"} 1\n",
        NULL
    };
    for (size_t i = 0; present[i]; i++) {
        if (!strstr(t, present[i]))
            fprintf(stderr, "\n  missing '%s'\n", present[i]);
        CU_ASSERT_PTR_NOT_NULL(strstr(t, present[i]));
    }
    free(t);
}

struct family_meta {
    const char *name;
    const char *type;
};

static const struct family_meta all_families[] = {
    { "piapi_build_info", "gauge" },
    { "piapi_process_start_time_seconds", "gauge" },
    { "piapi_requests_total", "counter" },
    { "piapi_request_latency_seconds", "histogram" },
    { "piapi_upstream_ttfb_seconds", "histogram" },
    { "piapi_user_requests_total", "counter" },
    { "piapi_request_bytes_total", "counter" },
    { "piapi_response_bytes_total", "counter" },
    { "piapi_upstream_errors_total", "counter" },
    { "piapi_requests_in_flight", "gauge" },
    { "piapi_pool_threads", "gauge" },
    { "piapi_pool_saturated_total", "counter" },
    { "piapi_config_reloads_total", "counter" },
    { "piapi_config_last_reload_success_timestamp_seconds", "gauge" },
    { "piapi_config_info", "gauge" },
    { "piapi_tokens_total", "counter" },
    { "piapi_cost_usd_total", "counter" },
    { "piapi_usage_incomplete_total", "counter" },
    { "piapi_usage_db_errors_total", "counter" },
    { "piapi_upstream_attempts_total", "counter" },
    { "piapi_failovers_total", "counter" },
    { "piapi_candidate_cooling", "gauge" },
    { NULL, NULL }
};

/* A sample belongs to the family whose TYPE line came last. */
static int sample_in_family(const char *line, const struct family_meta *f)
{
    size_t n = strcspn(line, "{ ");
    size_t fl = strlen(f->name);
    if (n == fl)
        return strncmp(line, f->name, fl) == 0;
    if (strcmp(f->type, "histogram") != 0 || n < fl
        || strncmp(line, f->name, fl) != 0)
        return 0;
    const char *suffix = line + fl;
    size_t sl = n - fl;
    return (sl == 7 && !strncmp(suffix, "_bucket", 7))
        || (sl == 4 && !strncmp(suffix, "_sum", 4))
        || (sl == 6 && !strncmp(suffix, "_count", 6));
}

static void check_families(const char *t)
{
    const struct family_meta *cur = NULL;
    size_t seen = 0;
    char help[128], type[160];

    for (const struct family_meta *f = all_families; f->name; f++) {
        snprintf(help, sizeof help, "# HELP %s ", f->name);
        snprintf(type, sizeof type, "\n# TYPE %s %s\n", f->name, f->type);
        const char *h = strstr(t, help), *ty = strstr(t, type);
        CU_ASSERT_PTR_NOT_NULL(h);
        CU_ASSERT_PTR_NOT_NULL(ty);
        CU_ASSERT_TRUE(h && ty && h < ty && !strstr(h + 1, help));
    }
    /* Every sample sits in its family's block (the format forbids
     * interleaving). */
    for (const char *p = t; *p;) {
        const char *nl = strchr(p, '\n');
        char *line = strndup(p, (size_t)(nl - p));
        if (!strncmp(line, "# TYPE ", 7)) {
            cur = NULL;
            for (const struct family_meta *f = all_families; f->name; f++)
                if (!strncmp(line + 7, f->name, strlen(f->name))
                    && line[7 + strlen(f->name)] == ' ')
                    cur = f;
            CU_ASSERT_PTR_NOT_NULL(cur);
            seen++;
        } else if (line[0] != '#') {
            CU_ASSERT_TRUE(cur && sample_in_family(line, cur));
        }
        free(line);
        p = nl + 1;
    }
    CU_ASSERT_EQUAL(seen, sizeof all_families / sizeof all_families[0] - 1);
}

static void test_help_type(void)
{
    piapi_metrics_init("t");
    char *t = render();
    check_families(t);      /* empty registry: metadata still there */
    free(t);
    request("s", "p", "u", 200, 1, 1, 1, 1);
    piapi_metrics_upstream_error("p", "reset");
    piapi_metrics_config_reload(1, "abc");
    t = render();
    check_families(t);
    CU_ASSERT_EQUAL(t[strlen(t) - 1], '\n');
    free(t);
}

static void test_reason_and_status_folding(void)
{
    piapi_metrics_init("t");
    piapi_metrics_upstream_error("p1", "connect");
    piapi_metrics_upstream_error("p1", "bogus");
    piapi_metrics_upstream_error("p1", NULL);
    piapi_metrics_upstream_error("p1", "Connect");
    piapi_metrics_upstream_error(NULL, "timeout");
    static const char *const reasons[] = {
        "connect", "timeout", "reset", "tls", "client_abort", "idle_timeout",
        "protocol", NULL
    };
    for (size_t i = 0; reasons[i]; i++)
        piapi_metrics_upstream_error("p2", reasons[i]);

    static const int statuses[] = { 100, 199, 200, 299, 302, 404, 499, 500, 599, 600, 0, -1 };
    for (size_t i = 0; i < sizeof statuses / sizeof statuses[0]; i++)
        request("st", "p", NULL, statuses[i], 0.1, -1, 0, 0);
    request(NULL, NULL, NULL, 401, 0.1, 0.2, 0, 0);

    char *t = render();
    static const char *const errors[] = {
        "piapi_upstream_errors_total{provider=\"p1\",reason=\"connect\"} 1",
        "piapi_upstream_errors_total{provider=\"p1\",reason=\"other\"} 3",
        "piapi_upstream_errors_total{provider=\"unknown\",reason=\"timeout\"} 1",
        "piapi_upstream_errors_total{provider=\"p2\",reason=\"connect\"} 1",
        "piapi_upstream_errors_total{provider=\"p2\",reason=\"timeout\"} 1",
        "piapi_upstream_errors_total{provider=\"p2\",reason=\"reset\"} 1",
        "piapi_upstream_errors_total{provider=\"p2\",reason=\"tls\"} 1",
        "piapi_upstream_errors_total{provider=\"p2\",reason=\"client_abort\"} 1",
        "piapi_upstream_errors_total{provider=\"p2\",reason=\"idle_timeout\"} 1",
        "piapi_upstream_errors_total{provider=\"p2\",reason=\"protocol\"} 1",
        NULL
    };
    assert_lines(t, "piapi_upstream_errors_total{", errors);
    static const char *const classes[] = {
        "piapi_requests_total{service_type=\"st\",status_class=\"other\"} 5",
        "piapi_requests_total{service_type=\"st\",status_class=\"2xx\"} 2",
        "piapi_requests_total{service_type=\"st\",status_class=\"3xx\"} 1",
        "piapi_requests_total{service_type=\"st\",status_class=\"4xx\"} 2",
        "piapi_requests_total{service_type=\"st\",status_class=\"5xx\"} 2",
        NULL
    };
    assert_lines(t, "piapi_requests_total{service_type=\"st\"", classes);
    CU_ASSERT_EQUAL(sample(t, "piapi_requests_total{service_type=\"unknown\","
                           "status_class=\"4xx\"}"), 1);
    CU_ASSERT_EQUAL(sample(t, "piapi_upstream_ttfb_seconds_count{service_type="
                           "\"unknown\",provider=\"unknown\"}"), 1);
    free(t);
}

static void pool_probe(unsigned *busy, unsigned *idle)
{
    *busy = 5;
    *idle = 3;
}

static void test_config_and_gauges(void)
{
    piapi_metrics_init("t");
    piapi_metrics_in_flight(1);
    piapi_metrics_in_flight(1);
    piapi_metrics_in_flight(1);
    piapi_metrics_in_flight(-1);
    piapi_metrics_pool_saturated();
    piapi_metrics_pool_saturated();
    piapi_metrics_set_pool_probe(pool_probe);
    piapi_metrics_config_reload(1, "abc");
    piapi_metrics_config_reload(0, "ignored");
    piapi_metrics_config_reload(1, NULL);       /* unchanged: keeps the info */
    char *t = render();
    CU_ASSERT_EQUAL(sample(t, "piapi_requests_in_flight"), 2);
    CU_ASSERT_EQUAL(sample(t, "piapi_pool_saturated_total"), 2);
    CU_ASSERT_EQUAL(sample(t, "piapi_pool_threads{state=\"busy\"}"), 5);
    CU_ASSERT_EQUAL(sample(t, "piapi_pool_threads{state=\"idle\"}"), 3);
    CU_ASSERT_EQUAL(sample(t, "piapi_config_reloads_total{result=\"success\"}"), 2);
    CU_ASSERT_EQUAL(sample(t, "piapi_config_reloads_total{result=\"failure\"}"), 1);
    CU_ASSERT_EQUAL(sample(t, "piapi_config_info{hash=\"abc\"}"), 1);
    double ts = sample(t, "piapi_config_last_reload_success_timestamp_seconds");
    CU_ASSERT_TRUE(absd(ts - (double)time(NULL)) < 5);
    free(t);

    piapi_metrics_config_reload(1, "def");
    piapi_metrics_in_flight(-3);
    t = render();
    static const char *const info[] = { "piapi_config_info{hash=\"def\"} 1", NULL };
    assert_lines(t, "piapi_config_info{", info);
    CU_ASSERT_EQUAL(sample(t, "piapi_requests_in_flight"), -1);
    free(t);
}

#define THREADS 8
#define PER_THREAD 20000

static void *recorder(void *arg)
{
    static const char *const svcs[] = { "a", "b", "c", "d" };
    int id = (int)(intptr_t)arg;
    char user[16];
    snprintf(user, sizeof user, "u%d", id % 2);
    for (int i = 0; i < PER_THREAD; i++) {
        /* All threads race to create the same series in the same order. */
        request(svcs[i % 4], "p", user, 200 + (i % 2) * 300, 0.001, 0.25, 3, 7);
        if (i % 4 == 0)
            piapi_metrics_upstream_error("p", "reset");
        piapi_metrics_in_flight(i % 2 ? -1 : 1);
    }
    return NULL;
}

static void test_concurrent_recording(void)
{
    pthread_t t[THREADS];
    piapi_metrics_init("t");
    for (int i = 0; i < THREADS; i++)
        pthread_create(&t[i], NULL, recorder, (void *)(intptr_t)i);
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);

    char *text = render();
    const double per_svc = THREADS * PER_THREAD / 4;
    char name[160];
    for (const char *s = "abcd"; *s; s++) {
        snprintf(name, sizeof name, "piapi_request_latency_seconds_count{service_type=\"%c\"}", *s);
        CU_ASSERT_EQUAL(sample(text, name), per_svc);
        snprintf(name, sizeof name, "piapi_request_latency_seconds_sum{service_type=\"%c\"}", *s);
        CU_ASSERT_EQUAL(sample(text, name), per_svc * 0.001);
        snprintf(name, sizeof name, "piapi_request_latency_seconds_bucket{service_type=\"%c\",le=\"0.005\"}", *s);
        CU_ASSERT_EQUAL(sample(text, name), per_svc);
        snprintf(name, sizeof name, "piapi_upstream_ttfb_seconds_bucket{service_type=\"%c\",provider=\"p\",le=\"0.25\"}", *s);
        CU_ASSERT_EQUAL(sample(text, name), per_svc);
        snprintf(name, sizeof name, "piapi_request_bytes_total{service_type=\"%c\"}", *s);
        CU_ASSERT_EQUAL(sample(text, name), per_svc * 3);
        snprintf(name, sizeof name, "piapi_response_bytes_total{service_type=\"%c\"}", *s);
        CU_ASSERT_EQUAL(sample(text, name), per_svc * 7);
    }
    /* Even i → 2xx on a and c, odd → 5xx on b and d. */
    CU_ASSERT_EQUAL(sample(text, "piapi_requests_total{service_type=\"a\",status_class=\"2xx\"}"), per_svc);
    CU_ASSERT_EQUAL(sample(text, "piapi_requests_total{service_type=\"b\",status_class=\"5xx\"}"), per_svc);
    CU_ASSERT_EQUAL(sample(text, "piapi_user_requests_total{user=\"u0\",service_type=\"c\",status_class=\"2xx\"}"),
                    per_svc / 2);
    CU_ASSERT_EQUAL(sample(text, "piapi_upstream_errors_total{provider=\"p\",reason=\"reset\"}"),
                    THREADS * PER_THREAD / 4);
    CU_ASSERT_EQUAL(sample(text, "piapi_requests_in_flight"), 0);
    /* One series per label set, however many threads raced to create it. */
    size_t count = 0;
    for (const char *p = text; (p = strstr(p, "piapi_requests_total{service_type=\"a\",")); p++)
        count++;
    CU_ASSERT_EQUAL(count, 1);
    free(text);
}

/* Only a rough sanity check; real timing belongs in tests/bench. */
static void test_render_500_series(void)
{
    char svc[32];
    struct timespec a, b;

    piapi_metrics_init("t");
    for (int i = 0; i < 125; i++) {     /* 4 series per service: 500 */
        snprintf(svc, sizeof svc, "service-%03d", i);
        request(svc, NULL, NULL, 200, 0.3, -1, 1, 1);
    }
    clock_gettime(CLOCK_MONOTONIC, &a);
    size_t len = 0;
    for (int i = 0; i < 20; i++) {
        char *t = render();
        len = strlen(t);
        free(t);
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    double us = ((double)(b.tv_sec - a.tv_sec) * 1e6
                 + (double)(b.tv_nsec - a.tv_nsec) / 1e3) / 20;
    printf("\n  render of 500 series: %zu bytes, %.0f us (sanitizer builds are slower)\n",
           len, us);
    char *t = render();
    CU_ASSERT_EQUAL(sample(t, "piapi_request_latency_seconds_count{service_type=\"service-124\"}"), 1);
    free(t);
}

/* promtool's parser and linter are the reference; skipped when absent. */
static void test_promtool(void)
{
    if (system("command -v promtool >/dev/null 2>&1") != 0) {
        printf("\n  promtool not installed: check skipped\n");
        return;
    }
    piapi_metrics_init("0.1.0");
    request("chat", "anthropic", "alice", 200, 12.5, 0.4, 1000, 90000);
    request("we\"ird\\svc\nx", "p\"", "bob \\ \"x\"", 404, 0.01, -1, 0, 100);
    request(PIAPI_METRICS_UNKNOWN, NULL, NULL, 401, 0.001, -1, 0, 80);
    piapi_metrics_upstream_error("anthropic", "timeout");
    piapi_metrics_upstream_error(NULL, "nonsense");
    piapi_metrics_config_reload(1, "5f2a9c");
    piapi_metrics_config_reload(0, NULL);
    piapi_metrics_in_flight(3);
    piapi_metrics_pool_saturated();
    piapi_metrics_set_pool_probe(pool_probe);

    char path[] = "/tmp/piapi-test-metrics-XXXXXX";
    int fd = mkstemp(path);
    CU_ASSERT_TRUE_FATAL(fd >= 0);
    char *t = render();
    size_t len = strlen(t);
    CU_ASSERT_EQUAL(write(fd, t, len), (ssize_t)len);
    close(fd);
    free(t);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "promtool check metrics < %s", path);
    CU_ASSERT_EQUAL(system(cmd), 0);

    /* And with nothing recorded: metadata-only families must pass too. */
    piapi_metrics_init("0.1.0");
    fd = open(path, O_WRONLY | O_TRUNC);
    t = render();
    len = strlen(t);
    CU_ASSERT_EQUAL(write(fd, t, len), (ssize_t)len);
    close(fd);
    free(t);
    CU_ASSERT_EQUAL(system(cmd), 0);
    unlink(path);
}

/* Runs last: it fills the table. New label sets fold into one "other"
 * series per family; nothing recorded is lost and the table stays bounded. */
static void test_table_overflow(void)
{
    enum { N = 5000 };
    char name[32];

    piapi_metrics_init("t");
    request("chat", "p", NULL, 200, 0.1, -1, 0, 0);
    for (int i = 0; i < N; i++) {
        snprintf(name, sizeof name, "prov-%d", i);
        piapi_metrics_upstream_error(name, "reset");
    }
    piapi_metrics_upstream_error("prov-0", "reset");    /* existing: still its own */
    request("chat", "p", NULL, 200, 0.1, -1, 0, 0);
    request("brand-new", "p", "new-user", 200, 0.1, -1, 0, 0);

    char *t = render();
    size_t series = 0;
    double total = 0;
    for (const char *p = t; (p = strstr(p, "\npiapi_upstream_errors_total{")); p++) {
        series++;
        total += strtod(strchr(p, '}') + 2, NULL);
    }
    CU_ASSERT_EQUAL(total, N + 1);
    CU_ASSERT_TRUE(series > 1000 && series < 4096);
    CU_ASSERT_EQUAL(sample(t, "piapi_upstream_errors_total{provider=\"prov-0\",reason=\"reset\"}"), 2);
    double other = sample(t, "piapi_upstream_errors_total{provider=\"other\",reason=\"other\"}");
    CU_ASSERT_TRUE(other > 0);
    /* Every provider that got its own series counted 1, prov-0 counted 2. */
    CU_ASSERT_EQUAL(other, N - (double)(series - 1));
    CU_ASSERT_EQUAL(sample(t, "piapi_requests_total{service_type=\"chat\",status_class=\"2xx\"}"), 2);
    CU_ASSERT_EQUAL(sample(t, "piapi_requests_total{service_type=\"other\",status_class=\"other\"}"), 1);
    CU_ASSERT_EQUAL(sample(t, "piapi_request_latency_seconds_count{service_type=\"other\"}"), 1);
    CU_ASSERT_EQUAL(sample(t, "piapi_user_requests_total{user=\"other\",service_type=\"other\",status_class=\"other\"}"), 1);
    CU_ASSERT_PTR_NULL(strstr(t, "brand-new"));
    check_families(t);
    free(t);
}

static uint64_t seven(void)
{
    return 7;
}

static void usage(const char *user, const char *model, int64_t in, int64_t out,
                  double cost, int priced, int complete)
{
    struct piapi_metrics_usage u = {
        .user = user, .service_type = "cc", .model = model, .input = in, .output = out,
        .cache_read = 3, .cache_write = 0, .cost_usd = cost, .priced = priced,
        .complete = complete,
    };
    piapi_metrics_usage(&u);
}

/* Tokens by kind (a zero count makes no series), cost in nano-dollars
 * rendered exactly, incomplete answers, the ledger's error count. */
static void test_usage_exposition(void)
{
    piapi_metrics_init("v");
    piapi_metrics_set_usage_db_probe(seven);
    usage("al", "claude-sonnet-4-5", 1250, 420, 0.0273, 1, 1);
    usage("al", "claude-sonnet-4-5", 1250, 420, 0.0273, 1, 1);
    usage("al", "mystery", 5, 0, 0, 0, 0);
    char *t = render();
    static const char *const present[] = {
        "piapi_tokens_total{user=\"al\",service_type=\"cc\",model=\"claude-sonnet-4-5\",kind=\"input\"} 2500\n",
        "piapi_tokens_total{user=\"al\",service_type=\"cc\",model=\"claude-sonnet-4-5\",kind=\"output\"} 840\n",
        "piapi_tokens_total{user=\"al\",service_type=\"cc\",model=\"claude-sonnet-4-5\",kind=\"cache_read\"} 6\n",
        "piapi_tokens_total{user=\"al\",service_type=\"cc\",model=\"mystery\",kind=\"input\"} 5\n",
        "piapi_cost_usd_total{user=\"al\",service_type=\"cc\",model=\"claude-sonnet-4-5\"} 0.054600000\n",
        "piapi_usage_incomplete_total{service_type=\"cc\"} 1\n",
        "piapi_usage_db_errors_total 7\n",
        NULL
    };
    for (size_t i = 0; present[i]; i++) {
        if (!strstr(t, present[i]))
            fprintf(stderr, "\n  missing '%s'\n", present[i]);
        CU_ASSERT_PTR_NOT_NULL(strstr(t, present[i]));
    }
    CU_ASSERT_PTR_NULL(strstr(t, "kind=\"cache_write\""));
    CU_ASSERT_PTR_NULL(strstr(t, "piapi_cost_usd_total{user=\"al\",service_type=\"cc\",model=\"mystery\"}"));
    free(t);
}

/* Model names come from upstream answers: the first 64 valid ones become
 * label values, the rest and anything odd is "other". */
static void test_model_labels_bounded(void)
{
    char name[32];
    piapi_metrics_init("v");
    for (int i = 0; i < 100; i++) {
        snprintf(name, sizeof name, "model-%d", i);
        usage("al", name, 1, 0, 0, 0, 1);
    }
    usage("al", "bad\"name", 1, 0, 0, 0, 1);
    usage("al", NULL, 1, 0, 0, 0, 1);
    char *t = render();
    size_t models = 0;
    for (const char *p = t; (p = strstr(p, ",kind=\"input\"} ")); p++)
        models++;
    CU_ASSERT_EQUAL(models, 65);  /* 64 names and "other" */
    CU_ASSERT_PTR_NOT_NULL(strstr(t, "model=\"model-63\",kind=\"input\"} 1\n"));
    CU_ASSERT_PTR_NULL(strstr(t, "model=\"model-64\""));
    CU_ASSERT_PTR_NOT_NULL(strstr(t, "model=\"other\",kind=\"input\"} 38\n"));
    CU_ASSERT_PTR_NULL(strstr(t, "bad"));
    free(t);
}

static const struct unit_case tests[] = {
    { "exact exposition", test_exact_exposition },
    { "bucket boundaries", test_bucket_boundaries },
    { "label escaping", test_label_escaping },
    { "HELP and TYPE for every family", test_help_type },
    { "reason and status folding", test_reason_and_status_folding },
    { "config and gauges", test_config_and_gauges },
    { "8 concurrent recorders", test_concurrent_recording },
    { "render 500 series", test_render_500_series },
    { "promtool check metrics", test_promtool },
    { "table overflow folds into other", test_table_overflow },
    { "usage exposition", test_usage_exposition },
    { "model labels bounded", test_model_labels_bounded },
    { NULL, NULL }
};

UNIT_MAIN("metrics", tests)
