/* Where a request's upstream transfer runs: on the event loop (upstream.c)
 * when its body was read whole, else here, on the calling pool thread: the
 * blocking driver. There a per-thread curl multi handle drives one easy
 * handle so the wait can also watch the FastCGI connection: nginx closes
 * it the moment the client goes away, and a silent upstream would
 * otherwise keep the transfer alive until its next byte. */
#include "piapi/proxy.h"

#include <curl/curl.h>
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "piapi/fcgi_conn.h"
#include "piapi/http.h"
#include "piapi/util.h"
#include "upstream.h"
#include "xfer.h"

struct piapi_proxy {
    CURLM *multi;
    CURL *easy;
    char *body;             /* PIAPI_PROXY_INLINE_BODY_MAX bytes, reused */
};

struct piapi_proxy *piapi_proxy_create(void)
{
    struct piapi_proxy *p = piapi_xcalloc(1, sizeof *p);
    p->multi = curl_multi_init();
    p->easy = curl_easy_init();
    if (!p->multi || !p->easy)
        abort();
    p->body = piapi_xmalloc(PIAPI_PROXY_INLINE_BODY_MAX);
    return p;
}

void piapi_proxy_destroy(struct piapi_proxy *p)
{
    if (!p)
        return;
    curl_easy_cleanup(p->easy);
    curl_multi_cleanup(p->multi);
    free(p->body);
    free(p);
}

/* ---- the blocking driver -------------------------------------------- */

/* After stdin's end nothing more arrives on the FastCGI connection, so any
 * readability means the web server closed it: the client is gone. */
static int client_hung_up(struct xfer *x)
{
    return x->stdin_eof && piapi_fcgi_hung_up(x->t->fcgi);
}

static void run_here(struct piapi_proxy *p, struct xfer *x)
{
    struct piapi_transfer *t = x->t;
    CURLcode rc = CURLE_OK;
    enum verdict v = RUNNING;
    int running = 0, fcgi_readable = 0;

    x->easy = p->easy;
    xfer_setup(x);
    curl_multi_add_handle(p->multi, p->easy);
    for (;;) {
        if (curl_multi_perform(p->multi, &running) != CURLM_OK || !running)
            break;
        if (xfer_flush(x) != 0 || (fcgi_readable && client_hung_up(x))) {
            v = CLIENT_GONE;
            break;
        }
        double now = piapi_now_mono(), next = now + POLL_SLICE_MS / 1000.0;
        if ((v = xfer_timers(x, now, &next)) != RUNNING || xfer_flush(x) != 0) {
            if (v == RUNNING)
                v = CLIENT_GONE;
            break;
        }
        /* At least 1 ms: a ping that is due waits for an event boundary. */
        int wait_ms = next > now ? (int)((next - now) * 1000.0) + 1 : 1;
        struct curl_waitfd extra = {
            .fd = piapi_fcgi_fd(t->fcgi), .events = CURL_WAIT_POLLIN, .revents = 0
        };
        curl_multi_poll(p->multi, &extra, x->stdin_eof && extra.fd >= 0 ? 1 : 0,
                        wait_ms, NULL);
        fcgi_readable = extra.revents != 0;
    }
    if (v == RUNNING) {
        int left;
        CURLMsg *m;
        while ((m = curl_multi_info_read(p->multi, &left)))
            if (m->msg == CURLMSG_DONE)
                rc = m->data.result;
    }
    /* Removing an unfinished transfer closes its connection, which is what
     * tells the upstream to stop generating. */
    curl_multi_remove_handle(p->multi, p->easy);
    xfer_end(x, v, rc);
}

void piapi_proxy_forward(struct piapi_proxy *p, struct piapi_transfer *t)
{
    struct xfer x;
    struct piapi_buf rewritten = {0};

    xfer_init(&x, t);
    char *read_whole = xfer_read_ahead(&x, p->body);
    xfer_prepare_usage(&x, &rewritten);
    if (x.body_failed) {
        /* Nothing went upstream: answer 408, or no one (the web server
         * dropped the request). */
        xfer_refuse(&x, x.body_failed == PIAPI_FCGI_BODY_TIMEOUT ? BODY_TIMEOUT
                                                                   : CLIENT_GONE);
    } else if (x.inline_len > t->settings->max_body_bytes) {
        /* A body without Content-Length, over the limit already in the
         * part read ahead: refuse before anything goes upstream. */
        xfer_refuse(&x, TOO_LARGE);
    } else if (t->admit_body && t->admit_body(t, x.whole ? x.body : NULL, x.inline_len)) {
        /* refused by the member's model allow-list: t says how */
    } else if (x.whole && upstream_submit(&x) == 0) {
        free(read_whole);  /* the loop has its own copy */
        piapi_buf_dispose(&rewritten);
        return;  /* the loop answers on this connection from now on */
    } else {
        /* Streamed from FastCGI as it is read: it cannot be sent again,
         * so this request stays with its first candidate (logged). */
        t->body_streamed = !x.whole;
        run_here(p, &x);
    }
    free(read_whole);
    piapi_buf_dispose(&rewritten);
    piapi_buf_dispose(&x.head);
    t->done(t);
}
