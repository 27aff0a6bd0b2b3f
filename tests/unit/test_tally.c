/* tally: a member's day and month roll over at UTC midnight and the first
 * of the month; a restore replaces the period it is in; members apart. */
#include <string.h>
#include <time.h>

#include "piapi/tally.h"
#include "piapi/util.h"
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

/* The calendar arithmetic agrees with libc's gmtime_r and timegm every
 * 7 hours and 13 seconds from 1901 to 2299 (leap years, centuries, 2000,
 * before 1970), and at the last second of each day around a leap day. */
static void test_utc_calendar(void)
{
    int bad = 0;
    for (double t = -2145916800.0; t < 10413792000.0 && bad < 5; t += 7 * 3600 + 13) {
        time_t tt = (time_t)t;
        struct tm tm;
        gmtime_r(&tt, &tm);
        int y, m, d;
        piapi_utc_date(t, &y, &m, &d);
        tm.tm_hour = tm.tm_min = tm.tm_sec = 0;
        if (y != tm.tm_year + 1900 || m != tm.tm_mon + 1 || d != tm.tm_mday ||
            piapi_utc_midnight(y, m, d) != (double)timegm(&tm))
            bad++;
    }
    CU_ASSERT_EQUAL(bad, 0);
    int y, m, d;
    piapi_utc_date(951868799.0, &y, &m, &d);   /* 2000-02-29 23:59:59 */
    CU_ASSERT(y == 2000 && m == 2 && d == 29);
    piapi_utc_date(951868800.0, &y, &m, &d);
    CU_ASSERT(y == 2000 && m == 3 && d == 1);
    piapi_utc_date(-1.0, &y, &m, &d);          /* 1969-12-31 23:59:59 */
    CU_ASSERT(y == 1969 && m == 12 && d == 31);
    char buf[21];
    CU_ASSERT_EQUAL(piapi_u64_str(buf, 0), 1);
    CU_ASSERT_STRING_EQUAL(buf, "0");
    CU_ASSERT_EQUAL(piapi_u64_str(buf, UINT64_MAX), 20);
    CU_ASSERT_STRING_EQUAL(buf, "18446744073709551615");
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
    { "UTC calendar arithmetic", test_utc_calendar },
    { "day and month roll over", test_roll_over },
    { "restore and many members", test_restore },
    { NULL, NULL }
};

UNIT_MAIN("tally", tests)
