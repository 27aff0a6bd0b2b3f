/* One upstream transfer's state and the steps both drivers share
 * (xfer.c): proxy.c drives a transfer on the calling thread (blocking),
 * upstream.c drives many on the event loop. Private to those three. */
#ifndef PIAPI_XFER_H
#define PIAPI_XFER_H

#include <curl/curl.h>
#include <stddef.h>

#include "piapi/headers.h"
#include "piapi/proxy.h"
#include "piapi/util.h"

/* Upper bound on one wait, so shutdown and timers are seen promptly. */
#define POLL_SLICE_MS 1000

struct xfer {
    struct piapi_transfer *t;
    CURL *easy;
    struct piapi_buf head;  /* response head under construction */
    const char *body;       /* the request body read ahead */
    size_t inline_len, inline_off;
    int whole;              /* the read-ahead is the whole body */
    double start;
    double last_upstream;   /* last byte from the upstream */
    double last_write;      /* last byte to the client */
    int stdin_eof;          /* only then does POLLIN on the fd mean "gone" */
    int in_block;           /* inside a non-1xx header block */
    int head_sent;
    int event_stream;       /* Content-Type: text/event-stream */
    int encoded;            /* a Content-Encoding other than identity: never inject into it */
    int at_boundary;        /* last body bytes ended an SSE event */
    int client_gone;
    int unflushed;          /* bytes queued in libfcgi's buffer */
    int body_over_limit;
    int body_failed;        /* PIAPI_FCGI_BODY_TIMEOUT or _GONE, else 0 */
    double read_timeout;    /* SO_RCVTIMEO last set, seconds; 0 unknown */
    char tail[2];           /* last two body bytes, for SSE boundaries */
    uint32_t keepalive_ms;  /* SSE ping interval in effect, 0: none */
    struct piapi_secrets secrets;  /* what no relayed byte may carry */
    int secrets_built;      /* at the first header line, freed by xfer_end */
    struct piapi_buf value;      /* a header value being redacted */
    /* An answer of status >= 300 that may echo a secret (not an event
     * stream, not to HEAD) is held up to HOLD_MAX, redacted and sent at
     * its end with its length fixed; a longer one is then `scanning`:
     * relayed redacted in windows without a Content-Length, the last
     * span - 1 bytes kept back in `held`. A compressed one cannot be
     * scanned: `withheld`, its body replaced by piapi's error. */
    int holding, scanning, withheld;
    int64_t upstream_cl;    /* its Content-Length, -1: none or invalid */
    int cl_seen;            /* a Content-Length line came (a repeat must agree) */
    struct piapi_buf held;  /* its body so far, or the part kept back */
    struct piapi_buf scanned;    /* a window after redaction */
    /* Usage accounting of a 2xx answer of a known API shape: the scanner
     * reads every body byte as it passes; `strip` (piapi added
     * include_usage to the request) has it remove the usage-only chunk,
     * so the client relays what it hands back in `relay`. */
    int counting, injected;
    struct piapi_usage_scan usage;
    struct piapi_buf relay;
    /* A body `injected` rewrote, in both spellings: a later candidate
     * whose service refuses the option (usage.injectStreamUsage: false)
     * gets the client's (xfer_choose_body). NULL: never rewritten. */
    const char *usage_body, *plain_body;
    size_t usage_len, plain_len;

    /* Event-loop driver only: failover. `failover` is the failed
     * attempt's outcome once t->pick() chose another candidate. */
    int can_fail_over;
    const char *failover;
    /* While another candidate could still answer, a 2xx head is held
     * (head_pending) until the first body bytes, and an event stream's
     * until its first event is whole (in `first`): a first event `error`
     * of type overloaded_error fails over too. The head goes out with
     * those bytes, so the client's first byte comes no later. */
    int head_pending;
    struct piapi_buf first;

    /* Event-loop driver only. A write to the web server must never block
     * the loop: once `unchecked` (an over-estimate of the socket memory
     * queued since the socket last polled writable) would pass `budget`,
     * the socket is polled again, and the transfer is paused while it is
     * full. budget 0: the blocking driver, which may simply block. */
    size_t budget, unchecked;
    int paused;
    void (*blocked)(struct xfer *x);  /* the transfer has just paused */
    void (*queued)(struct xfer *x);   /* bytes wait for xfer_flush() */
};

/* What a driver decided on its own (timers, hang-ups, shutdown). */
enum verdict { RUNNING, CLIENT_GONE, HEAD_TIMEOUT, IDLE_TIMEOUT, SHUTDOWN, TOO_LARGE,
               BODY_TIMEOUT };

/* A fresh transfer for t: its SSE ping interval, the secret no relayed
 * byte may carry, its clock. */
void xfer_init(struct xfer *x, struct piapi_transfer *t);
/* Reads into buf (PIAPI_PROXY_INLINE_BODY_MAX bytes) what may be read
 * whole, and a larger body on into a heap buffer (returned, the caller's
 * to free; NULL if none). x->whole says whether what was read is all of
 * the body. On the event loop the body always fits buf (pool.c's arrival
 * check), so it never reads on there. */
char *xfer_read_ahead(struct xfer *x, char *buf);
/* The request body as usage accounting needs it: its model noted, and
 * when piapi may and must ask for a streamed Chat Completions answer's
 * usage, the body rewritten into `rewritten` (x->body points there; the
 * caller disposes of it after the transfer). Only a body read whole. */
void xfer_prepare_usage(struct xfer *x, struct piapi_buf *rewritten);
/* Sets every option of x->easy for x->t (method, body, callbacks). */
void xfer_setup(struct xfer *x);
/* Sends what the client has queued; -1 once the client is gone. */
int xfer_flush(struct xfer *x);
/* Timers and flags at `now`; may queue an SSE ping. *next (absolute) is
 * lowered to the next moment this needs looking at. */
enum verdict xfer_timers(struct xfer *x, double now, double *next);
/* What t answers for a transfer ended (or never started) by v. */
void xfer_refuse(struct xfer *x, enum verdict v);
/* After x->easy left its multi handle, for the next attempt of the same
 * request: every per-answer state back to its start, nothing sent. */
void xfer_rearm(struct xfer *x);
/* After xfer_rearm() and t's next candidate aimed at: the body in the
 * spelling that candidate's service wants (t->inject_usage). */
void xfer_choose_body(struct xfer *x);
/* The failover outcome of a transfer that ended with rc before its head
 * (connect, tls, reset, timeout), or NULL: not a reason to fail over. */
const char *xfer_failed_outcome(const struct xfer *x, CURLcode rc);
/* After x->easy left its multi handle, before it is reused: fills t's
 * outcome from the verdict or libcurl's result, and poisons a stream cut
 * after its head. */
void xfer_end(struct xfer *x, enum verdict v, CURLcode rc);

#endif
