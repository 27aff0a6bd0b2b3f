/* Each member's usage so far this UTC day and this UTC month, in memory:
 * what GET /usage answers from (and what budgets will be checked
 * against). Restored from the usage ledger at start-up, added to as
 * each request ends; any thread may call. */
#ifndef PIAPI_TALLY_H
#define PIAPI_TALLY_H

#include "piapi/ledger.h"

/* Adds one request's usage, at `now` (unix seconds), to user's day and
 * month; a new day or month starts from zero. */
void piapi_tally_add(const char *user, double now, const struct piapi_usage_totals *one);
/* The totals of the day and the month that hold `now`. */
void piapi_tally_get(const char *user, double now, struct piapi_usage_totals *day,
                     struct piapi_usage_totals *month);
/* Replaces user's totals for the period `now` is in (at start-up, from the
 * ledger). */
void piapi_tally_restore(const char *user, double now, const struct piapi_usage_totals *day,
                         const struct piapi_usage_totals *month);
/* The UTC midnight that starts now's day, and the first of its month. */
double piapi_tally_day_start(double now);
double piapi_tally_month_start(double now);
/* Forgets everything (tests, shutdown). */
void piapi_tally_reset(void);

#endif
