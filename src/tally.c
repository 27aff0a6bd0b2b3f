/* Per-member day and month totals: a small open-addressing table keyed
 * by member name under one mutex. A request takes it once, at its end;
 * members are a team, not millions. */
#include "piapi/tally.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "piapi/util.h"

struct entry {
    char *user;                 /* NULL: empty slot */
    int64_t day, month;         /* which: days since the epoch, year*12+month */
    struct piapi_usage_totals today, this_month;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct entry *tab;       /* under lock */
static size_t mask, used;

static int64_t day_of(double now)
{
    return (int64_t)(now / 86400.0) - (now < 0);
}

static int64_t month_of(double now)
{
    int y, m, d;
    piapi_utc_date(now, &y, &m, &d);
    return (int64_t)y * 12 + m;
}

double piapi_tally_day_start(double now)
{
    return (double)day_of(now) * 86400.0;
}

double piapi_tally_month_start(double now)
{
    int y, m, d;
    piapi_utc_date(now, &y, &m, &d);
    return piapi_utc_midnight(y, m, 1);
}

static void grow(void)
{
    size_t cap = tab ? (mask + 1) * 2 : 64;
    struct entry *old = tab;
    size_t old_cap = tab ? mask + 1 : 0;
    tab = piapi_xcalloc(cap, sizeof *tab);
    mask = cap - 1;
    for (size_t i = 0; i < old_cap; i++) {
        if (!old[i].user)
            continue;
        size_t s = piapi_hash(old[i].user, strlen(old[i].user)) & mask;
        while (tab[s].user)
            s = (s + 1) & mask;
        tab[s] = old[i];
    }
    free(old);
}

/* The member's entry, made when new; under lock. */
static struct entry *find(const char *user)
{
    if (!tab || (used + 1) * 4 > (mask + 1) * 3)
        grow();
    size_t s = piapi_hash(user, strlen(user)) & mask;
    for (; tab[s].user; s = (s + 1) & mask)
        if (strcmp(tab[s].user, user) == 0)
            return &tab[s];
    tab[s].user = piapi_xstrdup(user);
    used++;
    return &tab[s];
}

/* A period that has passed starts again from zero. */
static void roll(struct entry *e, double now)
{
    int64_t d = day_of(now), m = month_of(now);
    if (e->day != d) {
        e->day = d;
        e->today = (struct piapi_usage_totals){0};
    }
    if (e->month != m) {
        e->month = m;
        e->this_month = (struct piapi_usage_totals){0};
    }
}

void piapi_tally_add(const char *user, double now, const struct piapi_usage_totals *one)
{
    pthread_mutex_lock(&lock);
    struct entry *e = find(user);
    roll(e, now);
    piapi_usage_totals_add(&e->today, one);
    piapi_usage_totals_add(&e->this_month, one);
    pthread_mutex_unlock(&lock);
}

void piapi_tally_get(const char *user, double now, struct piapi_usage_totals *day,
                     struct piapi_usage_totals *month)
{
    pthread_mutex_lock(&lock);
    struct entry *e = find(user);
    roll(e, now);
    *day = e->today;
    *month = e->this_month;
    pthread_mutex_unlock(&lock);
}

void piapi_tally_restore(const char *user, double now, const struct piapi_usage_totals *day,
                         const struct piapi_usage_totals *month)
{
    pthread_mutex_lock(&lock);
    struct entry *e = find(user);
    roll(e, now);
    e->today = *day;
    e->this_month = *month;
    pthread_mutex_unlock(&lock);
}

void piapi_tally_reset(void)
{
    pthread_mutex_lock(&lock);
    for (size_t i = 0; tab && i <= mask; i++)
        free(tab[i].user);
    free(tab);
    tab = NULL;
    mask = used = 0;
    pthread_mutex_unlock(&lock);
}
