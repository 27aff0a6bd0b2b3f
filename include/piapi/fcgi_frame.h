/* Whether a FastCGI request is already whole in a buffer, judged from the
 * record framing alone (FastCGI spec §3.3, §8); libfcgi still parses the
 * request. The event loop peeks at a new connection with it before it
 * lets libfcgi's blocking reads loose on it. */
#ifndef PIAPI_FCGI_FRAME_H
#define PIAPI_FCGI_FRAME_H

#include <stddef.h>

enum piapi_fcgi_arrival {
    PIAPI_FCGI_WHOLE,    /* begin, params to their end, stdin to its end */
    PIAPI_FCGI_PARTIAL,  /* not yet: more may still arrive */
    PIAPI_FCGI_UNFIT     /* never for the loop: out of order, more than
                            `cap` bytes, or a body over `body_max` */
};

/* p[0..n) is what the connection holds so far; cap is how much the caller
 * can look at (n == cap means there may be more than it saw); body_max is
 * the longest body (stdin) the caller takes. */
enum piapi_fcgi_arrival piapi_fcgi_arrival(const unsigned char *p, size_t n, size_t cap,
                                           size_t body_max);

#endif
