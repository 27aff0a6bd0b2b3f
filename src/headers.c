/* Header policy: one table says what never crosses (RFC 9110 §7.6.1
 * hop-by-hop fields, credentials, framing that libcurl owns). */
#include "piapi/headers.h"

#include <curl/curl.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "piapi/arena.h"
#include "piapi/route.h"
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
    /* Providers then answer uncompressed, so every error body can be
     * scanned for secrets (the web server may still compress towards the
     * client). */
    { "accept-encoding",     DROP_REQ },
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

/* RFC 9110 §5.6.2 token characters. */
static int tchar(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (c && strchr("!#$%&'*+-.^_`|~", c));
}

int piapi_headers_response_line_ok(const char *line, size_t len)
{
    const char *colon = memchr(line, ':', len);
    if (!colon || colon == line)
        return 0;
    for (const char *p = line; p < colon; p++)
        if (!tchar((unsigned char)*p))
            return 0;
    for (const char *p = colon + 1; p < line + len; p++) {
        unsigned char c = (unsigned char)*p;
        if ((c < 0x20 && c != '\t') || c == 0x7f)
            return 0;
    }
    return 1;
}

/* ---- the provider key in responses ------------------------------------ */

/* How many bytes the spelling of byte c at s takes: 1 (raw), 3 (%XX)
 * or 5 (%25XX), as a bit set (bit k: k bytes). For any c but '%' at most
 * one applies. */
static unsigned spellings_at(const char *s, size_t n, unsigned char c)
{
    unsigned m = 0;
    if (n >= 1 && (unsigned char)s[0] == c)
        m |= 1u << 1;
    int b = piapi_pct_byte(s, n);
    if (b == c)
        m |= 1u << 3;
    if (b == '%' && n >= 5 && piapi_hex_digit(s[3]) >= 0 && piapi_hex_digit(s[4]) >= 0 &&
        piapi_hex_digit(s[3]) * 16 + piapi_hex_digit(s[4]) == c)
        m |= 1u << 5;
    return m;
}

/* Length of s that spells key[0..klen) (each byte raw, %XX or %25XX),
 * or 0. Iterative, no recursion (a key is up to 16 KiB): for a key
 * without '%' every byte has one spelling at most, so this walks once;
 * a '%' in the key is ambiguous (raw '%', "%25", "%2525"), so the ends
 * reachable so far are kept as a set, a bitmap over [0, 5 * klen]
 * relative to s, and stepped byte by byte: O(klen * width) at worst. */
static size_t spelled_at(const char *s, size_t n, const unsigned char *key, size_t klen)
{
    if (!klen)
        return 0;
    if (!memchr(key, '%', klen)) {
        size_t at = 0;
        for (size_t j = 0; j < klen; j++) {
            unsigned m = spellings_at(s + at, n - at, key[j]);
            if (!m)
                return 0;
            at += m & (1u << 1) ? 1 : m & (1u << 3) ? 3 : 5;
        }
        return at;
    }
    /* reach[i]: after the bytes matched so far, the spelling may end at i.
     * Ends only grow, so the set lives in [lo, hi]. */
    size_t width = (klen * 5 < n ? klen * 5 : n) + 1, lo = 0, hi = 0;
    unsigned char *reach = calloc(width, 1), *next = calloc(width, 1);
    size_t found = 0;
    if (!reach || !next)
        abort();  /* OOM, as in piapi_xmalloc */
    reach[0] = 1;
    for (size_t j = 0; j < klen; j++) {
        size_t nlo = SIZE_MAX, nhi = 0;
        for (size_t i = lo; i <= hi; i++) {
            if (!reach[i])
                continue;
            reach[i] = 0;
            unsigned m = spellings_at(s + i, n - i, key[j]);
            for (size_t step = 1; step <= 5; step += 2) {
                if (!(m & (1u << step)) || i + step >= width)
                    continue;
                next[i + step] = 1;
                nlo = i + step < nlo ? i + step : nlo;
                nhi = i + step > nhi ? i + step : nhi;
            }
        }
        if (nlo == SIZE_MAX)
            goto out;
        unsigned char *tmp = reach;
        reach = next;
        next = tmp;
        lo = nlo;
        hi = nhi;
    }
    found = lo;  /* the shortest spelling */
out:
    free(reach);
    free(next);
    return found;
}

/* First position at or after `from` where the key is spelled; *mlen gets
 * the spelling's length. n when there is none. */
static size_t find_key(const struct piapi_secret *k, const char *s, size_t n,
                       size_t from, size_t *mlen)
{
    const unsigned char *key = (const unsigned char *)k->key;
    for (size_t i = from; i < n; i++) {
        if ((unsigned char)s[i] != key[0] && s[i] != '%')
            continue;
        size_t m = spelled_at(s + i, n - i, key, k->len);
        if (m) {
            *mlen = m;
            return i;
        }
    }
    return n;
}

/* Whether k is a secret the response path looks for: a shorter one
 * would match ordinary words and break every answer. */
static int searchable(const struct piapi_secret *k)
{
    return k && k->key && k->len >= PIAPI_SECRET_MIN_LEN;
}

/* The first position in [from, limit) where a secret of the set is
 * spelled (the longest spelling there when several start at the same
 * byte), or n. One pass over the text whatever the number of matches. */
static size_t find_any(const struct piapi_secrets *set, const char *s, size_t n,
                       size_t from, size_t limit, size_t *mlen)
{
    for (size_t i = from; set && i < limit && i < n; i++) {
        size_t best = 0;
        for (size_t j = 0; j < set->n; j++) {
            const struct piapi_secret *k = &set->v[j];
            if (!searchable(k) || ((unsigned char)s[i] != (unsigned char)k->key[0] && s[i] != '%'))
                continue;
            size_t m = spelled_at(s + i, n - i, (const unsigned char *)k->key, k->len);
            if (m > best)
                best = m;
        }
        if (best) {
            *mlen = best;
            return i;
        }
    }
    return n;
}

int piapi_secret_in(const struct piapi_secret *k, const char *s, size_t n)
{
    size_t m;
    return searchable(k) && find_key(k, s, n, 0, &m) < n;
}

size_t piapi_secret_redact(const struct piapi_secret *k, const char *s, size_t n,
                           struct piapi_buf *out)
{
    struct piapi_secrets one = { (struct piapi_secret *)k, k ? 1 : 0 };
    return piapi_secrets_redact(&one, s, n, out);
}

int piapi_secrets_in(const struct piapi_secrets *set, const char *s, size_t n)
{
    size_t m;
    return find_any(set, s, n, 0, n, &m) < n;
}

size_t piapi_secrets_redact_window(const struct piapi_secrets *set, const char *s,
                                   size_t n, size_t limit, struct piapi_buf *out,
                                   size_t *count)
{
    size_t at = 0, m = 0;
    for (;;) {
        size_t i = find_any(set, s, n, at, limit, &m);
        if (i == n)
            break;
        piapi_buf_append(out, s + at, i - at);
        piapi_buf_puts(out, "REDACTED");
        at = i + m;
        if (count)
            (*count)++;
    }
    size_t end = at > limit ? at : limit;
    if (end > n)
        end = n;
    piapi_buf_append(out, s + at, end - at);
    return end;
}

size_t piapi_secrets_redact(const struct piapi_secrets *set, const char *s, size_t n,
                            struct piapi_buf *out)
{
    size_t count = 0;
    piapi_secrets_redact_window(set, s, n, n, out, &count);
    return count;
}

size_t piapi_secrets_span(const struct piapi_secrets *set)
{
    size_t longest = 0;
    for (size_t i = 0; set && i < set->n; i++)
        if (searchable(&set->v[i]) && set->v[i].len * 5 > longest)
            longest = set->v[i].len * 5;
    return longest;
}

/* ---- the secret set of one request ------------------------------------ */

void piapi_secrets_add(struct piapi_secrets *set, const char *s, size_t n, const char *param)
{
    if (n < PIAPI_SECRET_MIN_LEN)
        return;
    for (size_t i = 0; i < set->n; i++)
        if (set->v[i].len == n && memcmp(set->v[i].key, s, n) == 0 && !param)
            return;
    set->v = piapi_xrealloc(set->v, (set->n + 1) * sizeof *set->v);
    char *copy = piapi_xmalloc(n + 1);
    memcpy(copy, s, n);
    copy[n] = '\0';
    set->v[set->n++] = (struct piapi_secret){ copy, n, param };
}

/* s percent-decoded into out (a '%' not followed by two hex digits stays). */
static void pct_decode(const char *s, size_t n, struct piapi_buf *out)
{
    piapi_buf_reset(out);
    for (size_t i = 0; i < n; i++) {
        int b = piapi_pct_byte(s + i, n - i);
        if (b >= 0) {
            piapi_buf_putc(out, (char)b);
            i += 2;
        } else {
            piapi_buf_putc(out, s[i]);
        }
    }
}

/* A credential as written in the URL and, when that differs, decoded. */
static void add_both(struct piapi_secrets *set, const char *s, size_t n, struct piapi_buf *tmp)
{
    piapi_secrets_add(set, s, n, NULL);
    pct_decode(s, n, tmp);
    piapi_secrets_add(set, tmp->data, tmp->len, NULL);
}

static void base64(const unsigned char *s, size_t n, struct piapi_buf *out)
{
    static const char abc[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    piapi_buf_reset(out);
    for (size_t i = 0; i < n; i += 3) {
        unsigned v = (unsigned)s[i] << 16 | (i + 1 < n ? (unsigned)s[i + 1] << 8 : 0) |
                     (i + 2 < n ? s[i + 2] : 0);
        piapi_buf_putc(out, abc[v >> 18 & 63]);
        piapi_buf_putc(out, abc[v >> 12 & 63]);
        piapi_buf_putc(out, i + 1 < n ? abc[v >> 6 & 63] : '=');
        piapi_buf_putc(out, i + 2 < n ? abc[v & 63] : '=');
    }
}

/* The userinfo "user:pass@" of the URL: whole, each half, decoded, and
 * as the Basic credential libcurl sends (base64 of the decoded pair),
 * which an error body echoing the Authorization header would show. */
static void add_userinfo(struct piapi_secrets *set, const char *url, struct piapi_buf *tmp)
{
    const char *scheme_end = strstr(url, "://");
    if (!scheme_end)
        return;
    const char *auth = scheme_end + 3;
    size_t alen = strcspn(auth, "/?#"), ulen = 0;
    for (size_t i = alen; i > 0 && !ulen; i--)
        if (auth[i - 1] == '@')
            ulen = i - 1;
    if (!ulen)
        return;
    const char *colon = memchr(auth, ':', ulen);
    size_t user = colon ? (size_t)(colon - auth) : ulen;
    add_both(set, auth, ulen, tmp);
    add_both(set, auth, user, tmp);
    if (colon)
        add_both(set, colon + 1, ulen - user - 1, tmp);
    struct piapi_buf dec = {0};
    pct_decode(auth, ulen, &dec);
    base64((const unsigned char *)dec.data, dec.len, tmp);
    piapi_secrets_add(set, tmp->data, tmp->len, NULL);
    explicit_bzero(dec.data, dec.len);
    piapi_buf_dispose(&dec);
}

/* Whether the '&'-separated part p[0..n) is one of the client's own. */
static int client_part(const char *cq, const char *p, size_t n)
{
    for (const char *c = cq; c && *c;) {
        size_t cn = strcspn(c, "&");
        if (cn == n && memcmp(c, p, n) == 0)
            return 1;
        c += cn + (c[cn] ? 1 : 0);
    }
    return 0;
}

void piapi_secrets_build(struct piapi_secrets *set, const char *provider_key,
                         const char *key_param, const char *url, const char *request_uri)
{
    struct piapi_buf tmp = {0};

    memset(set, 0, sizeof *set);
    if (provider_key)
        piapi_secrets_add(set, provider_key, strlen(provider_key), key_param);
    if (url) {
        add_userinfo(set, url, &tmp);
        /* Every query value upstream that is not one of the client's own
         * parameters came from the baseUrl (or is the key itself). */
        const char *cq = request_uri ? strchr(request_uri, '?') : NULL;
        const char *q = strchr(url, '?');
        for (const char *p = q ? q + 1 : NULL; p && *p;) {
            size_t n = strcspn(p, "&");
            if (!client_part(cq ? cq + 1 : NULL, p, n)) {
                const char *eq = memchr(p, '=', n);
                const char *v = eq ? eq + 1 : p;
                add_both(set, v, n - (size_t)(v - p), &tmp);
            }
            p += n + (p[n] ? 1 : 0);
        }
    }
    if (tmp.data)
        explicit_bzero(tmp.data, tmp.cap);
    piapi_buf_dispose(&tmp);
}

void piapi_secrets_dispose(struct piapi_secrets *set)
{
    for (size_t i = 0; i < set->n; i++) {
        explicit_bzero((char *)set->v[i].key, set->v[i].len);
        free((char *)set->v[i].key);
    }
    free(set->v);
    memset(set, 0, sizeof *set);
}

/* Where a query parameter's value ends inside a header value: a URL in
 * Link sits in <>, one in Refresh may be quoted, lists use ',' and ';'. */
static int ends_param(char c)
{
    return strchr("&#<>\"' \t,;", c) != NULL;
}

/* Appends v with the value of every query parameter named k->param
 * (after '?', '&' or ';'; the name itself possibly percent-encoded)
 * replaced by "REDACTED". Returns how many were replaced. */
static size_t redact_param(const struct piapi_secret *k, const char *v, size_t n,
                           struct piapi_buf *out)
{
    const unsigned char *name = (const unsigned char *)k->param;
    size_t name_len = strlen(k->param), at = 0, count = 0;

    for (size_t i = 1; name_len && i < n; i++) {
        char prev = v[i - 1];
        if (prev != '?' && prev != '&' && prev != ';')
            continue;
        size_t m = spelled_at(v + i, n - i, name, name_len);
        if (!m || i + m >= n || v[i + m] != '=')
            continue;
        size_t start = i + m + 1, end = start;
        while (end < n && !ends_param(v[end]))
            end++;
        if (end == start)
            continue;
        piapi_buf_append(out, v + at, start - at);
        piapi_buf_puts(out, "REDACTED");
        at = end;
        i = end;
        count++;
    }
    piapi_buf_append(out, v + at, n - at);
    return count;
}

static int carries_url(const char *name, size_t len)
{
    static const char *const names[] = { "location", "content-location", "link", "refresh" };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strlen(names[i]) == len && strncasecmp(names[i], name, len) == 0)
            return 1;
    return 0;
}

enum piapi_resp_value piapi_headers_response_value(const struct piapi_secrets *set,
                                                   const char *name, size_t name_len,
                                                   const char *val, size_t val_len,
                                                   struct piapi_buf *out)
{
    if (!piapi_secrets_span(set))
        return PIAPI_RESP_KEEP;
    if (!carries_url(name, name_len))
        return piapi_secrets_in(set, name, name_len) || piapi_secrets_in(set, val, val_len)
               ? PIAPI_RESP_DROP : PIAPI_RESP_KEEP;
    if (!val_len)
        return PIAPI_RESP_KEEP;

    /* A redirect that keeps the query hands back ?<param>=<key>: the key
     * goes wherever it shows (a raw '&' in it must not cut it short), then
     * the parameter's value, whatever it became on the way. */
    struct piapi_buf tmp = {0};
    size_t changed = piapi_secrets_redact(set, val, val_len, &tmp);
    for (size_t i = 0; i < set->n; i++) {
        if (!set->v[i].param || !searchable(&set->v[i]))
            continue;
        piapi_buf_reset(out);
        changed += redact_param(&set->v[i], tmp.data ? tmp.data : "", tmp.len, out);
        piapi_buf_reset(&tmp);
        piapi_buf_append(&tmp, out->data ? out->data : "", out->len);
    }
    piapi_buf_reset(out);
    piapi_buf_append(out, tmp.data ? tmp.data : "", tmp.len);
    piapi_buf_dispose(&tmp);
    return changed ? PIAPI_RESP_REDACTED : PIAPI_RESP_KEEP;
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

/* Views of one param's credentials, split where lighttpd joined
 * repeated lines with ", ". In Authorization the "Bearer" word is
 * skipped; a first part with another scheme (Basic) is none, a later
 * part without one counts whole ("Bearer a,b" may mean a key "b").
 * Adds to out[*n] while *n < max, counts every one in *n. */
static void presented_in(const char *v, int auth, struct piapi_route_secret *out,
                         size_t max, size_t *n)
{
    for (int first = 1; v; first = 0) {
        const char *comma = strchr(v, ',');
        const char *p = skip_ws(v);
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        if (auth && len > 6 && strncasecmp(p, "bearer", 6) == 0 &&
            (p[6] == ' ' || p[6] == '\t')) {
            const char *k = skip_ws(p + 6);
            len -= (size_t)(k - p);
            p = k;
        } else if (auth && first) {
            len = 0;
        }
        while (len && (p[len - 1] == ' ' || p[len - 1] == '\t'))
            len--;
        if (len) {
            if (*n < max)
                out[*n] = (struct piapi_route_secret){ p, len };
            (*n)++;
        }
        v = comma ? comma + 1 : NULL;
    }
}

size_t piapi_headers_presented(char **envp, struct piapi_route_secret *out, size_t max)
{
    static const char auth[] = "HTTP_AUTHORIZATION=", xkey[] = "HTTP_X_API_KEY=";
    size_t n = 0;

    for (char **e = envp; e && *e; e++) {
        if (strncmp(*e, auth, sizeof auth - 1) == 0)
            presented_in(*e + sizeof auth - 1, 1, out, max, &n);
        else if (strncmp(*e, xkey, sizeof xkey - 1) == 0)
            presented_in(*e + sizeof xkey - 1, 0, out, max, &n);
    }
    return n;
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

/* Is `name` listed in any of the client's Connection headers? nginx
 * passes repeated lines as repeated params (lighttpd joins them), and
 * every line counts. */
static int listed_in_any_connection(char **envp, const char *name, size_t len)
{
    static const char param[] = "HTTP_CONNECTION=";
    for (char **e = envp; e && *e; e++)
        if (strncmp(*e, param, sizeof param - 1) == 0 &&
            listed_in_connection(*e + sizeof param - 1, name, len))
            return 1;
    return 0;
}

/* A header list built in the request's arena: libcurl only reads a
 * curl_slist (data, next), so its nodes need not come from
 * curl_slist_append, and the request's one release frees (and wipes) them
 * with the rest. */
struct list {
    struct piapi_arena *a;
    struct curl_slist *head, **tail;
};

static void append(struct list *l, const char *line, size_t len)
{
    struct curl_slist *n = piapi_arena_alloc(l->a, sizeof *n);
    n->data = piapi_arena_strndup(l->a, line, len);
    *l->tail = n;
    l->tail = &n->next;
}

int piapi_headers_forward(char **envp, const struct piapi_service *svc,
                          const char *provider_key, const char *request_id,
                          const struct piapi_route_secret *creds, size_t ncreds,
                          struct piapi_arena *a, struct curl_slist **out,
                          const char **why)
{
    const char *auth_name = svc->auth.mode == PIAPI_AUTH_HEADER ? svc->auth.name : NULL;
    struct list list = { .a = a };
    struct piapi_buf line = {0};
    size_t count = 0, bytes = 0;
    int status = 0;

    list.tail = &list.head;
    if (ncreds > PIAPI_HEADERS_MAX_CREDS)
        ncreds = PIAPI_HEADERS_MAX_CREDS;
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
        if (listed_in_any_connection(envp, hname, hlen))
            continue;
        if (!value_ok(val)) {
            *why = "invalid character in a request header";
            status = 400;
            goto fail;
        }
        if (piapi_route_holds_secret(val, strlen(val), creds, ncreds))
            continue;
        /* "Name:" with nothing after it tells libcurl to remove a header;
         * "Name;" is its syntax for sending one with an empty value. */
        if (*val)
            piapi_buf_printf(&line, ": %s", val);
        else
            piapi_buf_putc(&line, ';');
        append(&list, line.data, line.len);
    }

    const char *ctype = piapi_headers_param(envp, "CONTENT_TYPE", NULL);
    if (ctype && *ctype) {
        if (!value_ok(ctype)) {
            *why = "invalid character in a request header";
            status = 400;
            goto fail;
        }
    }
    if (ctype && *ctype && !piapi_route_holds_secret(ctype, strlen(ctype), creds, ncreds)) {
        piapi_buf_reset(&line);
        piapi_buf_printf(&line, "Content-Type: %s", ctype);
        append(&list, line.data, line.len);
    }
    if (auth_name) {
        piapi_buf_reset(&line);
        piapi_buf_printf(&line, "%s: %s%s", auth_name, svc->auth.prefix, provider_key);
        append(&list, line.data, line.len);
    }
    piapi_buf_reset(&line);
    piapi_buf_printf(&line, "X-Request-ID: %s", request_id);
    append(&list, line.data, line.len);
    append(&list, "Expect:", 7);
    /* No Accept-Encoding at all (the table drops the client's, and libcurl
     * announces none of its own): answers come uncompressed, so an error
     * body can be read for secrets. */
    piapi_buf_wipe(&line);  /* it held the provider key */
    *out = list.head;
    return 0;

fail:
    piapi_buf_wipe(&line);
    *out = NULL;
    return status;
}
