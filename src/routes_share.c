/* Shared cooldowns (routes_share.h): a read of piapi:cooling every half
 * second, a script that merges a failure in, an HDEL for a success.
 *
 * Whether a read that lacks a candidate means it succeeded elsewhere
 * hangs on order: Redis answers one connection's calls in the order they
 * were sent, so a read asked for after a failure was written shows that
 * failure unless something deleted it since. routes.c marks each failure
 * with the number of reads asked for when it was written (epochs), once
 * Redis took the write. */
#include "piapi/routes_share.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "piapi/config.h"
#include "piapi/ev.h"
#include "piapi/loop.h"
#include "piapi/redis.h"
#include "piapi/routes.h"
#include "piapi/util.h"

#define KEY "piapi:cooling"
/* Failing candidates a read adopts, at most; a name past NAME_MAX is
 * none of the config's. */
#define REMOTE_MAX 64
#define NAME_MAX 256
/* The hash goes a day after its last failure: a team that dropped a
 * provider leaves nothing behind for long. */
#define KEEP_MS "86400000"
/* The latest cooldown end adopted: piapi's own longest (a Retry-After's
 * cap), with a minute for clocks apart. */
#define UNTIL_MAX_S (PIAPI_ROUTES_RETRY_AFTER_MAX_S + 60.0)

/* ARGV: field, cooldown end (unix ms), consecutive failures. */
static const char COOL_LUA[] =
    "local u, f = tonumber(ARGV[2]), tonumber(ARGV[3])\n"
    "local v = redis.call('HGET', KEYS[1], ARGV[1])\n"
    "if v then\n"
    "  local ou, of = string.match(v, '^(%d+) (%d+)$')\n"
    "  if ou then u = math.max(u, tonumber(ou)); f = math.max(f, tonumber(of)) end\n"
    "end\n"
    "redis.call('HSET', KEYS[1], ARGV[1], string.format('%.0f %d', u, f))\n"
    "redis.call('PEXPIRE', KEYS[1], ARGV[4])\n"
    "return 0\n";

static struct {
    struct piapi_ev_timer poll;
    uint64_t epoch;        /* reads asked for so far */
    int running;
} st;

/* "<provider>\t<key>": a tab is in no name (names are printable). */
static int field_of(char *out, size_t n, const char *provider, const char *key)
{
    int len = snprintf(out, n, "%s\t%s", provider, key);
    return len > 0 && (size_t)len < n ? 0 : -1;
}

/* Whether the connection is up, whichever Redis the live config names: a
 * request that began before a reload names the Redis of its time, and
 * asking for that one (piapi_redis_want) would drop the live one. */
static int shared(const char *redis)
{
    int configured, up;
    if (!redis || !piapi_loop_on_thread())
        return 0;
    piapi_redis_state(&configured, &up);
    return up;
}

/* A failure's write in flight: which candidate, and the reads asked for
 * before it went. */
struct sent {
    uint64_t epoch;
    char *key;       /* into names */
    char names[];    /* provider, NUL, key, NUL */
};

/* Only a write Redis took marks the failure shared: one it refused (a
 * full Redis, a key of another type) leaves the cooldown this
 * instance's, or the next read, lacking it, would end it. */
static void on_written(void *arg, const struct redisReply *reply)
{
    struct sent *s = arg;
    if (reply)
        piapi_routes_published(s->names, s->key, s->epoch);
    free(s);
}

void piapi_routes_share_failed(const char *redis, const char *provider, const char *key)
{
    char field[2 * NAME_MAX + 2], until_ms[32], fails_s[16];
    double until;
    unsigned fails;
    if (!shared(redis) || field_of(field, sizeof field, provider, key) != 0 ||
        !piapi_routes_health(provider, key, &until, &fails))
        return;
    snprintf(until_ms, sizeof until_ms, "%.0f",
             (piapi_now_real() + until - piapi_now_mono()) * 1000.0);
    snprintf(fails_s, sizeof fails_s, "%u", fails);
    size_t plen = strlen(provider), klen = strlen(key);
    struct sent *s = piapi_xmalloc(sizeof *s + plen + klen + 2);
    s->epoch = st.epoch;
    memcpy(s->names, provider, plen + 1);
    s->key = s->names + plen + 1;
    memcpy(s->key, key, klen + 1);
    const char *argv[] = { KEY, field, until_ms, fails_s, KEEP_MS };
    piapi_redis_eval(COOL_LUA, 1, 5, argv, on_written, s);
}

void piapi_routes_share_succeeded(const char *redis, const char *provider, const char *key)
{
    char field[2 * NAME_MAX + 2];
    if (!shared(redis) || field_of(field, sizeof field, provider, key) != 0)
        return;
    const char *argv[] = { "HDEL", KEY, field };
    piapi_redis_command_nowait(3, argv);
}

/* A decimal number of at most max, digits only (sscanf would take a
 * sign, blanks, a wrap); its end in *end. */
static int number(const char *s, const char **end, unsigned long long max,
                  unsigned long long *out)
{
    unsigned long long v = 0;
    const char *p = s;
    for (; *p >= '0' && *p <= '9'; p++) {
        if (v > (max - (unsigned long long)(*p - '0')) / 10)
            return -1;
        v = v * 10 + (unsigned long long)(*p - '0');
    }
    if (p == s)
        return -1;
    *end = p;
    *out = v;
    return 0;
}

/* One "<provider>\t<key>" / "<until ms> <fails>" pair of the read into
 * r, names copied to names (2 * NAME_MAX bytes); 0 when the names are
 * one candidate's. A value no piapi writes (garbage, an end past piapi's
 * own longest cooldown: a clock far ahead) gives fails 0: the candidate
 * is failing somewhere, but nothing of it is adopted. */
static int parse_pair(const char *f, size_t flen, const char *v, size_t vlen,
                      char *names, struct piapi_routes_remote *r, double now_mono,
                      double now_real)
{
    char val[64];
    const char *tab = memchr(f, '\t', flen), *p;
    unsigned long long ms, fails;
    if (!tab || flen >= 2 * NAME_MAX)
        return -1;
    memcpy(names, f, flen);
    names[tab - f] = '\0';
    names[flen] = '\0';
    *r = (struct piapi_routes_remote){ .provider = names, .key = names + (tab - f) + 1 };
    if (vlen >= sizeof val)
        return 0;
    memcpy(val, v, vlen);
    val[vlen] = '\0';
    if (number(val, &p, UINT64_MAX / 2, &ms) != 0 || *p != ' ' ||
        number(p + 1, &p, (unsigned)-1, &fails) != 0 || *p)
        return 0;
    double until = now_mono + ((double)ms / 1000.0 - now_real);
    if (until > now_mono + UNTIL_MAX_S)
        return 0;
    r->until = until;
    r->fails = (unsigned)fails;
    return 0;
}

static void on_read(void *arg, const struct redisReply *reply)
{
    static char names[REMOTE_MAX][2 * NAME_MAX + 1];
    struct piapi_routes_remote r[REMOTE_MAX];
    uint64_t epoch = (uint64_t)(uintptr_t)arg;
    size_t n = 0, count = piapi_redis_count(reply), i = 0;
    if (!reply)
        return;  /* no answer: the state stays as it is */
    struct piapi_config *cfg = piapi_config_current();
    double now_mono = piapi_now_mono(), now_real = piapi_now_real();
    for (; i + 1 < count && n < REMOTE_MAX; i += 2) {
        size_t flen, vlen;
        const char *f = piapi_redis_str(reply, i, &flen);
        const char *v = piapi_redis_str(reply, i + 1, &vlen);
        if (f && v &&
            parse_pair(f, flen, v, vlen, names[n], &r[n], now_mono, now_real) == 0 &&
            cfg && piapi_config_names_candidate(cfg, r[n].provider, r[n].key))
            n++;
    }
    piapi_config_release(cfg);
    /* a read cut short at REMOTE_MAX may lack a failure it holds: then it
     * says of none that it healed elsewhere (epoch 0) */
    piapi_routes_sync(r, n, i + 1 < count ? 0 : epoch);
}

static void poll_now(struct piapi_ev_timer *t)
{
    struct piapi_config *cfg = piapi_config_current();
    const char *redis = cfg ? piapi_config_settings(cfg)->redis : NULL;
    if (redis && piapi_redis_want(redis)) {
        const char *argv[] = { "HGETALL", KEY };
        piapi_redis_command(2, argv, on_read, (void *)(uintptr_t)++st.epoch);
    }
    piapi_config_release(cfg);
    piapi_ev_timer_set(piapi_loop_ev(), t, piapi_now_mono() + PIAPI_ROUTES_SHARE_POLL_S);
}

void piapi_routes_share_start(void)
{
    if (st.running)
        return;
    st.running = 1;
    st.poll.cb = poll_now;
    piapi_ev_timer_set(piapi_loop_ev(), &st.poll, 0);
}

void piapi_routes_share_stop(void)
{
    if (!st.running)
        return;
    st.running = 0;
    piapi_ev_timer_stop(piapi_loop_ev(), &st.poll);
}
