/* Which candidate of a route an attempt goes to, and each candidate's
 * health: a (provider, key) that failed is skipped for a while (its
 * Retry-After, else 10 s doubling per consecutive failure up to 5 min);
 * one success makes it healthy again. The state is this process's, kept
 * by names so that it survives a reload that keeps the candidate.
 *
 * With settings.redis the state is shared across instances by
 * routes_share.h, through the last group of functions below. */
#ifndef PIAPI_ROUTES_H
#define PIAPI_ROUTES_H

#include <stddef.h>
#include <stdint.h>

#include "piapi/config.h"

/* Retry-After is believed up to this long. */
#define PIAPI_ROUTES_RETRY_AFTER_MAX_S 600.0

/* The candidate of r for the next attempt of a request that already tried
 * those in `tried` (bit i: candidate i), at monotonic time `now`; -1 when
 * none is left. A cooling candidate is skipped, except on the first
 * attempt when every candidate cools: then the one whose cooldown ends
 * first. `session` picks the candidate of a spread route. */
int piapi_routes_pick(const struct piapi_route_set *r, uint32_t tried, uint64_t session,
                      double now);
/* A candidate failed at `now`; retry_after_s < 0: the upstream gave none. */
void piapi_routes_failed(const char *provider, const char *key, double retry_after_s,
                         double now);
/* 1 when the candidate was failing until now. */
int piapi_routes_succeeded(const char *provider, const char *key);
/* After a reload: forgets candidates cfg no longer names. */
void piapi_routes_forget_absent(const struct piapi_config *cfg);
/* A Retry-After value (delay-seconds or an HTTP date) in seconds from
 * now, capped; -1 when it is neither. */
double piapi_routes_parse_retry_after(const char *v, size_t len, double now_real);
/* Forgets every candidate's state (tests, exit). */
void piapi_routes_reset(void);

/* ---- the shared state's side (routes_share.c) ---- */

/* 1 when the candidate is failing, with its cooldown's end (monotonic)
 * and its consecutive failures. */
int piapi_routes_health(const char *provider, const char *key, double *until,
                        unsigned *fails);
/* Its failure went to the shared state after `epoch` reads of it were
 * asked for: a later read that lacks it means a success elsewhere. */
void piapi_routes_published(const char *provider, const char *key, uint64_t epoch);

/* A failing candidate as the shared state holds it. */
struct piapi_routes_remote {
    const char *provider, *key;
    double until;      /* monotonic */
    unsigned fails;
};
/* The epoch-th read of the shared state, every failing candidate in it:
 * each one's later cooldown end and larger failure count are adopted; a
 * candidate failing here, whose failure the read should show but does
 * not, succeeded elsewhere and is healthy again. */
void piapi_routes_sync(const struct piapi_routes_remote *r, size_t n, uint64_t epoch);

#endif
