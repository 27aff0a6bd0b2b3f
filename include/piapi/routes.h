/* Which candidate of a route an attempt goes to, and each candidate's
 * health: a (provider, key) that failed is skipped for a while (its
 * Retry-After, else 10 s doubling per consecutive failure up to 5 min);
 * one success makes it healthy again. The state is this process's, kept
 * by names so that it survives a reload that keeps the candidate.
 *
 * Seam for shared cooldowns (settings.redis): piapi_routes_failed(),
 * piapi_routes_succeeded() and the lookup behind piapi_routes_pick() are
 * the only places that read or write the state. */
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
void piapi_routes_succeeded(const char *provider, const char *key);
/* After a reload: forgets candidates cfg no longer names. */
void piapi_routes_forget_absent(const struct piapi_config *cfg);
/* A Retry-After value (delay-seconds or an HTTP date) in seconds from
 * now, capped; -1 when it is neither. */
double piapi_routes_parse_retry_after(const char *v, size_t len, double now_real);
/* Forgets every candidate's state (tests, exit). */
void piapi_routes_reset(void);

#endif
