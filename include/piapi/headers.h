/* What crosses in each direction. FastCGI hands request headers over as
 * HTTP_* params; this module turns them back into headers for libcurl,
 * applying one policy table, and decides which upstream response headers
 * reach the client. */
#ifndef PIAPI_HEADERS_H
#define PIAPI_HEADERS_H

#include <stddef.h>
#include "piapi/config.h"

struct curl_slist;
struct piapi_arena;

#define PIAPI_HEADERS_MAX_COUNT  100
#define PIAPI_HEADERS_MAX_BYTES  (64 * 1024)

enum piapi_key_status {
    PIAPI_KEY_OK = 0,
    PIAPI_KEY_MISSING,    /* 401 */
    PIAPI_KEY_DUPLICATE   /* the same credential header twice: 400 */
};

/* The member's key candidates: from "Authorization: Bearer <k>" (scheme
 * case-insensitive) and from "x-api-key: <k>". Either may be absent (NULL).
 * Views into envp. */
struct piapi_client_keys {
    const char *bearer;  size_t bearer_len;
    const char *api_key; size_t api_key_len;
};

enum piapi_key_status piapi_headers_client_keys(char **envp,
                                                struct piapi_client_keys *k);

/* Every credential the client presented, however often and whether or
 * not it authenticates: each "Authorization: Bearer" value and each
 * x-api-key value (nginx passes a repeated header as repeated params),
 * each part of one lighttpd joined with ", ". Up to max views into envp
 * go to out; returns how many there are (more than max: some are not in
 * out). None of them may reach the upstream or a log line. */
#define PIAPI_HEADERS_MAX_CREDS 4
struct piapi_route_secret;
size_t piapi_headers_presented(char **envp, struct piapi_route_secret *out, size_t max);

/* Builds the upstream request header list from the FastCGI params: every
 * client header except the policy's drops (credentials, Host, hop-by-hop,
 * headers named in Connection, Accept-Encoding, the injected auth header)
 * and any header whose value holds one of the presented credentials
 * `creds` (raw or percent-decoded, those of PIAPI_ROUTE_SECRET_MIN bytes
 * or more), then Content-Type, the provider key for header-mode auth,
 * X-Request-ID and an empty "Expect:" (no 100-continue stalls). The list
 * lives in arena `a` (nothing to free but the arena). Returns 0 and sets
 * *out, or the HTTP status to answer (400: CR/LF/NUL in a value; 431: too
 * many or too large headers) with a client-safe *why. */
int piapi_headers_forward(char **envp, const struct piapi_service *svc,
                          const char *provider_key, const char *request_id,
                          const struct piapi_route_secret *creds, size_t ncreds,
                          struct piapi_arena *a, struct curl_slist **out,
                          const char **why);

/* The name under which an upstream response header reaches the client
 * (name itself, or a replacement, *out_len long), or NULL: not relayed. */
const char *piapi_headers_response_name(const char *name, size_t len, size_t *out_len);

/* A secret of one request, which no relayed response may carry.
 * param: the query parameter it went out in (query-mode auth), else NULL. */
struct piapi_secret {
    const char *key;
    size_t len;
    const char *param;
};

/* Secrets shorter than this are never looked for in answers: they would
 * match ordinary words (a 1-byte key would cut every header holding that
 * letter). The config refuses provider keys this short anyway. */

/* Every secret of one request: the provider key and the baseUrl's
 * credentials (userinfo whole, user, password, their Basic form, query
 * values). Owns copies of them (wiped when disposed). */
struct piapi_secrets {
    struct piapi_secret *v;
    size_t n;
};

/* Fills set from the provider key (key_param: its query parameter or
 * NULL), the upstream URL and the client's REQUEST_URI: the URL's
 * userinfo, and every value of the URL's query that is not one of the
 * client's own parameters, as written and percent-decoded. */
void piapi_secrets_build(struct piapi_secrets *set, const char *provider_key,
                         const char *key_param, const char *url, const char *request_uri);
/* Adds a copy of s[0..n) (ignored when shorter than PIAPI_SECRET_MIN_LEN). */
void piapi_secrets_add(struct piapi_secrets *set, const char *s, size_t n, const char *param);
void piapi_secrets_dispose(struct piapi_secrets *set);

struct piapi_buf;

/* Whether s[0..n) holds the key in any form a URL or a body echoing one
 * may carry it: raw, or any of its bytes percent-encoded (%XX in either
 * hex case, or twice: %25XX), as libcurl's escaping and a re-encoding
 * server produce it. Work is O(n * key length), no recursion. */
int piapi_secret_in(const struct piapi_secret *k, const char *s, size_t n);
int piapi_secrets_in(const struct piapi_secrets *set, const char *s, size_t n);

/* Appends s[0..n) to out with every such occurrence replaced by
 * "REDACTED"; returns how many were replaced. */
size_t piapi_secret_redact(const struct piapi_secret *k, const char *s, size_t n,
                           struct piapi_buf *out);
size_t piapi_secrets_redact(const struct piapi_secrets *set, const char *s, size_t n,
                            struct piapi_buf *out);

/* The longest spelling any secret of the set can take (5 bytes a byte),
 * 0 when there is nothing to look for. A body scanned in windows keeps
 * this minus one byte back, so no spelling straddles two windows. */
size_t piapi_secrets_span(const struct piapi_secrets *set);

/* One window of a body scanned in pieces: redacts the spellings that
 * start before `limit` (each lies whole within s[0..n) when n - limit is
 * at least the span minus one), appends the result to out and returns
 * how many bytes of s it consumed (limit, or the end of a spelling that
 * crossed it); *count (may be NULL) grows by the replacements. */
size_t piapi_secrets_redact_window(const struct piapi_secrets *set, const char *s,
                                   size_t n, size_t limit, struct piapi_buf *out,
                                   size_t *count);

enum piapi_resp_value {
    PIAPI_RESP_KEEP,      /* relay the value as it is */
    PIAPI_RESP_REDACTED,  /* relay *out instead */
    PIAPI_RESP_DROP       /* relay nothing */
};

/* The response header policy for a value: in the URL-bearing headers
 * (Location, Content-Location, Link, Refresh) every secret and the key's
 * query parameter are replaced by "REDACTED" (out gets the new value);
 * any other header that holds a secret, in its name or value, is
 * dropped. */
enum piapi_resp_value piapi_headers_response_value(const struct piapi_secrets *set,
                                                   const char *name, size_t name_len,
                                                   const char *val, size_t val_len,
                                                   struct piapi_buf *out);

/* Whether an upstream response header line (without its CRLF) may be
 * relayed at all: a name of token characters and a value without
 * control characters but HTAB. A bare CR would let a web server split
 * it into two headers. */
int piapi_headers_response_line_ok(const char *line, size_t len);

/* Value of FastCGI param `name`; *count gets how many times it appears
 * (nginx passes repeated headers as repeated params). NULL when absent. */
const char *piapi_headers_param(char **envp, const char *name, int *count);

#endif
