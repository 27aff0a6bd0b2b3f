/* The libcurl multi driver: every upstream transfer of a request that
 * arrived whole runs here, on the event loop's thread (ev.h), through
 * libcurl's multi socket API, so a request costs no thread sleeping on
 * its upstream, a thousand streams cost no thousand threads, and all
 * transfers to one origin share one upstream connection cache. A client
 * of the loop like any other: fd handlers for libcurl's sockets and the
 * FastCGI connections, timers for libcurl's and its own, an end-of-round
 * hook that flushes what the round queued. Private to loop.c and proxy.c. */
#ifndef PIAPI_UPSTREAM_H
#define PIAPI_UPSTREAM_H

#include "piapi/ev.h"
#include "xfer.h"

/* Before the loop's first round. max_transfers bounds each origin's
 * connection cache. */
void upstream_start(struct piapi_ev *ev, unsigned max_transfers);
/* From any thread: hands x to the loop, which owns it from then on and
 * calls x->t->done at the end. -1 when no loop takes it (x stays the
 * caller's). */
int upstream_submit(struct xfer *x);
/* No more submissions from other threads (the loop's own still come). */
void upstream_close(void);
/* Transfers running on the loop (loop thread). */
unsigned upstream_running(void);
/* Shutdown (loop thread): the abort flag is set, look at every transfer
 * soon. */
void upstream_expedite(void);
/* After the loop's last round: frees every handle. */
void upstream_stop(void);

#endif
