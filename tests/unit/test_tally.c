/* tally: a member's day and month roll over at UTC midnight and the first
 * of the month; a restore replaces the period it is in; members apart. */
#include <string.h>

#include "piapi/tally.h"
#include "unit.h"

/* 2026-03-31 23:59:30 UTC and the moments after */
#define T0 1775001570.0
#define NEXT_DAY (T0 + 60)            /* 2026-04-01 00:00:30: a new month too */
#define LATER_SAME_DAY (NEXT_DAY + 3600)
#define DAY_AFTER (NEXT_DAY + 86400)

static struct piapi_usage_totals one(int64_t out, double cost)
{
    return (struct piapi_usage_totals){ .requests = 1, .input = 10, .output = out,
                                        .cache_read = 5, .cache_write = 2,
                                        .cache_write_1h = 1, .cost_usd = cost };
}

static void test_periods_start(void)
{
    CU_ASSERT_EQUAL(piapi_tally_day_start(T0), 1774915200.0);     /* 2026-03-31 */
    CU_ASSERT_EQUAL(piapi_tally_month_start(T0), 1772323200.0);   /* 2026-03-01 */
    CU_ASSERT_EQUAL(piapi_tally_month_start(NEXT_DAY), 1775001600.0);
    CU_ASSERT_EQUAL(piapi_tally_day_start(NEXT_DAY), 1775001600.0);
}

static void test_roll_over(void)
{
    struct piapi_usage_totals d, m, o = one(7, 0.5);

    piapi_tally_reset();
    piapi_tally_add("al", T0, &o);
    piapi_tally_add("al", T0, &o);
    piapi_tally_get("al", T0, &d, &m);
    CU_ASSERT_TRUE(d.requests == 2 && d.output == 14 && d.cache_write_1h == 2 &&
                   d.cost_usd == 1.0 && m.requests == 2);
    /* midnight of the 1st: a new day and a new month */
    piapi_tally_get("al", NEXT_DAY, &d, &m);
    CU_ASSERT_TRUE(d.requests == 0 && m.requests == 0 && m.cost_usd == 0);
    piapi_tally_add("al", NEXT_DAY, &o);
    piapi_tally_add("al", DAY_AFTER, &o);
    piapi_tally_get("al", DAY_AFTER, &d, &m);
    CU_ASSERT_TRUE(d.requests == 1 && m.requests == 2 && m.output == 14);
    piapi_tally_get("bo", DAY_AFTER, &d, &m);
    CU_ASSERT_TRUE(d.requests == 0 && m.requests == 0);
    piapi_tally_reset();
}

static void test_restore(void)
{
    struct piapi_usage_totals d, m, day = one(3, 0.25), month = one(30, 2.5);

    piapi_tally_reset();
    piapi_tally_restore("al", LATER_SAME_DAY, &day, &month);
    struct piapi_usage_totals o = one(1, 0.25);
    piapi_tally_add("al", LATER_SAME_DAY, &o);
    piapi_tally_get("al", LATER_SAME_DAY, &d, &m);
    CU_ASSERT_TRUE(d.requests == 2 && d.output == 4 && d.cost_usd == 0.5);
    CU_ASSERT_TRUE(m.requests == 2 && m.output == 31 && m.cost_usd == 2.75);
    /* many members: the table grows and keeps them apart */
    char name[16];
    for (int i = 0; i < 500; i++) {
        snprintf(name, sizeof name, "m%d", i);
        piapi_tally_add(name, LATER_SAME_DAY, &o);
    }
    piapi_tally_get("m499", LATER_SAME_DAY, &d, &m);
    CU_ASSERT_EQUAL(d.requests, 1);
    piapi_tally_get("al", LATER_SAME_DAY, &d, &m);
    CU_ASSERT_EQUAL(m.requests, 2);
    piapi_tally_reset();
}

static const struct unit_case tests[] = {
    { "period starts (UTC)", test_periods_start },
    { "day and month roll over", test_roll_over },
    { "restore and many members", test_restore },
    { NULL, NULL }
};

UNIT_MAIN("tally", tests)
