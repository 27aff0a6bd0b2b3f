/* Header policy: one table says what never crosses (RFC 9110 §7.6.1
 * hop-by-hop fields, credentials, framing that libcurl owns). */
#include "piapi/headers.h"

#include <curl/curl.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "piapi/util.h"

enum {
    DROP_REQ  = 1,  /* never forwarded upstream */
    DROP_RESP = 2,  /* never relayed to the client */
    RENAME_RESP = 4 /* relayed under UPSTREAM_ID instead */
};

struct header_rule {
    const char *name;   /* lowercase */
    unsigned flags;
};

static const struct header_rule header_rules[] = {
    { "authorization",       DROP_REQ },              /* member's key */
    { "x-api-key",           DROP_REQ },              /* member's key */
    { "host",                DROP_REQ },              /* libcurl sets the upstream's */
    { "content-length",      DROP_REQ },              /* libcurl frames the upstream body; relayed back so a cut body looks cut */
    { "content-type",        DROP_REQ },              /* taken from CONTENT_TYPE */
    { "expect",              DROP_REQ },
    /* piapi sets its own; the provider's id (what its support asks for)
     * reaches the client under another name */
    { "x-request-id",        DROP_REQ | RENAME_RESP },
    { "connection",          DROP_REQ | DROP_RESP },
    { "keep-alive",          DROP_REQ | DROP_RESP },
    { "te",                  DROP_REQ | DROP_RESP },
    { "trailer",             DROP_REQ | DROP_RESP },
    { "transfer-encoding",   DROP_REQ | DROP_RESP },
    { "upgrade",             DROP_REQ | DROP_RESP },
    { "proxy-connection",    DROP_REQ | DROP_RESP },
    { "proxy-authorization", DROP_REQ | DROP_RESP },
    { "proxy-authenticate",  DROP_REQ | DROP_RESP },
    { "proxy",               DROP_REQ },              /* httpoxy */
    { "status",              DROP_RESP },             /* would be read as the CGI status */
    { "x-accel-buffering",   DROP_RESP },             /* piapi decides */
    { "x-accel-redirect",    DROP_RESP },             /* would make nginx serve a file */
    { "x-accel-limit-rate",  DROP_RESP },
    { "x-accel-charset",     DROP_RESP },
    { "x-accel-expires",     DROP_RESP },
    { "x-sendfile",          DROP_RESP },             /* lighttpd's equivalent */
    { "x-lighttpd-send-file", DROP_RESP },
};

static unsigned rule_flags(const char *name, size_t len)
{
    for (size_t i = 0; i < sizeof header_rules / sizeof header_rules[0]; i++) {
        const char *r = header_rules[i].name;
        if (strlen(r) == len && strncasecmp(r, name, len) == 0)
            return header_rules[i].flags;
    }
    /* Proxy-* is hop-by-hop by convention, whatever follows the dash. */
    if (len > 6 && strncasecmp(name, "proxy-", 6) == 0)
        return DROP_REQ | DROP_RESP;
    return 0;
}

#define UPSTREAM_ID "X-Upstream-Request-ID"

const char *piapi_headers_response_name(const char *name, size_t len, size_t *out_len)
{
    unsigned f = rule_flags(name, len);
    if (f & DROP_RESP)
        return NULL;
    if (f & RENAME_RESP) {
        *out_len = sizeof UPSTREAM_ID - 1;
        return UPSTREAM_ID;
    }
    *out_len = len;
    return name;
}

const char *piapi_headers_param(char **envp, const char *name, int *count)
{
    size_t n = strlen(name);
    const char *val = NULL;
    int c = 0;

    for (char **e = envp; e && *e; e++) {
        if (strncmp(*e, name, n) == 0 && (*e)[n] == '=') {
            if (!val)
                val = *e + n + 1;
            c++;
        }
    }
    if (count)
        *count = c;
    return val;
}

static const char *skip_ws(const char *s)
{
    while (*s == ' ' || *s == '\t')
        s++;
    return s;
}

static size_t trimmed_len(const char *s)
{
    size_t n = strlen(s);
    while (n && (s[n - 1] == ' ' || s[n - 1] == '\t'))
        n--;
    return n;
}

enum piapi_key_status piapi_headers_client_keys(char **envp,
                                                struct piapi_client_keys *k)
{
    int na, nx;
    const char *auth = piapi_headers_param(envp, "HTTP_AUTHORIZATION", &na);
    const char *xkey = piapi_headers_param(envp, "HTTP_X_API_KEY", &nx);

    memset(k, 0, sizeof *k);
    if (na > 1 || nx > 1)
        return PIAPI_KEY_DUPLICATE;
    if (auth) {
        auth = skip_ws(auth);
        if (strncasecmp(auth, "bearer", 6) == 0 && (auth[6] == ' ' || auth[6] == '\t')) {
            k->bearer = skip_ws(auth + 6);
            k->bearer_len = trimmed_len(k->bearer);
        }
    }
    if (xkey) {
        k->api_key = skip_ws(xkey);
        k->api_key_len = trimmed_len(k->api_key);
    }
    /* lighttpd joins repeated headers with ", " where nginx passes two
     * params: a comma in a credential is the same ambiguity. */
    if (memchr(k->bearer ? k->bearer : "", ',', k->bearer_len) ||
        memchr(k->api_key ? k->api_key : "", ',', k->api_key_len))
        return PIAPI_KEY_DUPLICATE;
    if (!k->bearer_len && !k->api_key_len)
        return PIAPI_KEY_MISSING;
    return PIAPI_KEY_OK;
}

/* HTTP_X_FOO_BAR → X-Foo-Bar (title case keeps upstream logs readable;
 * header names are case-insensitive on the wire). */
static void param_to_header(const char *p, size_t n, struct piapi_buf *b)
{
    int up = 1;
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (c == '_') {
            piapi_buf_putc(b, '-');
            up = 1;
            continue;
        }
        if (up && c >= 'a' && c <= 'z')
            c = (char)(c - 'a' + 'A');
        else if (!up && c >= 'A' && c <= 'Z')
            c = (char)(c - 'A' + 'a');
        piapi_buf_putc(b, c);
        up = 0;
    }
}

/* CGI turns header names into [A-Z0-9_]; anything else did not come from
 * a well-formed header and must not become one. */
static int name_ok(const char *p, size_t n)
{
    if (n == 0)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
              (c >= '0' && c <= '9') || c == '_' || c == '-'))
            return 0;
    }
    return 1;
}

static int value_ok(const char *v)
{
    for (; *v; v++)
        if (*v == '\r' || *v == '\n')
            return 0;
    return 1;
}

/* Is `name` (as a header name) listed in the client's Connection header?
 * Those fields are hop-by-hop for this connection only (RFC 9110 §7.6.1). */
static int listed_in_connection(const char *conn, const char *name, size_t len)
{
    const char *p = conn;
    while (p && *p) {
        p = skip_ws(p);
        const char *end = strchr(p, ',');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        while (n && (p[n - 1] == ' ' || p[n - 1] == '\t'))
            n--;
        if (n == len && strncasecmp(p, name, len) == 0)
            return 1;
        p = end ? end + 1 : NULL;
    }
    return 0;
}

static struct curl_slist *append(struct curl_slist *l, const char *line)
{
    struct curl_slist *n = curl_slist_append(l, line);
    if (!n)
        abort();  /* OOM, as in piapi_xmalloc */
    return n;
}

int piapi_headers_forward(char **envp, const struct piapi_service *svc,
                          const char *provider_key, const char *request_id,
                          struct curl_slist **out, const char **why)
{
    const char *conn = piapi_headers_param(envp, "HTTP_CONNECTION", NULL);
    const char *auth_name = svc->auth.mode == PIAPI_AUTH_HEADER ? svc->auth.name : NULL;
    struct curl_slist *list = NULL;
    struct piapi_buf line = {0};
    size_t count = 0, bytes = 0;
    int status = 0;

    for (char **e = envp; e && *e; e++) {
        if (strncmp(*e, "HTTP_", 5) != 0)
            continue;
        const char *name = *e + 5;
        const char *eq = strchr(name, '=');
        if (!eq)
            continue;
        const char *val = eq + 1;
        size_t nlen = (size_t)(eq - name);

        if (++count > PIAPI_HEADERS_MAX_COUNT ||
            (bytes += nlen + strlen(val)) > PIAPI_HEADERS_MAX_BYTES) {
            *why = "request headers too large";
            status = 431;
            goto fail;
        }
        if (!name_ok(name, nlen)) {
            *why = "invalid request header name";
            status = 400;
            goto fail;
        }
        piapi_buf_reset(&line);
        param_to_header(name, nlen, &line);
        const char *hname = line.data;
        size_t hlen = line.len;
        if (rule_flags(hname, hlen) & DROP_REQ)
            continue;
        if (auth_name && strlen(auth_name) == hlen && strncasecmp(auth_name, hname, hlen) == 0)
            continue;
        if (conn && listed_in_connection(conn, hname, hlen))
            continue;
        if (!value_ok(val)) {
            *why = "invalid character in a request header";
            status = 400;
            goto fail;
        }
        /* "Name:" with nothing after it tells libcurl to remove a header;
         * "Name;" is its syntax for sending one with an empty value. */
        if (*val)
            piapi_buf_printf(&line, ": %s", val);
        else
            piapi_buf_putc(&line, ';');
        list = append(list, line.data);
    }

    const char *ctype = piapi_headers_param(envp, "CONTENT_TYPE", NULL);
    if (ctype && *ctype) {
        if (!value_ok(ctype)) {
            *why = "invalid character in a request header";
            status = 400;
            goto fail;
        }
        piapi_buf_reset(&line);
        piapi_buf_printf(&line, "Content-Type: %s", ctype);
        list = append(list, line.data);
    }
    if (auth_name) {
        piapi_buf_reset(&line);
        piapi_buf_printf(&line, "%s: %s%s", auth_name, svc->auth.prefix, provider_key);
        list = append(list, line.data);
        explicit_bzero(line.data, line.len);
    }
    piapi_buf_reset(&line);
    piapi_buf_printf(&line, "X-Request-ID: %s", request_id);
    list = append(list, line.data);
    list = append(list, "Expect:");
    /* Never let libcurl announce encodings itself: the client's
     * Accept-Encoding passes through and so does the encoded body. */
    piapi_buf_dispose(&line);
    *out = list;
    return 0;

fail:
    piapi_buf_dispose(&line);
    curl_slist_free_all(list);
    *out = NULL;
    return status;
}
