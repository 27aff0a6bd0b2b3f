/* Header policy: what crosses upstream, what comes back, and the member's
 * key extraction. */
#include <curl/curl.h>
#include <string.h>

#include "piapi/headers.h"
#include "piapi/util.h"
#include "unit.h"

static const struct piapi_service bearer_svc = {
    .type = "cx", .base_url = "https://u.example",
    .auth = { .mode = PIAPI_AUTH_HEADER, .name = "Authorization", .prefix = "Bearer " },
};
static const struct piapi_service xkey_svc = {
    .type = "cc", .base_url = "https://u.example",
    .auth = { .mode = PIAPI_AUTH_HEADER, .name = "x-api-key", .prefix = "" },
};
static const struct piapi_service query_svc = {
    .type = "q", .base_url = "https://u.example",
    .auth = { .mode = PIAPI_AUTH_QUERY, .name = "api_key", .prefix = "" },
};

static int has_line(const struct curl_slist *l, const char *line)
{
    for (; l; l = l->next)
        if (strcmp(l->data, line) == 0)
            return 1;
    return 0;
}

static int has_prefix_ci(const struct curl_slist *l, const char *prefix)
{
    for (; l; l = l->next)
        if (strncasecmp(l->data, prefix, strlen(prefix)) == 0)
            return 1;
    return 0;
}

static int mentions(const struct curl_slist *l, const char *s)
{
    for (; l; l = l->next)
        if (strstr(l->data, s))
            return 1;
    return 0;
}

static char *client_env[] = {
    "REQUEST_METHOD=POST",
    "REQUEST_URI=/piapi/cx/v1",
    "CONTENT_TYPE=application/json",
    "CONTENT_LENGTH=12",
    "HTTP_HOST=gw.example",
    "HTTP_AUTHORIZATION=Bearer member-key",
    "HTTP_X_API_KEY=member-key",
    "HTTP_CONTENT_TYPE=application/json",
    "HTTP_CONTENT_LENGTH=12",
    "HTTP_CONNECTION=keep-alive, X-Drop-Me",
    "HTTP_X_DROP_ME=1",
    "HTTP_KEEP_ALIVE=300",
    "HTTP_TE=trailers",
    "HTTP_TRAILER=x",
    "HTTP_TRANSFER_ENCODING=chunked",
    "HTTP_UPGRADE=h2c",
    "HTTP_PROXY=http://evil",
    "HTTP_PROXY_AUTHORIZATION=Basic x",
    "HTTP_PROXY_FOO=1",
    "HTTP_EXPECT=100-continue",
    "HTTP_X_REQUEST_ID=client-id",
    "HTTP_ACCEPT_ENCODING=gzip, br",
    "HTTP_ANTHROPIC_VERSION=2023-06-01",
    "HTTP_X_STAINLESS_OS=Linux",
    "HTTP_X_EMPTY=",
    NULL
};

static void test_forward_policy(void)
{
    struct curl_slist *l = NULL;
    const char *why = NULL;
    CU_ASSERT_EQUAL_FATAL(piapi_headers_forward(client_env, &bearer_svc, "sk-prov",
                                                "rid-1", &l, &why), 0);
    CU_ASSERT(has_line(l, "Authorization: Bearer sk-prov"));
    CU_ASSERT(has_line(l, "Content-Type: application/json"));
    CU_ASSERT(has_line(l, "X-Request-ID: rid-1"));
    CU_ASSERT(has_line(l, "Expect:"));
    CU_ASSERT(has_line(l, "Accept-Encoding: gzip, br"));
    CU_ASSERT(has_line(l, "Anthropic-Version: 2023-06-01"));
    CU_ASSERT(has_line(l, "X-Stainless-Os: Linux"));
    CU_ASSERT(has_line(l, "X-Empty;"));
    CU_ASSERT(!mentions(l, "member-key"));
    static const char *const dropped[] = {
        "Host", "X-Api-Key", "Content-Length", "Connection", "X-Drop-Me", "Keep-Alive",
        "TE:", "Trailer", "Transfer-Encoding", "Upgrade", "Proxy:", "Proxy-Authorization",
        "Proxy-Foo", "Expect: 100", "X-Request-ID: client-id", NULL
    };
    for (const char *const *d = dropped; *d; d++) {
        if (has_prefix_ci(l, *d))
            fprintf(stderr, "forwarded: %s\n", *d);
        CU_ASSERT(!has_prefix_ci(l, *d));
    }
    /* exactly one Authorization, one Content-Type */
    int auth = 0, ctype = 0;
    for (struct curl_slist *p = l; p; p = p->next) {
        auth += strncasecmp(p->data, "authorization:", 14) == 0;
        ctype += strncasecmp(p->data, "content-type:", 13) == 0;
    }
    CU_ASSERT_EQUAL(auth, 1);
    CU_ASSERT_EQUAL(ctype, 1);
    curl_slist_free_all(l);
}

static void test_forward_auth_modes(void)
{
    struct curl_slist *l = NULL;
    const char *why;
    CU_ASSERT_EQUAL(piapi_headers_forward(client_env, &xkey_svc, "sk-ant", "r", &l, &why), 0);
    CU_ASSERT(has_line(l, "x-api-key: sk-ant"));
    CU_ASSERT(!has_prefix_ci(l, "Authorization"));
    CU_ASSERT(!mentions(l, "member-key"));
    curl_slist_free_all(l);

    CU_ASSERT_EQUAL(piapi_headers_forward(client_env, &query_svc, "sk-q", "r", &l, &why), 0);
    CU_ASSERT(!mentions(l, "sk-q"));
    CU_ASSERT(!has_prefix_ci(l, "Authorization"));
    CU_ASSERT(!has_prefix_ci(l, "x-api-key"));
    curl_slist_free_all(l);
}

static void test_forward_rejects(void)
{
    struct curl_slist *l = (struct curl_slist *)1;
    const char *why = NULL;
    char *crlf[] = { "HTTP_X_EVIL=a\r\nInjected: 1", NULL };
    CU_ASSERT_EQUAL(piapi_headers_forward(crlf, &bearer_svc, "k", "r", &l, &why), 400);
    CU_ASSERT_PTR_NULL(l);
    CU_ASSERT_PTR_NOT_NULL(why);

    char *lf_ctype[] = { "CONTENT_TYPE=text/plain\nX: y", NULL };
    CU_ASSERT_EQUAL(piapi_headers_forward(lf_ctype, &bearer_svc, "k", "r", &l, &why), 400);

    static char *many[PIAPI_HEADERS_MAX_COUNT + 2];
    static char names[PIAPI_HEADERS_MAX_COUNT + 1][32];
    for (int i = 0; i <= PIAPI_HEADERS_MAX_COUNT; i++) {
        snprintf(names[i], sizeof names[i], "HTTP_X_H%d=v", i);
        many[i] = names[i];
    }
    CU_ASSERT_EQUAL(piapi_headers_forward(many, &bearer_svc, "k", "r", &l, &why), 431);

    static char big[PIAPI_HEADERS_MAX_BYTES + 64];
    memcpy(big, "HTTP_X_BIG=", 11);
    memset(big + 11, 'a', sizeof big - 12);
    char *huge[] = { big, NULL };
    CU_ASSERT_EQUAL(piapi_headers_forward(huge, &bearer_svc, "k", "r", &l, &why), 431);
}

static void test_response_policy(void)
{
    /* out: the name the client sees; NULL: not relayed; "" : unchanged */
    static const struct { const char *name, *out; } cases[] = {
        { "Content-Type", "" }, { "content-encoding", "" }, { "Cache-Control", "" },
        { "request-id", "" }, { "anthropic-ratelimit-requests-limit", "" },
        { "Set-Cookie", "" }, { "Connection", NULL }, { "Keep-Alive", NULL },
        { "Transfer-Encoding", NULL }, { "TE", NULL }, { "Trailer", NULL },
        { "Upgrade", NULL }, { "Proxy-Authenticate", NULL }, { "Status", NULL },
        { "X-Accel-Redirect", NULL }, { "X-Accel-Buffering", NULL },
        { "X-Sendfile", NULL }, { "Content-Length", "" },
        { "X-Request-ID", "X-Upstream-Request-ID" }, { "x-request-id", "X-Upstream-Request-ID" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        size_t n = strlen(cases[i].name), out_len = 0;
        const char *out = piapi_headers_response_name(cases[i].name, n, &out_len);
        if (!cases[i].out) {
            CU_ASSERT_PTR_NULL(out);
        } else if (!cases[i].out[0]) {
            CU_ASSERT_PTR_EQUAL(out, cases[i].name);
            CU_ASSERT_EQUAL(out_len, n);
        } else {
            CU_ASSERT_PTR_NOT_NULL_FATAL(out);
            CU_ASSERT_EQUAL(out_len, strlen(cases[i].out));
            CU_ASSERT(strncmp(out, cases[i].out, out_len) == 0);
        }
    }
}

static void test_client_keys(void)
{
    struct piapi_client_keys k;
    char *bearer[] = { "HTTP_AUTHORIZATION=bEaReR   tok-1  ", NULL };
    CU_ASSERT_EQUAL(piapi_headers_client_keys(bearer, &k), PIAPI_KEY_OK);
    CU_ASSERT_EQUAL(k.bearer_len, 5);
    CU_ASSERT(strncmp(k.bearer, "tok-1", 5) == 0);
    CU_ASSERT_PTR_NULL(k.api_key);

    char *xkey[] = { "HTTP_X_API_KEY=tok-2", NULL };
    CU_ASSERT_EQUAL(piapi_headers_client_keys(xkey, &k), PIAPI_KEY_OK);
    CU_ASSERT_EQUAL(k.api_key_len, 5);

    char *both[] = { "HTTP_AUTHORIZATION=Bearer a", "HTTP_X_API_KEY=b", NULL };
    CU_ASSERT_EQUAL(piapi_headers_client_keys(both, &k), PIAPI_KEY_OK);
    CU_ASSERT(k.bearer_len == 1 && k.api_key_len == 1);

    char *basic[] = { "HTTP_AUTHORIZATION=Basic dXNlcjpwYXNz", NULL };
    CU_ASSERT_EQUAL(piapi_headers_client_keys(basic, &k), PIAPI_KEY_MISSING);
    char *empty[] = { "HTTP_AUTHORIZATION=Bearer ", "HTTP_X_API_KEY=", NULL };
    CU_ASSERT_EQUAL(piapi_headers_client_keys(empty, &k), PIAPI_KEY_MISSING);
    char *none[] = { "HTTP_HOST=x", NULL };
    CU_ASSERT_EQUAL(piapi_headers_client_keys(none, &k), PIAPI_KEY_MISSING);
    char *bearer_nospace[] = { "HTTP_AUTHORIZATION=Bearertok", NULL };
    CU_ASSERT_EQUAL(piapi_headers_client_keys(bearer_nospace, &k), PIAPI_KEY_MISSING);
    char *dup[] = { "HTTP_AUTHORIZATION=Bearer a", "HTTP_AUTHORIZATION=Bearer b", NULL };
    CU_ASSERT_EQUAL(piapi_headers_client_keys(dup, &k), PIAPI_KEY_DUPLICATE);
    char *dupx[] = { "HTTP_X_API_KEY=a", "HTTP_X_API_KEY=a", NULL };
    CU_ASSERT_EQUAL(piapi_headers_client_keys(dupx, &k), PIAPI_KEY_DUPLICATE);
    /* lighttpd's spelling of the same: one param, values joined by ", " */
    char *joined[] = { "HTTP_AUTHORIZATION=Bearer a, Bearer b", NULL };
    CU_ASSERT_EQUAL(piapi_headers_client_keys(joined, &k), PIAPI_KEY_DUPLICATE);
    char *joinedx[] = { "HTTP_AUTHORIZATION=Bearer a", "HTTP_X_API_KEY=b, c", NULL };
    CU_ASSERT_EQUAL(piapi_headers_client_keys(joinedx, &k), PIAPI_KEY_DUPLICATE);
}

static void test_param(void)
{
    int n;
    char *env[] = { "A=1", "AB=2", "A=3", "B", NULL };
    CU_ASSERT_STRING_EQUAL(piapi_headers_param(env, "A", &n), "1");
    CU_ASSERT_EQUAL(n, 2);
    CU_ASSERT_STRING_EQUAL(piapi_headers_param(env, "AB", &n), "2");
    CU_ASSERT_PTR_NULL(piapi_headers_param(env, "B", &n));
    CU_ASSERT_EQUAL(n, 0);
}

/* The provider key as libcurl puts it into a query: '+', '/', '=' and
 * '&' escaped (%2B %2F %3D %26), the rest as is. */
#define QKEY "sk-q+Key/9=&x"
static const struct piapi_secret qsecret = { QKEY, sizeof QKEY - 1, "api_key" };
static const struct piapi_secret hsecret = { "sk-head-77", 10, NULL };

static void test_response_values(void)
{
    static const struct {
        const struct piapi_secret *k;
        const char *name, *val;
        const char *out;   /* NULL: dropped; == val: kept */
    } rows[] = {
        /* query-mode: the parameter, whatever its spelling */
        { &qsecret, "Location", "https://p.example/v1/dir/?api_key=sk-q%2BKey%2F9%3D%26x",
          "https://p.example/v1/dir/?api_key=REDACTED" },
        { &qsecret, "location", "/v1/dir/?a=1&api_key=sk-q%2bKey%2f9%3d%26x&b=2",
          "/v1/dir/?a=1&api_key=REDACTED&b=2" },
        { &qsecret, "LOCATION", "/d/?api%5Fkey=whatever-it-became#frag",
          "/d/?api%5Fkey=REDACTED#frag" },
        { &qsecret, "Content-Location", "/d/?api_key=" QKEY,
          "/d/?api_key=REDACTED" },
        { &qsecret, "Link", "</d/?api_key=sk-q%2BKey%2F9%3D%26x>; rel=\"next\", </e>; rel=prev",
          "</d/?api_key=REDACTED>; rel=\"next\", </e>; rel=prev" },
        { &qsecret, "Refresh", "0; url=/d/?x=1;api_key=sk-q%2BKey%2F9%3D%26x",
          "0; url=/d/?x=1;api_key=REDACTED" },
        /* the key elsewhere in a URL: raw, encoded, mixed case, twice encoded */
        { &qsecret, "Location", "/login?next=%2Fd%2F%3Fapi_key%3Dsk-q%252BKey%252F9%253D%2526x",
          "/login?next=%2Fd%2F%3Fapi_key%3DREDACTED" },
        { &qsecret, "Location", "/k/sk-q%2BKey%2f9%3D%26x/z", "/k/REDACTED/z" },
        { &qsecret, "Location", "/x?other_api_key=1&k=%73%6B-q+Key/9=&x",
          "/x?other_api_key=1&k=REDACTED" },
        /* nothing to hide */
        { &qsecret, "Location", "https://p.example/v1/dir/?a=1", "https://p.example/v1/dir/?a=1" },
        { &qsecret, "Location", "/d/?api_key=", "/d/?api_key=" },
        /* other headers: dropped when they hold the key at all */
        { &qsecret, "X-Debug-Query", "api_key=sk-q%2BKey%2F9%3D%26x", NULL },
        { &qsecret, "Set-Cookie", "k=" QKEY "; Path=/", NULL },
        { &qsecret, "X-sk-q%2BKey%2F9%3D%26x", "1", NULL },
        { &qsecret, "Content-Type", "application/json", "application/json" },
        { &qsecret, "X-Near", "sk-q%2BKey%2F9%3D%26", "sk-q%2BKey%2F9%3D%26" },
        /* header-mode keys the same way, without a parameter to look for */
        { &hsecret, "WWW-Authenticate", "Bearer error=\"invalid key sk-head-77\"", NULL },
        { &hsecret, "Location", "/d/?api_key=sk-head-77", "/d/?api_key=REDACTED" },
        { &hsecret, "Location", "/d/?api_key=other", "/d/?api_key=other" },
    };
    struct piapi_buf out = {0};

    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        const char *v = rows[i].val;
        enum piapi_resp_value r = piapi_headers_response_value(
            rows[i].k, rows[i].name, strlen(rows[i].name), v, strlen(v), &out);
        const char *got = r == PIAPI_RESP_DROP ? NULL
                        : r == PIAPI_RESP_KEEP ? v : out.data;
        size_t got_len = r == PIAPI_RESP_REDACTED ? out.len : got ? strlen(got) : 0;
        int ok = rows[i].out ? got && got_len == strlen(rows[i].out) &&
                               memcmp(got, rows[i].out, got_len) == 0
                             : got == NULL;
        if (rows[i].out == v)
            ok = ok && r == PIAPI_RESP_KEEP;
        if (!ok)
            fprintf(stderr, "row %zu: %s: %s -> %.*s\n", i, rows[i].name, v,
                    got ? (int)got_len : 6, got ? got : "(drop)");
        CU_ASSERT(ok);
    }
    piapi_buf_dispose(&out);

    /* No key: everything passes. */
    const struct piapi_secret none = {0};
    CU_ASSERT_EQUAL(piapi_headers_response_value(&none, "Location", 8, "/?api_key=x", 11, &out),
                    PIAPI_RESP_KEEP);
    piapi_buf_dispose(&out);
}

static void test_secret_redact(void)
{
    static const struct { const char *in, *out; size_t count; } rows[] = {
        { "{\"error\":\"invalid key " QKEY "\"}", "{\"error\":\"invalid key REDACTED\"}", 1 },
        { "sk-q%2BKey%2F9%3D%26x and sk-q%2bKey%2f9%3d%26x", "REDACTED and REDACTED", 2 },
        { "sk-q%2BKey%2F9%3D%26", "sk-q%2BKey%2F9%3D%26", 0 },
        { "", "", 0 },
        { "ssk-q+Key/9=&x", "sREDACTED", 1 },
    };
    struct piapi_buf out = {0};
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        piapi_buf_reset(&out);
        size_t c = piapi_secret_redact(&qsecret, rows[i].in, strlen(rows[i].in), &out);
        CU_ASSERT_EQUAL(c, rows[i].count);
        CU_ASSERT(out.len == strlen(rows[i].out) && memcmp(out.data ? out.data : "", rows[i].out, out.len) == 0);
        CU_ASSERT_EQUAL(piapi_secret_in(&qsecret, rows[i].in, strlen(rows[i].in)), c > 0);
    }
    /* A '%' in the key: raw, "%25" and "%2525" all spell it. */
    const struct piapi_secret pct = { "a%b", 3, NULL };
    CU_ASSERT(piapi_secret_in(&pct, "xa%25by", 7));
    CU_ASSERT(piapi_secret_in(&pct, "xa%2525by", 9));
    CU_ASSERT(piapi_secret_in(&pct, "a%b", 3));
    CU_ASSERT(!piapi_secret_in(&pct, "a%2b", 4));
    piapi_buf_dispose(&out);
}

/* nginx passes two Connection lines as two params: both name
 * hop-by-hop headers. */
static char *two_connection_env[] = {
    "HTTP_CONNECTION=close, X-Hop-A",
    "HTTP_X_HOP_A=1",
    "HTTP_CONNECTION=X-Hop-B",
    "HTTP_X_HOP_B=2",
    "HTTP_X_KEEP=3",
    NULL
};

static void test_forward_every_connection(void)
{
    struct curl_slist *l = NULL;
    const char *why;
    CU_ASSERT_EQUAL_FATAL(piapi_headers_forward(two_connection_env, &bearer_svc, "k", "r",
                                                &l, &why), 0);
    CU_ASSERT(!has_prefix_ci(l, "X-Hop-A"));
    CU_ASSERT(!has_prefix_ci(l, "X-Hop-B"));
    CU_ASSERT(has_line(l, "X-Keep: 3"));
    curl_slist_free_all(l);
}

static const struct unit_case cases[] = {
    { "response values", test_response_values },
    { "secret redact", test_secret_redact },
    { "every Connection", test_forward_every_connection },
    { "forward policy", test_forward_policy },
    { "auth modes", test_forward_auth_modes },
    { "rejects", test_forward_rejects },
    { "response policy", test_response_policy },
    { "client keys", test_client_keys },
    { "params", test_param },
    { NULL, NULL }
};

UNIT_MAIN("headers", cases)
