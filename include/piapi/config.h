/* config.yaml → immutable, reference-counted snapshot.
 *
 * Nothing outside the config stages (src/config*.c) sees a libyaml type. A snapshot never changes
 * after it is built; every pointer it hands out stays valid until the
 * snapshot's last reference is released. */
#ifndef PIAPI_CONFIG_H
#define PIAPI_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "piapi/sha256.h"

enum piapi_auth_mode {
    PIAPI_AUTH_HEADER,  /* <name>: <prefix><key> */
    PIAPI_AUTH_QUERY    /* ?<name>=<key> */
};

struct piapi_auth {
    enum piapi_auth_mode mode;
    const char *name;    /* header or query parameter name */
    const char *prefix;  /* header mode only; "" when none */
};

struct piapi_provider;

struct piapi_service {
    const char *type;
    const char *base_url;            /* absolute http(s) URL, as configured */
    struct piapi_auth auth;
    const struct piapi_provider *provider;
    /* usage.injectStreamUsage (default true): a streamed Chat Completions
     * request gets stream_options.include_usage, so its usage is known. */
    bool inject_stream_usage;
};

/* A provider key is at least this long (shorter ones are refused), and
 * no shorter secret is ever looked for in text: piapi keeps secrets out
 * of answers and logs by looking for them, and a key of a character or
 * two would match ordinary text. */
#define PIAPI_SECRET_MIN_LEN 4

struct piapi_provider_key {
    const char *name;   /* safe to log */
    const char *value;  /* secret: never log, print or put in a metric */
};

struct piapi_provider {
    const char *name;
    const struct piapi_provider_key *keys;
    size_t nkeys;
    const struct piapi_service *services;
    size_t nservices;
};

/* Per-member limits (`limits:` defaults, a member's `limits:` over them
 * field by field); 0 = no limit. */
struct piapi_limits {
    uint32_t concurrent;        /* concurrentRequests */
    uint32_t queue_ms;          /* queueMs: wait for a slot this long, then 429 */
    uint32_t per_minute;        /* requestsPerMinute, a sliding window */
    uint64_t tokens_per_day;    /* tokensPerDay: input + output + cache, UTC day */
    double daily_usd;           /* dailyBudgetUsd */
    double monthly_usd;         /* monthlyBudgetUsd, UTC calendar month */
};

/* One `models:` allow-list entry: exact, or a prefix ("gpt-5*"). */
struct piapi_model_pattern {
    const char *s;
    size_t len;
    bool prefix;
};

/* One candidate of a route: a provider and one of its keys. */
struct piapi_candidate {
    const struct piapi_provider *provider;
    const struct piapi_provider_key *key;
};

enum piapi_strategy {
    PIAPI_STRATEGY_FAILOVER,  /* the first healthy candidate, in order */
    PIAPI_STRATEGY_SPREAD     /* a session sticks to one healthy candidate */
};

/* Where a member's requests of one service type go: candidates tried in
 * turn before the first byte reaches the client (routes.h). A top-level
 * `routes:` entry has a name; a route written under a member has none. */
#define PIAPI_ROUTE_MAX_CANDIDATES 16
struct piapi_route_set {
    const char *name;  /* NULL: written inline, or the member's default */
    const struct piapi_candidate *candidates;
    size_t ncandidates;
    enum piapi_strategy strategy;
};

/* users[].services.<type> */
struct piapi_user_service {
    const char *type;
    const struct piapi_route_set *route;
};

struct piapi_user {
    const char *name;
    unsigned char key_digest[PIAPI_SHA256_LEN];  /* of the member's key */
    const struct piapi_provider *provider;
    const struct piapi_provider_key *key;
    struct piapi_limits limits;                 /* in effect for this member */
    const struct piapi_model_pattern *models;   /* NULL: any model */
    size_t nmodels;
    /* services: per service type; any other type takes default_route,
     * the single candidate providerName/providerKeyName. */
    const struct piapi_user_service *services;
    size_t nservices;
    struct piapi_route_set default_route;
    struct piapi_candidate default_candidate;
};

/* Optional top-level `settings:` block; every field has a default. */
struct piapi_settings {
    uint64_t max_body_bytes;        /* maxBodyBytes, default 32 MiB */
    uint32_t connect_timeout_ms;    /* connectTimeoutMs, default 10000 */
    uint32_t header_timeout_ms;     /* headerTimeoutMs: no upstream headers by then -> 504, default 300000 */
    uint32_t idle_timeout_ms;       /* idleTimeoutMs: silence mid-stream ends it, default 300000 */
    uint32_t sse_keepalive_ms;      /* sseKeepaliveMs: ": ping" during silence, 0 = off, default 15000 */
    int sse_keepalive_explicit;     /* sseKeepaliveMs was in the file (else piapi may shorten it) */
    uint32_t body_idle_timeout_ms;  /* bodyIdleTimeoutMs: no request body byte this long -> 408, default 30000 */
    uint32_t body_timeout_ms;       /* bodyTimeoutMs: request body not all read by then -> 408, default 300000 */
    const char *ca_file;            /* caFile, NULL = system store */
    const char *usage_db;           /* usageDb: the usage ledger, NULL = none */
    const char *redis;              /* redis: redis://host:port/db, NULL = none */
};

/* One `pricing:` entry, USD per million tokens. */
struct piapi_price {
    const char *model;   /* without the trailing '*' of a prefix pattern */
    size_t len;
    bool prefix;         /* "claude-sonnet-4*": any model starting so */
    double input, output, cache_read, cache_write, cache_write_1h;
};

struct piapi_config;

/* What a load read, so the apply path can tell a changed file from a
 * touch without reading it twice. */
struct piapi_config_read {
    bool read;        /* the bytes were read (whether valid or not) */
    int error;        /* errno when they could not be */
    size_t len;
    uint64_t digest;  /* seeded hash of the bytes; never leaves the process */
};

/* Loads and validates. On success returns a snapshot holding one
 * reference. On failure returns NULL and sets *errors to a malloc'd,
 * newline-separated list of every problem found, each naming the place:
 *   "config.yaml:14: users[1].providerKeyName: key 'x' not defined for provider 'p'"
 * *warnings (may be NULL on either path) lists non-fatal findings such as
 * a world-readable file or plain http to a non-loopback host. The caller
 * frees both strings. `rd` (may be NULL) is filled on either path. */
struct piapi_config *piapi_config_load_file(const char *path, char **errors,
                                            char **warnings,
                                            struct piapi_config_read *rd);
/* Same, from memory; `name` prefixes messages instead of a path. */
struct piapi_config *piapi_config_parse(const char *text, size_t len,
                                        const char *name, char **errors,
                                        char **warnings);

struct piapi_config *piapi_config_acquire(struct piapi_config *cfg);
void piapi_config_release(struct piapi_config *cfg);  /* NULL is fine */

/* O(1); constant-time comparison of the candidate key. NULL when unknown. */
const struct piapi_user *piapi_config_find_user(const struct piapi_config *cfg,
                                                const char *key, size_t len);
/* O(1). NULL when the provider offers no service of that type. */
const struct piapi_service *
piapi_config_find_service(const struct piapi_config *cfg,
                          const struct piapi_provider *provider,
                          const char *type, size_t len);

const struct piapi_settings *piapi_config_settings(const struct piapi_config *cfg);
/* The first `pricing:` entry matching model (exactly, or by its prefix),
 * or NULL: such a model's tokens are counted without a cost. */
const struct piapi_price *piapi_config_find_price(const struct piapi_config *cfg,
                                                  const char *model);
/* Short hex digest of the file's bytes (12 chars); identifies what is live. */
const char *piapi_config_hash(const struct piapi_config *cfg);
/* Same file and same keys read from outside it (env:, file:, credential:):
 * a reload that changes neither has nothing to swap in. */
bool piapi_config_same(const struct piapi_config *a, const struct piapi_config *b);
void piapi_config_counts(const struct piapi_config *cfg, size_t *providers,
                         size_t *services, size_t *users);

/* The route of a member's requests of service type `type`: its
 * services: entry, else its default route. */
const struct piapi_route_set *piapi_config_user_route(const struct piapi_user *user,
                                                      const char *type, size_t len);
/* Whether some route of the snapshot names this provider key (a reload
 * that drops one drops its cooldown). */
bool piapi_config_names_candidate(const struct piapi_config *cfg, const char *provider,
                                  const char *key);
/* --check-config: each member's route per service type, one line each. */
void piapi_config_print_routes(const struct piapi_config *cfg, FILE *out);

/* The live snapshot shared by all threads. current() returns an acquired
 * reference (or NULL before the first publish); publish() takes over the
 * caller's reference and releases the previous snapshot's. */
struct piapi_config *piapi_config_current(void);
void piapi_config_publish(struct piapi_config *cfg);

#endif
