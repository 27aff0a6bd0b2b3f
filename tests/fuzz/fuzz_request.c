/* libFuzzer target for everything piapi does with a client's request
 * before it reaches libcurl: REQUEST_URI parsing and validation, upstream
 * URL composition, credential extraction and the header policy.
 *
 * Input: the first line is REQUEST_URI, every further line one FastCGI
 * param ("NAME=value"). Invariants checked on every accepted path:
 *   - the path after baseUrl never holds a "." or ".." segment nor an
 *     empty one before its end, split on '/' and '\', raw or decoded once,
 *     twice or three times, with or without ";params", spaces trimmed:
 *     no upstream's way of reading it leaves the baseUrl's prefix;
 *   - decoded once, it is valid UTF-8 and free of control characters;
 *   - no '#' reaches libcurl;
 *   - the member's key (or the other credential sent) never appears in
 *     the upstream query, and the only parameter a parser could read as
 *     the auth parameter is the injected one, last;
 *   - the redacted URL shows no userinfo, baseUrl parameter value or
 *     provider key; the headers carry no CR/LF and no client credential. */
#include <curl/curl.h>
#include <ctype.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "piapi/arena.h"
#include "piapi/headers.h"
#include "piapi/route.h"

#define MEMBER_KEY "member-secret-key"
#define OTHER_KEY "other-credential"
#define BASE "https://fu:fPassW0rd@u.example/v1"

static const struct piapi_service svc = {
    .type = "cx", .base_url = BASE "?code=SECRETc&ver=1",
    .auth = { .mode = PIAPI_AUTH_QUERY, .name = "api_key", .prefix = "" },
};
static const struct piapi_service hsvc = {
    .type = "cx", .base_url = "https://u.example/v1",
    .auth = { .mode = PIAPI_AUTH_HEADER, .name = "Authorization", .prefix = "Bearer " },
};
static const struct piapi_route_secret hidden[] = {
    { MEMBER_KEY, sizeof MEMBER_KEY - 1 }, { OTHER_KEY, sizeof OTHER_KEY - 1 },
};

static char **split_lines(char *text, size_t *count)
{
    size_t n = 1;
    for (char *p = text; *p; p++)
        n += *p == '\n';
    char **v = calloc(n + 1, sizeof *v);
    size_t i = 0;
    for (char *line = text; line && i < n; i++) {
        v[i] = line;
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = '\0';
        line = nl ? nl + 1 : NULL;
    }
    *count = i;
    return v;
}

/* Written apart from route.c on purpose: the oracle must not share its
 * bugs. Decodes every well-formed %XY once, in place; returns the length. */
static size_t pct_decode(char *s, size_t n)
{
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '%' && i + 2 < n && isxdigit((unsigned char)s[i + 1]) &&
            isxdigit((unsigned char)s[i + 2])) {
            char hex[3] = { s[i + 1], s[i + 2], 0 };
            s[o++] = (char)strtol(hex, NULL, 16);
            i += 2;
        } else {
            s[o++] = s[i];
        }
    }
    return o;
}

/* "." or ".." once ";params" are cut (when cut) and spaces trimmed. */
static int is_dot(const char *s, size_t n, int cut)
{
    if (cut) {
        const char *semi = memchr(s, ';', n);
        if (semi)
            n = (size_t)(semi - s);
    }
    while (n && s[0] == ' ')
        s++, n--;
    while (n && s[n - 1] == ' ')
        n--;
    return (n == 1 && s[0] == '.') || (n == 2 && s[0] == '.' && s[1] == '.');
}

static void check_segments(const char *p, size_t n)
{
    size_t start = 0;
    for (size_t i = 0; i <= n; i++) {
        if (i < n && p[i] != '/' && p[i] != '\\')
            continue;
        if (is_dot(p + start, i - start, 0) || is_dot(p + start, i - start, 1))
            abort();
        if (i == start && i < n)   /* empty, and not the last */
            abort();
        start = i + 1;
    }
}

/* RFC 3629, the plain way: decode each sequence and look at the value. */
static void check_utf8(const unsigned char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        unsigned c = s[i], len, cp;
        if (c < 0x20 || c == 0x7f)
            abort();
        if (c < 0x80) { i++; continue; }
        if ((c & 0xe0) == 0xc0) len = 2, cp = c & 0x1f;
        else if ((c & 0xf0) == 0xe0) len = 3, cp = c & 0x0f;
        else if ((c & 0xf8) == 0xf0) len = 4, cp = c & 0x07;
        else abort();
        if (i + len > n)
            abort();
        for (unsigned k = 1; k < len; k++) {
            if ((s[i + k] & 0xc0) != 0x80)
                abort();
            cp = cp << 6 | (s[i + k] & 0x3f);
        }
        static const unsigned min[] = { 0, 0, 0x80, 0x800, 0x10000 };
        if (cp < min[len] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            abort();
        i += len;
    }
}

static void check_path(const char *url)
{
    size_t blen = strlen("https://fu:fPassW0rd@u.example/v1");
    if (strncmp(url, BASE, blen) != 0 || strchr(url, '#'))
        abort();
    const char *rest = url + blen;
    if (*rest++ != '/')
        abort();
    size_t n = strcspn(rest, "?");
    char *p = strndup(rest, n);
    for (int level = 0; level < 4; level++) {
        check_segments(p, n);
        if (level == 1)
            check_utf8((const unsigned char *)p, n);
        n = pct_decode(p, n);
    }
    free(p);
}

/* The name a lenient parser reads: decoded, cut at NUL, spaces trimmed,
 * an array's "[...]" dropped, any case. */
static int looks_like_auth(const char *name, size_t n)
{
    char *d = strndup(name, n);
    for (char *c = d; *c; c++)
        if (*c == '+')
            *c = ' ';
    n = pct_decode(d, strlen(d));
    d[n] = '\0';
    char *s = d;
    s += strspn(s, " ");
    size_t l = strlen(s);
    while (l && s[l - 1] == ' ')
        s[--l] = '\0';
    char *br = strchr(s, '[');
    if (br && l && s[l - 1] == ']')
        *br = '\0';
    int r = strcasecmp(s, "api_key") == 0;
    free(d);
    return r;
}

static void check_query(const char *url)
{
    const char *q = strchr(url, '?');
    if (!q)
        abort();  /* the provider key is always injected */
    char *dec = strdup(q);
    pct_decode(dec, strlen(dec));
    if (strstr(dec, MEMBER_KEY) || strstr(dec, OTHER_KEY))
        abort();
    free(dec);
    /* every parameter, split on '&' and ';': only the last is api_key */
    const char *last = strrchr(url, '&');
    if (!last || strncmp(last, "&api_key=", 9) != 0)
        abort();
    for (const char *p = q + 1; p < last;) {
        size_t n = strcspn(p, "&;=");
        if (p + n <= last && looks_like_auth(p, n))
            abort();
        p += strcspn(p, "&;");
        p += *p ? 1 : 0;
    }
}

static void check_redacted(const struct piapi_route_url *url)
{
    struct piapi_buf red = {0};
    piapi_route_redacted(url, &red);
    static const char tail[] = "api_key=REDACTED";
    if (red.len < sizeof tail || strcmp(red.data + red.len - (sizeof tail - 1), tail) != 0)
        abort();
    /* the client may write anything in its own path and query: look at
     * the parts that come from the baseUrl */
    static const char bq[] = "?code=REDACTED&ver=REDACTED";
    const char *q = strchr(red.data, '?');
    if (strncmp(red.data, "https://u.example/v1", 20) != 0 || !q ||
        strncmp(q, bq, sizeof bq - 1) != 0)
        abort();
    piapi_buf_dispose(&red);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 1);
    memcpy(text, data, size);
    text[size] = '\0';
    size_t n;
    char **lines = split_lines(text, &n);
    char **envp = lines + 1;

    struct piapi_route_target t;
    const char *why;
    if (piapi_route_parse(lines[0], &t, &why) == PIAPI_ROUTE_OK) {
        struct piapi_route_url url = {0};
        piapi_route_upstream_url(&url, &svc, &t, "sk-prov", hidden, 2);
        if (t.has_rest)
            check_path(url.buf.data);
        check_query(url.buf.data);
        check_redacted(&url);
        piapi_buf_dispose(&url.buf);
    }

    struct piapi_client_keys keys;
    piapi_headers_client_keys(envp, &keys);
    struct curl_slist *list = NULL;
    struct piapi_arena arena = { 0 };
    struct piapi_route_secret creds[PIAPI_HEADERS_MAX_CREDS];
    size_t ncreds = piapi_headers_presented(envp, creds, PIAPI_HEADERS_MAX_CREDS);
    if (piapi_headers_forward(envp, &hsvc, "sk-prov", "rid", creds, ncreds, &arena,
                              &list, &why) == 0) {
        for (struct curl_slist *l = list; l; l = l->next) {
            if (strchr(l->data, '\r') || strchr(l->data, '\n'))
                abort();
            if (strncasecmp(l->data, "x-api-key", 9) == 0 &&
                (l->data[9] == ':' || l->data[9] == ';'))
                abort();
        }
    }
    piapi_arena_dispose(&arena);
    free(lines);
    free(text);
    return 0;
}
