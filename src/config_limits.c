/* Config stage 2, per-member limits' part of the schema: top-level
 * `limits:` (defaults for every member), a member's `limits:` (over the
 * defaults field by field; 0 = no limit) and `models:` allow-list, and
 * `settings.redis`. Same rules as config_schema.c: every problem reported
 * with its line and field. */
#include "config_int.h"

#include "piapi/util.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define BUDGET_MAX 1e9           /* USD: no team's budget is a billion */
#define PER_MINUTE_MAX 1000000   /* the window remembers every admission */
#define MODELS_MAX 256

static const struct cfg_field limit_fields[] = {
    { .key = "concurrentRequests" },
    { .key = "queueMs" },
    { .key = "requestsPerMinute" },
    { .key = "tokensPerDay" },
    { .key = "dailyBudgetUsd" },
    { .key = "monthlyBudgetUsd" },
};
const struct cfg_schema cfg_limits_schema = CFG_SCHEMA(limit_fields);

/* The integer fields: where each goes and its bound. */
static const struct {
    const char *key;
    size_t off;
    bool wide;
    uint64_t max;
} integers[] = {
    { "concurrentRequests", offsetof(struct piapi_limits, concurrent), false, 100000 },
    { "queueMs", offsetof(struct piapi_limits, queue_ms), false, 3600000 },
    { "requestsPerMinute", offsetof(struct piapi_limits, per_minute), false, PER_MINUTE_MAX },
    { "tokensPerDay", offsetof(struct piapi_limits, tokens_per_day), true, 1ULL << 50 },
};

static void store_int(struct piapi_limits *l, size_t i, uint64_t v)
{
    unsigned char *at = (unsigned char *)l + integers[i].off;
    if (integers[i].wide) {
        memcpy(at, &v, sizeof v);
    } else {
        uint32_t v32 = (uint32_t)v;
        memcpy(at, &v32, sizeof v32);
    }
}

static void walk_integers(struct ctx *c, const struct ynode *map, const char *path,
                          struct piapi_limits *out)
{
    char kp[CFG_PATH_LEN];
    for (size_t i = 0; i < sizeof integers / sizeof integers[0]; i++) {
        uint64_t n;
        if (!cfg_map_get(map, integers[i].key))
            continue;
        const struct ynode *v = cfg_get_str(c, map, path, integers[i].key, CFG_REQUIRED);
        if (!v)
            continue;
        cfg_path_key(c, kp, path, integers[i].key, strlen(integers[i].key));
        if (piapi_parse_u64(v->str, 0, integers[i].max, &n) != 0) {
            cfg_err(c, v, kp, "expected an integer in 0..%" PRIu64 " (0 = no limit)",
                    integers[i].max);
            continue;
        }
        store_int(out, i, n);
    }
}

/* A budget in USD: a plain decimal number, 0 (no limit) or more. */
static void get_budget(struct ctx *c, const struct ynode *map, const char *path,
                       const char *key, double *out)
{
    char kp[CFG_PATH_LEN], shown[CFG_SHOW_LEN];
    if (!cfg_map_get(map, key))
        return;
    const struct ynode *v = cfg_get_str(c, map, path, key, CFG_REQUIRED);
    if (!v)
        return;
    cfg_path_key(c, kp, path, key, strlen(key));
    char *end;
    errno = 0;
    double d = strtod(v->str, &end);
    /* strtod also reads "inf", "nan" and hex floats: a budget is none */
    bool plain = strspn(v->str, "0123456789.eE+") == v->len;
    if (!plain || errno || end != v->str + v->len || !isfinite(d) || d < 0 ||
        d > BUDGET_MAX) {
        cfg_err(c, v, kp, "expected an amount in USD, 0..%.0f (0 = no limit), got '%s'",
                BUDGET_MAX, cfg_show(c, shown, v->str, v->len));
        return;
    }
    *out = d;
}

/* One `limits:` mapping over `out` (the defaults, or a member's copy of
 * them): each field given replaces the one below. */
static void walk_limits_map(struct ctx *c, const struct ynode *map, const char *path,
                            struct piapi_limits *out)
{
    if (!map || (map->kind == Y_SCALAR && map->null))
        return;
    if (!cfg_expect_kind(c, map, path, Y_MAP))
        return;
    cfg_check_keys(c, map, path, &cfg_limits_schema);
    walk_integers(c, map, path, out);
    get_budget(c, map, path, "dailyBudgetUsd", &out->daily_usd);
    get_budget(c, map, path, "monthlyBudgetUsd", &out->monthly_usd);
}

/* "claude-sonnet-4*" is a prefix; a '*' anywhere else would read as a
 * glob that it is not. */
static bool walk_model(struct ctx *c, const struct ynode *v, const char *path, size_t i,
                       struct piapi_model_pattern *out)
{
    char ip[CFG_PATH_LEN];
    cfg_path_idx(ip, path, i);
    if (v->kind != Y_SCALAR || v->null || v->len == 0 || v->has_nul) {
        cfg_err(c, v, ip, "expected a model name or a pattern ending in '*'");
        return false;
    }
    if (cfg_has_space_or_ctl(v->str, v->len)) {
        cfg_err(c, v, ip, "must not contain spaces or control characters");
        return false;
    }
    const char *star = memchr(v->str, '*', v->len);
    if (star && star != v->str + v->len - 1) {
        cfg_err(c, v, ip, "'*' may only end a model pattern");
        return false;
    }
    out->s = cfg_dup_str(c, v);
    out->prefix = star != NULL;
    out->len = v->len - (star != NULL);
    return true;
}

static void walk_models(struct ctx *c, const struct ynode *u, const char *upath,
                        struct piapi_user *out)
{
    char path[CFG_PATH_LEN];
    const struct ynode *seq = cfg_map_get(u, "models");
    if (!seq)
        return;  /* any model */
    cfg_path_key(c, path, upath, "models", 6);
    if (!cfg_expect_kind(c, seq, path, Y_SEQ))
        return;
    if (seq->count > MODELS_MAX) {
        cfg_err(c, seq, path, "at most %d patterns", MODELS_MAX);
        return;
    }
    /* An empty list allows no model at all: requests naming one get 403. */
    struct piapi_model_pattern *m =
        piapi_arena_array(&c->cfg->arena, seq->count ? seq->count : 1, sizeof *m);
    size_t i = 0, n = 0;
    for (const struct ynode *v = seq->first; v; v = v->next, i++)
        if (walk_model(c, v, path, i, &m[n]))
            n++;
    out->models = m;
    out->nmodels = n;
}

/* redis://host:port/db: host a name or IPv4 address, port 1..65535, db
 * 0..15 (Redis's default count). TLS and passwords are not supported. */
static void walk_redis(struct ctx *c, const struct ynode *root)
{
    const struct ynode *settings = cfg_map_get(root, "settings");
    if (!settings || settings->kind != Y_MAP || !cfg_map_get(settings, "redis"))
        return;
    const struct ynode *v = cfg_get_str(c, settings, "settings", "redis", CFG_REQUIRED);
    if (!v)
        return;
    char shown[CFG_SHOW_LEN];
    const char *s = v->str, *pfx = "redis://";
    const char *host = s + strlen(pfx), *colon = NULL, *slash = NULL;
    bool ok = strncmp(s, pfx, strlen(pfx)) == 0;
    if (ok) {
        colon = strchr(host, ':');
        slash = colon ? strchr(colon, '/') : NULL;
        ok = colon && slash && colon > host &&
             strspn(host, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-") ==
                 (size_t)(colon - host);
    }
    if (ok) {
        char port[8];
        size_t plen = (size_t)(slash - colon - 1);
        uint64_t p, db;
        ok = plen > 0 && plen < sizeof port;
        if (ok) {
            memcpy(port, colon + 1, plen);
            port[plen] = '\0';
            ok = piapi_parse_u64(port, 1, 65535, &p) == 0 &&
                 piapi_parse_u64(slash + 1, 0, 15, &db) == 0;
        }
    }
    if (!ok) {
        cfg_err(c, v, "settings.redis", "expected redis://host:port/db (db 0..15), got '%s'",
                cfg_show(c, shown, v->str, v->len));
        return;
    }
    c->cfg->settings.redis = cfg_dup_str(c, v);
}

void cfg_walk_limits(struct ctx *c, const struct ynode *root)
{
    struct piapi_limits defaults = { 0 };
    walk_limits_map(c, cfg_map_get(root, "limits"), "limits", &defaults);
    walk_redis(c, root);
    const struct ynode *seq = cfg_map_get(root, "users");
    if (!seq || seq->kind != Y_SEQ || !c->cfg->users)
        return;  /* reported by walk_users */
    size_t i = 0;
    for (const struct ynode *u = seq->first; u; u = u->next, i++) {
        struct piapi_user *out = &c->cfg->users[i];
        char path[CFG_PATH_LEN], lp[CFG_PATH_LEN];
        out->limits = defaults;
        if (u->kind != Y_MAP)
            continue;
        cfg_path_idx(path, "users", i);
        cfg_path_key(c, lp, path, "limits", 6);
        walk_limits_map(c, cfg_map_get(u, "limits"), lp, &out->limits);
        walk_models(c, u, path, out);
    }
}
