/* Path validation and upstream URL composition. */
#include "piapi/route.h"

#include <curl/curl.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* ---- path validation -------------------------------------------------- */

/* Raw bytes a path may carry: printable ASCII minus the backslash, which
 * some upstreams treat as a separator. Everything else must be %-encoded. */
static int path_byte_ok(unsigned char c)
{
    return c > 0x20 && c < 0x7f && c != '\\';
}

/* RFC 3629 well-formedness, fed one decoded byte at a time: overlong
 * forms (%c0%ae is an overlong '.'), surrogates and bytes above U+10FFFF
 * are what some decoders turn into ASCII and others refuse. */
struct utf8_state {
    int need;                /* continuation bytes still expected */
    unsigned char lo, hi;    /* the next one's range */
    unsigned long cp;        /* the code point so far */
};

static int utf8_next(struct utf8_state *u, unsigned char c)
{
    if (u->need) {
        if (c < u->lo || c > u->hi)
            return 0;
        u->need--;
        u->lo = 0x80, u->hi = 0xbf;
        u->cp = u->cp << 6 | (c & 0x3f);
        return 1;
    }
    u->lo = 0x80, u->hi = 0xbf;
    u->cp = c;
    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf)
        u->need = 1, u->cp = c & 0x1f;
    else if (c == 0xe0)
        u->need = 2, u->lo = 0xa0, u->cp = c & 0x0f;
    else if (c == 0xed)
        u->need = 2, u->hi = 0x9f, u->cp = c & 0x0f;
    else if (c >= 0xe1 && c <= 0xef)
        u->need = 2, u->cp = c & 0x0f;
    else if (c == 0xf0)
        u->need = 3, u->lo = 0x90, u->cp = c & 0x07;
    else if (c >= 0xf1 && c <= 0xf3)
        u->need = 3, u->cp = c & 0x07;
    else if (c == 0xf4)
        u->need = 3, u->hi = 0x8f, u->cp = c & 0x07;
    else
        return 0;
    return 1;
}

/* Code points that Unicode compatibility normalisation (NFKC, which some
 * frameworks apply to paths) turns into '.', "..", '/' or '\': a
 * "%ef%bc%8e%ef%bc%8e" segment would become ".." there. */
static int dot_or_slash_lookalike(unsigned long cp)
{
    static const unsigned long lookalikes[] = {
        0x2024, 0x2025, 0xfe30,  /* one and two dot leaders, vertical two dots */
        0xfe52, 0xff0e,          /* small and fullwidth full stops */
        0xff0f, 0xfe68, 0xff3c,  /* fullwidth '/', small and fullwidth '\' */
    };
    for (size_t i = 0; i < sizeof lookalikes / sizeof lookalikes[0]; i++)
        if (cp == lookalikes[i])
            return 1;
    return 0;
}

/* Upstreams and the frameworks in front of them may decode a URL more
 * than once: paths, credentials and parameter names are looked at in
 * every spelling up to this many decodings. */
#define DECODE_ROUNDS 4

/* After a "%25", whether what follows, as sent or decoded once or more,
 * starts with "2e", "2f", "5c", "25", "3b" or "20" (%252e, %25%32%65,
 * %25252e, %252%2566, %253%2562, %252%30...): an escape of '.', '/',
 * '\', '%', ';' or ' ' is then left, which an upstream that decodes once
 * more turns into a dot segment, a separator, ";params" that servers such
 * as Tomcat drop before resolving ".;", or a space that some trim around
 * a ". ". Each round shrinks what it decodes to a third at most, so
 * the first 3^DECODE_ROUNDS bytes decide it. */
static int multi_encoded(const char *s, size_t n)
{
    char buf[81];
    size_t m = n < sizeof buf ? n : sizeof buf;

    memcpy(buf, s, m);
    for (int round = 0; round <= DECODE_ROUNDS; round++) {
        int hi = m >= 2 ? piapi_hex_digit(buf[0]) : -1;
        int lo = m >= 2 ? piapi_hex_digit(buf[1]) : -1;
        if (hi >= 0 && lo >= 0) {
            int v = hi * 16 + lo;
            return v == '.' || v == '/' || v == '\\' || v == '%' || v == ';' || v == ' ';
        }
        size_t k = 0;
        for (size_t i = 0; i < m; i++) {
            int v = buf[i] == '%' ? piapi_pct_byte(buf + i, m - i) : -1;
            buf[k++] = v >= 0 ? (char)v : buf[i];
            if (v >= 0)
                i += 2;
        }
        if (k == m)
            return 0;  /* nothing left to decode */
        m = k;
    }
    return 0;
}

/* The bytes of one segment (between raw '/'): allowed raw bytes,
 * well-formed escapes, nothing that decodes to a control character, to
 * invalid UTF-8 or to a look-alike of '.', '/' or '\', no multiply
 * encoded '.', '/', '\', '%', ';' or ' '. NULL when fine, else why not. */
static const char *segment_bytes_why(const char *s, size_t n)
{
    struct utf8_state u = { 0 };

    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '%') {
            int v = piapi_pct_byte(s + i, n - i);
            if (v < 0)
                return "malformed percent-encoding in path";
            if (v < 0x20 || v == 0x7f)
                return "control character in path";
            if (v == '%' && multi_encoded(s + i + 3, n - i - 3))
                return "multiply encoded character in path";
            c = (unsigned char)v;
            i += 2;
        } else if (!path_byte_ok(c)) {
            return c == '\\' ? "backslash in path" : "invalid character in path";
        }
        if (!utf8_next(&u, c))
            return "invalid UTF-8 in path";
        if (c >= 0x80 && !u.need && dot_or_slash_lookalike(u.cp))
            return "Unicode look-alike of '.', '/' or '\\' in path";
    }
    return u.need ? "invalid UTF-8 in path" : NULL;
}

/* "." or "..", however spelled: %2e in any case, followed by ";params"
 * (raw or %3b; servers such as Tomcat drop them before resolving "..;/"),
 * or padded with spaces (which some trim). Escapes are well-formed here. */
static int dot_segment(const char *s, size_t n)
{
    size_t dots = 0, other = 0;

    for (size_t i = 0; i < n; i++) {
        int c = (unsigned char)s[i];
        if (c == '%') {
            c = piapi_pct_byte(s + i, n - i);
            i += 2;
        }
        if (c == ';')
            break;
        if (c == '.')
            dots++;
        else if (c != ' ')
            other++;
    }
    return dots >= 1 && dots <= 2 && other == 0;
}

/* An encoded '/' or '\' (%2F, %5C) is forwarded as sent: real APIs put
 * them in ids (Bedrock's inference-profile ARNs). An upstream that
 * decodes them sees the pieces between them as segments, so each must be
 * one it may resolve: not a dot segment and, where an encoded separator
 * made it, not empty (a leading "%2F" would decode to "//host"). An
 * encoded '?' or '#' (%3F, %23) ends a segment too for an upstream that
 * decodes once and splits the URL again, so what precedes it must not be
 * a dot segment either ("..%3F" is ".." there). */
static const char *pieces_why(const char *s, size_t n)
{
    size_t start = 0, i = 0;
    int after_slash = 0;   /* the piece follows an encoded '/' or '\' */

    for (;;) {
        int sep = 0;       /* what ends the piece: '/' for %2F %5C, '?' for %3F %23 */
        while (i < n && !sep) {
            if (s[i] != '%') {
                i++;
                continue;
            }
            int v = piapi_pct_byte(s + i, n - i);
            sep = v == '/' || v == '\\' ? '/' : v == '?' || v == '#' ? '?' : 0;
            if (!sep)
                i += 3;
        }
        if (dot_segment(s + start, i - start))
            return "dot segment in path";
        if (i == start && (sep == '/' || after_slash))
            return "empty segment in path";
        if (!sep)
            return NULL;
        after_slash = sep == '/';
        i += 3;
        start = i;
    }
}

static int segment_ok(const char *s, size_t n, const char **why)
{
    const char *w = segment_bytes_why(s, n);
    if (!w)
        w = pieces_why(s, n);
    if (w)
        *why = w;
    return w == NULL;
}

static enum piapi_route_status query_check(struct piapi_route_target *t,
                                           const char **why)
{
    for (size_t i = 0; i < t->query_len; i++) {
        unsigned char c = (unsigned char)t->query[i];
        if (c <= 0x20 || c >= 0x7f) {
            *why = "invalid character in query";
            return PIAPI_ROUTE_BAD_PATH;
        }
    }
    return PIAPI_ROUTE_OK;
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
    /* A fragment is never part of a request target (RFC 9110 §7.1). Sent
     * anyway, libcurl would cut the upstream URL there, losing what
     * follows (a query-mode key among it) while the log showed it. */
    if (memchr(uri, '#', len)) {
        *why = "fragment ('#') in request target";
        return PIAPI_ROUTE_BAD_PATH;
    }

    const char *path = uri + sizeof base - 1;
    const char *q = strchr(path, '?');
    size_t plen = q ? (size_t)(q - path) : strlen(path);
    if (q) {
        t->query = q + 1;
        t->query_len = len - (size_t)(t->query - uri);
        if (query_check(t, why) != PIAPI_ROUTE_OK)
            return PIAPI_ROUTE_BAD_PATH;
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

/* ---- decoding, repeated ----------------------------------------------- */

/* Decodes s[0..n) in place once: %XY, and '+' as a space when form is
 * set (query strings). Returns the new length; decoding only shrinks, so
 * the write position never passes the read position. */
static size_t decode_once(char *s, size_t n, int form)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        int v = piapi_pct_byte(s + i, n - i);
        if (v >= 0) {
            s[o++] = (char)v;
            i += 2;
        } else {
            s[o++] = form && s[i] == '+' ? ' ' : s[i];
        }
    }
    return o;
}

/* The spellings of a text an upstream may read: as sent, then decoded
 * once, twice..., until decoding changes nothing or DECODE_ROUNDS. */
struct spelling {
    char *s;
    size_t n;
    int rounds, form;
    char small[256];
};

static void spelling_init(struct spelling *sp, const char *s, size_t n, int form)
{
    sp->s = n < sizeof sp->small ? sp->small : piapi_xmalloc(n + 1);
    memcpy(sp->s, s, n);
    sp->n = n;
    sp->rounds = 0;
    sp->form = form;
}

/* Decodes once more; 0 when that spells nothing new. */
static int spelling_next(struct spelling *sp)
{
    if (sp->rounds == DECODE_ROUNDS)
        return 0;
    int plus = sp->form && memchr(sp->s, '+', sp->n) != NULL;
    size_t n = decode_once(sp->s, sp->n, sp->form);
    if (n == sp->n && !plus)
        return 0;
    sp->n = n;
    sp->rounds++;
    return 1;
}

static void spelling_dispose(struct spelling *sp)
{
    if (sp->s != sp->small)
        free(sp->s);
}

/* Whether s[0..n) holds one of the credentials at least min bytes long. */
static int holds_one(const char *s, size_t n, const struct piapi_route_secret *hidden,
                     size_t nhidden, size_t min)
{
    for (size_t i = 0; i < nhidden; i++)
        if (hidden[i].len && hidden[i].len >= min &&
            memmem(s, n, hidden[i].s, hidden[i].len) != NULL)
            return 1;
    return 0;
}

int piapi_route_holds_secret(const char *s, size_t n,
                             const struct piapi_route_secret *hidden, size_t nhidden)
{
    struct spelling sp;
    int found;

    spelling_init(&sp, s, n, 0);
    do
        found = holds_one(sp.s, sp.n, hidden, nhidden, PIAPI_ROUTE_SECRET_MIN);
    while (!found && spelling_next(&sp));
    spelling_dispose(&sp);
    return found;
}

/* ---- the client's query ----------------------------------------------- */

/* What parsers trim from a name: whitespace and control bytes. */
static int is_blank(unsigned char c)
{
    return c <= 0x20 || c == 0x7f;
}

/* A name's byte as PHP reads it (' ', '.' and an unmatched '[' become
 * '_'), case-folded. */
static int name_fold(unsigned char c)
{
    if (c == ' ' || c == '.' || c == '[')
        c = '_';
    return c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c;
}

/* Whether a decoded parameter name is the auth parameter as some parser
 * reads it: in any case (API_KEY), cut at a NUL, trimmed of whitespace
 * and control bytes (%09api_key), up to a bracket (api_key[], api_key[0],
 * api_key]), or with '.', ' ' and '[' read as '_' (PHP: api.key). */
static int names_auth(const char *name, size_t n, const char *auth)
{
    size_t alen = strlen(auth), cut = 0;
    const char *nul = memchr(name, '\0', n);

    if (nul)
        n = (size_t)(nul - name);
    while (n && is_blank((unsigned char)name[0]))
        name++, n--;
    while (n && is_blank((unsigned char)name[n - 1]))
        n--;
    while (cut < n && name[cut] != '[' && name[cut] != ']')
        cut++;
    if (cut == alen && strncasecmp(name, auth, alen) == 0)
        return 1;
    if (n != alen)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (name_fold((unsigned char)name[i]) != name_fold((unsigned char)auth[i]))
            return 0;
    return 1;
}

/* Checks every name in one spelling of a parameter: some parsers also
 * split on ';' (HTML 4's advice, Python before 3.9.2), and a decoded
 * spelling may hold a '&' or ';' of its own (a=1%3Bapi_key=x, as read by
 * a parser that decodes before it splits). */
static int carries_auth_name(const char *p, size_t n, const char *auth)
{
    const char *end = p + n;
    for (;;) {
        size_t len = 0;
        while (p + len < end && p[len] != ';' && p[len] != '&')
            len++;
        const char *eq = memchr(p, '=', len);
        if (names_auth(p, eq ? (size_t)(eq - p) : len, auth))
            return 1;
        if (p + len == end)
            return 0;
        p += len + 1;
    }
}

/* A client parameter is dropped when, in any of its spellings, it is
 * named like the service's auth parameter (the provider key must be the
 * only value upstream sees) or its name or value contains a credential
 * the client presented (never forward one in any form). */
static int param_dropped(const char *p, size_t n, const struct piapi_service *svc,
                         const struct piapi_route_secret *hidden, size_t nhidden)
{
    const char *auth = svc->auth.mode == PIAPI_AUTH_QUERY ? svc->auth.name : NULL;
    struct spelling sp;
    int drop;

    spelling_init(&sp, p, n, 1);
    do
        drop = (auth && carries_auth_name(sp.s, sp.n, auth)) ||
               holds_one(sp.s, sp.n, hidden, nhidden, 1);
    while (!drop && spelling_next(&sp));
    spelling_dispose(&sp);
    return drop;
}

/* ---- the upstream URL ------------------------------------------------- */

/* Where the userinfo ("user:pass@") of an absolute URL sits: *off and
 * *len (0 when none). The config load has checked the URL's form. */
static void find_userinfo(const char *url, size_t *off, size_t *len)
{
    const char *scheme_end = strstr(url, "://");
    *off = *len = 0;
    if (!scheme_end)
        return;
    const char *auth = scheme_end + 3;
    size_t alen = strcspn(auth, "/?");
    for (size_t i = alen; i > 0; i--) {
        if (auth[i - 1] == '@') {
            *off = (size_t)(auth - url);
            *len = i;
            return;
        }
    }
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
                              const struct piapi_route_secret *hidden,
                              size_t nhidden)
{
    const char *base = svc->base_url;
    const char *bq = strchr(base, '?');
    size_t base_len = bq ? (size_t)(bq - base) : strlen(base);
    int have_query = 0;

    piapi_buf_reset(&out->buf);
    out->secret_off = out->secret_len = 0;
    out->base_query_off = out->base_query_len = 0;
    find_userinfo(base, &out->userinfo_off, &out->userinfo_len);
    piapi_buf_append(&out->buf, base, base_len);
    if (t->has_rest) {
        piapi_buf_putc(&out->buf, '/');
        piapi_buf_append(&out->buf, t->rest, t->rest_len);
    }
    if (bq && bq[1]) {
        append_query_part(&out->buf, &have_query, bq + 1, strlen(bq + 1));
        out->base_query_len = strlen(bq + 1);
        out->base_query_off = out->buf.len - out->base_query_len;
    }

    if (t->query) {
        const char *p = t->query, *end = t->query + t->query_len;
        while (p < end) {
            const char *amp = memchr(p, '&', (size_t)(end - p));
            size_t n = amp ? (size_t)(amp - p) : (size_t)(end - p);
            if (n && !param_dropped(p, n, svc, hidden, nhidden))
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

/* Every value of a query string replaced: "a=1&b" → "a=REDACTED&REDACTED". */
static void put_redacted_query(struct piapi_buf *out, const char *s, size_t n)
{
    const char *end = s + n;
    for (const char *p = s; p < end;) {
        const char *amp = memchr(p, '&', (size_t)(end - p));
        const char *pend = amp ? amp : end;
        const char *eq = memchr(p, '=', (size_t)(pend - p));
        if (p != s)
            piapi_buf_putc(out, '&');
        if (eq)
            piapi_buf_append(out, p, (size_t)(eq + 1 - p));
        piapi_buf_puts(out, "REDACTED");
        p = pend + (amp ? 1 : 0);
    }
}

void piapi_route_redacted(const struct piapi_route_url *url,
                          struct piapi_buf *out)
{
    const char *d = url->buf.data;
    size_t pos = 0;

    piapi_buf_reset(out);
    if (url->userinfo_len) {
        piapi_buf_append(out, d, url->userinfo_off);
        pos = url->userinfo_off + url->userinfo_len;
    }
    if (url->base_query_len) {
        piapi_buf_append(out, d + pos, url->base_query_off - pos);
        put_redacted_query(out, d + url->base_query_off, url->base_query_len);
        pos = url->base_query_off + url->base_query_len;
    }
    if (url->secret_len) {
        piapi_buf_append(out, d + pos, url->secret_off - pos);
        piapi_buf_puts(out, "REDACTED");
        pos = url->secret_off + url->secret_len;
    }
    piapi_buf_append(out, d + pos, url->buf.len - pos);
}

/* ---- secrets in foreign text ----------------------------------------- */

static int has_part(const char *text, const char *s, size_t n)
{
    return n >= PIAPI_SECRET_MIN_LEN && memmem(text, strlen(text), s, n) != NULL;
}

int piapi_route_mentions_secret(const struct piapi_service *svc,
                                const char *provider_key, const char *text)
{
    const char *base = svc->base_url;
    size_t off, len;

    if (provider_key && *provider_key && strstr(text, provider_key))
        return 1;
    find_userinfo(base, &off, &len);
    if (len) {
        const char *ui = base + off;
        size_t ulen = len - 1;  /* without '@' */
        const char *colon = memchr(ui, ':', ulen);
        size_t user = colon ? (size_t)(colon - ui) : ulen;
        if (has_part(text, ui, ulen) || has_part(text, ui, user) ||
            (colon && has_part(text, colon + 1, ulen - user - 1)))
            return 1;
    }
    const char *q = strchr(base, '?');
    for (const char *p = q ? q + 1 : NULL; p && *p;) {
        size_t n = strcspn(p, "&");
        const char *eq = memchr(p, '=', n);
        const char *v = eq ? eq + 1 : p;
        if (has_part(text, v, n - (size_t)(v - p)))
            return 1;
        p += n + (p[n] ? 1 : 0);
    }
    return 0;
}
