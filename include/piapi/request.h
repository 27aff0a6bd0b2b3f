/* One request's life, from FCGX_Accept_r to the log line: parse params,
 * take the live config snapshot, answer /healthz and /metrics, or
 * authenticate, route and proxy; then log, record metrics and release. */
#ifndef PIAPI_REQUEST_H
#define PIAPI_REQUEST_H

#include <fcgiapp.h>
#include <stdatomic.h>

/* Per-thread state (curl handles, request ids). `aborting` is set at
 * shutdown once the grace period is over; `stopping` as soon as the pool
 * stops accepting (health then reports 503). */
struct piapi_worker;

struct piapi_worker *piapi_request_worker_create(const atomic_int *stopping,
                                                 const atomic_int *aborting);
void piapi_request_worker_destroy(struct piapi_worker *w);

/* Serves one accepted request and ends it (FCGX_Finish_r), then calls
 * over(r): before this returns, or later on the event loop's thread when
 * the proxy handed the transfer to it. r's connection is still open then
 * (piapi_fcgi_fd(r) >= 0) when the web server keeps it (piapi_fcgi_kept),
 * or when the web server may still be sending a body piapi did not read
 * (not kept): it must then be drained before it closes. */
void piapi_request_handle(struct piapi_worker *w, FCGX_Request *r,
                          void (*over)(FCGX_Request *r));

/* /healthz or /metrics: answered at once, without a request slot. */
int piapi_request_is_local(FCGX_Request *r);

/* Answers without routing (e.g. 503 when the pool is saturated), logs
 * and records it like any other request; `reason` goes into the log line's
 * error field. */
void piapi_request_reject(struct piapi_worker *w, FCGX_Request *r, int status,
                          const char *message, const char *reason);

#endif
