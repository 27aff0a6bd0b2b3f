/* Header policy: what crosses upstream, what comes back, and the member's
 * key extraction. */
#include <curl/curl.h>
#include <pthread.h>
#include <string.h>

#include "piapi/arena.h"
#include "piapi/headers.h"
#include "piapi/route.h"
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

/* The request's part: its credentials as presented and its arena. */
static struct piapi_arena arena;

static int forward(char **env, const struct piapi_service *svc, const char *key,
                   const char *id, struct curl_slist **out, const char **why)
{
    struct piapi_route_secret creds[PIAPI_HEADERS_MAX_CREDS];
    size_t n = piapi_headers_presented(env, creds, PIAPI_HEADERS_MAX_CREDS);
    return piapi_headers_forward(env, svc, key, id, creds, n, &arena, out, why);
}

static void test_forward_policy(void)
{
    struct curl_slist *l = NULL;
    const char *why = NULL;
    CU_ASSERT_EQUAL_FATAL(forward(client_env, &bearer_svc, "sk-prov",
                                                "rid-1", &l, &why), 0);
    CU_ASSERT(has_line(l, "Authorization: Bearer sk-prov"));
    CU_ASSERT(has_line(l, "Content-Type: application/json"));
    CU_ASSERT(has_line(l, "X-Request-ID: rid-1"));
    CU_ASSERT(has_line(l, "Expect:"));
    /* not forwarded: providers answer uncompressed, so error bodies can
     * be scanned for secrets */
    CU_ASSERT(!has_prefix_ci(l, "Accept-Encoding"));
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
    piapi_arena_dispose(&arena);
}

static void test_forward_auth_modes(void)
{
    struct curl_slist *l = NULL;
    const char *why;
    CU_ASSERT_EQUAL(forward(client_env, &xkey_svc, "sk-ant", "r", &l, &why), 0);
    CU_ASSERT(has_line(l, "x-api-key: sk-ant"));
    CU_ASSERT(!has_prefix_ci(l, "Authorization"));
    CU_ASSERT(!mentions(l, "member-key"));
    piapi_arena_dispose(&arena);

    CU_ASSERT_EQUAL(forward(client_env, &query_svc, "sk-q", "r", &l, &why), 0);
    CU_ASSERT(!mentions(l, "sk-q"));
    CU_ASSERT(!has_prefix_ci(l, "Authorization"));
    CU_ASSERT(!has_prefix_ci(l, "x-api-key"));
    piapi_arena_dispose(&arena);
}

static void test_forward_rejects(void)
{
    struct curl_slist *l = (struct curl_slist *)1;
    const char *why = NULL;
    char *crlf[] = { "HTTP_X_EVIL=a\r\nInjected: 1", NULL };
    CU_ASSERT_EQUAL(forward(crlf, &bearer_svc, "k", "r", &l, &why), 400);
    CU_ASSERT_PTR_NULL(l);
    CU_ASSERT_PTR_NOT_NULL(why);

    char *lf_ctype[] = { "CONTENT_TYPE=text/plain\nX: y", NULL };
    CU_ASSERT_EQUAL(forward(lf_ctype, &bearer_svc, "k", "r", &l, &why), 400);

    static char *many[PIAPI_HEADERS_MAX_COUNT + 2];
    static char names[PIAPI_HEADERS_MAX_COUNT + 1][32];
    for (int i = 0; i <= PIAPI_HEADERS_MAX_COUNT; i++) {
        snprintf(names[i], sizeof names[i], "HTTP_X_H%d=v", i);
        many[i] = names[i];
    }
    CU_ASSERT_EQUAL(forward(many, &bearer_svc, "k", "r", &l, &why), 431);

    static char big[PIAPI_HEADERS_MAX_BYTES + 64];
    memcpy(big, "HTTP_X_BIG=", 11);
    memset(big + 11, 'a', sizeof big - 12);
    char *huge[] = { big, NULL };
    CU_ASSERT_EQUAL(forward(huge, &bearer_svc, "k", "r", &l, &why), 431);
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
        const struct piapi_secrets one = { (struct piapi_secret *)rows[i].k, 1 };
        enum piapi_resp_value r = piapi_headers_response_value(
            &one, rows[i].name, strlen(rows[i].name), v, strlen(v), &out);
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
    const struct piapi_secrets none = {0};
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
    const struct piapi_secret pct = { "aa%b", 4, NULL };
    CU_ASSERT(piapi_secret_in(&pct, "xaa%25by", 8));
    CU_ASSERT(piapi_secret_in(&pct, "xaa%2525by", 10));
    CU_ASSERT(piapi_secret_in(&pct, "aa%b", 4));
    CU_ASSERT(!piapi_secret_in(&pct, "aa%2b", 5));
    /* ambiguous: "%25" read as '%' then "25" as key bytes */
    const struct piapi_secret amb = { "%2525", 5, NULL };
    CU_ASSERT(piapi_secret_in(&amb, "%252525", 7));
    CU_ASSERT(piapi_secret_in(&amb, "x%2525y", 7));
    CU_ASSERT(!piapi_secret_in(&amb, "%2524", 5));
    piapi_buf_dispose(&out);
}

/* A key of 16 KiB (a file: key) matched against a body echoing it: the
 * matcher must not recurse per key byte (a pool thread has 512 KiB of
 * stack), and must find it in every spelling. Runs on a thread with a
 * 256 KiB stack, as small as piapi's pool threads' (a recursion per key
 * byte overflows it). */
static void *long_key_checks(void *arg)
{
    enum { N = 16 * 1024 };
    static char key[N + 1], text[3 * N + 16];
    int *ok = arg;
    memset(key, 'k', N);
    const struct piapi_secret k = { key, N, NULL };
    memcpy(text, "x:", 2);
    memcpy(text + 2, key, N);
    *ok = piapi_secret_in(&k, text, N + 2) && !piapi_secret_in(&k, text, N + 1);
    /* percent-encoded: every byte as %6B */
    for (size_t i = 0; i < N; i++)
        memcpy(text + 3 * i, "%6B", 3);
    *ok = *ok && piapi_secret_in(&k, text, 3 * N);
    /* a key full of '%' takes the ambiguous path, bounded too */
    static char pkey[2049], ptext[3 * 2048];
    memset(pkey, '%', 2048);
    const struct piapi_secret pk = { pkey, 2048, NULL };
    for (size_t i = 0; i < 2048; i++)
        memcpy(ptext + 3 * i, "%25", 3);
    *ok = *ok && piapi_secret_in(&pk, ptext, sizeof ptext) &&
          !piapi_secret_in(&pk, ptext, sizeof ptext - 7);
    return NULL;
}

static void test_long_key(void)
{
    pthread_attr_t a;
    pthread_t th;
    int ok = 0;
    pthread_attr_init(&a);
    pthread_attr_setstacksize(&a, 256 * 1024);
    CU_ASSERT_EQUAL_FATAL(pthread_create(&th, &a, long_key_checks, &ok), 0);
    pthread_join(th, NULL);
    pthread_attr_destroy(&a);
    CU_ASSERT(ok);
}

/* Secrets shorter than PIAPI_SECRET_MIN_LEN are never looked for. */
static void test_short_secret(void)
{
    const struct piapi_secret a = { "a", 1, NULL }, abc = { "abc1", 4, NULL };
    const struct piapi_secrets one = { (struct piapi_secret *)&a, 1 };
    struct piapi_buf out = {0};
    CU_ASSERT(!piapi_secret_in(&a, "application/json", 16));
    CU_ASSERT_EQUAL(piapi_headers_response_value(&one, "Content-Type", 12,
                                                 "application/json", 16, &out),
                    PIAPI_RESP_KEEP);
    CU_ASSERT_EQUAL(piapi_secret_redact(&a, "a cat", 5, &out), 0);
    CU_ASSERT(piapi_secret_in(&abc, "xabc1", 5));
    piapi_buf_dispose(&out);
}

static int set_has(const struct piapi_secrets *set, const char *s)
{
    for (size_t i = 0; i < set->n; i++)
        if (set->v[i].len == strlen(s) && memcmp(set->v[i].key, s, set->v[i].len) == 0)
            return 1;
    return 0;
}

/* The baseUrl's credentials are secrets like the key: userinfo (whole,
 * user, password, decoded, the Basic credential) and every query value
 * that is not the client's own, each of 4 bytes or more. */
static void test_secrets_build(void)
{
    struct piapi_secrets set;
    piapi_secrets_build(&set, "sk-prov-1234", NULL,
                        "https://basicuser:BASIC%40PASS@h.example/fn/x?code=FNSECRET%3D%3D&ab=xyz"
                        "&page=2&mine=client-value",
                        "/piapi/fn/x?page=2&mine=client-value");
    static const char *const want[] = {
        "sk-prov-1234", "basicuser:BASIC%40PASS", "basicuser:BASIC@PASS", "basicuser",
        "BASIC%40PASS", "BASIC@PASS", "YmFzaWN1c2VyOkJBU0lDQFBBU1M=",
        "FNSECRET%3D%3D", "FNSECRET==",
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        if (!set_has(&set, want[i]))
            fprintf(stderr, "missing secret %s\n", want[i]);
        CU_ASSERT(set_has(&set, want[i]));
    }
    CU_ASSERT(!set_has(&set, "xyz"));          /* under 4 bytes */
    CU_ASSERT(!set_has(&set, "client-value")); /* the client's own */
    CU_ASSERT(!set_has(&set, "2"));
    struct piapi_buf out = {0};
    const char body[] = "{\"e\":\"bad code FNSECRET== for basicuser\"}";
    CU_ASSERT_EQUAL(piapi_secrets_redact(&set, body, sizeof body - 1, &out), 2);
    CU_ASSERT(out.len == strlen("{\"e\":\"bad code REDACTED for REDACTED\"}") &&
              memcmp(out.data, "{\"e\":\"bad code REDACTED for REDACTED\"}", out.len) == 0);
    piapi_buf_reset(&out);
    CU_ASSERT_EQUAL(piapi_headers_response_value(&set, "Location", 8,
                                                 "/fn/x?code=FNSECRET%3D%3D&x=1", 29, &out),
                    PIAPI_RESP_REDACTED);
    CU_ASSERT(out.len == 23 && memcmp(out.data, "/fn/x?code=REDACTED&x=1", 23) == 0);
    piapi_buf_dispose(&out);
    piapi_secrets_dispose(&set);
    CU_ASSERT_EQUAL(set.n, 0);
}

/* A body scanned in windows: a secret straddling two windows is caught
 * when span - 1 bytes are kept back. */
static void test_redact_window(void)
{
    struct piapi_secrets set = {0};
    piapi_secrets_add(&set, "sk-win-12345", 12, NULL);
    size_t keep = piapi_secrets_span(&set) - 1;
    CU_ASSERT_EQUAL(keep, 59);
    const char text[] = "0123456789sk-win-12345 and sk-win-%31%32345.";
    for (size_t cut = 0; cut <= sizeof text - 1; cut++) {
        struct piapi_buf out = {0};
        char held[128];
        size_t hl = 0, count = 0;
        /* feed the text in two pieces, as on_body would */
        const char *pieces[2] = { text, text + cut };
        size_t lens[2] = { cut, sizeof text - 1 - cut };
        for (int p = 0; p < 2; p++) {
            memcpy(held + hl, pieces[p], lens[p]);
            hl += lens[p];
            if (hl > keep) {
                size_t used = piapi_secrets_redact_window(&set, held, hl, hl - keep, &out, &count);
                memmove(held, held + used, hl - used);
                hl -= used;
            }
        }
        size_t used = piapi_secrets_redact_window(&set, held, hl, hl, &out, &count);
        CU_ASSERT_EQUAL(used, hl);
        CU_ASSERT_EQUAL(count, 2);
        CU_ASSERT(out.len == strlen("0123456789REDACTED and REDACTED.") &&
                  memcmp(out.data, "0123456789REDACTED and REDACTED.", out.len) == 0);
        piapi_buf_dispose(&out);
    }
    piapi_secrets_dispose(&set);
}

/* Response header lines that are never relayed. */
static void test_response_lines(void)
{
    static const struct { const char *line; int ok; } rows[] = {
        { "X-Foo: a", 1 }, { "X-Foo:\ta\tb", 1 }, { "X-Foo:", 1 },
        { "X-Foo: a\rX-Accel-Redirect: /metrics", 0 },  /* bare CR */
        { "X-Foo: a\nb", 0 }, { "X-Foo: a\x01", 0 }, { "X-Foo: a\x7f", 0 },
        { "X-Accel-Redirect : /metrics", 0 },  /* space before the colon */
        { "X-Accel-Redirect\t: /metrics", 0 }, { " folded", 0 }, { ": v", 0 },
        { "no colon", 0 },
    };
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        int got = piapi_headers_response_line_ok(rows[i].line, strlen(rows[i].line));
        if (got != rows[i].ok)
            fprintf(stderr, "line row %zu: %d\n", i, got);
        CU_ASSERT_EQUAL(got, rows[i].ok);
    }
    CU_ASSERT_EQUAL(piapi_headers_response_line_ok("X-A\0: v", 7), 0);
    CU_ASSERT_EQUAL(piapi_headers_response_line_ok("X-A: v\0w", 8), 0);
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
    CU_ASSERT_EQUAL_FATAL(forward(two_connection_env, &bearer_svc, "k", "r",
                                                &l, &why), 0);
    CU_ASSERT(!has_prefix_ci(l, "X-Hop-A"));
    CU_ASSERT(!has_prefix_ci(l, "X-Hop-B"));
    CU_ASSERT(has_line(l, "X-Keep: 3"));
    piapi_arena_dispose(&arena);
}

static const struct unit_case cases[] = {
    { "response values", test_response_values },
    { "secret redact", test_secret_redact },
    { "long key", test_long_key },
    { "short secret", test_short_secret },
    { "secrets build", test_secrets_build },
    { "redact window", test_redact_window },
    { "response lines", test_response_lines },
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
