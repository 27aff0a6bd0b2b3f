/* A request's upstream transfer: the request body from FastCGI stdin, the
 * response head and every body chunk back to FastCGI as soon as libcurl
 * has them (the transfer itself: xfer.c).
 *
 * A transfer whose body is in hand once read (up to 8 MiB: every LLM
 * request) runs on the event loop (upstream.h): one thread, every such
 * transfer at once, one upstream connection cache per origin. A larger
 * body is streamed by the calling pool thread with its own handles. */
#ifndef PIAPI_PROXY_H
#define PIAPI_PROXY_H

#include <fcgiapp.h>
#include <stdatomic.h>
#include <stdint.h>
#include "piapi/config.h"
#include "piapi/usage.h"

struct curl_slist;
struct piapi_proxy;

/* Bodies up to this size are read ahead whole wherever the request is
 * served, so the event loop can serve such requests itself. A pool thread
 * reads larger bodies whole too (up to 8 MiB) before it hands the transfer
 * to the loop; only a transfer with a body even larger runs on the thread. */
#define PIAPI_PROXY_INLINE_BODY_MAX (64 * 1024)

struct piapi_proxy *piapi_proxy_create(void);
void piapi_proxy_destroy(struct piapi_proxy *p);

struct piapi_transfer {
    /* in */
    FCGX_Request *fcgi;
    const char *method;
    const char *url;
    struct curl_slist *headers;
    const struct piapi_settings *settings;
    const char *request_id;
    int64_t content_length;         /* -1: unknown, read stdin to its end */
    const atomic_int *abort_flag;   /* set at shutdown after the grace period */
    /* The provider key, which the client must never get back (a redirect
     * keeping the query, an error echoing it), and the query parameter it
     * went out in (query-mode auth) or NULL. */
    const char *provider_key;
    const char *key_param;
    void (*done)(struct piapi_transfer *t);  /* called once, at the end */
    /* The API shape whose usage the answer carries (NONE: not counted),
     * and whether a streamed Chat Completions request may be given
     * stream_options.include_usage (the service's usage.injectStreamUsage). */
    enum piapi_usage_shape usage_shape;
    int inject_usage;
    /* A later candidate's service injects though this one's does not: the
     * rewritten body is made anyway, kept for that candidate. */
    int inject_usage_later;
    /* Called once the body was read (body NULL: too large to read whole),
     * before anything goes upstream; non-zero refuses the request with
     * error_status and error_message, which it sets. NULL: none. */
    int (*admit_body)(struct piapi_transfer *t, const char *body, size_t len);
    /* Failover, on the event loop only (a body it holds whole can be sent
     * again): when an attempt failed before anything reached the client
     * (connect, TLS, reset or timeout before the head; status 429, 5xx,
     * 529), pick() chooses the next candidate (1: there is one), then
     * retry() records the failed attempt and aims t at that candidate
     * (url, headers, provider_key, key_param); 0 if it could not. NULL:
     * no failover. */
    int (*pick)(struct piapi_transfer *t);
    int (*retry)(struct piapi_transfer *t, const char *outcome, double retry_after);

    /* out */
    int status;            /* upstream status relayed; 0 while no head went out */
    uint64_t bytes_in;     /* request body bytes read from the client */
    uint64_t bytes_out;    /* response body bytes written to the client */
    double ttfb;           /* seconds until the upstream's head; < 0: none */
    const char *error;     /* metrics reason ("connect", "timeout", ...) or NULL */
    int error_status;      /* when status == 0: what to answer (413/502/504) */
    const char *error_message;  /* client-safe text for error_status */
    /* libcurl's own account of a failed transfer, for the log ("Failed to
     * connect to ... port 443", "SSL certificate problem: ..."), or "". */
    char error_detail[256];
    /* The provider's id of its answer (x-request-id, request-id), for the
     * log: what its support asks for. "" when it sent none. */
    char upstream_id[96];
    /* The answer's usage (usage_shape != NONE and a 2xx answer), and the
     * request body's top-level "model" ("" when none or not read whole). */
    struct piapi_usage usage;
    char request_model[128];
    /* The answer's Retry-After in seconds (capped), -1: none. */
    double retry_after;
    /* The body was streamed by the blocking driver: it could not fail over. */
    int body_streamed;
    /* The answer's first SSE event was an overloaded_error. */
    int overloaded;
};

/* Reads the body ahead and runs the transfer to its end, then calls
 * t->done: here, or on the event loop's thread when the body was read
 * whole, possibly before this returns; either way the caller must not
 * touch t (or t->fcgi) once this is called. Never writes an error body
 * itself: when t->status is 0 at t->done the owner answers with
 * t->error_status. A failure after the head went out leaves the FastCGI
 * stream invalid, so the web server cuts the client connection instead of
 * ending it cleanly. */
void piapi_proxy_forward(struct piapi_proxy *p, struct piapi_transfer *t);

#endif
