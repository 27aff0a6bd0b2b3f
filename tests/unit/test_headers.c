/* Header policy: what crosses upstream, what comes back, and the member's
 * key extraction. */
#include <curl/curl.h>
#include <string.h>

#include "piapi/headers.h"
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

static const struct unit_case cases[] = {
    { "forward policy", test_forward_policy },
    { "auth modes", test_forward_auth_modes },
    { "rejects", test_forward_rejects },
    { "response policy", test_response_policy },
    { "client keys", test_client_keys },
    { "params", test_param },
    { NULL, NULL }
};

UNIT_MAIN("headers", cases)
