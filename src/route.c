/* Path validation and upstream URL composition. */
#include "piapi/route.h"

#include <curl/curl.h>
#include <stdlib.h>
#include <string.h>

static int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Raw bytes a path may carry: printable ASCII minus the backslash, which
 * some upstreams treat as a separator. Everything else must be %-encoded. */
static int path_byte_ok(unsigned char c)
{
    return c > 0x20 && c < 0x7f && c != '\\';
}

/* Checks one path segment: valid %-escapes, no encoded '/', '\' or control
 * characters, and not "." or ".." in any spelling (%2e, %2E, mixed). */
static int segment_ok(const char *s, size_t n, const char **why)
{
    size_t dots = 0, chars = 0;

    for (size_t i = 0; i < n; i++, chars++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '%') {
            if (i + 2 >= n) {
                *why = "malformed percent-encoding in path";
                return 0;
            }
            int h = hexval(s[i + 1]), l = hexval(s[i + 2]);
            if (h < 0 || l < 0) {
                *why = "malformed percent-encoding in path";
                return 0;
            }
            c = (unsigned char)(h * 16 + l);
            i += 2;
            if (c == '/' || c == '\\') {
                *why = "encoded slash or backslash in path";
                return 0;
            }
            if (c < 0x20 || c == 0x7f) {
                *why = "control character in path";
                return 0;
            }
        } else if (!path_byte_ok(c)) {
            *why = c == '\\' ? "backslash in path" : "invalid character in path";
            return 0;
        }
        if (c == '.')
            dots++;
    }
    if (chars > 0 && dots == chars && chars <= 2) {
        *why = "dot segment in path";
        return 0;
    }
    return 1;
}

enum piapi_route_status piapi_route_parse(const char *uri,
                                          struct piapi_route_target *t,
                                          const char **why)
{
    static const char base[] = PIAPI_ROUTE_BASE;
    size_t len = strlen(uri);

    memset(t, 0, sizeof *t);
    if (len > PIAPI_ROUTE_MAX_URI) {
        *why = "request URI too long";
        return PIAPI_ROUTE_TOO_LONG;
    }
    if (strncmp(uri, base, sizeof base - 1) != 0) {
        *why = "unknown path";
        return PIAPI_ROUTE_NOT_FOUND;
    }

    const char *path = uri + sizeof base - 1;
    const char *q = strchr(path, '?');
    size_t plen = q ? (size_t)(q - path) : strlen(path);
    if (q) {
        t->query = q + 1;
        t->query_len = len - (size_t)(t->query - uri);
        for (size_t i = 0; i < t->query_len; i++) {
            unsigned char c = (unsigned char)t->query[i];
            if (c <= 0x20 || c >= 0x7f) {
                *why = "invalid character in query";
                return PIAPI_ROUTE_BAD_PATH;
            }
        }
    }

    /* Walk the segments: the first is the service type, the rest is
     * forwarded verbatim once every segment has passed the checks. */
    const char *end = path + plen;
    const char *seg = path;
    int first = 1;
    while (seg <= end) {
        const char *slash = memchr(seg, '/', (size_t)(end - seg));
        const char *segend = slash ? slash : end;
        size_t n = (size_t)(segend - seg);

        if (first) {
            if (n == 0) {
                *why = "no service type in path";
                return PIAPI_ROUTE_NOT_FOUND;
            }
            t->type = seg;
            t->type_len = n;
            if (slash) {
                t->has_rest = 1;
                t->rest = slash + 1;
                t->rest_len = (size_t)(end - t->rest);
            }
        } else if (n == 0 && slash) {
            *why = "empty segment in path";
            return PIAPI_ROUTE_BAD_PATH;
        }
        if (!segment_ok(seg, n, why))
            return PIAPI_ROUTE_BAD_PATH;
        if (first && memchr(seg, '%', n)) {
            /* Service types are plain tokens in the config; an encoded one
             * can only be an attempt to confuse the router. */
            *why = "encoded character in service type";
            return PIAPI_ROUTE_BAD_PATH;
        }
        first = 0;
        if (!slash)
            break;
        seg = slash + 1;
    }
    return PIAPI_ROUTE_OK;
}

/* Decodes %XX and '+' (form encoding) into out; returns the length. */
static size_t query_decode(const char *s, size_t n, char *out)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        int h, l;
        if (s[i] == '%' && i + 2 < n &&
            (h = hexval(s[i + 1])) >= 0 && (l = hexval(s[i + 2])) >= 0) {
            out[o++] = (char)(h * 16 + l);
            i += 2;
        } else {
            out[o++] = s[i] == '+' ? ' ' : s[i];
        }
    }
    return o;
}

/* A client parameter is dropped when it is the service's auth parameter
 * (the provider key must be the only value upstream sees) or when its
 * name or value contains the member's own key (never forward it in any
 * form). */
static int param_dropped(const char *p, size_t n,
                         const struct piapi_service *svc,
                         const char *member_key, size_t member_key_len)
{
    const char *eq = memchr(p, '=', n);
    size_t name_len = eq ? (size_t)(eq - p) : n;
    char small[256];
    char *dec = n < sizeof small ? small : piapi_xmalloc(n + 1);
    int drop = 0;

    size_t dn = query_decode(p, name_len, dec);
    if (svc->auth.mode == PIAPI_AUTH_QUERY &&
        dn == strlen(svc->auth.name) && memcmp(dec, svc->auth.name, dn) == 0)
        drop = 1;
    if (!drop && member_key_len) {
        size_t whole = query_decode(p, n, dec);
        drop = memmem(dec, whole, member_key, member_key_len) != NULL;
    }
    if (dec != small)
        free(dec);
    return drop;
}

static void append_query_part(struct piapi_buf *b, int *have_query,
                              const char *s, size_t n)
{
    piapi_buf_putc(b, *have_query ? '&' : '?');
    piapi_buf_append(b, s, n);
    *have_query = 1;
}

void piapi_route_upstream_url(struct piapi_route_url *out,
                              const struct piapi_service *svc,
                              const struct piapi_route_target *t,
                              const char *provider_key,
                              const char *member_key, size_t member_key_len)
{
    const char *base = svc->base_url;
    const char *bq = strchr(base, '?');
    size_t base_len = bq ? (size_t)(bq - base) : strlen(base);
    int have_query = 0;

    piapi_buf_reset(&out->buf);
    out->secret_off = out->secret_len = 0;
    piapi_buf_append(&out->buf, base, base_len);
    if (t->has_rest) {
        piapi_buf_putc(&out->buf, '/');
        piapi_buf_append(&out->buf, t->rest, t->rest_len);
    }
    if (bq && bq[1])
        append_query_part(&out->buf, &have_query, bq + 1, strlen(bq + 1));

    if (t->query) {
        const char *p = t->query, *end = t->query + t->query_len;
        while (p < end) {
            const char *amp = memchr(p, '&', (size_t)(end - p));
            size_t n = amp ? (size_t)(amp - p) : (size_t)(end - p);
            if (n && !param_dropped(p, n, svc, member_key, member_key_len))
                append_query_part(&out->buf, &have_query, p, n);
            p += n + 1;
        }
        /* "?" alone or a trailing "&" carry no parameter; keep the query
         * byte-exact otherwise, which the loop above does. */
    }

    if (svc->auth.mode == PIAPI_AUTH_QUERY && provider_key) {
        char *esc = curl_easy_escape(NULL, provider_key, 0);
        piapi_buf_putc(&out->buf, have_query ? '&' : '?');
        piapi_buf_puts(&out->buf, svc->auth.name);
        piapi_buf_putc(&out->buf, '=');
        out->secret_off = out->buf.len;
        out->secret_len = strlen(esc ? esc : "");
        piapi_buf_puts(&out->buf, esc ? esc : "");
        curl_free(esc);
    }
}

void piapi_route_redacted(const struct piapi_route_url *url,
                          struct piapi_buf *out)
{
    piapi_buf_reset(out);
    if (!url->secret_len) {
        piapi_buf_append(out, url->buf.data, url->buf.len);
        return;
    }
    piapi_buf_append(out, url->buf.data, url->secret_off);
    piapi_buf_puts(out, "REDACTED");
    size_t tail = url->secret_off + url->secret_len;
    piapi_buf_append(out, url->buf.data + tail, url->buf.len - tail);
}
