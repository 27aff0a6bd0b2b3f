/* Candidate choice and cooldowns (routes.h). The state is a small table
 * of the candidates that failed at least once, by name, under one mutex;
 * while none is failing (the common case) a pick takes no lock. */
#include "piapi/routes.h"

#include <curl/curl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "piapi/metrics.h"
#include "piapi/util.h"

#define BASE_COOLDOWN_S 10.0
#define MAX_COOLDOWN_S 300.0

/* mark: the shared state's read after which a read that lacks this
 * failure means a success elsewhere (routes_share.c); LOCAL_ONLY while
 * the failure is this instance's alone (not in Redis). */
#define LOCAL_ONLY UINT64_MAX

struct health {
    char *provider, *key;
    double until;      /* monotonic; skipped before this */
    unsigned fails;    /* consecutive */
    uint64_t mark;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct health *tab;           /* under lock */
static size_t ntab, captab;          /* under lock */
static atomic_size_t nfailing;       /* entries with fails > 0 */

static struct health *find(const char *provider, const char *key)
{
    for (size_t i = 0; i < ntab; i++)
        if (!strcmp(tab[i].provider, provider) && !strcmp(tab[i].key, key))
            return &tab[i];
    return NULL;
}

/* When candidate c may be tried again; 0: healthy. Under lock. */
static double cooling_until(const struct piapi_candidate *c)
{
    const struct health *h = find(c->provider->name, c->key->name);
    return h ? h->until : 0;
}

/* Rendezvous hashing: a session keeps its candidate while that one stays
 * healthy, whatever happens to the others. */
static uint64_t weight(uint64_t session, const struct piapi_candidate *c)
{
    uint64_t h = session ^ piapi_hash(c->provider->name, strlen(c->provider->name));
    h = (h ^ piapi_hash(c->key->name, strlen(c->key->name))) * 0x9e3779b97f4a7c15ULL;
    return h ^ (h >> 29);
}

int piapi_routes_pick(const struct piapi_route_set *r, uint32_t tried, uint64_t session,
                      double now)
{
    double until[PIAPI_ROUTE_MAX_CANDIDATES] = {0};
    size_t n = r->ncandidates < PIAPI_ROUTE_MAX_CANDIDATES ? r->ncandidates
                                                             : PIAPI_ROUTE_MAX_CANDIDATES;
    if (atomic_load_explicit(&nfailing, memory_order_acquire)) {
        pthread_mutex_lock(&lock);
        for (size_t i = 0; i < n; i++)
            until[i] = cooling_until(&r->candidates[i]);
        pthread_mutex_unlock(&lock);
    }
    int best = -1, soonest = -1;
    uint64_t best_w = 0;
    for (size_t i = 0; i < n; i++) {
        if (tried & (1u << i))
            continue;
        if (until[i] > now) {
            if (soonest < 0 || until[i] < until[soonest])
                soonest = (int)i;
            continue;
        }
        if (r->strategy == PIAPI_STRATEGY_FAILOVER)
            return (int)i;
        uint64_t w = weight(session, &r->candidates[i]);
        if (best < 0 || w > best_w)
            best = (int)i, best_w = w;
    }
    if (best >= 0)
        return best;
    return tried ? -1 : soonest;
}

static void emit_all(void (*emit)(void *ud, const char *provider, const char *key,
                                  int cooling), void *ud)
{
    double now = piapi_now_mono();
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < ntab; i++)
        emit(ud, tab[i].provider, tab[i].key, tab[i].until > now);
    pthread_mutex_unlock(&lock);
}

/* Under lock: the entry of (provider, key), made healthy when new. */
static struct health *entry(const char *provider, const char *key)
{
    struct health *h = find(provider, key);
    if (h)
        return h;
    if (ntab == captab) {
        captab = captab ? 2 * captab : 8;
        tab = piapi_xrealloc(tab, captab * sizeof *tab);
    }
    h = &tab[ntab++];
    *h = (struct health){ piapi_xstrdup(provider), piapi_xstrdup(key), 0, 0, LOCAL_ONLY };
    return h;
}

/* Under lock. */
static void set_fails(struct health *h, unsigned fails)
{
    if (!h->fails && fails)
        atomic_fetch_add_explicit(&nfailing, 1, memory_order_release);
    else if (h->fails && !fails)
        atomic_fetch_sub_explicit(&nfailing, 1, memory_order_release);
    h->fails = fails;
}

void piapi_routes_failed(const char *provider, const char *key, double retry_after_s,
                         double now)
{
    piapi_metrics_set_cooling_probe(emit_all);
    pthread_mutex_lock(&lock);
    struct health *h = entry(provider, key);
    if (h->fails + 1 != 0)  /* a count adopted at its top must not wrap to 0 */
        set_fails(h, h->fails + 1);
    h->mark = LOCAL_ONLY;
    double d = retry_after_s;
    if (d < 0) {
        d = BASE_COOLDOWN_S;
        for (unsigned i = 1; i < h->fails && d < MAX_COOLDOWN_S; i++)
            d *= 2;
        if (d > MAX_COOLDOWN_S)
            d = MAX_COOLDOWN_S;
    } else if (d > PIAPI_ROUTES_RETRY_AFTER_MAX_S) {
        d = PIAPI_ROUTES_RETRY_AFTER_MAX_S;
    }
    h->until = now + d;
    pthread_mutex_unlock(&lock);
}

int piapi_routes_succeeded(const char *provider, const char *key)
{
    int was = 0;
    if (!atomic_load_explicit(&nfailing, memory_order_acquire))
        return 0;
    pthread_mutex_lock(&lock);
    struct health *h = find(provider, key);
    if (h && h->fails) {
        set_fails(h, 0);
        h->until = 0;
        was = 1;
    }
    pthread_mutex_unlock(&lock);
    return was;
}

int piapi_routes_health(const char *provider, const char *key, double *until,
                        unsigned *fails)
{
    pthread_mutex_lock(&lock);
    const struct health *h = find(provider, key);
    int failing = h && h->fails;
    if (failing)
        *until = h->until, *fails = h->fails;
    pthread_mutex_unlock(&lock);
    return failing;
}

void piapi_routes_published(const char *provider, const char *key, uint64_t epoch)
{
    pthread_mutex_lock(&lock);
    struct health *h = find(provider, key);
    if (h && h->fails)
        h->mark = epoch;
    pthread_mutex_unlock(&lock);
}

static int listed(const struct health *h, const struct piapi_routes_remote *r, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!strcmp(r[i].provider, h->provider) && !strcmp(r[i].key, h->key))
            return 1;
    return 0;
}

void piapi_routes_sync(const struct piapi_routes_remote *r, size_t n, uint64_t epoch)
{
    if (n)
        piapi_metrics_set_cooling_probe(emit_all);
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < ntab; i++)
        if (tab[i].fails && tab[i].mark < epoch && !listed(&tab[i], r, n)) {
            set_fails(&tab[i], 0);  /* healed elsewhere */
            tab[i].until = 0;
        }
    for (size_t i = 0; i < n; i++) {
        if (!r[i].fails)
            continue;
        struct health *h = entry(r[i].provider, r[i].key);
        if (r[i].until > h->until)
            h->until = r[i].until;
        if (r[i].fails > h->fails)
            set_fails(h, r[i].fails);
        if (h->mark == LOCAL_ONLY || h->mark < epoch)
            h->mark = h->mark == LOCAL_ONLY && h->fails > r[i].fails ? LOCAL_ONLY : epoch;
    }
    pthread_mutex_unlock(&lock);
}

static void drop(size_t i)
{
    set_fails(&tab[i], 0);
    free(tab[i].provider);
    free(tab[i].key);
    tab[i] = tab[--ntab];
}

void piapi_routes_forget_absent(const struct piapi_config *cfg)
{
    pthread_mutex_lock(&lock);
    for (size_t i = ntab; i-- > 0;)
        if (!piapi_config_names_candidate(cfg, tab[i].provider, tab[i].key))
            drop(i);
    pthread_mutex_unlock(&lock);
}

void piapi_routes_reset(void)
{
    pthread_mutex_lock(&lock);
    while (ntab)
        drop(ntab - 1);
    free(tab);
    tab = NULL;
    captab = 0;
    pthread_mutex_unlock(&lock);
}

double piapi_routes_parse_retry_after(const char *v, size_t len, double now_real)
{
    const double cap = PIAPI_ROUTES_RETRY_AFTER_MAX_S;
    char buf[64];
    if (!len)
        return -1;
    if (v[0] >= '0' && v[0] <= '9') {
        /* delay-seconds, however many digits: a number too long for any
         * integer type still asks for a long wait, which is the cap. */
        double d = 0;
        for (size_t i = 0; i < len; i++) {
            if (v[i] < '0' || v[i] > '9')
                return -1;
            if (d < cap)
                d = d * 10 + (v[i] - '0');
        }
        return d > cap ? cap : d;
    }
    if (len >= sizeof buf)
        return -1;
    memcpy(buf, v, len);
    buf[len] = '\0';
    time_t t = curl_getdate(buf, NULL);
    if (t < 0)
        return -1;
    double d = (double)t - now_real;
    if (d < 0)
        d = 0;
    return d > cap ? cap : d;
}
