/* FastCGI connections and the threads for whatever may block. The event
 * loop accepts every connection (piapi_pool_connection_ready) and serves
 * on the spot each request that is already whole in the socket; a request
 * whose body is still arriving or too large, or one that must wait for a
 * request slot, goes to a pool thread. A fastcgi_keep_conn connection
 * waits on the loop between its requests, never on a thread. Threads grow
 * with demand up to a cap; when every request slot is taken, a new request
 * waits a bounded time for one and is then answered 503 instead of
 * hanging (/healthz and /metrics take no slot and never wait). A
 * connection whose request was answered before its body was read is
 * half-closed and drained on the loop before it closes. */
#ifndef PIAPI_POOL_H
#define PIAPI_POOL_H

#include <stddef.h>

struct piapi_pool_opts {
    int fd;                     /* listening socket */
    unsigned max_requests;      /* concurrent requests served (--threads) */
    unsigned extra_threads;     /* threads beyond max_requests, for waiters */
    size_t stack_size;          /* per thread */
    unsigned queue_timeout_ms;  /* wait for a free slot before 503 */
};

int piapi_pool_start(const struct piapi_pool_opts *o, char *err, size_t errlen);
/* The event loop's handler for a readable listening socket. */
void piapi_pool_connection_ready(int listen_fd);
/* Stops accepting: idle threads leave, idle kept connections close,
 * running requests continue. */
void piapi_pool_stop_accepting(void);
/* Requests in progress, wherever they run. */
unsigned piapi_pool_active(void);
/* Tells running transfers to give up now (grace period over). */
void piapi_pool_abort(void);
/* Waits for every thread to end. Call after stop_accepting, and after the
 * event loop stopped. */
void piapi_pool_join(void);

#endif
