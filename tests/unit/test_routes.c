/* Candidate choice and cooldowns: failover order, skipping a cooling
 * candidate, the soonest when all cool (first attempt only), no candidate
 * twice, Retry-After (seconds, HTTP date, cap, junk), 10 s doubling to
 * 5 min, a success resetting, a reload forgetting a dropped candidate,
 * spread's stickiness and spreading; and the config's routes. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "piapi/config.h"
#include "piapi/routes.h"
#include "unit.h"

static struct piapi_provider prov[3] = { { .name = "a" }, { .name = "b" }, { .name = "c" } };
static struct piapi_provider_key key = { .name = "k", .value = "sk-xxxx" };
static struct piapi_candidate cands[3];

static struct piapi_route_set route(enum piapi_strategy s, size_t n)
{
    for (size_t i = 0; i < 3; i++)
        cands[i] = (struct piapi_candidate){ &prov[i], &key };
    return (struct piapi_route_set){ .candidates = cands, .ncandidates = n, .strategy = s };
}

static void test_failover_order(void)
{
    piapi_routes_reset();
    struct piapi_route_set r = route(PIAPI_STRATEGY_FAILOVER, 3);
    CU_ASSERT_EQUAL(piapi_routes_pick(&r, 0, 1, 100), 0);
    CU_ASSERT_EQUAL(piapi_routes_pick(&r, 1, 1, 100), 1);
    CU_ASSERT_EQUAL(piapi_routes_pick(&r, 3, 1, 100), 2);
    CU_ASSERT_EQUAL(piapi_routes_pick(&r, 7, 1, 100), -1);
    piapi_routes_failed("a", "k", -1, 100);
    CU_ASSERT_EQUAL(piapi_routes_pick(&r, 0, 1, 100), 1);     /* a cools 10 s */
    CU_ASSERT_EQUAL(piapi_routes_pick(&r, 0, 1, 110.5), 0);   /* and is back */
    piapi_routes_failed("b", "k", 3, 100);
    piapi_routes_failed("c", "k", 1, 100);
    /* all cooling: the soonest (c), but only as the first attempt */
    CU_ASSERT_EQUAL(piapi_routes_pick(&r, 0, 1, 100.5), 2);
    CU_ASSERT_EQUAL(piapi_routes_pick(&r, 4, 1, 100.5), -1);
    piapi_routes_succeeded("a", "k");
    CU_ASSERT_EQUAL(piapi_routes_pick(&r, 0, 1, 100.5), 0);
    piapi_routes_reset();
}

static void test_backoff(void)
{
    piapi_routes_reset();
    struct piapi_route_set r = route(PIAPI_STRATEGY_FAILOVER, 2);
    double want[] = { 10, 20, 40, 80, 160, 300, 300 };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        piapi_routes_failed("a", "k", -1, 1000);
        CU_ASSERT_EQUAL(piapi_routes_pick(&r, 0, 1, 1000 + want[i] - 0.01), 1);
        CU_ASSERT_EQUAL(piapi_routes_pick(&r, 0, 1, 1000 + want[i] + 0.01), 0);
    }
    piapi_routes_succeeded("a", "k");   /* one success resets it */
    piapi_routes_failed("a", "k", -1, 2000);
    CU_ASSERT_EQUAL(piapi_routes_pick(&r, 0, 1, 2010.01), 0);
    piapi_routes_failed("a", "k", 5000, 3000);   /* Retry-After is capped */
    CU_ASSERT_EQUAL(piapi_routes_pick(&r, 0, 1, 3599), 1);
    CU_ASSERT_EQUAL(piapi_routes_pick(&r, 0, 1, 3601), 0);
    piapi_routes_reset();
}

static void test_retry_after(void)
{
    CU_ASSERT_DOUBLE_EQUAL(piapi_routes_parse_retry_after("2", 1, 0), 2, 1e-9);
    CU_ASSERT_DOUBLE_EQUAL(piapi_routes_parse_retry_after("0", 1, 0), 0, 1e-9);
    CU_ASSERT_DOUBLE_EQUAL(piapi_routes_parse_retry_after("86400", 5, 0), 600, 1e-9);
    /* Sun, 06 Nov 1994 08:49:37 GMT = 784111777 */
    const char *d = "Sun, 06 Nov 1994 08:49:37 GMT";
    CU_ASSERT_DOUBLE_EQUAL(piapi_routes_parse_retry_after(d, strlen(d), 784111777 - 30), 30,
                           1e-9);
    CU_ASSERT_DOUBLE_EQUAL(piapi_routes_parse_retry_after(d, strlen(d), 784111777 + 30), 0,
                           1e-9);
    CU_ASSERT(piapi_routes_parse_retry_after("soon", 4, 0) < 0);
    CU_ASSERT(piapi_routes_parse_retry_after("2x", 2, 0) < 0);
    CU_ASSERT(piapi_routes_parse_retry_after("", 0, 0) < 0);
}

static void test_spread(void)
{
    piapi_routes_reset();
    struct piapi_route_set r = route(PIAPI_STRATEGY_SPREAD, 3);
    int seen[3] = {0};
    for (uint64_t s = 1; s <= 60; s++) {
        int first = piapi_routes_pick(&r, 0, s * 0x9e3779b97f4a7c15ULL, 100);
        CU_ASSERT(first >= 0 && first < 3);
        /* the same session, the same candidate */
        CU_ASSERT_EQUAL(piapi_routes_pick(&r, 0, s * 0x9e3779b97f4a7c15ULL, 100), first);
        seen[first]++;
    }
    CU_ASSERT(seen[0] > 0 && seen[1] > 0 && seen[2] > 0);
    /* a session keeps its candidate when another one cools */
    uint64_t s = 42 * 0x9e3779b97f4a7c15ULL;
    int mine = piapi_routes_pick(&r, 0, s, 100);
    const char *other = prov[(mine + 1) % 3].name;
    piapi_routes_failed(other, "k", -1, 100);
    CU_ASSERT_EQUAL(piapi_routes_pick(&r, 0, s, 100), mine);
    piapi_routes_failed(prov[mine].name, "k", -1, 100);
    int moved = piapi_routes_pick(&r, 0, s, 100);
    CU_ASSERT(moved >= 0 && moved != mine && prov[moved].name != other);
    piapi_routes_reset();
}

/* The shared state's side: a read adopts a later cooldown and a larger
 * count; a failure the read should show but lacks healed elsewhere; one
 * that never reached the shared state (or came after the read was asked
 * for) stays. */
static void test_sync(void)
{
    piapi_routes_reset();
    struct piapi_route_set r = route(PIAPI_STRATEGY_FAILOVER, 3);
    double until;
    unsigned fails;
    struct piapi_routes_remote remote[] = { { "a", "k", 130, 3 }, { "b", "k", 90, 1 } };
    piapi_routes_sync(remote, 2, 1);
    CU_ASSERT_EQUAL(piapi_routes_pick(&r, 0, 1, 100), 1);     /* a adopted; b's is over */
    CU_ASSERT(piapi_routes_health("a", "k", &until, &fails));
    CU_ASSERT_EQUAL(until, 130);
    CU_ASSERT_EQUAL(fails, 3);
    piapi_routes_failed("a", "k", -1, 100);                    /* 4th: 80 s */
    CU_ASSERT(piapi_routes_health("a", "k", &until, &fails));
    CU_ASSERT_EQUAL(until, 180);
    CU_ASSERT_EQUAL(fails, 4);
    /* an earlier cooldown and a smaller count do not shorten it */
    struct piapi_routes_remote older = { "a", "k", 120, 2 };
    piapi_routes_sync(&older, 1, 2);
    CU_ASSERT(piapi_routes_health("a", "k", &until, &fails));
    CU_ASSERT_EQUAL(until, 180);
    CU_ASSERT_EQUAL(fails, 4);
    /* a's 4th failure never reached the shared state: a read without it
     * is no success elsewhere */
    piapi_routes_sync(NULL, 0, 3);
    CU_ASSERT(piapi_routes_health("a", "k", &until, &fails));
    /* written after 3 reads were asked for: the 3rd read need not show it */
    piapi_routes_published("a", "k", 3);
    piapi_routes_sync(NULL, 0, 3);
    CU_ASSERT(piapi_routes_health("a", "k", &until, &fails));
    /* the 4th would: without it, a succeeded elsewhere */
    piapi_routes_sync(NULL, 0, 4);
    CU_ASSERT(!piapi_routes_health("a", "k", &until, &fails));
    CU_ASSERT(!piapi_routes_health("b", "k", &until, &fails));
    CU_ASSERT_EQUAL(piapi_routes_pick(&r, 0, 1, 100), 0);
    /* a healthy candidate in a read with no failure is left alone */
    struct piapi_routes_remote healed = { "c", "k", 500, 0 };
    piapi_routes_sync(&healed, 1, 5);
    CU_ASSERT(!piapi_routes_health("c", "k", &until, &fails));
    piapi_routes_reset();
}

static const char yaml[] =
    "providers:\n"
    "  - name: a\n"
    "    apiKeys: {k: sk-aaaa-1, k2: sk-aaaa-2}\n"
    "    services:\n"
    "      - {type: cc, baseUrl: 'http://127.0.0.1:1/a'}\n"
    "  - name: b\n"
    "    apiKeys: {k: sk-bbbb-1}\n"
    "    services:\n"
    "      - {type: cc, baseUrl: 'http://127.0.0.1:1/b'}\n"
    "      - {type: cx, baseUrl: 'http://127.0.0.1:1/bx'}\n"
    "routes:\n"
    "  ha: {candidates: [{providerName: a, providerKeyName: k2}, {providerName: b, providerKeyName: k}], strategy: spread}\n"
    "users:\n"
    "  - {name: u, apiKey: piapi-user-u-1, providerName: a, providerKeyName: k,\n"
    "     services: {cc: {route: ha}, cx: {providerName: b, providerKeyName: k}}}\n"
    "  - {name: v, apiKey: piapi-user-v-1, providerName: a, providerKeyName: k}\n";

static void test_config_routes(void)
{
    char *errors = NULL;
    struct piapi_config *cfg = piapi_config_parse(yaml, strlen(yaml), "t.yaml", &errors, NULL);
    if (!cfg)
        fprintf(stderr, "\n%s\n", errors);
    CU_ASSERT_PTR_NOT_NULL_FATAL(cfg);
    const struct piapi_user *u = piapi_config_find_user(cfg, "piapi-user-u-1", 14);
    const struct piapi_user *v = piapi_config_find_user(cfg, "piapi-user-v-1", 14);
    CU_ASSERT_PTR_NOT_NULL_FATAL(u);
    CU_ASSERT_PTR_NOT_NULL_FATAL(v);
    const struct piapi_route_set *r = piapi_config_user_route(u, "cc", 2);
    CU_ASSERT_STRING_EQUAL(r->name, "ha");
    CU_ASSERT_EQUAL(r->ncandidates, 2);
    CU_ASSERT_EQUAL(r->strategy, PIAPI_STRATEGY_SPREAD);
    CU_ASSERT_STRING_EQUAL(r->candidates[0].key->name, "k2");
    r = piapi_config_user_route(u, "cx", 2);
    CU_ASSERT_EQUAL(r->ncandidates, 1);
    CU_ASSERT_STRING_EQUAL(r->candidates[0].provider->name, "b");
    r = piapi_config_user_route(u, "c", 1);   /* a prefix is not a type */
    CU_ASSERT_PTR_EQUAL(r, &u->default_route);
    r = piapi_config_user_route(v, "cc", 2);  /* the flat format */
    CU_ASSERT_PTR_EQUAL(r, &v->default_route);
    CU_ASSERT_STRING_EQUAL(r->candidates[0].provider->name, "a");
    CU_ASSERT_STRING_EQUAL(r->candidates[0].key->name, "k");
    CU_ASSERT(piapi_config_names_candidate(cfg, "a", "k2"));
    CU_ASSERT(!piapi_config_names_candidate(cfg, "b", "k2"));

    /* a reload that no longer names a cooling candidate forgets it */
    piapi_routes_reset();
    struct piapi_route_set two = route(PIAPI_STRATEGY_FAILOVER, 2);
    piapi_routes_failed("a", "k2", -1, 100);
    piapi_routes_failed("a", "gone", -1, 100);
    piapi_routes_forget_absent(cfg);
    cands[0].key = &(struct piapi_provider_key){ .name = "gone", .value = "x" };
    CU_ASSERT_EQUAL(piapi_routes_pick(&two, 0, 1, 101), 0);   /* forgotten: healthy */
    cands[0].key = &(struct piapi_provider_key){ .name = "k2", .value = "x" };
    CU_ASSERT_EQUAL(piapi_routes_pick(&two, 0, 1, 101), 1);   /* kept: cooling */
    piapi_routes_reset();
    piapi_config_release(cfg);
    free(errors);
}

static const struct unit_case cases[] = {
    { "failover order, cooling, soonest", test_failover_order },
    { "backoff and reset", test_backoff },
    { "Retry-After", test_retry_after },
    { "spread", test_spread },
    { "shared state: adopt and heal", test_sync },
    { "config routes", test_config_routes },
    { NULL, NULL }
};

UNIT_MAIN("routes", cases)
