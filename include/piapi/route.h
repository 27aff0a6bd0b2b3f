/* Request path → service type + rest, and the upstream URL built from a
 * route. Works on REQUEST_URI exactly as the client sent it: it is the only
 * raw path both nginx and lighttpd pass. */
#ifndef PIAPI_ROUTE_H
#define PIAPI_ROUTE_H

#include <stddef.h>
#include "piapi/config.h"
#include "piapi/util.h"

#define PIAPI_ROUTE_BASE      "/piapi/"
#define PIAPI_ROUTE_MAX_URI   8192

enum piapi_route_status {
    PIAPI_ROUTE_OK = 0,
    PIAPI_ROUTE_NOT_FOUND,  /* outside the base path, or no service type: 404 */
    PIAPI_ROUTE_BAD_PATH,   /* dot segments in any spelling, controls, '#', look-alikes...: 400 */
    PIAPI_ROUTE_TOO_LONG    /* over PIAPI_ROUTE_MAX_URI: 414 */
};

/* Views into the caller's REQUEST_URI; nothing is copied. */
struct piapi_route_target {
    const char *type;   size_t type_len;
    const char *rest;   size_t rest_len;   /* after "<type>/"; may be empty */
    int has_rest;                          /* a '/' followed the type */
    const char *query;  size_t query_len;  /* after '?'; NULL when absent */
};

/* Splits and validates. On failure *why is a static, client-safe text. */
enum piapi_route_status piapi_route_parse(const char *uri,
                                          struct piapi_route_target *t,
                                          const char **why);

/* A credential the client presented (a view, len 0 when absent): no
 * parameter of the client's query that contains it goes upstream. */
struct piapi_route_secret {
    const char *s;
    size_t len;
};

/* Credentials shorter than this are not looked for in paths and header
 * values: they would match too much (member keys are long). */
#define PIAPI_ROUTE_SECRET_MIN 8

/* 1 when s[0..n) (a path, a header value) holds one of the credentials
 * of at least PIAPI_ROUTE_SECRET_MIN bytes, as sent or percent-decoded
 * once or more (up to four times, as upstreams that decode repeatedly
 * read it). */
int piapi_route_holds_secret(const char *s, size_t n,
                             const struct piapi_route_secret *hidden, size_t nhidden);

/* The upstream URL: baseUrl (with its userinfo, which libcurl sends as
 * basic auth), then "/<rest>" when the client gave one, then the
 * baseUrl's own query, the client's query (minus any parameter that
 * carries one of the `hidden` credentials or is named like the service's
 * auth parameter, as sent or percent-decoded up to four times), and the
 * provider key for query-mode auth. The offsets
 * locate, inside buf.data, what logs must not show: the userinfo with its
 * '@', the baseUrl's parameters and the provider key (len 0 when absent). */
struct piapi_route_url {
    struct piapi_buf buf;
    size_t userinfo_off, userinfo_len;
    size_t base_query_off, base_query_len;
    size_t secret_off, secret_len;
};

void piapi_route_upstream_url(struct piapi_route_url *out,
                              const struct piapi_service *svc,
                              const struct piapi_route_target *t,
                              const char *provider_key,
                              const struct piapi_route_secret *hidden,
                              size_t nhidden);

/* out gets the URL as a log may show it: no userinfo, every baseUrl
 * parameter's value and the provider key replaced by "REDACTED". */
void piapi_route_redacted(const struct piapi_route_url *url,
                          struct piapi_buf *out);

/* 1 when text (libcurl's or the upstream's words) contains a secret of
 * the service: the provider key, or the baseUrl's userinfo (whole, user
 * or password) or one of its parameter values (those of 4 bytes or more:
 * shorter ones would match most texts). */
int piapi_route_mentions_secret(const struct piapi_service *svc,
                                const char *provider_key, const char *text);

#endif
