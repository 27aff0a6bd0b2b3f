/* The request lifecycle. One struct request owns each request from accept
 * to finish (style §5): whatever path it takes, request_end() logs it
 * once, records metrics once, releases the snapshot and frees it. A
 * proxied request may end on the event loop thread, after the thread that
 * read it has moved on to other requests. */
#include "piapi/request.h"

#include <curl/curl.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "piapi/account.h"
#include "piapi/arena.h"
#include "piapi/config.h"
#include "piapi/fcgi_conn.h"
#include "piapi/headers.h"
#include "piapi/http.h"
#include "piapi/json.h"
#include "piapi/limits.h"
#include "piapi/log.h"
#include "piapi/loop.h"
#include "piapi/metrics.h"
#include "piapi/proxy.h"
#include "piapi/redis.h"
#include "piapi/route.h"
#include "piapi/routes.h"
#include "piapi/routes_share.h"
#include "piapi/tally.h"
#include "piapi/util.h"

#define REQUEST_ID_MAX 128
/* One answer for missing, malformed and unknown keys: a caller learns
 * nothing about which it was. */
#define UNAUTHORIZED \
    "invalid or missing API key (send Authorization: Bearer <key> or x-api-key: <key>)"

struct piapi_worker {
    struct piapi_proxy *proxy;
    const atomic_int *stopping;
    const atomic_int *aborting;
    uint64_t rng[2];           /* request ids */
};

struct attempt {
    const struct piapi_candidate *cand;
    const char *outcome;  /* NULL: none of the candidate's doing */
};

struct request {
    struct piapi_worker *w;    /* the reading thread's: not after forward() */
    FCGX_Request *r;
    void (*over)(FCGX_Request *r);  /* the pool's: called last, gets r back */
    struct piapi_transfer x;
    struct curl_slist *headers;
    struct piapi_route_url url;
    double start;
    const char *method;
    const char *uri;
    char id[REQUEST_ID_MAX + 1];
    struct piapi_config *cfg;
    const struct piapi_user *user;
    struct piapi_client_keys keys;  /* as presented: point into the params */
    /* every credential presented (ncreds may exceed the array): views
     * into the params, like keys */
    struct piapi_route_secret creds[PIAPI_HEADERS_MAX_CREDS];
    size_t ncreds;
    size_t nseen;              /* of them in creds: at most the array's size */
    int path_has_key;          /* the path holds a presented credential: 400 */
    int path_hidden;           /* the log shows no path: it has or may have one */
    const struct piapi_service *svc;   /* the candidate's, this attempt */
    /* Failover (routes.h): the member's route for this service type, the
     * candidate of this attempt and of the next, those tried, and what
     * each attempt came to. */
    const struct piapi_route_set *route;
    struct piapi_route_target target;
    const struct piapi_candidate *cand;
    int next;
    uint32_t tried;
    uint64_t session;
    unsigned nattempts;
    struct attempt attempts[PIAPI_ROUTE_MAX_CANDIDATES];
    int status;
    int logged_route;          /* the upstream URL is worth logging */
    const char *error;         /* reason for the log line */
    double ttfb;
    uint64_t bytes_in, bytes_out;
    /* Per-member limits: the one that refused the request (its log line's
     * `limit`), and whether it holds a slot to give back at its end. */
    struct piapi_limits_refusal refusal;
    struct piapi_limits_slot slot;
    /* Last (request_init zeroes what comes before): owns what the request
     * allocates, the upstream header list, its first 4 KiB inside the
     * request itself; wiped at the request's end like the URL, which may
     * hold the provider key. */
    struct piapi_arena arena;
    max_align_t arena_first[4096 / sizeof(max_align_t)];
};

struct piapi_worker *piapi_request_worker_create(const atomic_int *stopping,
                                                 const atomic_int *aborting)
{
    struct piapi_worker *w = piapi_xcalloc(1, sizeof *w);
    w->proxy = piapi_proxy_create();
    w->stopping = stopping;
    w->aborting = aborting;
    if (getrandom(w->rng, sizeof w->rng, 0) != (ssize_t)sizeof w->rng) {
        w->rng[0] = (uint64_t)(uintptr_t)w ^ (uint64_t)(piapi_now_real() * 1e9);
        w->rng[1] = 0x9e3779b97f4a7c15ULL;
    }
    w->rng[0] |= 1;
    return w;
}

void piapi_request_worker_destroy(struct piapi_worker *w)
{
    if (!w)
        return;
    piapi_proxy_destroy(w->proxy);
    free(w);
}

/* ---- request id ------------------------------------------------------ */

/* xorshift128+: ids must be unique, not secret. */
static uint64_t next_random(struct piapi_worker *w)
{
    uint64_t s1 = w->rng[0];
    const uint64_t s0 = w->rng[1];
    w->rng[0] = s0;
    s1 ^= s1 << 23;
    w->rng[1] = s1 ^ s0 ^ (s1 >> 17) ^ (s0 >> 26);
    return w->rng[1] + s0;
}

static int request_id_sane(const char *s)
{
    size_t n = 0;
    for (; s[n]; n++) {
        char c = s[n];
        if (n >= REQUEST_ID_MAX ||
            !((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.' || c == ':'))
            return 0;
    }
    return n > 0;
}

/* Whether the id holds a credential the client presented (any length:
 * replacing an id costs nothing), or may: more were presented than
 * were looked at. The id is logged, forwarded and echoed. */
static int id_holds_credential(const struct request *q, const char *id)
{
    if (q->nseen < q->ncreds)
        return 1;
    for (size_t i = 0; i < q->nseen; i++)
        if (memmem(id, strlen(id), q->creds[i].s, q->creds[i].len))
            return 1;
    return 0;
}

static void assign_request_id(struct request *q)
{
    int count;
    const char *given = piapi_headers_param(q->r->envp, "HTTP_X_REQUEST_ID", &count);
    if (given && count == 1 && request_id_sane(given) && !id_holds_credential(q, given)) {
        snprintf(q->id, sizeof q->id, "%s", given);
        return;
    }
    snprintf(q->id, sizeof q->id, "%016llx%016llx",
             (unsigned long long)next_random(q->w),
             (unsigned long long)next_random(q->w));
}

/* ---- responses piapi writes itself ------------------------------------ */

static int path_is(const char *uri, const char *path)
{
    size_t n = strlen(path);
    return uri && strncmp(uri, path, n) == 0 && (uri[n] == '\0' || uri[n] == '?');
}

static void respond(struct request *q, int status, const char *ctype,
                    const char *extra_headers, const char *body, size_t len)
{
    char head[512];
    int n = snprintf(head, sizeof head,
                     "Status: %d %s\r\nContent-Type: %s\r\n"
                     "Content-Length: %zu\r\nCache-Control: no-store\r\n"
                     "X-Request-ID: %s\r\n%s\r\n",
                     status, piapi_http_reason(status), ctype, len, q->id,
                     extra_headers ? extra_headers : "");
    q->status = status;
    if (n < 0 || (size_t)n >= sizeof head)
        return;
    FCGX_PutStr(head, n, q->r->out);
    if (len && strcmp(q->method, "HEAD") != 0)
        FCGX_PutStr(body, (int)len, q->r->out);
    FCGX_FFlush(q->r->out);
    q->bytes_out = len;
}

static void respond_error(struct request *q, int status, const char *message)
{
    struct piapi_buf b = {0};
    piapi_json_error(&b, piapi_http_error_type(status), message);
    piapi_buf_putc(&b, '\n');
    respond(q, status, "application/json",
            status == 401 ? "WWW-Authenticate: Bearer\r\n" :
            status == 405 && path_is(q->uri, "/usage") ? "Allow: GET, HEAD\r\n" :
            status == 405 ? "Allow: GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS\r\n" :
            NULL, b.data, b.len);
    piapi_buf_dispose(&b);
}

/* 429 with Retry-After, or the model's 403: the usual JSON error. */
static void respond_limited(struct request *q, const struct piapi_limits_refusal *r)
{
    char extra[48];
    struct piapi_buf b = {0};
    if (r != &q->refusal)
        q->refusal = *r;
    q->error = "limited";
    piapi_limits_count(q->user->name, r->limit);
    piapi_json_error(&b, piapi_http_error_type(r->status), r->message);
    piapi_buf_putc(&b, '\n');
    snprintf(extra, sizeof extra, "Retry-After: %u\r\n", r->retry_after);
    respond(q, r->status, "application/json", r->status == 429 ? extra : NULL, b.data, b.len);
    piapi_buf_dispose(&b);
}

/* ---- local endpoints -------------------------------------------------- */

static void serve_health(struct request *q)
{
    if (atomic_load_explicit(q->w->stopping, memory_order_relaxed)) {
        respond_error(q, 503, "shutting down");
        return;
    }
    if (!q->cfg) {
        respond_error(q, 503, "no configuration loaded");
        return;
    }
    /* Redis down is no reason to fail: limits fall back to this instance. */
    int redis, up;
    if (piapi_loop_on_thread())  /* connects once the config names one */
        piapi_redis_want(piapi_config_settings(q->cfg)->redis);
    piapi_redis_state(&redis, &up);
    if (redis && !up) {
        static const char text[] = "ok\nredis: unreachable; limits are local to this "
                                   "instance until it is back\n";
        respond(q, 200, "text/plain; charset=utf-8", NULL, text, sizeof text - 1);
        return;
    }
    respond(q, 200, "text/plain; charset=utf-8", NULL, "ok\n", 3);
}

static void serve_metrics(struct request *q)
{
    struct piapi_buf b = {0};
    piapi_metrics_render(&b);
    respond(q, 200, "text/plain; version=0.0.4; charset=utf-8", NULL, b.data, b.len);
    piapi_buf_dispose(&b);
}

/* ---- the gateway path ------------------------------------------------- */

static int method_allowed(const char *m)
{
    static const char *const ok[] = {
        "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", NULL
    };
    for (const char *const *p = ok; *p; p++)
        if (strcmp(m, *p) == 0)
            return 1;
    return 0;
}

/* Authorization first, then x-api-key: SDKs may send both, and either one
 * naming a member is enough. Unknown and malformed keys look the same. */
static const struct piapi_user *authenticate(struct request *q,
                                             const struct piapi_client_keys *k)
{
    const struct piapi_user *u = NULL;
    if (k->bearer_len)
        u = piapi_config_find_user(q->cfg, k->bearer, k->bearer_len);
    if (!u && k->api_key_len)
        u = piapi_config_find_user(q->cfg, k->api_key, k->api_key_len);
    return u;
}

/* CONTENT_LENGTH: absent or empty means unknown (chunked upload with
 * nginx request buffering off); anything else must be a clean number. */
static int content_length(struct request *q, int64_t *out)
{
    const char *cl = piapi_headers_param(q->r->envp, "CONTENT_LENGTH", NULL);
    uint64_t v;
    if (!cl || !*cl) {
        *out = -1;
        return 0;
    }
    if (piapi_parse_u64(cl, 0, INT64_MAX, &v) != 0)
        return -1;
    *out = (int64_t)v;
    return 0;
}

static void request_end(struct request *q);

/* ---- candidates ------------------------------------------------------- */

/* An attempt's outcome for the candidate's health and the metrics; the
 * client's doing (it left) or the request's (its body) is none. */
static void note_attempt(struct request *q, const char *outcome, double retry_after)
{
    const struct piapi_candidate *c = q->cand;
    if (q->nattempts < PIAPI_ROUTE_MAX_CANDIDATES)
        q->attempts[q->nattempts++] = (struct attempt){ c, outcome };
    if (!outcome)
        return;
    piapi_metrics_attempt(c->provider->name, c->key->name, outcome);
    const char *redis = piapi_config_settings(q->cfg)->redis;
    if (strcmp(outcome, "ok") != 0) {
        piapi_routes_failed(c->provider->name, c->key->name, retry_after,
                            piapi_now_mono());
        piapi_routes_share_failed(redis, c->provider->name, c->key->name);
    } else if (piapi_routes_succeeded(c->provider->name, c->key->name)) {
        piapi_routes_share_succeeded(redis, c->provider->name, c->key->name);
    }
}

/* How the last attempt ended, from what the transfer reports. */
static const char *final_outcome(const struct piapi_transfer *x)
{
    if (x->error) {
        if (!strcmp(x->error, "client_abort") || !strcmp(x->error, "shutdown"))
            return NULL;
        return !strcmp(x->error, "idle_timeout") ? "timeout" : x->error;
    }
    if (!x->status)
        return NULL;  /* refused before it went out: 408, 413 */
    if (x->overloaded)
        return "overloaded";
    if (x->status == 429)
        return "status_429";
    if (x->status == 529)
        return "status_529";
    if (x->status >= 500 && x->status != 501 && x->status != 505)
        return "status_5xx";
    return "ok";
}

static void aim(struct request *q, int i)
{
    q->cand = &q->route->candidates[i];
    q->tried |= 1u << i;
    q->svc = piapi_config_find_service(q->cfg, q->cand->provider, q->target.type,
                                       q->target.type_len);
}

/* The upstream request for the candidate aimed at: its URL and headers
 * with its key, into the request's arena (the body is the same). */
static int prepare(struct request *q, const char **why)
{
    int st = piapi_headers_forward(q->r->envp, q->svc, q->cand->key->value, q->id,
                                   q->creds, q->nseen, &q->arena, &q->headers, why);
    if (st)
        return st;
    /* Both credentials the client sent, not only the one that matched: a
     * junk bearer next to a valid x-api-key must not let the key through. */
    const struct piapi_route_secret hidden[] = {
        { q->keys.bearer, q->keys.bearer_len },
        { q->keys.api_key, q->keys.api_key_len },
    };
    piapi_route_upstream_url(&q->url, q->svc, &q->target, q->cand->key->value,
                             hidden, sizeof hidden / sizeof hidden[0]);
    q->x.url = q->url.buf.data;
    q->x.headers = q->headers;
    q->x.provider_key = q->cand->key->value;
    q->x.inject_usage = q->svc->inject_stream_usage;
    q->x.key_param = q->svc->auth.mode == PIAPI_AUTH_QUERY ? q->svc->auth.name : NULL;
    return 0;
}

static int pick_next(struct piapi_transfer *x)
{
    struct request *q = (struct request *)((char *)x - offsetof(struct request, x));
    q->next = piapi_routes_pick(q->route, q->tried, q->session, piapi_now_mono());
    return q->next >= 0;
}

static int retry_next(struct piapi_transfer *x, const char *outcome, double retry_after)
{
    struct request *q = (struct request *)((char *)x - offsetof(struct request, x));
    const char *why = NULL;
    note_attempt(q, outcome, retry_after);
    aim(q, q->next);
    return q->svc && prepare(q, &why) == 0;
}

/* The rest of a proxied request, wherever its transfer ended. */
static void forwarded(struct piapi_transfer *x)
{
    struct request *q = (struct request *)((char *)x - offsetof(struct request, x));

    note_attempt(q, final_outcome(x), x->retry_after);
    if (q->nattempts > 1)
        piapi_metrics_failover(q->svc->type);

    q->bytes_in = x->bytes_in;
    q->ttfb = x->ttfb;
    q->error = x->error;
    if (x->error)
        piapi_metrics_upstream_error(q->svc->provider->name, x->error);
    if (x->status) {
        q->status = x->status;
        q->bytes_out = x->bytes_out;
    } else if (q->refusal.limit == PIAPI_LIMIT_MODEL) {
        q->logged_route = 0;  /* nothing went upstream, nothing to account */
        respond_limited(q, &q->refusal);
    } else if (x->error_status == 499) {
        q->status = 499;  /* nobody to answer; nginx's convention in the log */
    } else {
        respond_error(q, x->error_status, x->error_message);
    }
    request_end(q);
}

/* Who ends a request once dispatch() returns: the caller (ANSWERED), or
 * the proxy through forwarded() (FORWARDED: already, or later on the event
 * loop's thread; q is not the caller's any more). */
enum outcome { ANSWERED, FORWARDED };

/* Once the body is read whole (or not: body NULL), before anything goes
 * upstream: the member's model allow-list. */
static int admit_model(struct piapi_transfer *x, const char *body, size_t len)
{
    struct request *q = (struct request *)((char *)x - offsetof(struct request, x));
    if (piapi_limits_model_body(q->user, body, len, &q->refusal) == 0)
        return 0;
    x->error_status = 403;
    x->error_message = q->refusal.message;
    return -1;
}

/* Whether a later candidate's service adds the usage option though the
 * first one's does not (a body rewritten for it is made up front). */
static int later_injects(const struct request *q)
{
    if (q->svc->inject_stream_usage || q->route->ncandidates < 2)
        return 0;
    for (size_t i = 0; i < q->route->ncandidates; i++) {
        const struct piapi_service *s = piapi_config_find_service(
            q->cfg, q->route->candidates[i].provider, q->target.type, q->target.type_len);
        if (s && s->inject_stream_usage)
            return 1;
    }
    return 0;
}

static enum outcome forward(struct request *q, const struct piapi_route_target *t)
{
    const struct piapi_settings *set = piapi_config_settings(q->cfg);
    const char *why = NULL;
    int64_t cl;

    if (content_length(q, &cl) != 0) {
        respond_error(q, 400, "invalid Content-Length");
        return ANSWERED;
    }
    if (cl > 0 && (uint64_t)cl > set->max_body_bytes) {
        respond_error(q, 413, "request body too large");
        return ANSWERED;
    }
    q->target = *t;
    int st = prepare(q, &why);
    if (st) {
        respond_error(q, st, why);
        return ANSWERED;
    }
    q->logged_route = 1;
    q->x = (struct piapi_transfer){
        .fcgi = q->r,
        .method = q->method,
        .url = q->url.buf.data,
        .headers = q->headers,
        .settings = set,
        .pick = q->route->ncandidates > 1 ? pick_next : NULL,
        .retry = retry_next,
        .request_id = q->id,
        .content_length = cl,
        .abort_flag = q->w->aborting,
        .provider_key = q->cand->key->value,
        .key_param = q->svc->auth.mode == PIAPI_AUTH_QUERY ? q->svc->auth.name : NULL,
        .done = forwarded,
        .usage_shape = strcmp(q->method, "POST") == 0
                           ? piapi_usage_shape_of(t->rest, t->rest_len) : PIAPI_USAGE_NONE,
        .inject_usage = q->svc->inject_stream_usage,
        .inject_usage_later = later_injects(q),
        .admit_body = admit_model,
    };
    piapi_proxy_forward(q->w->proxy, &q->x);
    return FORWARDED;
}

/* Who the request's key says it comes from; 0 when it was answered
 * (400 or 401) instead. */
static int member(struct request *q)
{
    switch (piapi_headers_client_keys(q->r->envp, &q->keys)) {
    case PIAPI_KEY_OK:
        break;
    case PIAPI_KEY_DUPLICATE:
        respond_error(q, 400, "credential header sent more than once");
        return 0;
    case PIAPI_KEY_MISSING:
        respond_error(q, 401, UNAUTHORIZED);
        return 0;
    }
    q->user = authenticate(q, &q->keys);
    if (!q->user) {
        respond_error(q, 401, UNAUTHORIZED);
        return 0;
    }
    return 1;
}

/* GET /usage: the member's own usage today and this month. */
static void serve_usage(struct request *q)
{
    if (strcmp(q->method, "GET") != 0 && strcmp(q->method, "HEAD") != 0) {
        respond_error(q, 405, "method not allowed: GET /usage");
        return;
    }
    if (!q->cfg) {
        respond_error(q, 503, "no configuration loaded");
        return;
    }
    if (!member(q))
        return;
    struct piapi_buf b = {0};
    double now = piapi_now_real();
    piapi_account_usage_json(q->user->name, now, &b);
    /* The member's limits go inside the object: before its "}\n". */
    if (b.len >= 2 && b.data[b.len - 2] == '}') {
        b.len -= 2;
        piapi_limits_usage_json(q->user, now, &b);
        piapi_buf_puts(&b, "}\n");
    }
    respond(q, 200, "application/json", NULL, b.data, b.len);
    piapi_buf_dispose(&b);
}

/* A parked request's wait is over (on the loop's thread): on it goes,
 * or it is answered. Its route is parsed again from its URI, which is
 * still the params' (they live until the request ends). */
static void resumed(void *arg, enum piapi_limits_verdict v,
                    const struct piapi_limits_refusal *r)
{
    struct request *q = arg;
    struct piapi_route_target t;
    const char *why;
    if (v == PIAPI_LIMITS_ADMITTED) {
        if (piapi_route_parse(q->uri, &t, &why) == PIAPI_ROUTE_OK &&
            forward(q, &t) == FORWARDED)
            return;
    } else if (v == PIAPI_LIMITS_GONE) {
        q->status = 499;  /* the client left while queued */
        q->error = "client_abort";
    } else {
        respond_limited(q, r);
    }
    request_end(q);
}

/* The member's limits, after authentication and before anything goes
 * upstream (the model's: once the body is read, admit_model). */
static enum outcome admit(struct request *q, const struct piapi_route_target *t)
{
    switch (piapi_limits_admit(q->user, piapi_now_real(), piapi_config_settings(q->cfg)->redis,
                               piapi_fcgi_fd(q->r), resumed, q, &q->slot, &q->refusal)) {
    case PIAPI_LIMITS_ADMITTED:
        return forward(q, t);
    case PIAPI_LIMITS_QUEUED:
        return FORWARDED;  /* resumed() ends it */
    case PIAPI_LIMITS_REFUSED:
    case PIAPI_LIMITS_GONE:
        break;
    }
    respond_limited(q, &q->refusal);
    return ANSWERED;
}

/* What a spread route keeps on one candidate: Claude Code's session, else
 * the member. */
static uint64_t session_of(struct request *q)
{
    int count;
    const char *sid = piapi_headers_param(q->r->envp, "HTTP_X_CLAUDE_CODE_SESSION_ID",
                                          &count);
    if (sid && *sid)
        return piapi_hash(sid, strlen(sid));
    return piapi_hash(q->user->name, strlen(q->user->name));
}

static enum outcome dispatch(struct request *q)
{
    struct piapi_route_target t;
    const char *why = NULL;

    if (!q->uri || !*q->uri || !q->method || !*q->method) {
        respond_error(q, 400, "missing request line");
        return ANSWERED;
    }
    /* A key pasted into the URL: it would reach the upstream, and the
     * path is logged. */
    if (q->path_has_key) {
        respond_error(q, 400, "request path contains your API key");
        return ANSWERED;
    }
    if (path_is(q->uri, "/usage")) {
        serve_usage(q);
        return ANSWERED;
    }
    switch (piapi_route_parse(q->uri, &t, &why)) {
    case PIAPI_ROUTE_OK:
        break;
    case PIAPI_ROUTE_NOT_FOUND:
        respond_error(q, 404, why);
        return ANSWERED;
    case PIAPI_ROUTE_TOO_LONG:
        respond_error(q, 414, why);
        return ANSWERED;
    case PIAPI_ROUTE_BAD_PATH:
        respond_error(q, 400, why);
        return ANSWERED;
    }
    if (!method_allowed(q->method)) {
        respond_error(q, 405, "method not allowed");
        return ANSWERED;
    }
    if (!q->cfg) {
        respond_error(q, 503, "no configuration loaded");
        return ANSWERED;
    }
    if (!member(q))
        return ANSWERED;
    q->route = piapi_config_user_route(q->user, t.type, t.type_len);
    q->target = t;
    if (q->route->strategy == PIAPI_STRATEGY_SPREAD)
        q->session = session_of(q);
    aim(q, piapi_routes_pick(q->route, 0, q->session, piapi_now_mono()));
    if (!q->svc) {
        respond_error(q, 404, "service type not available for this key");
        return ANSWERED;
    }
    return admit(q, &t);
}

/* ---- finish ----------------------------------------------------------- */

/* By status; a stream that broke after its head went out is an error
 * even though its status says 200 (a client leaving is only a warning). */
static enum piapi_log_level level_for(int status, const char *error)
{
    if (status >= 500 || (error && status < 400 && strcmp(error, "client_abort") != 0))
        return PIAPI_LOG_ERROR;
    if (status >= 400 || error)
        return PIAPI_LOG_WARN;
    return PIAPI_LOG_INFO;
}

/* The path as logged: without the query, which may carry secrets. */
static size_t path_len(const char *uri)
{
    const char *qm = strchr(uri, '?');
    return qm ? (size_t)(qm - uri) : strlen(uri);
}

static int mentions(const char *text, const char *s, size_t len)
{
    return len && memmem(text, strlen(text), s, len);
}

/* Text libcurl or the upstream wrote (never a header value of ours, nor
 * the query) goes into the log line, so no secret may be in it: the
 * member's key as presented, the provider key, the baseUrl's userinfo and
 * query. Checked before the FastCGI params (which hold the presented key)
 * are freed; text that fails is dropped. */
static void scrub_foreign(const struct request *q, char *text)
{
    if (!text[0] || !q->user)
        return;
    if (mentions(text, q->keys.bearer, q->keys.bearer_len) ||
        mentions(text, q->keys.api_key, q->keys.api_key_len) ||
        strstr(text, q->user->key->value) ||
        (q->cand && strstr(text, q->cand->key->value)) ||
        (q->svc && piapi_route_mentions_secret(q->svc, NULL, text)))
        text[0] = '\0';
}

static void log_foreign(struct piapi_log_line *l, const char *name, const char *text)
{
    if (text[0])
        piapi_log_str(l, name, text);
}

/* attempts, and candidates: "provider/key:outcome" in the order tried. */
static void log_attempts(struct piapi_log_line *l, const struct request *q)
{
    struct piapi_buf b = {0};
    piapi_log_int(l, "attempts", (int64_t)q->nattempts);
    for (unsigned i = 0; i < q->nattempts; i++)
        piapi_buf_printf(&b, "%s%s/%s:%s", i ? "," : "",
                         q->attempts[i].cand->provider->name, q->attempts[i].cand->key->name,
                         q->attempts[i].outcome ? q->attempts[i].outcome : "none");
    piapi_log_str(l, "candidates", b.data);
    piapi_buf_dispose(&b);
    if (q->x.body_streamed && q->route->ncandidates > 1)
        piapi_log_str(l, "failover", "unavailable: a body over 8 MiB is streamed "
                      "upstream as it arrives, so it cannot be sent again");
}

static void log_request(struct request *q, enum piapi_log_level level,
                        double latency, const struct piapi_account *acct)
{
    struct piapi_log_line l;
    if (!piapi_log_begin(&l, level, "request completed"))
        return;
    piapi_log_str(&l, "request_id", q->id);
    piapi_log_str(&l, "method", q->method);
    if (q->uri && q->path_hidden)
        piapi_log_str(&l, "path", "REDACTED");
    else if (q->uri)
        piapi_log_strn(&l, "path", q->uri, path_len(q->uri));
    piapi_log_str(&l, "user", q->user ? q->user->name : NULL);
    piapi_log_str(&l, "service_type", q->svc ? q->svc->type : NULL);
    piapi_log_str(&l, "upstream_provider", q->cand ? q->cand->provider->name :
                                           q->user ? q->user->provider->name : NULL);
    piapi_log_str(&l, "upstream_key", q->cand ? q->cand->key->name :
                                      q->user ? q->user->key->name : NULL);
    if (q->nattempts)
        log_attempts(&l, q);
    if (q->logged_route) {
        struct piapi_buf redacted = {0};
        piapi_route_redacted(&q->url, &redacted);
        piapi_log_str(&l, "upstream_url", redacted.data);
        piapi_buf_dispose(&redacted);
    }
    piapi_log_int(&l, "status", q->status);
    piapi_log_double(&l, "latency_ms", latency * 1000.0);
    if (q->ttfb >= 0)
        piapi_log_double(&l, "ttfb_ms", q->ttfb * 1000.0);
    piapi_log_int(&l, "bytes_in", (int64_t)q->bytes_in);
    piapi_log_int(&l, "bytes_out", (int64_t)q->bytes_out);
    if (q->refusal.limit)
        piapi_log_str(&l, "limit", piapi_limits_name(q->refusal.limit));
    if (q->error) {
        piapi_log_str(&l, "error", q->error);
        log_foreign(&l, "error_detail", q->x.error_detail);
    }
    log_foreign(&l, "upstream_request_id", q->x.upstream_id);
    if (acct)
        piapi_account_log(acct, &l);
    piapi_log_end_batched(&l);
}

/* What the log line needs from the params, which FCGX_Finish_r frees. */
struct kept_line {
    char method[16];
    char path[1024];
};

/* Ends the FastCGI request before the bookkeeping, so the web server has
 * the whole answer while the log line and metrics are written; what the
 * log line needs of the params, which that frees, is copied first. */
static void end_fastcgi(struct request *q, struct kept_line *k)
{
    snprintf(k->method, sizeof k->method, "%s", q->method);
    q->method = k->method;
    if (q->uri) {
        size_t n = path_len(q->uri);
        if (n >= sizeof k->path)
            n = sizeof k->path - 1;
        memcpy(k->path, q->uri, n);
        k->path[n] = '\0';
        q->uri = k->path;
    }
    piapi_fcgi_end(q->r);
}

/* A forwarded request's usage, settled from its answer. */
static void settle(struct request *q, struct piapi_account *a)
{
    *a = (struct piapi_account){
        .cfg = q->cfg,
        .request_id = q->id,
        .user = q->user->name,
        .service_type = q->svc->type,
        .provider = q->cand->provider->name,
        .key_name = q->cand->key->name,
        .status = q->status,
        .shape = q->x.usage_shape,
        .usage = &q->x.usage,
        .request_model = q->x.request_model,
    };
    piapi_account_settle(a);
}

static void finish(struct request *q)
{
    double latency = piapi_now_mono() - q->start;
    struct kept_line k;
    struct piapi_account acct, *a = q->logged_route ? &acct : NULL;
    scrub_foreign(q, q->x.error_detail);
    scrub_foreign(q, q->x.upstream_id);
    /* The model names are the client's or the upstream's words too. */
    scrub_foreign(q, q->x.usage.model);
    scrub_foreign(q, q->x.request_model);
    end_fastcgi(q, &k);
    q->keys = (struct piapi_client_keys){ 0 };  /* they pointed into the params */
    memset(q->creds, 0, sizeof q->creds);
    struct piapi_metrics_request m = {
        .service_type = q->svc ? q->svc->type : PIAPI_METRICS_UNKNOWN,
        .provider = q->svc ? q->svc->provider->name : NULL,
        .user = q->user ? q->user->name : NULL,
        .status = q->status,
        .latency_s = latency,
        .ttfb_s = q->ttfb,
        .bytes_in = q->bytes_in,
        .bytes_out = q->bytes_out,
    };
    piapi_metrics_request(&m);
    if (a) {
        double now = piapi_now_real();
        const struct piapi_usage *u = &q->x.usage;
        settle(q, a);
        piapi_account_record(a, now);
        piapi_limits_spent(q->user->name, piapi_config_settings(q->cfg)->redis, now,
                           u->input + u->output + u->cache_read + u->cache_write,
                           a->cost_usd);
    }
    log_request(q, level_for(q->status, q->error), latency, a);
    if (q->slot.held)
        piapi_limits_release(q->user->name, &q->slot);
    piapi_config_release(q->cfg);
    q->cfg = NULL;
}

static void request_init(struct request *q, struct piapi_worker *w, FCGX_Request *r)
{
    memset(q, 0, offsetof(struct request, arena));
    piapi_arena_init(&q->arena, q->arena_first, sizeof q->arena_first);
    q->w = w;
    q->r = r;
    q->start = piapi_now_mono();
    q->ttfb = -1;
    q->method = FCGX_GetParam("REQUEST_METHOD", r->envp);
    q->uri = FCGX_GetParam("REQUEST_URI", r->envp);
    if (!q->method)
        q->method = "";
    q->ncreds = piapi_headers_presented(r->envp, q->creds, PIAPI_HEADERS_MAX_CREDS);
    q->nseen = q->ncreds < PIAPI_HEADERS_MAX_CREDS ? q->ncreds : PIAPI_HEADERS_MAX_CREDS;
    assign_request_id(q);
    /* Looked at before any answer or log line. More credentials than were
     * looked at (a request refused anyway) keep the path out of the log. */
    if (q->uri)
        q->path_has_key = piapi_route_holds_secret(q->uri, path_len(q->uri), q->creds,
                                                   q->nseen);
    q->path_hidden = q->path_has_key || q->nseen < q->ncreds;
}

/* What serves uri here, if it is /healthz or /metrics. */
static void (*local_endpoint(const char *uri))(struct request *)
{
    return !uri ? NULL :
           path_is(uri, "/healthz") ? serve_health :
           path_is(uri, "/metrics") ? serve_metrics : NULL;
}

int piapi_request_is_local(FCGX_Request *r)
{
    return local_endpoint(FCGX_GetParam("REQUEST_URI", r->envp)) != NULL;
}

/* /healthz and /metrics: answered here, logged at debug level and kept
 * out of the request metrics, so probes and scrapes do not show up as
 * traffic (or count themselves in flight). */
static int serve_local(struct request *q)
{
    void (*serve)(struct request *) = local_endpoint(q->uri);
    if (!serve)
        return 0;
    q->cfg = piapi_config_current();
    serve(q);
    struct kept_line k;
    end_fastcgi(q, &k);
    log_request(q, PIAPI_LOG_DEBUG, piapi_now_mono() - q->start, NULL);
    piapi_config_release(q->cfg);
    return 1;
}

static void request_end(struct request *q)
{
    void (*over)(FCGX_Request *) = q->over;
    FCGX_Request *r = q->r;

    finish(q);
    piapi_metrics_in_flight(-1);
    piapi_arena_dispose(&q->arena);
    piapi_buf_wipe(&q->url.buf);
    free(q);
    over(r);
}

void piapi_request_handle(struct piapi_worker *w, FCGX_Request *r,
                          void (*over)(FCGX_Request *r))
{
    struct request *q = piapi_xmalloc(sizeof *q);

    request_init(q, w, r);
    q->over = over;
    if (serve_local(q)) {
        free(q);
        over(r);
        return;
    }
    piapi_metrics_in_flight(1);
    q->cfg = piapi_config_current();
    if (dispatch(q) == ANSWERED)
        request_end(q);
}

void piapi_request_reject(struct piapi_worker *w, FCGX_Request *r, int status,
                          const char *message, const char *reason)
{
    struct request q;

    request_init(&q, w, r);
    respond_error(&q, status, message);
    q.error = reason;
    finish(&q);
}
