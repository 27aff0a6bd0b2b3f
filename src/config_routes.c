/* Config stage 2, routes: top-level `routes:` and a member's `services:`,
 * the candidates a request of one service type may go to (routes.h).
 * Same rules as config_schema.c: every problem reported with its line and
 * field; a candidate must name a provider offering that service type and
 * a key of that provider. */
#include "config_int.h"

#include <string.h>

static const struct cfg_field candidate_fields[] = {
    { .key = "providerName" },
    { .key = "providerKeyName" },
};
static const struct cfg_schema candidate_schema = CFG_SCHEMA(candidate_fields);

static const struct cfg_field route_fields[] = {
    { .key = "candidates" },
    { .key = "strategy" },
};
const struct cfg_schema cfg_route_schema = CFG_SCHEMA(route_fields);

/* A services: entry is one of three forms; the keys say which. */
static const struct cfg_field service_route_fields[] = {
    { .key = "providerName" },
    { .key = "providerKeyName" },
    { .key = "candidates" },
    { .key = "strategy" },
    { .key = "route" },
};
static const struct cfg_schema service_route_schema = CFG_SCHEMA(service_route_fields);

static bool offers(struct ctx *c, const struct piapi_provider *p, const char *type,
                   size_t len)
{
    size_t pi = (size_t)(p - c->cfg->providers);
    return cfg_strset_find(&c->svc_types, pi, type, len) != NULL;
}

/* {providerName, providerKeyName}; `type` (may be NULL: a named route,
 * checked where it is used) must be one the provider offers. */
static bool walk_candidate(struct ctx *c, const struct ynode *m, const char *path,
                           const struct ynode *type, struct piapi_candidate *out)
{
    char kp[CFG_PATH_LEN], s1[CFG_SHOW_LEN], s2[CFG_SHOW_LEN];

    if (!cfg_expect_kind(c, m, path, Y_MAP))
        return false;
    cfg_check_keys(c, m, path, &candidate_schema);
    const struct ynode *pn = cfg_get_name(c, m, path, "providerName");
    const struct ynode *kn = cfg_get_name(c, m, path, "providerKeyName");
    if (!pn || !kn)
        return false;
    const struct strset_ent *pe = cfg_strset_find(&c->prov_names, 0, pn->str, pn->len);
    cfg_path_key(c, kp, path, "providerName", 12);
    if (!pe) {
        cfg_err(c, pn, kp, "unknown provider '%s'", cfg_show(c, s1, pn->str, pn->len));
        return false;
    }
    out->provider = &c->cfg->providers[pe->val];
    if (type && !offers(c, out->provider, type->str, type->len)) {
        cfg_err(c, pn, kp, "provider '%s' offers no service of type '%s'",
                cfg_show(c, s1, pn->str, pn->len), cfg_show(c, s2, type->str, type->len));
        return false;
    }
    const struct strset_ent *ke = cfg_strset_find(&c->prov_keys, pe->val, kn->str, kn->len);
    if (!ke) {
        cfg_path_key(c, kp, path, "providerKeyName", 15);
        cfg_err(c, kn, kp, "key '%s' not defined for provider '%s'",
                cfg_show(c, s1, kn->str, kn->len), cfg_show(c, s2, pn->str, pn->len));
        return false;
    }
    out->key = &out->provider->keys[ke->val];
    return true;
}

static void walk_strategy(struct ctx *c, const struct ynode *m, const char *path,
                          struct piapi_route_set *out)
{
    char kp[CFG_PATH_LEN], shown[CFG_SHOW_LEN];
    const struct ynode *s = cfg_get_str(c, m, path, "strategy", CFG_OPTIONAL);

    out->strategy = PIAPI_STRATEGY_FAILOVER;
    if (!s || (s->len == 8 && !memcmp(s->str, "failover", 8)))
        return;
    if (s->len == 6 && !memcmp(s->str, "spread", 6)) {
        out->strategy = PIAPI_STRATEGY_SPREAD;
        return;
    }
    cfg_path_key(c, kp, path, "strategy", 8);
    cfg_err(c, s, kp, "unknown strategy '%s' (use failover or spread)",
            cfg_show(c, shown, s->str, s->len));
}

/* {candidates: [...], strategy}; false when it is unusable. */
static bool walk_candidates(struct ctx *c, const struct ynode *m, const char *path,
                            const struct ynode *type, struct piapi_route_set *out)
{
    char sp[CFG_PATH_LEN], ip[CFG_PATH_LEN];
    const struct ynode *seq = cfg_get_coll(c, m, path, "candidates", Y_SEQ);

    walk_strategy(c, m, path, out);
    if (!seq)
        return false;
    cfg_path_key(c, sp, path, "candidates", 10);
    if (seq->count > PIAPI_ROUTE_MAX_CANDIDATES) {
        cfg_err(c, seq, sp, "at most %d candidates", PIAPI_ROUTE_MAX_CANDIDATES);
        return false;
    }
    struct piapi_candidate *cands = piapi_arena_array(&c->cfg->arena, seq->count,
                                                      sizeof *cands);
    bool ok = true;
    size_t i = 0;
    for (const struct ynode *e = seq->first; e; e = e->next, i++) {
        cfg_path_idx(ip, sp, i);
        if (!walk_candidate(c, e, ip, type, &cands[i])) {
            ok = false;
            continue;
        }
        for (size_t j = 0; j < i; j++)
            if (cands[j].key == cands[i].key) {
                /* Its cooldown is its twin's: listed twice, one request
                 * could go to the same key twice. */
                cfg_err(c, e, ip, "repeats candidates[%zu]", j);
                ok = false;
                break;
            }
    }
    out->candidates = cands;
    out->ncandidates = seq->count;
    return ok;
}

void cfg_walk_routes(struct ctx *c, const struct ynode *root)
{
    char kp[CFG_PATH_LEN];
    const struct ynode *map = cfg_map_get(root, "routes");

    if (!map || (map->kind == Y_SCALAR && map->null))
        return;
    if (!cfg_expect_kind(c, map, "routes", Y_MAP))
        return;
    cfg_check_keys(c, map, "routes", NULL);
    size_t n = map->count / 2;
    c->cfg->routes = piapi_arena_array(&c->cfg->arena, n, sizeof *c->cfg->routes);
    c->route_nodes = piapi_arena_array(&c->tree, n, sizeof *c->route_nodes);
    for (const struct ynode *k = map->first; k && k->next; k = k->next->next) {
        if (k->kind != Y_SCALAR)
            continue;  /* reported by check_keys */
        cfg_path_key(c, kp, "routes", k->str, k->len);
        if (k->null || k->len == 0 || k->has_nul || cfg_has_ctl(k->str, k->len, false)) {
            cfg_err(c, k, kp, "route names must be non-empty printable strings");
            continue;
        }
        size_t ri = c->cfg->nroutes;
        if (cfg_strset_add(&c->route_names, 0, k->str, k->len, ri))
            continue;  /* duplicate: reported by check_keys */
        struct piapi_route_set *r = &c->cfg->routes[ri];
        c->route_nodes[ri] = k->next;
        c->cfg->nroutes++;
        r->name = cfg_dup_str(c, k);
        if (!cfg_expect_kind(c, k->next, kp, Y_MAP))
            continue;
        cfg_check_keys(c, k->next, kp, &cfg_route_schema);
        walk_candidates(c, k->next, kp, NULL, r);
    }
}

/* A named route used for `type`: each of its candidates must offer it. */
static const struct piapi_route_set *use_route(struct ctx *c, const struct ynode *ref,
                                               const char *path, const struct ynode *type)
{
    char s1[CFG_SHOW_LEN], s2[CFG_SHOW_LEN], s3[CFG_SHOW_LEN];
    const struct strset_ent *e = cfg_strset_find(&c->route_names, 0, ref->str, ref->len);

    if (!e) {
        cfg_err(c, ref, path, "unknown route '%s' (not in routes:)",
                cfg_show(c, s1, ref->str, ref->len));
        return NULL;
    }
    const struct piapi_route_set *r = &c->cfg->routes[e->val];
    bool ok = true;
    for (size_t i = 0; i < r->ncandidates; i++) {
        const struct piapi_candidate *cand = &r->candidates[i];
        if (!cand->provider || offers(c, cand->provider, type->str, type->len))
            continue;
        cfg_err(c, ref, path, "route '%s': candidates[%zu]: provider '%s' offers no "
                "service of type '%s'", cfg_show(c, s1, ref->str, ref->len), i,
                cfg_show(c, s2, cand->provider->name, strlen(cand->provider->name)),
                cfg_show(c, s3, type->str, type->len));
        ok = false;
    }
    return ok ? r : NULL;
}

/* One services: entry: a single target, candidates, or a route name. */
static const struct piapi_route_set *walk_service_route(struct ctx *c,
                                                       const struct ynode *type,
                                                       const struct ynode *m,
                                                       const char *path)
{
    char kp[CFG_PATH_LEN];

    if (!cfg_expect_kind(c, m, path, Y_MAP))
        return NULL;
    cfg_check_keys(c, m, path, &service_route_schema);
    bool single = cfg_map_get(m, "providerName") || cfg_map_get(m, "providerKeyName");
    bool list = cfg_map_get(m, "candidates") != NULL;
    const struct ynode *ref = cfg_map_get(m, "route");
    if (single + list + (ref != NULL) != 1) {
        cfg_err(c, m, path, "give one of providerName/providerKeyName, candidates "
                "or route");
        return NULL;
    }
    if (ref) {
        const struct ynode *v = cfg_get_name(c, m, path, "route");
        cfg_path_key(c, kp, path, "route", 5);
        return v ? use_route(c, v, kp, type) : NULL;
    }
    struct piapi_route_set *r = piapi_arena_array(&c->cfg->arena, 1, sizeof *r);
    if (list)
        return walk_candidates(c, m, path, type, r) ? r : NULL;
    if (cfg_map_get(m, "strategy")) {
        cfg_path_key(c, kp, path, "strategy", 8);
        cfg_err(c, cfg_map_get(m, "strategy"), kp, "only with candidates");
    }
    struct piapi_candidate *cand = piapi_arena_array(&c->cfg->arena, 1, sizeof *cand);
    if (!walk_candidate(c, m, path, type, cand))
        return NULL;
    r->candidates = cand;
    r->ncandidates = 1;
    return r;
}

void cfg_walk_user_services(struct ctx *c, const struct ynode *u, const char *path,
                            struct piapi_user *out)
{
    char sp[CFG_PATH_LEN], kp[CFG_PATH_LEN];

    out->default_candidate = (struct piapi_candidate){ out->provider, out->key };
    out->default_route = (struct piapi_route_set){
        .candidates = &out->default_candidate, .ncandidates = 1,
    };
    const struct ynode *map = cfg_map_get(u, "services");
    if (!map || (map->kind == Y_SCALAR && map->null))
        return;
    cfg_path_key(c, sp, path, "services", 8);
    if (!cfg_expect_kind(c, map, sp, Y_MAP))
        return;
    cfg_check_keys(c, map, sp, NULL);
    struct piapi_user_service *svcs = piapi_arena_array(&c->cfg->arena, map->count / 2,
                                                        sizeof *svcs);
    size_t n = 0;
    for (const struct ynode *k = map->first; k && k->next; k = k->next->next) {
        if (k->kind != Y_SCALAR || k->null || k->len == 0 || k->has_nul)
            continue;  /* reported by check_keys, or no type at all */
        cfg_path_key(c, kp, sp, k->str, k->len);
        bool dup = false;
        for (size_t i = 0; i < n; i++)
            dup |= strlen(svcs[i].type) == k->len && !memcmp(svcs[i].type, k->str, k->len);
        if (dup)
            continue;  /* reported by check_keys */
        const struct piapi_route_set *r = walk_service_route(c, k, k->next, kp);
        if (!r)
            continue;
        svcs[n].type = cfg_dup_str(c, k);
        svcs[n].route = r;
        n++;
    }
    out->services = svcs;
    out->nservices = n;
}
