/* The gateway's event loop: one thread running the general loop (ev.h)
 * for three clients: the listening socket (pool.c accepts and serves every
 * request that arrived whole: nearly all of them, the web server buffers
 * request bodies), waits for a kept connection's next request
 * (fastcgi_keep_conn), and the upstream driver (upstream.h), which runs
 * those requests' transfers through libcurl's multi interface. Whatever
 * could block it (a body still arriving, a wait for a request slot) goes
 * to the pool's threads instead. */
#ifndef PIAPI_LOOP_H
#define PIAPI_LOOP_H

#include <stddef.h>

/* Starts the thread. ready(listen_fd) runs on it while the listening
 * socket is readable. */
int piapi_loop_start(unsigned max_transfers, int listen_fd, void (*ready)(int fd),
                     char *err, size_t errlen);

/* On the loop thread: cb(fd, arg, 0) once fd is readable, or
 * cb(fd, arg, 1) when timeout_ms pass first (never if < 0), the peer hangs
 * up, or the waits are expired. -1: fd cannot be watched. */
int piapi_loop_await(int fd, int timeout_ms, void (*cb)(int fd, void *arg, int timed_out),
                     void *arg);

/* On the loop thread: ends every wait now, as if timed out. The loop
 * does so itself once it is told to stop. */
void piapi_loop_expire_awaits(void);

/* From any thread: fn(arg) runs on the loop thread (at once when called
 * there), before the loop stops. -1: the loop is stopping or stopped, and
 * fn will not run. */
int piapi_loop_post(void (*fn)(void *arg), void *arg);

/* The loop's ev, for modules that arm watchers and timers of their own
 * (on the loop's thread only), and whether the caller runs there. */
struct piapi_ev *piapi_loop_ev(void);
int piapi_loop_on_thread(void);

/* From ready(): stop watching the listening socket for ms milliseconds
 * (resource shortage), or for good with ms < 0. */
void piapi_loop_pause(int fd, int ms);

/* Call once no new request can arrive and the abort flag of the running
 * ones is set: waits for them to end, then for the thread. */
void piapi_loop_stop(void);

#endif
