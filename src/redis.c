/* The Redis connection on the event loop (redis.h): an adapter that lets
 * hiredis's async context arm piapi_ev watchers (its addRead/addWrite
 * hooks), a deadline per call, script caching by SHA, and reconnection
 * with backoff. One connection, owned by the loop's thread.
 *
 * Once connected, the commands of a loop round go out together at its
 * end, in one write, without asking epoll whether the socket is writable
 * (it nearly always is); EPOLLOUT is armed only when a write could not
 * take everything. */
#include "piapi/redis.h"

#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>

#include "piapi/ev.h"
#include "piapi/log.h"
#include "piapi/loop.h"
#include "piapi/util.h"

#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 5000
#define CONNECT_MS 1000
#define SCRIPTS_MAX 8

/* A script's SHA on the current connection ("" until SCRIPT LOAD said). */
struct script {
    const char *text;
    char sha[41];
};

struct call {
    struct piapi_ev_timer deadline;
    piapi_redis_done done;     /* NULL once answered (late or not) */
    void *arg;
    int script;                /* index, for NOSCRIPT */
    int waits;                 /* an answer is awaited (not fire and forget) */
    int resent;                /* sent again as EVAL after a NOSCRIPT */
    int nkeys, argc;
    const char *argv[PIAPI_REDIS_ARGS_MAX];  /* into text, below */
    char text[];
};

static struct {
    char *url;                 /* as configured; NULL: none */
    char host[256];
    int port, db;
    redisAsyncContext *ac;     /* NULL: not connected */
    int up;                    /* connected (its first write event came) */
    struct piapi_ev_io io;
    uint32_t want;             /* EPOLLIN | EPOLLOUT as hiredis asked */
    int flush;                 /* commands wait for the round's end */
    int flushing;              /* inside flush(): a write left some */
    struct piapi_ev_hook round_end;
    struct piapi_ev_timer flush_soon;  /* a command made after the hook ran */
    int hooked;
    struct piapi_ev_timer retry;  /* reconnect, or the connect deadline */
    unsigned backoff_ms;
    struct script scripts[SCRIPTS_MAX];
    size_t nscripts;
    atomic_uint_fast64_t errors;
    atomic_int configured, healthy;
    uint64_t connections;      /* made so far (each SELECT answered) */
} rd;

static void count_error(const char *what, const char *detail)
{
    atomic_fetch_add_explicit(&rd.errors, 1, memory_order_relaxed);
    piapi_log_msg(PIAPI_LOG_WARN, what, "error", detail ? detail : "");
}

uint64_t piapi_redis_errors(void)
{
    return atomic_load_explicit(&rd.errors, memory_order_relaxed);
}

uint64_t piapi_redis_connection(void)
{
    return rd.connections;
}

void piapi_redis_state(int *configured, int *up)
{
    *configured = atomic_load(&rd.configured);
    *up = atomic_load(&rd.healthy);
}

const char *piapi_redis_str(const struct redisReply *r, size_t i, size_t *len)
{
    if (!r || r->type != REDIS_REPLY_ARRAY || i >= r->elements ||
        r->element[i]->type != REDIS_REPLY_STRING)
        return NULL;
    *len = r->element[i]->len;
    return r->element[i]->str;
}

size_t piapi_redis_count(const struct redisReply *r)
{
    return r && r->type == REDIS_REPLY_ARRAY ? r->elements : 0;
}

long long piapi_redis_int(const struct redisReply *r, size_t i, long long dflt)
{
    if (!r || r->type != REDIS_REPLY_ARRAY || i >= r->elements ||
        r->element[i]->type != REDIS_REPLY_INTEGER)
        return dflt;
    return r->element[i]->integer;
}

/* ---- the event adapter: hiredis's hooks on piapi_ev --------------------- */

static void on_io(struct piapi_ev_io *io, uint32_t events)
{
    (void)io;
    if (!rd.ac)
        return;  /* closed earlier in this round */
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR))
        redisAsyncHandleRead(rd.ac);
    if (rd.ac && (events & EPOLLOUT))
        redisAsyncHandleWrite(rd.ac);
}

static void rearm(void)
{
    if (rd.ac && (!rd.io.in_set || rd.io.events != rd.want))
        piapi_ev_io_arm(piapi_loop_ev(), &rd.io, rd.want);
}

/* Writes what the round's commands left in hiredis's buffer. */
static void flush(void)
{
    piapi_ev_timer_stop(piapi_loop_ev(), &rd.flush_soon);
    if (!rd.flush || !rd.ac)
        return;
    rd.flush = 0;
    rd.flushing = 1;
    redisAsyncHandleWrite(rd.ac);  /* may drop the connection */
    rd.flushing = 0;
}

void piapi_redis_flush(void) { flush(); }

static void flush_hook(struct piapi_ev_hook *h) { (void)h; flush(); }
static void flush_timer(struct piapi_ev_timer *t) { (void)t; flush(); }

/* A command is buffered: before the connection is up, epoll says when it
 * can be written; after, the round's end writes it (a timer already due
 * covers a command made by a hook that runs after ours). */
static void want_write(void)
{
    if (!rd.up || rd.flushing) {
        rd.want |= EPOLLOUT;
        rearm();
        return;
    }
    rd.flush = 1;
    if (!rd.flush_soon.slot)
        piapi_ev_timer_set(piapi_loop_ev(), &rd.flush_soon, 0);
}

/* p: the context the hook is about (ev.data); one that is being freed
 * after a newer one took its place must not touch the newer one's watch. */
static int current(void *p) { return !rd.ac || p == rd.ac; }

static void add_read(void *p) { if (current(p)) { rd.want |= EPOLLIN; rearm(); } }
static void del_read(void *p) { if (current(p)) { rd.want &= ~(uint32_t)EPOLLIN; rearm(); } }
static void add_write(void *p) { if (current(p)) want_write(); }
static void del_write(void *p) { if (current(p)) { rd.want &= ~(uint32_t)EPOLLOUT; rearm(); } }

static void cleanup(void *p)
{
    if (!current(p))
        return;
    piapi_ev_io_stop(piapi_loop_ev(), &rd.io);
    rd.want = 0;
}

/* ---- connecting ----------------------------------------------------------- */

static void connect_now(void);

static void schedule_retry(void)
{
    rd.backoff_ms = rd.backoff_ms ? rd.backoff_ms * 2 : BACKOFF_MIN_MS;
    if (rd.backoff_ms > BACKOFF_MAX_MS)
        rd.backoff_ms = BACKOFF_MAX_MS;
    piapi_ev_timer_set(piapi_loop_ev(), &rd.retry, piapi_now_mono() + rd.backoff_ms / 1000.0);
}

/* The connection is gone (hiredis frees it after this callback). */
static void lost(void)
{
    rd.ac = NULL;
    rd.up = 0;
    rd.flush = 0;
    piapi_ev_timer_stop(piapi_loop_ev(), &rd.flush_soon);
    atomic_store(&rd.healthy, 0);
    for (size_t i = 0; i < rd.nscripts; i++)
        rd.scripts[i].sha[0] = '\0';
    if (rd.url)
        schedule_retry();
}

/* Closes the connection at once: every call still out is answered NULL
 * (its caller falls back), on_disconnect does not run for it, and the
 * next attempt comes after the backoff. Inside a hiredis callback the
 * context is freed when the callback returns. */
static void drop(void)
{
    redisAsyncContext *ac = rd.ac;
    rd.ac = NULL;
    rd.up = 0;
    atomic_store(&rd.healthy, 0);
    ac->onDisconnect = NULL;
    redisAsyncFree(ac);
    lost();
}

/* The TCP connection alone says little (a listener that never answers
 * accepts it too): the connection is up once SELECT is answered. */
static void on_connect(const redisAsyncContext *ac, int status)
{
    if (ac != rd.ac)
        return;
    if (status != REDIS_OK) {
        count_error("redis connection failed; limits are local until it is back",
                    ac->errstr);
        lost();
    }
}

static void on_selected(redisAsyncContext *ac, void *reply, void *priv)
{
    redisReply *r = reply;
    (void)priv;
    if (!r || ac != rd.ac)
        return;  /* the connection went meanwhile */
    if (r->type == REDIS_REPLY_ERROR) {
        /* a database this Redis does not have */
        count_error("redis SELECT failed; limits are local until it is back", r->str);
        drop();
        return;
    }
    piapi_ev_timer_stop(piapi_loop_ev(), &rd.retry);
    rd.up = 1;
    rd.connections++;
    rd.backoff_ms = 0;
    atomic_store(&rd.healthy, 1);
    piapi_log_msg(PIAPI_LOG_INFO, "redis connected; limits shared", NULL, NULL);
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    if (ac != rd.ac)
        return;
    if (status != REDIS_OK)
        count_error("redis connection lost; limits are local until it is back",
                    ac->errstr);
    lost();
}

static void on_retry(struct piapi_ev_timer *t)
{
    (void)t;
    if (rd.ac && !rd.up) {
        /* no answer to SELECT in time: give up on this attempt */
        count_error("redis connect timed out; limits are local until it is back", NULL);
        drop();
        return;
    }
    if (!rd.ac && rd.url)
        connect_now();
}

static void connect_now(void)
{
    redisAsyncContext *ac = redisAsyncConnect(rd.host, rd.port);
    if (!ac || ac->err) {
        count_error("redis connect failed; limits are local until it is back",
                    ac ? ac->errstr : "out of memory");
        if (ac)
            redisAsyncFree(ac);
        schedule_retry();
        return;
    }
    rd.ac = ac;
    rd.io = (struct piapi_ev_io){ .cb = on_io, .fd = ac->c.fd };
    rd.flush_soon.cb = flush_timer;
    if (!rd.hooked) {
        rd.round_end.fn = flush_hook;
        piapi_ev_hook_add(piapi_loop_ev(), &rd.round_end);
        rd.hooked = 1;
    }
    ac->ev.addRead = add_read;
    ac->ev.delRead = del_read;
    ac->ev.addWrite = add_write;
    ac->ev.delWrite = del_write;
    ac->ev.cleanup = cleanup;
    ac->ev.data = ac;
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    /* hiredis writes it once connected; nothing else goes first */
    redisAsyncCommand(ac, on_selected, NULL, "SELECT %d", rd.db);
    add_write(ac);
    piapi_ev_timer_set(piapi_loop_ev(), &rd.retry, piapi_now_mono() + CONNECT_MS / 1000.0);
}

/* redis://host:port/db, validated by the config already. */
static int parse_url(const char *url)
{
    const char *host = url + strlen("redis://");
    const char *colon = strchr(host, ':');
    if (strncmp(url, "redis://", 8) != 0 || !colon ||
        (size_t)(colon - host) >= sizeof rd.host)
        return -1;
    memcpy(rd.host, host, (size_t)(colon - host));
    rd.host[colon - host] = '\0';
    rd.port = atoi(colon + 1);
    const char *slash = strchr(colon, '/');
    rd.db = slash ? atoi(slash + 1) : 0;
    return 0;
}

static void disconnect(void)
{
    piapi_ev_timer_stop(piapi_loop_ev(), &rd.retry);
    free(rd.url);
    rd.url = NULL;
    atomic_store(&rd.configured, 0);
    if (rd.ac)
        drop();  /* pending calls get NULL; rd.url is gone: no retry */
    rd.ac = NULL;
    rd.up = 0;
    rd.backoff_ms = 0;
    atomic_store(&rd.healthy, 0);
}

int piapi_redis_want(const char *url)
{
    if (rd.url && url && strcmp(rd.url, url) == 0)
        return rd.up;
    if (rd.url)
        disconnect();
    if (!url || parse_url(url) != 0)
        return 0;
    rd.url = piapi_xstrdup(url);
    rd.retry.cb = on_retry;
    atomic_store(&rd.configured, 1);
    connect_now();
    return 0;
}

void piapi_redis_stop(void)
{
    if (rd.url || rd.ac)
        disconnect();
}

/* ---- calls ----------------------------------------------------------------- */

static int script_index(const char *text)
{
    for (size_t i = 0; i < rd.nscripts; i++)
        if (rd.scripts[i].text == text)
            return (int)i;
    if (rd.nscripts == SCRIPTS_MAX)
        return -1;
    rd.scripts[rd.nscripts].text = text;
    rd.scripts[rd.nscripts].sha[0] = '\0';
    return (int)rd.nscripts++;
}

static void on_loaded(redisAsyncContext *ac, void *reply, void *priv)
{
    redisReply *r = reply;
    struct script *s = priv;
    (void)ac;
    if (r && r->type == REDIS_REPLY_STRING && r->len == 40)
        memcpy(s->sha, r->str, 41);
}

static void answer(struct call *c, const redisReply *r)
{
    piapi_redis_done done = c->done;
    c->done = NULL;
    piapi_ev_timer_stop(piapi_loop_ev(), &c->deadline);
    done(c->arg, r);
}

/* Redis this slow is no help: the connection goes (every call still out
 * is answered NULL, this one too) and the next comes after the backoff,
 * so the requests meanwhile decide at once on local state instead of
 * each waiting out its deadline (a Redis that never answers would also
 * keep every call forever). */
static void on_deadline(struct piapi_ev_timer *t)
{
    struct call *c = (struct call *)t;
    count_error("redis slower than 50 ms; limits are local until it is back", NULL);
    answer(c, NULL);  /* c itself is freed by its NULL reply, at the drop */
    if (rd.ac)
        drop();
}

static int send_eval(struct call *c);

static void on_reply(redisAsyncContext *ac, void *reply, void *priv)
{
    struct call *c = priv;
    redisReply *r = reply;
    (void)ac;
    if (r && r->type == REDIS_REPLY_ERROR) {
        if (strncmp(r->str, "NOSCRIPT", 8) == 0 && c->script >= 0) {
            /* flushed (SCRIPT FLUSH, a failover): the text goes again,
             * once, whether an answer is awaited or not (a lease's
             * release must not be lost) */
            rd.scripts[c->script].sha[0] = '\0';
            if (!c->resent && rd.ac && rd.up) {
                c->resent = 1;
                if (send_eval(c) == REDIS_OK)
                    return;
            }
        }
        if (!c->waits || c->done)
            count_error(c->waits ? "redis call failed; its caller used local state"
                                 : "redis call failed", r->str);
        r = NULL;
    }
    if (c->done)
        answer(c, r);
    free(c);
}

/* "<c><v>\r\n" at p; its length. */
static size_t put_header(char *p, char c, size_t v)
{
    char digits[24];
    size_t n = 0, len = 0;
    do
        digits[n++] = (char)('0' + v % 10);
    while ((v /= 10) != 0);
    p[len++] = c;
    while (n)
        p[len++] = digits[--n];
    p[len++] = '\r';
    p[len++] = '\n';
    return len;
}

/* One command in Redis's wire format, written by hand: hiredis's own
 * formatting (a printf-like append per argument) cost more than the rest
 * of a call. Most commands fit the stack buffer. */
static int send_argv(redisCallbackFn *fn, void *priv, int argc, const char **argv)
{
    char stack[1024], *buf = stack;
    size_t lens[PIAPI_REDIS_ARGS_MAX + 3], need = 32;
    for (int i = 0; i < argc; i++) {
        lens[i] = strlen(argv[i]);
        need += lens[i] + 32;  /* "$<len>\r\n" and "\r\n" */
    }
    if (need > sizeof stack)
        buf = piapi_xmalloc(need);
    size_t n = put_header(buf, '*', (size_t)argc);
    for (int i = 0; i < argc; i++) {
        n += put_header(buf + n, '$', lens[i]);
        memcpy(buf + n, argv[i], lens[i]);
        n += lens[i];
        buf[n++] = '\r';
        buf[n++] = '\n';
    }
    int rc = redisAsyncFormattedCommand(rd.ac, fn, priv, buf, n);
    if (buf != stack)
        free(buf);
    return rc;
}

/* Sends c: its script (EVALSHA, or EVAL while the SHA is unknown), or
 * its plain command. */
static int send_eval(struct call *c)
{
    const char *args[PIAPI_REDIS_ARGS_MAX + 3];
    char nk[12];
    int si = c->script;
    if (si < 0)
        return send_argv(on_reply, c, c->argc, c->argv);
    snprintf(nk, sizeof nk, "%d", c->nkeys);
    int sha = rd.scripts[si].sha[0] != '\0';
    args[0] = sha ? "EVALSHA" : "EVAL";
    args[1] = sha ? rd.scripts[si].sha : rd.scripts[si].text;
    args[2] = nk;
    for (int i = 0; i < c->argc; i++)
        args[3 + i] = c->argv[i];
    if (!sha)  /* learn the SHA for the next calls */
        redisAsyncCommand(rd.ac, on_loaded, &rd.scripts[si], "SCRIPT LOAD %s",
                          rd.scripts[si].text);
    return send_argv(on_reply, c, c->argc + 3, args);
}

/* A call with its own copy of the arguments (sent again after NOSCRIPT);
 * NULL when it cannot be made. */
static struct call *call_new(const char *script, int nkeys, int argc, const char **argv)
{
    int si = script ? script_index(script) : -1;
    size_t len = 0;
    if ((script && si < 0) || argc > PIAPI_REDIS_ARGS_MAX)
        return NULL;
    for (int i = 0; i < argc; i++)
        len += strlen(argv[i]) + 1;
    struct call *c = piapi_xcalloc(1, sizeof *c + len);
    char *p = c->text;
    c->script = si;
    c->nkeys = nkeys;
    c->argc = argc;
    for (int i = 0; i < argc; i++) {
        size_t n = strlen(argv[i]) + 1;
        memcpy(p, argv[i], n);
        c->argv[i] = p;
        p += n;
    }
    return c;
}

void piapi_redis_command(int argc, const char **argv, piapi_redis_done done, void *arg)
{
    piapi_redis_eval(NULL, 0, argc, argv, done, arg);
}

void piapi_redis_eval(const char *script, int nkeys, int argc, const char **argv,
                      piapi_redis_done done, void *arg)
{
    struct call *c = rd.ac && rd.up ? call_new(script, nkeys, argc, argv) : NULL;
    if (!c) {
        done(arg, NULL);
        return;
    }
    c->done = done;
    c->arg = arg;
    c->waits = 1;
    c->deadline.cb = on_deadline;
    if (send_eval(c) != REDIS_OK) {
        free(c);
        count_error("redis command failed; this request used local limits", NULL);
        done(arg, NULL);
        return;
    }
    piapi_ev_timer_set(piapi_loop_ev(), &c->deadline,
                       piapi_now_mono() + PIAPI_REDIS_DEADLINE_MS / 1000.0);
}

int piapi_redis_eval_nowait(const char *script, int nkeys, int argc, const char **argv)
{
    struct call *c = rd.ac && rd.up ? call_new(script, nkeys, argc, argv) : NULL;
    if (c && send_eval(c) != REDIS_OK) {
        free(c);
        c = NULL;
    }
    return c ? 0 : -1;
}

static void on_plain_reply(redisAsyncContext *ac, void *reply, void *priv)
{
    redisReply *r = reply;
    (void)ac;
    (void)priv;
    if (r && r->type == REDIS_REPLY_ERROR)
        count_error("redis command failed", r->str);
}

int piapi_redis_command_nowait(int argc, const char **argv)
{
    if (!rd.ac || !rd.up)
        return -1;
    if (argc > PIAPI_REDIS_ARGS_MAX)
        return -1;
    return send_argv(on_plain_reply, NULL, argc, argv) == REDIS_OK ? 0 : -1;
}
