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
    PIAPI_ROUTE_BAD_PATH,   /* dot segments, encoded slashes, controls...: 400 */
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

/* The upstream URL: baseUrl, then "/<rest>" when the client gave one, then
 * the baseUrl's own query, the client's query (minus any parameter that
 * carries the member's key or the service's auth parameter name), and the
 * provider key for query-mode auth. `secret_off/len` locate the provider
 * key inside out->data (len 0 when absent) so logs can redact it. */
struct piapi_route_url {
    struct piapi_buf buf;
    size_t secret_off;
    size_t secret_len;
};

void piapi_route_upstream_url(struct piapi_route_url *out,
                              const struct piapi_service *svc,
                              const struct piapi_route_target *t,
                              const char *provider_key,
                              const char *member_key, size_t member_key_len);

/* out gets the URL with the provider key replaced by "REDACTED". */
void piapi_route_redacted(const struct piapi_route_url *url,
                          struct piapi_buf *out);

#endif
