/* Prometheus metrics: a static registry, lock-free recording on the request
 * path (relaxed atomics), everything folded at scrape time.
 *
 * Label values come from the config (service types, provider and member
 * names) or from fixed sets piapi defines; a client can never create a new
 * series. Requests that match no configured service are recorded with
 * service_type "unknown". */
#ifndef PIAPI_METRICS_H
#define PIAPI_METRICS_H

#include <stddef.h>
#include <stdint.h>
#include "piapi/util.h"

#define PIAPI_METRICS_UNKNOWN "unknown"

/* Call once before threads start. `version` goes into piapi_build_info. */
void piapi_metrics_init(const char *version);

struct piapi_metrics_request {
    const char *service_type;   /* configured type, or PIAPI_METRICS_UNKNOWN */
    const char *provider;       /* NULL when no route was found */
    const char *user;           /* member name; NULL when unauthenticated */
    int status;                 /* HTTP status sent to the client */
    double latency_s;           /* whole request */
    double ttfb_s;              /* upstream first byte; < 0 when none */
    uint64_t bytes_in;          /* request body bytes sent upstream */
    uint64_t bytes_out;         /* response body bytes sent to the client */
};

/* piapi_requests_total, piapi_request_latency_seconds,
 * piapi_upstream_ttfb_seconds, piapi_user_requests_total, byte counters. */
void piapi_metrics_request(const struct piapi_metrics_request *m);

/* One answer's usage. model: the name the upstream's answer gave, NULL
 * when none; the first 64 distinct names become label values, the rest
 * (and names that are no model name) "other". */
struct piapi_metrics_usage {
    const char *user;
    const char *service_type;
    const char *model;
    int64_t input, output, cache_read, cache_write;
    double cost_usd;
    int priced;       /* the model has a price: cost_usd counts */
    int complete;     /* the answer's final usage was seen */
};

/* piapi_tokens_total, piapi_cost_usd_total, piapi_usage_incomplete_total. */
void piapi_metrics_usage(const struct piapi_metrics_usage *u);

/* reason: "connect", "timeout", "reset", "tls", "client_abort",
 * "idle_timeout", "protocol" (others are folded into "other"). */
void piapi_metrics_upstream_error(const char *provider, const char *reason);

/* piapi_config_reloads_total{result}, and on success
 * piapi_config_last_reload_success_timestamp_seconds and
 * piapi_config_info{hash}. `unchanged` successes count but keep the info. */
void piapi_metrics_config_reload(int ok, const char *hash);

/* piapi_upstream_attempts_total{provider,key,outcome}: one attempt of a
 * request at one candidate. outcome: ok, status_429, status_5xx,
 * status_529, overloaded, connect, timeout, tls, reset (else "other"). */
void piapi_metrics_attempt(const char *provider, const char *key, const char *outcome);
/* piapi_failovers_total{service_type}: a request tried a second candidate. */
void piapi_metrics_failover(const char *service_type);
/* piapi_candidate_cooling{provider,key} is read from routes.c when scraped:
 * the probe calls emit once per candidate it knows. */
typedef void (*piapi_metrics_cooling_probe)(
    void (*emit)(void *ud, const char *provider, const char *key, int cooling), void *ud);
void piapi_metrics_set_cooling_probe(piapi_metrics_cooling_probe probe);

void piapi_metrics_in_flight(int delta);          /* piapi_requests_in_flight */
void piapi_metrics_pool_saturated(void);          /* piapi_pool_saturated_total */

/* The pool reports its thread counts when scraped. */
typedef void (*piapi_metrics_pool_probe)(unsigned *busy, unsigned *idle);
void piapi_metrics_set_pool_probe(piapi_metrics_pool_probe probe);

/* piapi_usage_db_errors_total is the ledger's own count, read when scraped. */
typedef uint64_t (*piapi_metrics_count_probe)(void);
void piapi_metrics_set_usage_db_probe(piapi_metrics_count_probe probe);

/* Families another module keeps and renders itself (per-member limits):
 * appended, whole with HELP and TYPE, after piapi's own. */
typedef void (*piapi_metrics_render_probe)(struct piapi_buf *out);
void piapi_metrics_set_extra_probe(piapi_metrics_render_probe probe);

/* Appends the whole exposition (text format 0.0.4) to out. */
void piapi_metrics_render(struct piapi_buf *out);

#endif
