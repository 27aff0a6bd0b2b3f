/* `piapi usage`: totals from the usage ledger (ledger.h), per member,
 * model, service type or day, as an aligned table or JSON. Reads the
 * database read-only, so it works while piapi writes to it (WAL). */
#ifndef PIAPI_USAGE_REPORT_H
#define PIAPI_USAGE_REPORT_H

#include <stdio.h>

/* argv[0] is "usage"; the options:
 *   --since YYYY-MM-DD   first day counted (UTC, inclusive)
 *   --until YYYY-MM-DD   last day counted (UTC, inclusive)
 *   --by user|model|service|day   (default user)
 *   --json, --help
 * (each also as --opt=VALUE). --config FILE / -c FILE is accepted and
 * skipped: the caller read it to find db_path (settings.usageDb; NULL when
 * the config sets none).
 * Writes the report to out and problems to err. Returns the exit status:
 * 0, 1 when the database is missing or cannot be read, 2 on a usage
 * error. */
int piapi_usage_report(const char *db_path, int argc, char **argv,
                       FILE *out, FILE *err);

#endif
