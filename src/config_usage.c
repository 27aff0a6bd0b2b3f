/* Config stage 2, usage accounting's part of the schema: `pricing:`,
 * `settings.usageDb` and a service's `usage:` mapping. Same rules as
 * config_schema.c: every problem reported with its line and field. */
#include "config_int.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* USD per million tokens: no model costs a million dollars per million. */
#define PRICE_MAX 1e6

static const struct cfg_field price_fields[] = {
    { .key = "model" },
    { .key = "input" },
    { .key = "output" },
    { .key = "cacheRead" },
    { .key = "cacheWrite" },
    { .key = "cacheWrite1h" },
};
const struct cfg_schema cfg_pricing_schema = CFG_SCHEMA(price_fields);

static const struct cfg_field service_usage_fields[] = {
    { .key = "injectStreamUsage" },
};
const struct cfg_schema cfg_service_usage_schema = CFG_SCHEMA(service_usage_fields);

/* A price: a plain decimal number, 0 or more. Returns false (reported)
 * when it is present and not one; *out keeps its value when absent. */
static bool get_price(struct ctx *c, const struct ynode *map, const char *path,
                      const char *key, int required, double *out)
{
    char kp[CFG_PATH_LEN], shown[CFG_SHOW_LEN];
    if (!required && !cfg_map_get(map, key))
        return true;
    const struct ynode *v = cfg_get_str(c, map, path, key, CFG_REQUIRED);
    if (!v)
        return false;
    cfg_path_key(c, kp, path, key, strlen(key));
    char *end;
    errno = 0;
    double d = strtod(v->str, &end);
    /* strtod also reads "inf", "nan" and hex floats: a price is none of them */
    bool plain = v->len && strspn(v->str, "0123456789.-+eE") == v->len;
    if (!plain || errno || end != v->str + v->len || !isfinite(d)) {
        cfg_err(c, v, kp, "expected a price in USD per million tokens, got '%s'",
                cfg_show(c, shown, v->str, v->len));
        return false;
    }
    if (d < 0 || d > PRICE_MAX) {
        cfg_err(c, v, kp, "must be between 0 and %.0f", PRICE_MAX);
        return false;
    }
    *out = d;
    return true;
}

/* "gpt-5*" is a prefix; a '*' anywhere else would read as a glob that it
 * is not. */
static bool walk_price_model(struct ctx *c, const struct ynode *map, const char *path,
                             struct piapi_price *out)
{
    char kp[CFG_PATH_LEN];
    const struct ynode *m = cfg_get_name(c, map, path, "model");
    if (!m)
        return false;
    cfg_path_key(c, kp, path, "model", 5);
    const char *star = memchr(m->str, '*', m->len);
    if (star && star != m->str + m->len - 1) {
        cfg_err(c, m, kp, "'*' may only end a model pattern");
        return false;
    }
    out->model = cfg_dup_str(c, m);
    out->prefix = star != NULL;
    out->len = m->len - (star != NULL);
    return true;
}

/* Unset cache prices are the input price: a provider without a cache
 * discount bills cached tokens as input. 1-hour writes default to the
 * 5-minute price. */
static void walk_price(struct ctx *c, const struct ynode *map, size_t i,
                       struct piapi_price *out)
{
    char path[CFG_PATH_LEN];
    cfg_path_idx(path, "pricing", i);
    if (!cfg_expect_kind(c, map, path, Y_MAP))
        return;
    cfg_check_keys(c, map, path, &cfg_pricing_schema);
    walk_price_model(c, map, path, out);
    bool in_ok = get_price(c, map, path, "input", CFG_REQUIRED, &out->input);
    bool out_ok = get_price(c, map, path, "output", CFG_REQUIRED, &out->output);
    if (!in_ok || !out_ok)
        return;
    out->cache_read = out->cache_write = out->input;
    if (get_price(c, map, path, "cacheRead", CFG_OPTIONAL, &out->cache_read) &&
        get_price(c, map, path, "cacheWrite", CFG_OPTIONAL, &out->cache_write)) {
        out->cache_write_1h = out->cache_write;
        get_price(c, map, path, "cacheWrite1h", CFG_OPTIONAL, &out->cache_write_1h);
    }
}

void cfg_walk_pricing(struct ctx *c, const struct ynode *root)
{
    const struct ynode *seq = cfg_map_get(root, "pricing");
    if (!seq || (seq->kind == Y_SCALAR && seq->null))
        return;  /* tokens are counted, nothing is priced */
    if (!cfg_expect_kind(c, seq, "pricing", Y_SEQ))
        return;
    c->cfg->prices = piapi_arena_array(&c->cfg->arena, seq->count, sizeof *c->cfg->prices);
    c->cfg->nprices = seq->count;
    size_t i = 0;
    for (const struct ynode *p = seq->first; p; p = p->next, i++)
        walk_price(c, p, i, &c->cfg->prices[i]);
}

void cfg_walk_service_usage(struct ctx *c, const struct ynode *svc, const char *path,
                            struct piapi_service *out)
{
    char up[CFG_PATH_LEN], kp[CFG_PATH_LEN];
    out->inject_stream_usage = true;
    const struct ynode *map = cfg_map_get(svc, "usage");
    if (!map)
        return;
    cfg_path_key(c, up, path, "usage", 5);
    if (!cfg_expect_kind(c, map, up, Y_MAP))
        return;
    cfg_check_keys(c, map, up, &cfg_service_usage_schema);
    if (!cfg_map_get(map, "injectStreamUsage"))
        return;
    const struct ynode *v = cfg_get_str(c, map, up, "injectStreamUsage", CFG_REQUIRED);
    if (!v)
        return;
    cfg_path_key(c, kp, up, "injectStreamUsage", 17);
    if (strcmp(v->str, "true") == 0)
        out->inject_stream_usage = true;
    else if (strcmp(v->str, "false") == 0)
        out->inject_stream_usage = false;
    else
        cfg_err(c, v, kp, "expected true or false");
}

/* Opening the ledger is the apply path's business: a database that
 * cannot be opened is logged and counted, never a refused config (a full
 * disk must not stop a reload). Only what can never be a path is an
 * error here. */
void cfg_walk_usage_db(struct ctx *c, const struct ynode *settings)
{
    char kp[CFG_PATH_LEN];
    if (!cfg_map_get(settings, "usageDb"))
        return;
    const struct ynode *v = cfg_get_str(c, settings, "settings", "usageDb", CFG_REQUIRED);
    if (!v)
        return;
    cfg_path_key(c, kp, "settings", "usageDb", 7);
    if (cfg_has_ctl(v->str, v->len, false)) {
        cfg_err(c, v, kp, "must not contain control characters");
        return;
    }
    c->cfg->settings.usage_db = cfg_dup_str(c, v);
}
