/* One FastCGI connection and its request, as libfcgi holds them. This is
 * the only module that touches libfcgi's internals (the connection's fd,
 * its keep-alive flag, its read-ahead buffer): everyone else goes through
 * these calls and libfcgi's public FCGX_* API.
 *
 * The rule the event loop rests on, that its thread never blocks, is
 * checked here: a thread that called piapi_fcgi_mark_loop_thread() may
 * read only what is already in the socket and write only within its
 * budget. Debug and sanitizer builds (PIAPI_LOOP_CHECKS) abort when it
 * would not. */
#ifndef PIAPI_FCGI_CONN_H
#define PIAPI_FCGI_CONN_H

#include <fcgiapp.h>
#include <stddef.h>

#include "piapi/fcgi_frame.h"

/* A connection the pool accepted (or a kept one) whose next request
 * libfcgi has not read yet: FCGX_Accept_r reads it from fd, never accepts
 * on its own (a malformed request ends in an error, not a blocking
 * accept()). */
void piapi_fcgi_init(FCGX_Request *r, int fd);
int piapi_fcgi_fd(const FCGX_Request *r);
/* The web server keeps the connection for further requests (after the
 * request ended: and piapi can reuse it). */
int piapi_fcgi_kept(const FCGX_Request *r);

/* Whether the socket already holds the whole request with a body of at
 * most body_max bytes (peeked into buf, cap bytes), so that libfcgi's
 * blocking reads find everything there. */
enum piapi_fcgi_arrival piapi_fcgi_in_socket(const FCGX_Request *r, char *buf,
                                             size_t cap, size_t body_max);

/* Reading a request body (FCGI_STDIN) with deadlines. */
#define PIAPI_FCGI_BODY_TIMEOUT (-1)   /* a deadline passed */
#define PIAPI_FCGI_BODY_GONE    (-2)   /* the connection failed */

/* Reads up to n (> 0) bytes of r's body into buf, waiting at most idle_s
 * for a byte and never past `deadline` (monotonic seconds). Returns the
 * bytes read, 0 at the body's end, or PIAPI_FCGI_BODY_*. *armed caches
 * the socket's current receive timeout (start with 0). */
int piapi_fcgi_read_body(FCGX_Request *r, char *buf, int n, double deadline,
                         double idle_s, double *armed);

/* Writing the answer without blocking: how many bytes of socket memory a
 * writer may queue before it must look again (half the send buffer), and
 * whether the socket takes more now. */
size_t piapi_fcgi_send_budget(const FCGX_Request *r);
int piapi_fcgi_writable(const FCGX_Request *r);
/* Once the body's end was read nothing more arrives: any readability
 * means the web server closed the connection (the client left). */
int piapi_fcgi_hung_up(const FCGX_Request *r);
/* Makes a cut answer look cut to the web server (see fcgi_conn.c). */
void piapi_fcgi_poison(FCGX_Request *r);

/* Ends the request: the answer goes out, a body left unread is dropped as
 * far as it has arrived, and libfcgi lets go of the request. Afterwards
 * the connection is closed (fd < 0), reusable (kept), or open with body
 * still arriving or a pipelined request swallowed (not kept): then the
 * caller half-closes and drains it. */
void piapi_fcgi_end(FCGX_Request *r);

/* The calling thread is the event loop's: see the opening comment. */
void piapi_fcgi_mark_loop_thread(void);

#endif
