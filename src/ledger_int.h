/* Private to the ledger's two readers: ledger.c (the start-up sums) and
 * usage_report.c (piapi usage). */
#ifndef PIAPI_LEDGER_INT_H
#define PIAPI_LEDGER_INT_H

#include <sqlite3.h>

#include "piapi/ledger.h"

/* The sum columns every totals query selects, in this order, from column
 * `col` on: COUNT(*), SUM(input), SUM(output), SUM(cache_read),
 * SUM(cache_write), SUM(cache_write_1h), TOTAL(cost_usd). */
#define LEDGER_SUM_COLUMNS                                                   \
    "COUNT(*), SUM(input), SUM(output), SUM(cache_read), SUM(cache_write),"  \
    " SUM(cache_write_1h), TOTAL(cost_usd)"

void ledger_read_totals(sqlite3_stmt *st, int col, struct piapi_usage_totals *t);

#endif
