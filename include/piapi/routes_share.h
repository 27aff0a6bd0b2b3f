/* Candidates' cooldowns shared across instances (settings.redis): what
 * one instance learns of a provider key (a 529, a Retry-After) keeps every
 * instance on the same Redis off it, and a success anywhere ends it.
 *
 * A failure goes to one Redis hash, piapi:cooling, field
 * "<provider>\t<key>" = "<cooldown end, unix ms> <consecutive failures>"
 * (the later end and the larger count win); a success deletes the field.
 * Each instance reads the hash every PIAPI_ROUTES_SHARE_POLL_S and adopts
 * what it shows (routes.h's piapi_routes_sync). Without Redis, or while
 * it is away, each instance keeps its own state, as without settings.redis.
 * Everything here runs on the event loop's thread. */
#ifndef PIAPI_ROUTES_SHARE_H
#define PIAPI_ROUTES_SHARE_H

#define PIAPI_ROUTES_SHARE_POLL_S 0.5

/* Starts and stops the reads (the live config says whether a Redis is
 * named, at each). */
void piapi_routes_share_start(void);
void piapi_routes_share_stop(void);

/* After piapi_routes_failed / piapi_routes_succeeded (1: it was failing),
 * with the config's settings.redis (NULL: none, nothing to share). */
void piapi_routes_share_failed(const char *redis, const char *provider, const char *key);
void piapi_routes_share_succeeded(const char *redis, const char *provider, const char *key);

#endif
