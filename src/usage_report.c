/* piapi usage: one GROUP BY over the ledger's requests table (ledger.c owns
 * the schema), in a single read transaction on a read-only connection, so
 * the numbers are one consistent snapshot even while piapi commits. Sums
 * are exact integers; unpriced rows add 0 to the cost and are counted. */
#include "piapi/usage_report.h"

#include <errno.h>
#include <float.h>
#include <inttypes.h>
#include <sqlite3.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "ledger_int.h"
#include "piapi/json.h"
#include "piapi/util.h"

#define BUSY_TIMEOUT_MS 5000
#define DAY_S 86400.0

/* --by NAME: what to group by. */
static const struct grouping {
    const char *name;
    const char *expr;
} groupings[] = {
    { "user", "user" },
    { "model", "model" },
    { "service", "service_type" },
    { "day", "strftime('%Y-%m-%d', ts, 'unixepoch')" },
};

struct opts {
    const struct grouping *by;
    const char *since, *until;      /* as given, for the JSON */
    double from, to;                /* ts >= from AND ts < to */
    int json;
};

struct sums {
    struct piapi_usage_totals t;
    uint64_t incomplete, unpriced;
};

struct group {
    char *name;
    struct sums s;
};

struct report {
    struct group *groups;
    size_t n, cap;
    struct sums total;
};

static const char usage_text[] =
    "usage: piapi usage --config FILE [--since YYYY-MM-DD] [--until YYYY-MM-DD]\n"
    "                   [--by user|model|service|day] [--json]\n"
    "Requests, token counts and cost from the usage ledger (settings.usageDb),\n"
    "per group (default: per member) and in total. Days are UTC; --since and\n"
    "--until are inclusive. Unpriced requests count 0 cost.\n";

/* ---- arguments -------------------------------------------------------------- */

/* Strict YYYY-MM-DD of a real day → its first second (UTC). */
static int parse_day(const char *s, double *out)
{
    static const int mdays[] = { 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31 };
    int y = 0, m = 0, d = 0;

    if (strlen(s) != 10 || s[4] != '-' || s[7] != '-')
        return -1;
    for (int i = 0; i < 10; i++) {
        if (i == 4 || i == 7)
            continue;
        if (s[i] < '0' || s[i] > '9')
            return -1;
        int v = s[i] - '0';
        if (i < 4)
            y = y * 10 + v;
        else if (i < 7)
            m = m * 10 + v;
        else
            d = d * 10 + v;
    }
    int leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    if (y < 1970 || m < 1 || m > 12 || d < 1 || d > mdays[m - 1] + (m == 2 && leap))
        return -1;
    struct tm tm = { .tm_year = y - 1900, .tm_mon = m - 1, .tm_mday = d };
    *out = (double)timegm(&tm);
    return 0;
}

/* "--name VALUE" or "--name=VALUE" at argv[*i]: 1 and *val set (advancing
 * *i past a separate value), 0 when argv[*i] is another option, -1 when
 * the value is missing. */
static int option(int argc, char **argv, int *i, const char *name, const char **val)
{
    size_t n = strlen(name);
    const char *a = argv[*i];

    if (strncmp(a, name, n) != 0)
        return 0;
    if (a[n] == '=') {
        *val = a + n + 1;
        return 1;
    }
    if (a[n] != '\0')
        return 0;
    if (*i + 1 >= argc)
        return -1;
    *val = argv[++*i];
    return 1;
}

static const struct grouping *grouping_named(const char *name)
{
    for (size_t i = 0; i < sizeof groupings / sizeof groupings[0]; i++)
        if (strcmp(groupings[i].name, name) == 0)
            return &groupings[i];
    return NULL;
}

/* 0 to report, 1 for --help, 2 on a usage error (told on err). */
static int parse_args(int argc, char **argv, struct opts *o, FILE *err)
{
    static const char *const with_value[] = { "--since", "--until", "--by", "--config", "-c" };
    const char *by = "user", *ignored;

    *o = (struct opts){ .from = -DBL_MAX, .to = DBL_MAX };
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int r = 0;
        size_t k;
        if (strcmp(a, "--json") == 0) {
            o->json = 1;
            continue;
        }
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0)
            return 1;
        for (k = 0; k < sizeof with_value / sizeof with_value[0]; k++) {
            const char **dst = k == 0 ? &o->since : k == 1 ? &o->until : k == 2 ? &by : &ignored;
            if ((r = option(argc, argv, &i, with_value[k], dst)) != 0)
                break;
        }
        if (r < 0) {
            fprintf(err, "piapi usage: %s needs a value\n", a);
            return 2;
        }
        if (r == 0) {
            fprintf(err, "piapi usage: unknown argument '%s' (see piapi usage --help)\n", a);
            return 2;
        }
    }
    if (!(o->by = grouping_named(by))) {
        fprintf(err, "piapi usage: --by '%s': use user, model, service or day\n", by);
        return 2;
    }
    if (o->since && parse_day(o->since, &o->from) != 0) {
        fprintf(err, "piapi usage: --since '%s': not a date (YYYY-MM-DD)\n", o->since);
        return 2;
    }
    if (o->until && parse_day(o->until, &o->to) != 0) {
        fprintf(err, "piapi usage: --until '%s': not a date (YYYY-MM-DD)\n", o->until);
        return 2;
    }
    if (o->until)
        o->to += DAY_S;         /* the whole last day */
    if (o->from >= o->to) {
        fprintf(err, "piapi usage: --since %s is after --until %s\n", o->since, o->until);
        return 2;
    }
    return 0;
}

/* ---- reading ---------------------------------------------------------------- */

static void sums_add(struct sums *to, const struct sums *s)
{
    piapi_usage_totals_add(&to->t, &s->t);
    to->incomplete += s->incomplete;
    to->unpriced += s->unpriced;
}

static void report_add(struct report *r, const char *name, const struct sums *s)
{
    if (r->n == r->cap) {
        r->cap = r->cap ? r->cap * 2 : 16;
        r->groups = piapi_xrealloc(r->groups, r->cap * sizeof *r->groups);
    }
    r->groups[r->n].name = piapi_xstrdup(name);
    r->groups[r->n].s = *s;
    r->n++;
    sums_add(&r->total, s);
}

static void report_dispose(struct report *r)
{
    for (size_t i = 0; i < r->n; i++)
        free(r->groups[i].name);
    free(r->groups);
}

static int query(sqlite3 *db, const struct opts *o, struct report *r)
{
    struct piapi_buf sql = {0};
    sqlite3_stmt *st = NULL;

    piapi_buf_printf(&sql,
        "SELECT %s, " LEDGER_SUM_COLUMNS ", SUM(complete = 0), SUM(cost_usd IS NULL)"
        " FROM requests WHERE ts >= ?1 AND ts < ?2 GROUP BY 1 ORDER BY 1", o->by->expr);
    int rc = sqlite3_prepare_v2(db, sql.data, -1, &st, NULL);
    piapi_buf_dispose(&sql);
    if (rc == SQLITE_OK)
        rc = sqlite3_bind_double(st, 1, o->from);
    if (rc == SQLITE_OK)
        rc = sqlite3_bind_double(st, 2, o->to);
    while (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        struct sums s = {
            .incomplete = (uint64_t)sqlite3_column_int64(st, 8),
            .unpriced = (uint64_t)sqlite3_column_int64(st, 9),
        };
        ledger_read_totals(st, 1, &s.t);
        const char *name = (const char *)sqlite3_column_text(st, 0);
        report_add(r, name ? name : "", &s);
        rc = SQLITE_OK;
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? 0 : -1;
}

/* 0 with the report filled, or 1 (told on err). A database without the
 * schema yet (created, nothing written) has no rows. */
static int read_ledger(const char *path, const struct opts *o, struct report *r, FILE *err)
{
    sqlite3 *db = NULL;
    int version = 0, rc;

    if (!path) {
        fprintf(err, "piapi usage: no usage database configured (settings.usageDb)\n");
        return 1;
    }
    if (access(path, F_OK) != 0) {
        fprintf(err, "piapi usage: %s: %s (settings.usageDb; piapi creates it at start)\n",
                path, strerror(errno));
        return 1;
    }
    if (piapi_ledger_check_path(path) != 0) {
        fprintf(err, "piapi usage: %s: %s (settings.usageDb)\n", path,
                errno == EINVAL ? "not a regular file" : strerror(errno));
        return 1;
    }
    rc = sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_busy_timeout(db, BUSY_TIMEOUT_MS);
        sqlite3_stmt *st = NULL;
        rc = sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &st, NULL);
        if (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW) {
            version = sqlite3_column_int(st, 0);
            rc = SQLITE_OK;
        }
        sqlite3_finalize(st);
    }
    if (rc == SQLITE_OK && version > PIAPI_LEDGER_SCHEMA) {
        fprintf(err, "piapi usage: %s: ledger schema version %d is newer than this piapi's (%d)\n",
                path, version, PIAPI_LEDGER_SCHEMA);
        sqlite3_close(db);
        return 1;
    }
    if (rc == SQLITE_OK && version > 0 && query(db, o, r) != 0)
        rc = SQLITE_ERROR;
    if (rc != SQLITE_OK)
        fprintf(err, "piapi usage: %s: %s\n", path, db ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
    sqlite3_close(db);
    return rc == SQLITE_OK ? 0 : 1;
}

/* ---- the table ---------------------------------------------------------------- */

#define NCOLS 9

/* Characters on a terminal, roughly: UTF-8 continuation bytes take none. */
static size_t text_width(const char *s)
{
    size_t w = 0;
    for (; *s; s++)
        w += ((unsigned char)*s & 0xc0) != 0x80;
    return w;
}

/* A group name from the ledger as one table cell: no control characters
 * (a name could otherwise move the cursor), "(none)" for empty. */
static char *cell_name(const char *name)
{
    char *c = piapi_xstrdup(*name ? name : "(none)");
    for (char *p = c; *p; p++)
        if ((unsigned char)*p < 0x20 || *p == 0x7f)
            *p = '?';
    return c;
}

static void cell_numbers(char cells[][32], const struct sums *s)
{
    snprintf(cells[1], 32, "%" PRIu64, s->t.requests);
    snprintf(cells[2], 32, "%" PRId64, s->t.input);
    snprintf(cells[3], 32, "%" PRId64, s->t.output);
    snprintf(cells[4], 32, "%" PRId64, s->t.cache_read);
    snprintf(cells[5], 32, "%" PRId64, s->t.cache_write);
    snprintf(cells[6], 32, "%" PRId64, s->t.cache_write_1h);
    snprintf(cells[7], 32, "%.6f", s->t.cost_usd);
    snprintf(cells[8], 32, "%" PRIu64, s->incomplete);
}

/* Name left-aligned, numbers right-aligned, two spaces between columns. */
static void print_line(FILE *out, const char *name, char cells[][32], const size_t *w)
{
    fprintf(out, "%s%*s", name, (int)(w[0] - text_width(name)), "");
    for (int c = 1; c < NCOLS; c++)
        fprintf(out, "  %*s", (int)w[c], cells[c]);
    fputc('\n', out);
}

static void widen(size_t *w, const char *name, char cells[][32])
{
    if (text_width(name) > w[0])
        w[0] = text_width(name);
    for (int c = 1; c < NCOLS; c++)
        if (strlen(cells[c]) > w[c])
            w[c] = strlen(cells[c]);
}

static void print_table(FILE *out, const struct opts *o, const struct report *r)
{
    static const char *const heads[NCOLS] = {
        NULL, "requests", "input", "output", "cache_read", "cache_write",
        "cache_write_1h", "cost_usd", "incomplete",
    };
    char head[NCOLS][32], total[NCOLS][32];
    char (*cells)[NCOLS][32] = piapi_xcalloc(r->n ? r->n : 1, sizeof *cells);
    char **names = piapi_xcalloc(r->n ? r->n : 1, sizeof *names);
    size_t w[NCOLS] = {0};

    for (int c = 1; c < NCOLS; c++)
        snprintf(head[c], 32, "%s", heads[c]);
    widen(w, o->by->name, head);
    cell_numbers(total, &r->total);
    widen(w, "TOTAL", total);
    for (size_t i = 0; i < r->n; i++) {
        names[i] = cell_name(r->groups[i].name);
        cell_numbers(cells[i], &r->groups[i].s);
        widen(w, names[i], cells[i]);
    }

    print_line(out, o->by->name, head, w);
    for (size_t i = 0; i < r->n; i++)
        print_line(out, names[i], cells[i], w);
    print_line(out, "TOTAL", total, w);
    if (r->total.unpriced)
        fprintf(out, "(%" PRIu64 " of these requests had no known price: counted as 0 cost)\n",
                r->total.unpriced);
    for (size_t i = 0; i < r->n; i++)
        free(names[i]);
    free(names);
    free(cells);
}

/* ---- JSON ----------------------------------------------------------------- */

static void json_sums(struct piapi_buf *b, const struct sums *s)
{
    piapi_buf_printf(b,
        "\"requests\":%" PRIu64 ",\"input\":%" PRId64 ",\"output\":%" PRId64
        ",\"cache_read\":%" PRId64 ",\"cache_write\":%" PRId64 ",\"cache_write_1h\":%" PRId64
        ",\"cost_usd\":%.6f,\"incomplete\":%" PRIu64 ",\"unpriced\":%" PRIu64,
        s->t.requests, s->t.input, s->t.output, s->t.cache_read, s->t.cache_write, s->t.cache_write_1h,
        s->t.cost_usd, s->incomplete, s->unpriced);
}

static void json_day(struct piapi_buf *b, const char *day)
{
    if (day)
        piapi_json_string(b, day, strlen(day));
    else
        piapi_buf_puts(b, "null");
}

static void print_json(FILE *out, const struct opts *o, const struct report *r)
{
    struct piapi_buf b = {0};

    piapi_buf_printf(&b, "{\"by\":\"%s\",\"since\":", o->by->name);
    json_day(&b, o->since);
    piapi_buf_puts(&b, ",\"until\":");
    json_day(&b, o->until);
    piapi_buf_puts(&b, ",\"groups\":[");
    for (size_t i = 0; i < r->n; i++) {
        piapi_buf_puts(&b, i ? ",{\"group\":" : "{\"group\":");
        piapi_json_string(&b, r->groups[i].name, strlen(r->groups[i].name));
        piapi_buf_putc(&b, ',');
        json_sums(&b, &r->groups[i].s);
        piapi_buf_putc(&b, '}');
    }
    piapi_buf_puts(&b, "],\"total\":{");
    json_sums(&b, &r->total);
    piapi_buf_puts(&b, "}}\n");
    fwrite(b.data, 1, b.len, out);
    piapi_buf_dispose(&b);
}

int piapi_usage_report(const char *db_path, int argc, char **argv, FILE *out, FILE *err)
{
    struct opts o;
    struct report r = {0};
    int rc = parse_args(argc, argv, &o, err);

    if (rc == 1) {
        fputs(usage_text, out);
        return 0;
    }
    if (rc != 0)
        return rc;
    rc = read_ledger(db_path, &o, &r, err);
    if (rc == 0) {
        if (o.json)
            print_json(out, &o, &r);
        else
            print_table(out, &o, &r);
        if (fflush(out) != 0)
            rc = 1;
    }
    report_dispose(&r);
    return rc;
}
