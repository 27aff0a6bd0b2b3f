/* One upstream transfer with libcurl, streamed both ways: the request body
 * from FastCGI stdin, the response head and every body chunk back to
 * FastCGI as soon as libcurl has them. One piapi_proxy per pool thread, so
 * upstream connections (and TLS sessions) are reused across requests. */
#ifndef PIAPI_PROXY_H
#define PIAPI_PROXY_H

#include <fcgiapp.h>
#include <stdatomic.h>
#include <stdint.h>
#include "piapi/config.h"

struct curl_slist;
struct piapi_proxy;

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

    /* out */
    int status;            /* upstream status relayed; 0 while no head went out */
    uint64_t bytes_in;     /* request body bytes read from the client */
    uint64_t bytes_out;    /* response body bytes written to the client */
    double ttfb;           /* seconds until the upstream's head; < 0: none */
    const char *error;     /* metrics reason ("connect", "timeout", ...) or NULL */
    int error_status;      /* when status == 0: what to answer (413/502/504) */
    const char *error_message;  /* client-safe text for error_status */
};

/* Runs the transfer to its end. Never writes an error body itself: when
 * t->status is 0 afterwards the caller answers with t->error_status. A
 * failure after the head went out leaves the FastCGI stream invalid, so the
 * web server cuts the client connection instead of ending it cleanly. */
void piapi_proxy_run(struct piapi_proxy *p, struct piapi_transfer *t);

#endif
