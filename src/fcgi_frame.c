/* FastCGI record framing, just enough to know a request has arrived. */
#include "piapi/fcgi_frame.h"

/* Record types and flags (FastCGI spec §8). */
#define FCGI_HEADER_LEN    8
#define FCGI_BEGIN_REQUEST 1
#define FCGI_PARAMS        4
#define FCGI_STDIN         5

enum piapi_fcgi_arrival piapi_fcgi_arrival(const unsigned char *p, size_t n, size_t cap,
                                           size_t body_max)
{
    size_t off = 0, body = 0;
    int begun = 0, params_done = 0;

    while (off + FCGI_HEADER_LEN <= n) {
        size_t len = (size_t)p[off + 4] << 8 | p[off + 5];
        size_t next = off + FCGI_HEADER_LEN + len + p[off + 6];
        if (next > n)
            break;
        switch (p[off + 1]) {
        case FCGI_BEGIN_REQUEST:  /* body: role (2), flags, reserved (5) */
            if (begun || len < 8)
                return PIAPI_FCGI_UNFIT;
            begun = 1;
            break;
        case FCGI_PARAMS:
            if (!begun)
                return PIAPI_FCGI_UNFIT;
            params_done |= len == 0;
            break;
        case FCGI_STDIN:
            /* Before a begin: the rest of the body of a kept connection's
             * last request, which was answered without reading it all.
             * libfcgi skips it too (its request id is not the new one's). */
            if (!begun)
                break;
            if (!params_done || (body += len) > body_max)
                return PIAPI_FCGI_UNFIT;
            if (len == 0)
                return PIAPI_FCGI_WHOLE;
            break;
        }
        off = next;
    }
    return n < cap ? PIAPI_FCGI_PARTIAL : PIAPI_FCGI_UNFIT;
}
