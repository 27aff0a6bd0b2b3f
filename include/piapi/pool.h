/* The FastCGI responder pool. Threads grow with demand up to a cap; only a
 * few wait in accept at a time (warm threads serve short requests); when
 * every request slot is taken, a new request waits a bounded time for one
 * and is then answered 503 instead of hanging in the listen backlog. */
#ifndef PIAPI_POOL_H
#define PIAPI_POOL_H

#include <stddef.h>

struct piapi_pool_opts {
    int fd;                     /* listening socket */
    unsigned max_requests;      /* concurrent requests served (--threads) */
    unsigned accepters;         /* threads waiting in accept at once */
    size_t stack_size;          /* per thread */
    unsigned queue_timeout_ms;  /* wait for a free slot before 503 */
};

int piapi_pool_start(const struct piapi_pool_opts *o, char *err, size_t errlen);
/* Stops accepting: idle threads leave, running requests continue. */
void piapi_pool_stop_accepting(void);
/* Requests in progress. */
unsigned piapi_pool_active(void);
/* Tells running transfers to give up now (grace period over). */
void piapi_pool_abort(void);
/* Waits for every thread to end. Call after stop_accepting. */
void piapi_pool_join(void);

#endif
