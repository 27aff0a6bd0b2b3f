/* One upstream transfer: the libcurl callbacks that stream the request
 * body from FastCGI and the answer back, the response-header policy and
 * the key redaction on the way, timers and the outcome. Both drivers use
 * it: the event loop's (upstream.c) and the blocking one (proxy.c). */
#include "xfer.h"

#include <cjson/cJSON.h>
#include <curl/curl.h>
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "piapi/fcgi_conn.h"
#include "piapi/headers.h"
#include "piapi/http.h"
#include "piapi/routes.h"
#include "piapi/util.h"

/* What one write of n bytes may cost in socket memory (kernel skb
 * overhead and rounding): deliberately high, see xfer.budget. */
#define WRITE_COST(n) (2 * (n) + 2048)
/* A pool thread reads a body up to this size whole, so that its transfer
 * runs on the event loop too; a larger one it streams itself. */
#define LOOP_BODY_MAX (8 * 1024 * 1024)
/* An answer that may echo a secret (status >= 300, not an event stream)
 * is held whole up to this size, so its length can be fixed after the
 * redaction; a larger one is relayed redacted in windows. */
#define HOLD_MAX (64 * 1024)
/* lighttpd tells piapi nothing when a client leaves: only a write to the
 * client fails, and lighttpd closes the FastCGI connection at the second
 * write after the close. Unless the operator chose an interval, pings
 * this often during silence bound that to about twice this. */
#define LIGHTTPD_PROBE_MS 500
/* A first event longer than this is not waited for to its end: the head
 * goes out (such an event is no error event). */
#define FIRST_EVENT_MAX (64 * 1024)

/* ---- set up ---------------------------------------------------------- */

/* The SSE ping interval: the operator's, else the default, shortened
 * behind lighttpd, which cannot tell piapi that a client left. */
static uint32_t keepalive_ms(const struct piapi_transfer *t)
{
    const struct piapi_settings *s = t->settings;
    if (s->sse_keepalive_explicit || s->sse_keepalive_ms <= LIGHTTPD_PROBE_MS)
        return s->sse_keepalive_ms;
    const char *sw = FCGX_GetParam("SERVER_SOFTWARE", t->fcgi->envp);
    if (sw && strncasecmp(sw, "lighttpd", 8) == 0)
        return LIGHTTPD_PROBE_MS;
    return s->sse_keepalive_ms;
}

void xfer_init(struct xfer *x, struct piapi_transfer *t)
{
    *x = (struct xfer){ .t = t, .keepalive_ms = keepalive_ms(t), .upstream_cl = -1 };
    x->start = x->last_write = piapi_now_mono();
    t->status = 0;
    t->ttfb = -1;
    t->retry_after = -1;
}

void xfer_rearm(struct xfer *x)
{
    struct xfer k = *x;
    struct piapi_transfer *t = x->t;

    piapi_buf_wipe(&x->value);
    piapi_buf_wipe(&x->held);
    piapi_buf_dispose(&x->scanned);
    piapi_secrets_dispose(&x->secrets);
    if (x->counting)
        piapi_usage_scan_dispose(&x->usage);
    piapi_buf_dispose(&x->relay);
    piapi_buf_dispose(&x->first);
    piapi_buf_reset(&k.head);
    *x = (struct xfer){
        .t = t, .easy = k.easy, .head = k.head, .body = k.body,
        .inline_len = k.inline_len, .whole = k.whole, .start = k.start,
        .last_write = k.last_write, .stdin_eof = k.stdin_eof,
        .read_timeout = k.read_timeout, .keepalive_ms = k.keepalive_ms,
        .upstream_cl = -1, .injected = k.injected, .can_fail_over = k.can_fail_over,
        .usage_body = k.usage_body, .plain_body = k.plain_body, .usage_len = k.usage_len,
        .plain_len = k.plain_len,
        .budget = k.budget, .unchecked = k.unchecked, .blocked = k.blocked,
        .queued = k.queued,
    };
    t->status = 0;
    t->ttfb = -1;
    t->retry_after = -1;
    t->error = NULL;
    t->error_status = 0;
    t->error_message = NULL;
    t->bytes_out = 0;
    t->upstream_id[0] = '\0';
    t->usage = (struct piapi_usage){0};
    t->overloaded = 0;
}

/* A status the next candidate may answer better; NULL: relay it. */
static const char *status_outcome(int status)
{
    switch (status) {
    case 429: return "status_429";
    case 529: return "status_529";
    case 500: case 502: case 503: case 504: return "status_5xx";
    default: return NULL;
    }
}

/* ---- client side ---------------------------------------------------- */

/* Queues bytes for the client. They go out at the next xfer_flush(),
 * which the transfer loop does before it waits for the upstream again:
 * every chunk still leaves as soon as libcurl has handed it over, but
 * the last one travels with FCGI_END_REQUEST in a single write. */
static int client_put(struct xfer *x, const char *data, size_t n)
{
    if (x->client_gone)
        return -1;
    if (FCGX_PutStr(data, (int)n, x->t->fcgi->out) != (int)n) {
        x->client_gone = 1;
        return -1;
    }
    if (!x->unflushed && x->queued)
        x->queued(x);
    x->unflushed = 1;
    x->unchecked += WRITE_COST(n);
    return 0;
}

/* Loop driver: whether n more bytes fit without a write that could block.
 * A socket polls writable while at most a quarter of its send buffer is
 * queued, and the budget is half of it, so what is admitted after a
 * writable poll always fits. */
static int client_has_room(struct xfer *x, size_t n)
{
    if (!x->budget || x->unchecked + WRITE_COST(n) <= x->budget)
        return 1;
    if (piapi_fcgi_writable(x->t->fcgi)) {
        x->unchecked = 0;
        return 1;
    }
    return 0;
}

int xfer_flush(struct xfer *x)
{
    if (!x->unflushed || x->client_gone)
        return x->client_gone ? -1 : 0;
    x->unflushed = 0;
    if (FCGX_FFlush(x->t->fcgi->out) != 0) {
        x->client_gone = 1;
        return -1;
    }
    x->last_write = piapi_now_mono();
    return 0;
}

/* ---- request body --------------------------------------------------- */

/* A body read with the request's deadlines: no byte for bodyIdleTimeoutMs,
 * or not all of it by bodyTimeoutMs after the transfer began, ends it. */
static int body_read(struct xfer *x, char *buf, size_t n)
{
    const struct piapi_settings *s = x->t->settings;
    if (x->body_failed)
        return x->body_failed;
    if (n > INT_MAX)
        n = INT_MAX;
    int got = piapi_fcgi_read_body(x->t->fcgi, buf, (int)n,
                                    x->start + s->body_timeout_ms / 1000.0,
                                    s->body_idle_timeout_ms / 1000.0, &x->read_timeout);
    if (got < 0)
        x->body_failed = got;
    else if (got == 0)
        x->stdin_eof = 1;
    return got;
}

/* Consumes the empty FCGI_STDIN record that ends the body. Until it is
 * read, readability of the connection means nothing about the client. */
static void consume_stdin_end(struct xfer *x)
{
    char c;
    if (!x->stdin_eof)
        body_read(x, &c, 1);
}


static size_t read_body(char *buf, size_t size, size_t nitems, void *ud)
{
    struct xfer *x = ud;
    size_t want = size * nitems;

    if (x->inline_off < x->inline_len) {
        size_t n = x->inline_len - x->inline_off;
        if (n > want)
            n = want;
        memcpy(buf, x->body + x->inline_off, n);
        x->inline_off += n;
        return n;
    }
    if (x->stdin_eof)
        return 0;
    int got = body_read(x, buf, want);
    if (got < 0)
        return CURL_READFUNC_ABORT;
    if (got == 0)
        return 0;
    x->t->bytes_in += (uint64_t)got;
    if (x->t->bytes_in > x->t->settings->max_body_bytes) {
        x->body_over_limit = 1;
        return CURL_READFUNC_ABORT;
    }
    if (x->t->content_length >= 0 &&
        x->t->bytes_in >= (uint64_t)x->t->content_length)
        consume_stdin_end(x);
    return (size_t)got;
}

/* Reads on into buf (already holding inline_len bytes) up to `limit`
 * bytes in all. Returns 1 when that is the whole body (or reading it
 * failed: x->body_failed), 0 when more is left. */
static int preread_body(struct xfer *x, char *buf, size_t limit, int exact)
{
    while (x->inline_len < limit) {
        int got = body_read(x, buf + x->inline_len, limit - x->inline_len);
        if (got <= 0)
            return 1;  /* its end, or x->body_failed */
        x->inline_len += (size_t)got;
    }
    if (exact) {
        consume_stdin_end(x);
        return 1;
    }
    return 0;
}

/* Reads a larger body on from where buf ended into a heap buffer, whole
 * if it fits LOOP_BODY_MAX and the size limit. NULL: too large to try. */
static char *read_on(struct xfer *x)
{
    int64_t cl = x->t->content_length;
    uint64_t max = x->t->settings->max_body_bytes + 1;  /* one more: TOO_LARGE */
    if (max > LOOP_BODY_MAX)
        max = LOOP_BODY_MAX;
    if (cl > (int64_t)max || x->inline_len >= max)
        return NULL;
    size_t limit = cl >= 0 ? (size_t)cl : (size_t)max;
    char *heap = piapi_xmalloc(limit);
    memcpy(heap, x->body, x->inline_len);
    x->body = heap;
    x->whole = preread_body(x, heap, limit, cl >= 0);
    return heap;
}

char *xfer_read_ahead(struct xfer *x, char *buf)
{
    int64_t cl = x->t->content_length;
    char *heap = NULL;

    x->body = buf;
    if (cl >= 0 && cl <= PIAPI_PROXY_INLINE_BODY_MAX)
        x->whole = preread_body(x, buf, (size_t)cl, 1);
    else  /* unknown, or larger than the buffer (unless the length lies) */
        x->whole = preread_body(x, buf, PIAPI_PROXY_INLINE_BODY_MAX, 0);
    if (!x->whole)
        heap = read_on(x);
    x->t->bytes_in = x->inline_len;
    return heap;
}

void xfer_choose_body(struct xfer *x)
{
    if (!x->usage_body)
        return;
    x->injected = x->t->inject_usage != 0;
    x->body = x->injected ? x->usage_body : x->plain_body;
    x->inline_len = x->injected ? x->usage_len : x->plain_len;
}

void xfer_prepare_usage(struct xfer *x, struct piapi_buf *rewritten)
{
    struct piapi_transfer *t = x->t;
    struct piapi_usage_request rq;

    t->request_model[0] = '\0';
    if (!t->usage_shape || !x->whole ||
        piapi_usage_scan_request(x->body, x->inline_len, &rq) != 0)
        return;
    snprintf(t->request_model, sizeof t->request_model, "%s", rq.model);
    if (t->usage_shape != PIAPI_USAGE_CHAT || !rq.stream || rq.asked_usage ||
        !(t->inject_usage || t->inject_usage_later))
        return;
    if (piapi_usage_inject(x->body, x->inline_len, rewritten) != 0)
        return;
    x->plain_body = x->body;
    x->plain_len = x->inline_len;
    x->usage_body = rewritten->data;
    x->usage_len = rewritten->len;
    xfer_choose_body(x);
}


/* ---- response head -------------------------------------------------- */

static int parse_status_line(const char *line, size_t n)
{
    /* "HTTP/1.1 200 OK" or "HTTP/2 200" */
    const char *sp = memchr(line, ' ', n);
    if (!sp || (size_t)(sp - line) + 4 > n)
        return 0;
    int code = 0;
    for (int i = 1; i <= 3; i++) {
        char c = sp[i];
        if (c < '0' || c > '9')
            return 0;
        code = code * 10 + (c - '0');
    }
    return code >= 100 && code <= 599 ? code : 0;
}

/* Pads the head to a multiple of 8 bytes: libfcgi pads every record to 8,
 * and nginx holds a padded header-only record until the first body byte
 *. The spaces go into X-Accel-Buffering, which nginx
 * reads leniently and never shows the client. */
static void finish_head(struct piapi_buf *h)
{
    static const char pre[] = "X-Accel-Buffering:", post[] = "no\r\n\r\n";
    size_t len = h->len + sizeof pre - 1 + 1 + sizeof post - 1;
    size_t pad = (8 - len % 8) % 8;

    piapi_buf_puts(h, pre);
    for (size_t i = 0; i <= pad; i++)
        piapi_buf_putc(h, ' ');
    piapi_buf_puts(h, post);
}

static int ows(char c)
{
    return c == ' ' || c == '\t';
}

/* One Content-Length number: digits only (leading zeros allowed, any
 * number of them), or -1. */
static int64_t parse_number(const char *v, size_t n)
{
    while (n > 1 && *v == '0')
        v++, n--;
    if (!n || n > 18)
        return -1;
    int64_t cl = 0;
    for (size_t i = 0; i < n; i++) {
        if (v[i] < '0' || v[i] > '9')
            return -1;
        cl = cl * 10 + (v[i] - '0');
    }
    return cl;
}

/* A Content-Length value, or -1 when it is not valid. A list of equal
 * numbers ("5, 5", a proxy joining repeated lines) is that number, a
 * list of different ones invalid (RFC 9110 §8.6). */
static int64_t parse_length(const char *v, size_t n)
{
    int64_t cl = -1;
    for (;;) {
        size_t part = 0;
        while (part < n && v[part] != ',')
            part++;
        const char *p = v;
        size_t pn = part;
        while (pn && ows(*p))
            p++, pn--;
        while (pn && ows(p[pn - 1]))
            pn--;
        int64_t one = parse_number(p, pn);
        if (one < 0 || (cl >= 0 && one != cl))
            return -1;
        cl = one;
        if (part == n)
            return cl;
        v += part + 1;
        n -= part + 1;
    }
}

/* Whether a Content-Type value is the media type text/event-stream
 * (RFC 9110 §8.3.1: parameters may follow after ';'). */
static int is_event_stream(const char *v, size_t n)
{
    static const char sse[] = "text/event-stream";
    size_t k = sizeof sse - 1;
    return n >= k && strncasecmp(v, sse, k) == 0 &&
           (n == k || v[k] == ';' || ows(v[k]));
}

/* Whether a Content-Encoding value applies a coding: "identity" or an
 * empty list leaves the body as it is. */
static int is_encoded(const char *v, size_t n)
{
    while (n) {
        size_t part = 0;
        while (part < n && v[part] != ',')
            part++;
        const char *p = v;
        size_t pn = part;
        while (pn && ows(*p))
            p++, pn--;
        while (pn && ows(p[pn - 1]))
            pn--;
        if (pn && !(pn == 8 && strncasecmp(p, "identity", 8) == 0))
            return 1;
        if (part == n)
            break;
        v += part + 1;
        n -= part + 1;
    }
    return 0;
}

/* Removes the head's lines of one field (name lowercase). */
static void head_drop(struct piapi_buf *h, const char *name)
{
    size_t nl = strlen(name), at = 0;
    while (at < h->len) {
        char *eol = memchr(h->data + at, '\n', h->len - at);
        size_t end = eol ? (size_t)(eol - h->data) + 1 : h->len;
        if (end - at > nl && h->data[at + nl] == ':' &&
            strncasecmp(h->data + at, name, nl) == 0) {
            memmove(h->data + at, h->data + end, h->len - end);
            h->len -= end - at;
        } else {
            at = end;
        }
    }
}

/* A 2xx answer of a known shape, in the clear: its usage is read as it
 * passes (an error's body carries none, a compressed one cannot be read). */
static void start_counting(struct xfer *x)
{
    int st = x->t->status;
    if (!x->t->usage_shape || st < 200 || st > 299 || x->encoded)
        return;
    x->counting = 1;
    piapi_usage_scan_init(&x->usage, x->t->usage_shape, x->event_stream,
                          x->injected && x->event_stream);
}

static int send_head(struct xfer *x)
{
    struct piapi_buf *h = &x->head;
    piapi_buf_printf(h, "X-Request-ID: %s\r\n", x->t->request_id);
    finish_head(h);
    return client_put(x, h->data, h->len);
}

/* Whether the body could echo a secret and must be read for it: a
 * redirect or an error (never the streamed answers), not to HEAD. */
static int may_echo_key(const struct xfer *x)
{
    int st = x->t->status;
    return piapi_secrets_span(&x->secrets) && st >= 300 && st != 304 &&
           !x->event_stream && strcmp(x->t->method, "HEAD") != 0;
}

/* Sends a held answer, redacted: the head with the body's new length,
 * then the body. Nothing of this request went to the web server yet, so
 * these 64 KiB at most fit its socket's empty buffer: the loop does not
 * block on them. */
static int release_held(struct xfer *x)
{
    struct piapi_buf body = {0};
    piapi_secrets_redact(&x->secrets, x->held.data ? x->held.data : "", x->held.len, &body);
    if (x->upstream_cl >= 0)
        piapi_buf_printf(&x->head, "Content-Length: %zu\r\n", body.len);
    x->holding = 0;
    int rc = send_head(x);
    if (rc == 0 && body.len)
        rc = client_put(x, body.data, body.len);
    if (rc == 0)
        x->t->bytes_out += body.len;
    piapi_buf_dispose(&body);
    piapi_buf_wipe(&x->held);
    return rc;
}

/* Relays x->held redacted except its last span - 1 bytes, where a
 * spelling could still be starting (all of it when `last`). */
static int scan_window(struct xfer *x, int last)
{
    size_t keep = last ? 0 : piapi_secrets_span(&x->secrets) - 1;
    if (x->held.len <= keep)
        return 0;
    piapi_buf_reset(&x->scanned);
    size_t used = piapi_secrets_redact_window(&x->secrets, x->held.data, x->held.len,
                                              x->held.len - keep, &x->scanned, NULL);
    memmove(x->held.data, x->held.data + used, x->held.len - used);
    x->held.len -= used;
    if (!x->scanned.len)
        return 0;
    if (client_put(x, x->scanned.data, x->scanned.len) != 0)
        return -1;
    x->t->bytes_out += x->scanned.len;
    return 0;
}

/* A held answer outgrew HOLD_MAX: its head goes out without a length
 * (the redaction may change it; FastCGI needs none), and from here on
 * it is relayed in windows. */
static int start_scanning(struct xfer *x)
{
    x->holding = 0;
    x->scanning = 1;
    if (send_head(x) != 0)
        return -1;
    return scan_window(x, 0);
}

/* A compressed error or redirect: piapi cannot read it for secrets, so
 * the client gets the status with piapi's own error body instead. */
static int withhold(struct xfer *x)
{
    static const char body[] =
        "{\"type\":\"error\",\"error\":{\"type\":\"upstream_error\",\"message\":"
        "\"upstream error body withheld: compressed, so it could not be checked for secrets\"}}";
    head_drop(&x->head, "content-type");
    head_drop(&x->head, "content-encoding");
    piapi_buf_printf(&x->head, "Content-Type: application/json\r\nContent-Length: %zu\r\n",
                     sizeof body - 1);
    x->withheld = 1;
    if (send_head(x) != 0 || client_put(x, body, sizeof body - 1) != 0)
        return -1;
    x->t->bytes_out += sizeof body - 1;
    return 0;
}

static size_t on_header(char *data, size_t size, size_t nitems, void *ud)
{
    struct xfer *x = ud;
    size_t n = size * nitems;
    struct piapi_buf *h = &x->head;

    if (x->head_sent || x->head_pending)
        return n;  /* trailers: not relayed */
    if (n >= 5 && memcmp(data, "HTTP/", 5) == 0) {
        int code = parse_status_line(data, n);
        if (!code)
            return 0;
        x->t->status = code;
        x->t->retry_after = -1;
        x->in_block = code >= 200;
        x->event_stream = x->encoded = x->cl_seen = 0;
        x->upstream_cl = -1;
        if (!x->secrets_built) {
            piapi_secrets_build(&x->secrets, x->t->provider_key, x->t->key_param, x->t->url,
                                FCGX_GetParam("REQUEST_URI", x->t->fcgi->envp));
            x->secrets_built = 1;
        }
        piapi_buf_reset(h);
        piapi_buf_printf(h, "Status: %d %s\r\n", code, piapi_http_reason(code));
        return n;
    }
    if (!x->in_block)
        return n;  /* 1xx block: nothing to relay */
    if (n <= 2) {  /* the empty line: the head is complete */
        const char *failed = status_outcome(x->t->status);
        if (failed && x->can_fail_over && x->t->pick && x->t->pick(x->t)) {
            /* Nothing of it reaches the client: the next candidate's
             * answer will. Ending the transfer here closes the connection. */
            x->failover = failed;
            return 0;
        }
        x->head_sent = 1;
        x->at_boundary = 1;  /* before the first event is between events */
        start_counting(x);
        x->t->ttfb = piapi_now_mono() - x->start;
        x->last_upstream = piapi_now_mono();
        if (may_echo_key(x) && x->encoded)
            return withhold(x) == 0 ? n : 0;
        x->holding = may_echo_key(x);
        if (x->holding)
            return n;  /* the head goes out with the body, at its end */
        if (x->upstream_cl >= 0)
            piapi_buf_printf(h, "Content-Length: %lld\r\n", (long long)x->upstream_cl);
        if (x->can_fail_over && x->t->pick && x->t->status < 300 &&
            strcmp(x->t->method, "HEAD") != 0) {
            x->head_sent = 0;
            x->head_pending = 1;
            return n;
        }
        return send_head(x) == 0 ? n : 0;
    }

    size_t len = n;
    if (len && data[len - 1] == '\n')
        len--;
    if (len && data[len - 1] == '\r')
        len--;
    if (!piapi_headers_response_line_ok(data, len))
        return n;  /* a bare CR or a name that is no token: never relayed */
    const char *colon = memchr(data, ':', len);
    size_t name_len = (size_t)(colon - data), out_len;
    const char *out = piapi_headers_response_name(data, name_len, &out_len);
    if (!out)
        return n;
    const char *v = colon + 1;
    while (v < data + len && ows(*v))
        v++;
    size_t vlen = (size_t)(data + len - v);
    while (vlen && ows(v[vlen - 1]))
        vlen--;
    switch (piapi_headers_response_value(&x->secrets, data, name_len, v, vlen, &x->value)) {
    case PIAPI_RESP_DROP:
        return n;
    case PIAPI_RESP_REDACTED:
        v = x->value.data;
        vlen = x->value.len;
        break;
    case PIAPI_RESP_KEEP:
        break;
    }
    if (name_len == 14 && strncasecmp(data, "content-length", 14) == 0) {
        /* Relayed at the head's end, in one spelling: a held body's
         * length may change. One that cannot be read (or repeats with
         * another value) is dropped; it never turns the scan off. */
        int64_t cl = parse_length(v, vlen);
        x->upstream_cl = x->cl_seen && cl != x->upstream_cl ? -1 : cl;
        x->cl_seen = 1;
        return n;
    }
    if (name_len == 12 && strncasecmp(data, "content-type", 12) == 0) {
        x->event_stream = is_event_stream(v, vlen);
    } else if (name_len == 16 && strncasecmp(data, "content-encoding", 16) == 0) {
        x->encoded |= is_encoded(v, vlen);
    } else if (name_len == 11 && strncasecmp(data, "retry-after", 11) == 0) {
        x->t->retry_after = piapi_routes_parse_retry_after(v, vlen, piapi_now_real());
    } else if ((name_len == 12 && strncasecmp(data, "x-request-id", 12) == 0) ||
               (name_len == 10 && strncasecmp(data, "request-id", 10) == 0)) {
        snprintf(x->t->upstream_id, sizeof x->t->upstream_id, "%.*s", (int)vlen, v);
    }
    piapi_buf_append(h, out, out_len);
    piapi_buf_puts(h, ": ");
    piapi_buf_append(h, v, vlen);
    piapi_buf_puts(h, "\r\n");
    return n;
}

static int relay(struct xfer *x, const char *data, size_t n);
static int relay_counted(struct xfer *x, const char *data, size_t n);

/* The held head goes out, with what was held of the body. */
static int release_pending(struct xfer *x)
{
    x->head_pending = 0;
    x->head_sent = 1;
    int rc = send_head(x);
    if (rc == 0 && x->first.len)
        rc = x->counting ? relay_counted(x, x->first.data, x->first.len)
                         : relay(x, x->first.data, x->first.len);
    piapi_buf_dispose(&x->first);
    return rc;
}

/* One whole line of d[0..n) from *at (CR, LF or CRLF ends it): 1 and
 * *line, *len, with *at past its end; 0 when none is whole yet (a CR at
 * the end may still be half of a CRLF). */
static int next_line(const char *d, size_t n, size_t *at, const char **line, size_t *len)
{
    size_t i = *at;
    while (i < n && d[i] != '\n' && d[i] != '\r')
        i++;
    if (i == n || (d[i] == '\r' && i + 1 == n))
        return 0;
    *line = d + *at;
    *len = i - *at;
    *at = i + (d[i] == '\r' && d[i + 1] == '\n' ? 2 : 1);
    return 1;
}

/* Whether the data of an error event says overloaded_error: its
 * error.type, not some word in its message. */
static int overloaded_data(const struct piapi_buf *data)
{
    cJSON *root = cJSON_ParseWithLength(data->data ? data->data : "", data->len);
    const cJSON *err = cJSON_GetObjectItemCaseSensitive(root, "error");
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(err, "type");
    int yes = cJSON_IsString(type) && strcmp(type->valuestring, "overloaded_error") == 0;
    cJSON_Delete(root);
    return yes;
}

/* Judges the first event of an event stream held in b, by its own fields
 * (the words of later events, the model's text among them, say nothing):
 * -1 while it is not whole, 1 when it is Anthropic's overload in the
 * middle of a 200 stream (`event: error`, error type overloaded_error),
 * else 0. */
static int first_event_overloaded(const struct piapi_buf *b)
{
    struct piapi_buf data = {0};
    const char *line;
    size_t len, at = 0;
    int error_event = 0, verdict = -1;

    while (next_line(b->data, b->len, &at, &line, &len)) {
        if (!len) {
            verdict = error_event && overloaded_data(&data);
            break;
        }
        const char *colon = memchr(line, ':', len);
        size_t name = colon ? (size_t)(colon - line) : len;
        const char *v = colon ? colon + 1 : line + len;
        size_t vlen = (size_t)(line + len - v);
        if (vlen && *v == ' ')
            v++, vlen--;
        if (name == 5 && !memcmp(line, "event", 5)) {
            error_event = vlen == 5 && !memcmp(v, "error", 5);
        } else if (name == 4 && !memcmp(line, "data", 4)) {
            if (data.len)
                piapi_buf_putc(&data, '\n');
            piapi_buf_append(&data, v, vlen);
        }
    }
    piapi_buf_dispose(&data);
    return verdict;
}

/* A held head and the first bytes: 1 when they may go out now. A
 * compressed stream cannot be read, so its first event is not waited for. */
static int first_bytes(struct xfer *x, const char *data, size_t n)
{
    if (!x->event_stream || x->encoded)
        return 1;
    piapi_buf_append(&x->first, data, n);
    int overloaded = first_event_overloaded(&x->first);
    if (overloaded < 0 && x->first.len < FIRST_EVENT_MAX)
        return 0;
    x->t->overloaded = overloaded > 0;
    return 1;
}

static size_t on_body(char *data, size_t size, size_t nitems, void *ud)
{
    struct xfer *x = ud;
    size_t n = size * nitems;

    if (x->withheld) {
        x->last_upstream = piapi_now_mono();
        return n;  /* piapi's error went out instead */
    }
    if (x->head_pending) {
        x->last_upstream = piapi_now_mono();
        if (!first_bytes(x, data, n))
            return n;
        if (x->t->overloaded && x->t->pick(x->t)) {
            x->failover = "overloaded";
            return 0;  /* nothing of it reached the client */
        }
        int held = x->first.len > 0;  /* the first event, these bytes among it */
        if (release_pending(x) != 0)
            return 0;
        if (held)
            return n;
    }
    if (x->holding) {
        x->last_upstream = piapi_now_mono();
        piapi_buf_append(&x->held, data, n);
        if (x->held.len <= HOLD_MAX)
            return n;
        return start_scanning(x) == 0 ? n : 0;
    }
    if (x->scanning) {
        if (!client_has_room(x, n + x->held.len)) {
            x->paused = 1;
            x->blocked(x);
            return CURL_WRITEFUNC_PAUSE;
        }
        x->last_upstream = piapi_now_mono();
        piapi_buf_append(&x->held, data, n);
        return scan_window(x, 0) == 0 ? n : 0;
    }
    if (!client_has_room(x, n + (x->counting ? piapi_usage_held(&x->usage) : 0))) {
        x->paused = 1;
        x->blocked(x);
        return CURL_WRITEFUNC_PAUSE;
    }
    x->last_upstream = piapi_now_mono();
    if (x->counting)
        return relay_counted(x, data, n) == 0 ? n : 0;
    if (relay(x, data, n) != 0)
        return 0;
    return n;
}

/* Bytes of the answer that reach the client as they are. */
static int relay(struct xfer *x, const char *data, size_t n)
{
    if (client_put(x, data, n) != 0)
        return -1;
    x->t->bytes_out += n;
    if (n >= 2) {
        x->tail[0] = data[n - 2];
        x->tail[1] = data[n - 1];
    } else if (n == 1) {
        x->tail[0] = x->tail[1];
        x->tail[1] = data[0];
    }
    x->at_boundary = x->tail[0] == '\n' && x->tail[1] == '\n';
    return 0;
}

/* The scanner reads every byte; when stripping, the client gets what it
 * hands back (whole events only) instead. */
static int relay_counted(struct xfer *x, const char *data, size_t n)
{
    if (!(x->injected && x->event_stream)) {
        piapi_usage_feed(&x->usage, data, n, NULL);
        return relay(x, data, n);
    }
    piapi_buf_reset(&x->relay);
    piapi_usage_feed(&x->usage, data, n, &x->relay);
    if (!x->relay.len)
        return 0;
    if (client_put(x, x->relay.data, x->relay.len) != 0)
        return -1;
    x->t->bytes_out += x->relay.len;
    x->at_boundary = 1;  /* only whole events come back */
    return 0;
}

/* ---- the transfer --------------------------------------------------- */

static void set_method_and_body(struct xfer *x)
{
    CURL *e = x->easy;
    struct piapi_transfer *t = x->t;
    const char *m = t->method;
    int64_t cl = t->content_length;
    int whole = x->whole;

    if (strcmp(m, "HEAD") == 0) {
        curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
        return;
    }
    int bodyless = whole && x->inline_len == 0 &&
                   (!strcmp(m, "GET") || !strcmp(m, "DELETE") || !strcmp(m, "OPTIONS"));
    if (bodyless) {
        if (strcmp(m, "GET") != 0)
            curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, m);
        return;
    }
    curl_easy_setopt(e, CURLOPT_POST, 1L);
    if (strcmp(m, "POST") != 0)
        curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, m);
    if (whole) {
        curl_easy_setopt(e, CURLOPT_POSTFIELDS, x->body);
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)x->inline_len);
        return;
    }
    curl_easy_setopt(e, CURLOPT_READFUNCTION, read_body);
    curl_easy_setopt(e, CURLOPT_READDATA, x);
    if (cl >= 0)
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)cl);
    /* Unknown length: libcurl sends it chunked. */
}

_Static_assert(sizeof ((struct piapi_transfer *)0)->error_detail >= CURL_ERROR_SIZE,
               "libcurl's error buffer");

void xfer_setup(struct xfer *x)
{
    CURL *e = x->easy;
    const struct piapi_settings *s = x->t->settings;

    curl_easy_reset(e);
    x->t->error_detail[0] = '\0';
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, x->t->error_detail);
    curl_easy_setopt(e, CURLOPT_URL, x->t->url);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, x->t->headers);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)s->connect_timeout_ms);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, x);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, x);
    if (s->ca_file)
        curl_easy_setopt(e, CURLOPT_CAINFO, s->ca_file);
    set_method_and_body(x);
}

/* Maps a failed transfer to the metrics reason and, when nothing reached
 * the client yet, the status to answer with. */
static void classify(struct xfer *x, CURLcode rc)
{
    struct piapi_transfer *t = x->t;
    const char *reason;
    int status = 502;
    const char *msg = "upstream request failed";

    switch (rc) {
    case CURLE_COULDNT_CONNECT:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
        reason = "connect";
        msg = "upstream unreachable";
        break;
    case CURLE_OPERATION_TIMEDOUT:
        reason = "timeout";
        status = 504;
        msg = "upstream timed out";
        break;
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_CACERT_BADFILE:
        reason = "tls";
        msg = "upstream TLS failure";
        break;
    case CURLE_RECV_ERROR:
    case CURLE_SEND_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
        reason = "reset";
        msg = "upstream closed the connection";
        break;
    default:
        reason = "protocol";
        msg = "invalid upstream response";
        break;
    }
    t->error = reason;
    t->error_status = status;
    t->error_message = msg;
}

const char *xfer_failed_outcome(const struct xfer *x, CURLcode rc)
{
    if (x->head_sent || x->client_gone || x->body_failed || x->body_over_limit)
        return NULL;
    switch (rc) {
    case CURLE_COULDNT_CONNECT:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
        return "connect";
    case CURLE_OPERATION_TIMEDOUT:
        return "timeout";
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_CACERT_BADFILE:
        return "tls";
    case CURLE_RECV_ERROR:
    case CURLE_SEND_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
        return "reset";
    default:
        return NULL;
    }
}

/* A held event-stream head whose upstream has sent nothing more for a
 * ping interval: holding it longer would silence the pings that keep the
 * client's connection alive and, behind lighttpd, are the only way to
 * notice a client that left. So it goes out (the ping follows); a first
 * event that arrives later is relayed, not judged. Partway through the
 * first event no ping could be sent anyway: it is held on. */
static int held_too_long(struct xfer *x, double now, double *next)
{
    if (!x->event_stream || x->encoded || !x->keepalive_ms || x->first.len)
        return 0;
    double due = x->last_upstream + x->keepalive_ms / 1000.0;
    if (now >= due)
        return 1;
    if (due < *next)
        *next = due;
    return 0;
}

enum verdict xfer_timers(struct xfer *x, double now, double *next)
{
    const struct piapi_settings *s = x->t->settings;

    if (x->t->abort_flag && atomic_load_explicit(x->t->abort_flag, memory_order_relaxed))
        return SHUTDOWN;
    if (x->client_gone)
        return CLIENT_GONE;
    if (x->body_over_limit)
        return TOO_LARGE;
    if (!x->head_sent && !x->head_pending) {
        double deadline = x->start + s->header_timeout_ms / 1000.0;
        if (now >= deadline)
            return HEAD_TIMEOUT;
        if (deadline < *next)
            *next = deadline;
        return RUNNING;
    }
    if (x->paused)
        return RUNNING;  /* the client is slow, not the upstream */
    double deadline = x->last_upstream + s->idle_timeout_ms / 1000.0;
    if (now >= deadline)
        return IDLE_TIMEOUT;
    if (deadline < *next)
        *next = deadline;
    if (x->head_pending && held_too_long(x, now, next) && release_pending(x) != 0)
        return CLIENT_GONE;
    if (x->event_stream && !x->encoded && x->keepalive_ms && !x->head_pending) {
        double due = x->last_write + x->keepalive_ms / 1000.0;
        /* Comments only between events, so no event is split. */
        if (now >= due && x->at_boundary) {
            static const char ping[] = ": ping\n\n";
            if (client_put(x, ping, sizeof ping - 1) != 0)
                return CLIENT_GONE;
            x->last_write = now;
            due = now + x->keepalive_ms / 1000.0;
        }
        if (due < *next)
            *next = due;
    }
    return RUNNING;
}

/* What the client is told when a driver ends a transfer itself; error
 * is the metrics reason (NULL: the client's doing, not the upstream's). */
static const struct {
    const char *error;
    int status;
    const char *message;
} refusals[] = {
    [CLIENT_GONE]  = { "client_abort", 499, "client closed the connection" },
    [HEAD_TIMEOUT] = { "timeout", 504, "upstream sent no response in time" },
    [IDLE_TIMEOUT] = { "idle_timeout", 504, "upstream went silent" },
    [SHUTDOWN]     = { "shutdown", 503, "gateway shutting down" },
    [TOO_LARGE]    = { NULL, 413, "request body too large" },
    [BODY_TIMEOUT] = { NULL, 408, "request body not received in time" },
};

void xfer_refuse(struct xfer *x, enum verdict v)
{
    if (v == RUNNING)
        return;
    x->t->error = refusals[v].error;
    x->t->error_status = refusals[v].status;
    x->t->error_message = refusals[v].message;
}

/* The answer ended: its usage is what was seen. A stripped stream that
 * ended cleanly still owes the client its last bytes (an event without
 * its blank line); a cut one is poisoned anyway. A cut answer is never
 * complete, whatever usage it carried before the cut: Anthropic may send
 * more than one (cumulative) message_delta, and what the client got was
 * not the whole answer. */
static void finish_counting(struct xfer *x, int clean)
{
    piapi_buf_reset(&x->relay);
    piapi_usage_finish(&x->usage, &x->relay, &x->t->usage);
    if (!clean)
        x->t->usage.complete = 0;
    if (clean && x->relay.len && client_put(x, x->relay.data, x->relay.len) == 0)
        x->t->bytes_out += x->relay.len;
    piapi_usage_scan_dispose(&x->usage);
    piapi_buf_dispose(&x->relay);
    x->counting = 0;
}

void xfer_end(struct xfer *x, enum verdict v, CURLcode rc)
{
    struct piapi_transfer *t = x->t;

    /* The handle is reused; t's buffer goes with t. */
    curl_easy_setopt(x->easy, CURLOPT_ERRORBUFFER, NULL);
    if (v == RUNNING) {
        if (x->body_over_limit)
            v = TOO_LARGE;
        else if (x->client_gone || x->body_failed == PIAPI_FCGI_BODY_GONE)
            v = CLIENT_GONE;
        else if (x->body_failed == PIAPI_FCGI_BODY_TIMEOUT)
            v = BODY_TIMEOUT;
    }
    if (v != RUNNING)
        xfer_refuse(x, v);
    else if (rc != CURLE_OK)
        classify(x, rc);

    piapi_buf_wipe(&x->value);
    if (x->head_pending) {
        /* An answer that ended before its first event was whole goes out
         * as it came; a failed one never reached the client. */
        if (!t->error && v == RUNNING)
            release_pending(x);
        x->head_pending = 0;
    }
    piapi_buf_dispose(&x->first);
    if (x->holding) {
        /* Complete: out it goes, redacted. Cut: nothing of it reached the
         * client, which gets the error instead. */
        if (!t->error && v == RUNNING)
            release_held(x);
        else
            x->head_sent = 0;
        x->holding = 0;
    } else if (x->scanning && !t->error && v == RUNNING) {
        scan_window(x, 1);  /* the part kept back; a cut stream is poisoned */
    }
    if (x->counting)
        finish_counting(x, !t->error && v == RUNNING);
    piapi_buf_wipe(&x->held);
    piapi_buf_dispose(&x->scanned);
    piapi_secrets_dispose(&x->secrets);
    if (!x->head_sent) {
        t->status = 0;
        return;
    }
    if (t->error && v != CLIENT_GONE)
        piapi_fcgi_poison(x->t->fcgi);
}
