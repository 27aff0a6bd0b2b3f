/* A Redis connection for shared limit state (settings.redis), driven by
 * hiredis's async API on piapi's own event loop: the loop never blocks on
 * Redis, and a request waiting for a reply holds no thread.
 *
 * Everything here runs on the event loop's thread, except the counters
 * and the state for /healthz and /metrics, which any thread may read. The
 * connection follows the live config: piapi_redis_want(url) (at each
 * admission) connects, reconnects after a failure with a backoff (100 ms
 * doubling to 5 s), or disconnects when the URL went away. It is up once
 * Redis answered its SELECT. A call is answered within
 * PIAPI_REDIS_DEADLINE_MS or counted as an error and handed NULL (the
 * caller then falls back to its local state), and the connection is
 * dropped like a lost one. A script Redis no longer has (NOSCRIPT) is
 * sent again as EVAL, once. */
#ifndef PIAPI_REDIS_H
#define PIAPI_REDIS_H

#include <stddef.h>
#include <stdint.h>

#define PIAPI_REDIS_DEADLINE_MS 50
/* Arguments of a script call, at most. */
#define PIAPI_REDIS_ARGS_MAX 48

/* hiredis's reply, seen through the few fields a script's answer needs. */
struct redisReply;

/* reply: the script's answer (an array of integers), or NULL when Redis
 * was unreachable, slow or answered an error (counted). Runs once, on the
 * loop, possibly before piapi_redis_eval returns. */
typedef void (*piapi_redis_done)(void *arg, const struct redisReply *reply);

/* The URL the config names now (NULL: none). 1 when a connection is up
 * and calls may be made. */
int piapi_redis_want(const char *url);

/* EVALSHA (EVAL the first time on a connection) of `script`, a string
 * with static storage, with nkeys of the argc arguments as its keys. */
void piapi_redis_eval(const char *script, int nkeys, int argc, const char **argv,
                      piapi_redis_done done, void *arg);

/* A plain command (no script), answered as piapi_redis_eval's calls. */
void piapi_redis_command(int argc, const char **argv, piapi_redis_done done, void *arg);

/* Writes the commands buffered so far now, not at the round's end (for
 * a round-end hook that may run after redis's own). */
void piapi_redis_flush(void);

/* Fire and forget (a lease's release): no answer awaited. 0 when sent,
 * -1 when not (no connection). */
int piapi_redis_eval_nowait(const char *script, int nkeys, int argc, const char **argv);

/* Fire and forget, a plain command (no script, so nothing to send again
 * after a flush): 0 when sent, -1 when not (no connection). An error
 * answer is counted. */
int piapi_redis_command_nowait(int argc, const char **argv);

/* Any thread: the reply's integer at index i of an array, or `dflt`; its
 * string there (not NUL-terminated: *len), or NULL; its element count. */
long long piapi_redis_int(const struct redisReply *r, size_t i, long long dflt);
const char *piapi_redis_str(const struct redisReply *r, size_t i, size_t *len);
size_t piapi_redis_count(const struct redisReply *r);

/* Any thread: errors so far (piapi_redis_errors_total), and whether a
 * Redis is configured and whether it is up (for /healthz). */
uint64_t piapi_redis_errors(void);
void piapi_redis_state(int *configured, int *up);

/* On the loop: which connection is up (a new number after a reconnect,
 * when Redis may have lost what it held). */
uint64_t piapi_redis_connection(void);

/* On the loop, at shutdown: closes the connection. */
void piapi_redis_stop(void);

#endif
