/* Cooldown input a broken or hostile provider controls: Retry-After
 * values of every odd shape, and the pick when every candidate cools. */
#include <string.h>

#include "piapi/routes.h"
#include "unit.h"

static double ra(const char *v)
{
    return piapi_routes_parse_retry_after(v, strlen(v), 1.8e9);
}

/* More digits than any integer holds still asks for a long wait: the cap,
 * not the 10 s that "no Retry-After" means. */
static void test_retry_after_overlong_number_is_the_cap(void)
{
    CU_ASSERT_DOUBLE_EQUAL(ra("99999999999999999999999"), PIAPI_ROUTES_RETRY_AFTER_MAX_S, 1e-9);
    char many[200];
    memset(many, '9', sizeof many - 1);
    many[sizeof many - 1] = '\0';
    CU_ASSERT_DOUBLE_EQUAL(ra(many), PIAPI_ROUTES_RETRY_AFTER_MAX_S, 1e-9);
    CU_ASSERT_DOUBLE_EQUAL(ra("18446744073709551616"), PIAPI_ROUTES_RETRY_AFTER_MAX_S, 1e-9);
}

static void test_retry_after_odd_shapes(void)
{
    CU_ASSERT_DOUBLE_EQUAL(ra("0"), 0, 1e-9);
    CU_ASSERT_DOUBLE_EQUAL(ra("00002"), 2, 1e-9);
    CU_ASSERT_DOUBLE_EQUAL(ra("601"), PIAPI_ROUTES_RETRY_AFTER_MAX_S, 1e-9);
    CU_ASSERT(ra("-5") < 0);
    CU_ASSERT(ra("5.5") < 0);
    CU_ASSERT(ra("5s") < 0);
    CU_ASSERT(ra("1e3") < 0);
    CU_ASSERT(ra("") < 0);
    CU_ASSERT(ra("soon") < 0);
    /* A date in the past: no wait; far in the future: the cap. */
    CU_ASSERT_DOUBLE_EQUAL(ra("Wed, 21 Oct 2015 07:28:00 GMT"), 0, 1e-9);
    CU_ASSERT_DOUBLE_EQUAL(ra("Fri, 01 Jan 2100 00:00:00 GMT"),
                           PIAPI_ROUTES_RETRY_AFTER_MAX_S, 1e-9);
}

static const struct piapi_provider_key keys[3] = { { .name = "k0" }, { .name = "k1" },
                                                   { .name = "k2" } };
static const struct piapi_provider prov = { .name = "p", .keys = keys, .nkeys = 3 };
static const struct piapi_candidate cands[3] = {
    { &prov, &keys[0] }, { &prov, &keys[1] }, { &prov, &keys[2] },
};

/* Every candidate cooling: the first attempt goes to the one whose cooldown
 * ends first; a second attempt of the same request to none. */
static void test_all_cooling_soonest_once(void)
{
    const struct piapi_route_set r = { .candidates = cands, .ncandidates = 3 };
    piapi_routes_reset();
    piapi_routes_failed("p", "k0", 600, 100);
    piapi_routes_failed("p", "k1", 35, 100);
    piapi_routes_failed("p", "k2", -1, 100);  /* 10 s */
    CU_ASSERT_EQUAL(piapi_routes_pick(&r, 0, 0, 105), 2);
    CU_ASSERT_EQUAL(piapi_routes_pick(&r, 1u << 2, 0, 105), -1);
    CU_ASSERT_EQUAL(piapi_routes_pick(&r, 0, 0, 111), 2);  /* healthy again */
    piapi_routes_succeeded("p", "k2");
    piapi_routes_failed("p", "k2", -1, 120);  /* the doubling starts over */
    CU_ASSERT_EQUAL(piapi_routes_pick(&r, 0, 0, 129), 2);
    CU_ASSERT_EQUAL(piapi_routes_pick(&r, 0, 0, 131), 2);
    piapi_routes_reset();
}

static const struct unit_case cases[] = {
    { "Retry-After: an over-long number is the cap", test_retry_after_overlong_number_is_the_cap },
    { "Retry-After: odd shapes", test_retry_after_odd_shapes },
    { "all cooling: the soonest, once", test_all_cooling_soonest_once },
    { NULL, NULL },
};

UNIT_MAIN("routes_hostile", cases)
