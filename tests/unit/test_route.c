/* Path splitting, validation and upstream URL composition. */
#include <string.h>

#include "piapi/route.h"
#include "unit.h"

struct parse_case {
    const char *uri;
    enum piapi_route_status want;
    const char *type;   /* expected on OK */
    const char *rest;   /* expected on OK; NULL = no rest */
    const char *query;  /* expected on OK; NULL = none */
};

static const struct parse_case parse_cases[] = {
    { "/piapi/cx/v1/chat/completions", PIAPI_ROUTE_OK, "cx", "v1/chat/completions", NULL },
    { "/piapi/cx/v1/chat?a=1&b=%20x", PIAPI_ROUTE_OK, "cx", "v1/chat", "a=1&b=%20x" },
    { "/piapi/cx", PIAPI_ROUTE_OK, "cx", NULL, NULL },
    { "/piapi/cx?x=1", PIAPI_ROUTE_OK, "cx", NULL, "x=1" },
    { "/piapi/cx/", PIAPI_ROUTE_OK, "cx", "", NULL },
    { "/piapi/cx/v1/models/", PIAPI_ROUTE_OK, "cx", "v1/models/", NULL },
    { "/piapi/cx/a%20b/c", PIAPI_ROUTE_OK, "cx", "a%20b/c", NULL },
    { "/piapi/cx/...", PIAPI_ROUTE_OK, "cx", "...", NULL },
    { "/piapi/cx/a.b/.c", PIAPI_ROUTE_OK, "cx", "a.b/.c", NULL },
    { "/piapi/cx/x?q=%2e%2e/../", PIAPI_ROUTE_OK, "cx", "x", "q=%2e%2e/../" },
    { "/piapi/cx/v1?", PIAPI_ROUTE_OK, "cx", "v1", "" },
    /* outside the base path */
    { "/", PIAPI_ROUTE_NOT_FOUND, 0, 0, 0 },
    { "/piapi", PIAPI_ROUTE_NOT_FOUND, 0, 0, 0 },
    { "/piapix/cx/v1", PIAPI_ROUTE_NOT_FOUND, 0, 0, 0 },
    { "/piapi/", PIAPI_ROUTE_NOT_FOUND, 0, 0, 0 },
    { "/piapi//v1", PIAPI_ROUTE_NOT_FOUND, 0, 0, 0 },
    { "/other/piapi/cx", PIAPI_ROUTE_NOT_FOUND, 0, 0, 0 },
    /* dot segments, any spelling */
    { "/piapi/cx/../x", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/./x", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/v1/..", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/%2e%2e/x", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/%2E%2e/x", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/.%2E/x", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/%2e/x", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/../etc/passwd", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/%2e%2e/x", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    /* encoded slashes and backslashes are forwarded as sent */
    { "/piapi/cx/a%2fb", PIAPI_ROUTE_OK, "cx", "a%2fb", NULL },
    { "/piapi/cx/a%2Fb", PIAPI_ROUTE_OK, "cx", "a%2Fb", NULL },
    { "/piapi/cx/a%5cb", PIAPI_ROUTE_OK, "cx", "a%5cb", NULL },
    { "/piapi/cx/a%5Cb/c", PIAPI_ROUTE_OK, "cx", "a%5Cb/c", NULL },
    { "/piapi/cx/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.anthropic.claude-v1%3A0/invoke",
      PIAPI_ROUTE_OK, "cx",
      "model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.anthropic.claude-v1%3A0/invoke", NULL },
    { "/piapi/cx/a%2F.b%2F...", PIAPI_ROUTE_OK, "cx", "a%2F.b%2F...", NULL },
    { "/piapi/cx/a%2e%2Fb", PIAPI_ROUTE_OK, "cx", "a%2e%2Fb", NULL },
    { "/piapi/cx/a;b/c;d=1", PIAPI_ROUTE_OK, "cx", "a;b/c;d=1", NULL },
    { "/piapi/cx/%3B../x", PIAPI_ROUTE_OK, "cx", "%3B../x", NULL },
    { "/piapi/cx/a%20..", PIAPI_ROUTE_OK, "cx", "a%20..", NULL },
    { "/piapi/cx/%252x/%2541", PIAPI_ROUTE_OK, "cx", "%252x/%2541", NULL },
    { "/piapi/cx/caf%C3%A9/%E2%82%AC/%F0%9F%98%80", PIAPI_ROUTE_OK, "cx",
      "caf%C3%A9/%E2%82%AC/%F0%9F%98%80", NULL },
    /* ...but never make a dot segment or an empty one once decoded */
    { "/piapi/cx/a%2F..%2Fb", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a%2f..", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/..%2fa", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a%5C%2e%2E%5Cb", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a%5c.", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/%2Fetc", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/%5Cevil.example/x", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a%2F", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a%2F%2Fb", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a%2F/b", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    /* an encoded '?' or '#' ends a segment for an upstream that decodes
     * once and splits again: no dot segment before or after one */
    { "/piapi/cx/a/%2e%2e%3f/b", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a/%2e%2e%23/b", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a/..%3Fx", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a/.%23", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a/x%3f..", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a/x%23%2e%2e;p", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a/x%2F%3Fy", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a/x%3Fy=1%23z", PIAPI_ROUTE_OK, "cx", "a/x%3Fy=1%23z", NULL },
    { "/piapi/cx/a/%3F/%23", PIAPI_ROUTE_OK, "cx", "a/%3F/%23", NULL },
    { "/piapi/cx/a/x%3f...", PIAPI_ROUTE_OK, "cx", "a/x%3f...", NULL },
    /* code points NFKC turns into '.', "..", '/' or '\' */
    { "/piapi/cx/a/%ef%bc%8e%ef%bc%8e/b", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a/%EF%BC%8E", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a/%e2%80%a4%e2%80%a4/b", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a/%e2%80%a5", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a/.%ef%b9%92/b", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a/%ef%b8%b0", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a%ef%bc%8fb", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a%ef%bc%bcb", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a%ef%b9%a8b", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/x%e2%80%a6/%ef%bc%8d", PIAPI_ROUTE_OK, "cx", "x%e2%80%a6/%ef%bc%8d", NULL },
    { "/piapi/cx/a\\b", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    /* dot segments behind ";params" or spaces */
    { "/piapi/cx/..;/x", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/.;/x", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/..;jsessionid=1/x", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/%2e%2e;x", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/..%3bx/y", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a%2F..;x", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/..%20/x", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/%20./x", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/.%20./x", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    /* multiply encoded dot, slash, backslash, percent */
    { "/piapi/cx/%252e%252e/x", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a%252Fb", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a%255cb", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a%25252e", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/%25%32%65%25%32%65/x", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/%25%32e", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    /* the pair itself spelled across rounds: %2 then %66 -> %2f -> '/' */
    { "/piapi/cx/a%252%2566b", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a%252%25%36%36b", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/%252%2565%252%2565/x", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    /* a ';' so spelled: ".%253%2562" is ".;" three decodings on, "." to
     * a server that drops ";params" */
    { "/piapi/cx/.%253%2562/x", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/..%253b/x", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    /* and a space: ".%252%30;" is ". ;" two decodings on */
    { "/piapi/cx/.%252%30;/x", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/..%2520/x", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    /* percent-encoded bytes that are not UTF-8 (overlong '.', surrogates...) */
    { "/piapi/cx/%c0%ae%c0%ae/x", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/%C0%AE", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/%c1%9c", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/%e0%80%ae", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/%f0%80%80%ae", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/%ed%a0%80", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/%f4%90%80%80", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/%ff", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/%c3", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/%c3/%a9", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/%c3x%a9", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    /* a fragment is never part of a request target */
    { "/piapi/cx/x#frag", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/x?a=1#frag", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx#", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    /* controls, bad escapes, service type */
    { "/piapi/c%78/v1", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx%2fv1/x", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a%00b", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a%0ab", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a\tb", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a b", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a%zzb", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a%2", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a%", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a\x7f", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a\xc3\xa9", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a//b", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/x?a=\x01", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/x?a= b", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
};

static int view_is(const char *p, size_t n, const char *want)
{
    return p && strlen(want) == n && memcmp(p, want, n) == 0;
}

static void test_parse_table(void)
{
    for (size_t i = 0; i < sizeof parse_cases / sizeof parse_cases[0]; i++) {
        const struct parse_case *c = &parse_cases[i];
        struct piapi_route_target t;
        const char *why = NULL;
        enum piapi_route_status st = piapi_route_parse(c->uri, &t, &why);
        if (st != c->want)
            fprintf(stderr, "case %zu (%s): got %d want %d\n", i, c->uri, st, c->want);
        CU_ASSERT_EQUAL(st, c->want);
        if (st != PIAPI_ROUTE_OK) {
            CU_ASSERT_PTR_NOT_NULL(why);
            continue;
        }
        CU_ASSERT(view_is(t.type, t.type_len, c->type));
        if (c->rest) {
            CU_ASSERT(t.has_rest && view_is(t.rest, t.rest_len, c->rest));
        } else {
            CU_ASSERT(!t.has_rest);
        }
        if (c->query) {
            CU_ASSERT(view_is(t.query, t.query_len, c->query));
        } else {
            CU_ASSERT_PTR_NULL(t.query);
        }
    }
}

static void test_too_long(void)
{
    static char uri[PIAPI_ROUTE_MAX_URI + 64];
    struct piapi_route_target t;
    const char *why;
    strcpy(uri, "/piapi/cx/");
    memset(uri + 10, 'a', sizeof uri - 11);
    uri[sizeof uri - 1] = '\0';
    CU_ASSERT_EQUAL(piapi_route_parse(uri, &t, &why), PIAPI_ROUTE_TOO_LONG);
    uri[PIAPI_ROUTE_MAX_URI] = '\0';
    CU_ASSERT_EQUAL(piapi_route_parse(uri, &t, &why), PIAPI_ROUTE_OK);
}

struct url_case {
    const char *base_url;
    enum piapi_auth_mode mode;
    const char *auth_name;
    const char *uri;
    const char *want;
};

static const struct url_case url_cases[] = {
    { "https://u.example/v1", PIAPI_AUTH_HEADER, "Authorization",
      "/piapi/cx/chat/completions?a=1&b=%20x", "https://u.example/v1/chat/completions?a=1&b=%20x" },
    { "https://u.example/v1", PIAPI_AUTH_HEADER, "Authorization",
      "/piapi/cx", "https://u.example/v1" },
    { "https://u.example/v1", PIAPI_AUTH_HEADER, "Authorization",
      "/piapi/cx/", "https://u.example/v1/" },
    { "https://u.example/v1?ver=2", PIAPI_AUTH_HEADER, "Authorization",
      "/piapi/cx/m?x=1", "https://u.example/v1/m?ver=2&x=1" },
    { "https://u.example/v1?ver=2", PIAPI_AUTH_HEADER, "Authorization",
      "/piapi/cx/m", "https://u.example/v1/m?ver=2" },
    { "https://u.example/codex", PIAPI_AUTH_QUERY, "api_key",
      "/piapi/cx/run", "https://u.example/codex/run?api_key=sk-prov%2Bkey%2F1" },
    { "https://u.example/codex", PIAPI_AUTH_QUERY, "api_key",
      "/piapi/cx/run?a=1&api_key=evil&b=2", "https://u.example/codex/run?a=1&b=2&api_key=sk-prov%2Bkey%2F1" },
    { "https://u.example/codex", PIAPI_AUTH_QUERY, "api_key",
      "/piapi/cx/run?api%5Fkey=evil", "https://u.example/codex/run?api_key=sk-prov%2Bkey%2F1" },
    /* the member's key never leaves, whatever the parameter is called */
    { "https://u.example/v1", PIAPI_AUTH_HEADER, "Authorization",
      "/piapi/cx/m?key=member-key&x=1&t=member%2Dkey", "https://u.example/v1/m?x=1" },
    { "https://u.example/v1", PIAPI_AUTH_HEADER, "Authorization",
      "/piapi/cx/m?&&x=1&", "https://u.example/v1/m?x=1" },
    { "https://u.example/v1", PIAPI_AUTH_HEADER, "Authorization",
      "/piapi/cx/m?flag", "https://u.example/v1/m?flag" },
    /* ...nor the other credential the client presented */
    { "https://u.example/v1", PIAPI_AUTH_HEADER, "Authorization",
      "/piapi/cx/m?session=junk-bearer&x=1", "https://u.example/v1/m?x=1" },
    /* look-alikes of the auth parameter go too: any case, arrays, ';' */
    { "https://u.example/codex", PIAPI_AUTH_QUERY, "api_key",
      "/piapi/cx/run?API_KEY=evil&Api_Key=e&x=1", "https://u.example/codex/run?x=1&api_key=sk-prov%2Bkey%2F1" },
    { "https://u.example/codex", PIAPI_AUTH_QUERY, "api_key",
      "/piapi/cx/run?api_key[]=evil&api_key%5B0%5D=e&api_key[a][b]=e",
      "https://u.example/codex/run?api_key=sk-prov%2Bkey%2F1" },
    { "https://u.example/codex", PIAPI_AUTH_QUERY, "api_key",
      "/piapi/cx/run?a=1;api_key=evil&b=2;c=3", "https://u.example/codex/run?b=2;c=3&api_key=sk-prov%2Bkey%2F1" },
    { "https://u.example/codex", PIAPI_AUTH_QUERY, "api_key",
      "/piapi/cx/run?api_key%00x=e&+api_key+=e&api_key", "https://u.example/codex/run?api_key=sk-prov%2Bkey%2F1" },
    { "https://u.example/codex", PIAPI_AUTH_QUERY, "api_key",
      "/piapi/cx/run?api_keys=1&my_api_key=2&api=3&key=4",
      "https://u.example/codex/run?api_keys=1&my_api_key=2&api=3&key=4&api_key=sk-prov%2Bkey%2F1" },
    /* ...in any spelling: whitespace and controls trimmed, decoded more
     * than once, PHP's '.', ' ', '[' for '_', stray brackets, or split
     * by a parser that decodes before it splits */
    { "https://u.example/codex", PIAPI_AUTH_QUERY, "api_key",
      "/piapi/cx/run?%09api_key=e&api_key%09=e&api_key%0a=e&%0Dapi_key%7F=e&x=1",
      "https://u.example/codex/run?x=1&api_key=sk-prov%2Bkey%2F1" },
    { "https://u.example/codex", PIAPI_AUTH_QUERY, "api_key",
      "/piapi/cx/run?api.key=e&api+key=e&Api%2EKey=e&api[key=e&api_key]=e&api_key[=e&x=1",
      "https://u.example/codex/run?x=1&api_key=sk-prov%2Bkey%2F1" },
    { "https://u.example/codex", PIAPI_AUTH_QUERY, "api_key",
      "/piapi/cx/run?api%255fkey=e&api%25255Fkey=e&%2561pi_key=e&x=1",
      "https://u.example/codex/run?x=1&api_key=sk-prov%2Bkey%2F1" },
    { "https://u.example/codex", PIAPI_AUTH_QUERY, "api_key",
      "/piapi/cx/run?a=1%3Bapi_key=e&b=1%26api_key%3De&api_key%3D=e&x=1",
      "https://u.example/codex/run?x=1&api_key=sk-prov%2Bkey%2F1" },
    { "https://u.example/codex", PIAPI_AUTH_QUERY, "api_key",
      "/piapi/cx/run?x[api_key]=1&api-key=2&apikey=3&api_key_x=4&a=api_key",
      "https://u.example/codex/run?x[api_key]=1&api-key=2&apikey=3&api_key_x=4&a=api_key&api_key=sk-prov%2Bkey%2F1" },
    /* the member's key decoded twice or more is still the member's key */
    { "https://u.example/v1", PIAPI_AUTH_HEADER, "Authorization",
      "/piapi/cx/m?k=%256dember-key&j=%25256D%252565mber-key&x=1&m=member+key",
      "https://u.example/v1/m?x=1&m=member+key" },
    /* a header-mode service keeps parameters that only look like one */
    { "https://u.example/v1", PIAPI_AUTH_HEADER, "Authorization",
      "/piapi/cx/m?API_KEY=1&Authorization=2", "https://u.example/v1/m?API_KEY=1&Authorization=2" },
    /* encoded slashes reach the upstream byte-exact */
    { "https://u.example/bedrock", PIAPI_AUTH_HEADER, "Authorization",
      "/piapi/cx/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Ainference-profile%2Fus.x%2fy%5Cz/invoke",
      "https://u.example/bedrock/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Ainference-profile%2Fus.x%2fy%5Cz/invoke" },
    /* userinfo and the baseUrl's query are sent */
    { "https://fn:pw@u.example/api/fn?code=SECRET", PIAPI_AUTH_HEADER, "x-functions-key",
      "/piapi/cx/run?x=1", "https://fn:pw@u.example/api/fn/run?code=SECRET&x=1" },
};

static const struct piapi_route_secret hidden[] = {
    { "junk-bearer", 11 }, { "member-key", 10 },
};

static void test_upstream_url(void)
{
    struct piapi_route_url url = {0};
    for (size_t i = 0; i < sizeof url_cases / sizeof url_cases[0]; i++) {
        const struct url_case *c = &url_cases[i];
        struct piapi_service svc = {
            .type = "cx", .base_url = c->base_url,
            .auth = { .mode = c->mode, .name = c->auth_name, .prefix = "" },
        };
        struct piapi_route_target t;
        const char *why;
        CU_ASSERT_EQUAL_FATAL(piapi_route_parse(c->uri, &t, &why), PIAPI_ROUTE_OK);
        piapi_route_upstream_url(&url, &svc, &t, "sk-prov+key/1", hidden, 2);
        if (strcmp(url.buf.data, c->want) != 0)
            fprintf(stderr, "case %zu: got %s want %s\n", i, url.buf.data, c->want);
        CU_ASSERT_STRING_EQUAL(url.buf.data, c->want);
    }
    piapi_buf_dispose(&url.buf);
}

static void test_redacted(void)
{
    struct piapi_route_url url = {0};
    struct piapi_buf out = {0};
    struct piapi_service svc = {
        .type = "cx", .base_url = "https://u.example/codex",
        .auth = { .mode = PIAPI_AUTH_QUERY, .name = "api_key", .prefix = "" },
    };
    struct piapi_route_target t;
    const char *why;
    piapi_route_parse("/piapi/cx/run?z=1", &t, &why);
    piapi_route_upstream_url(&url, &svc, &t, "sk-secret", hidden + 1, 1);
    piapi_route_redacted(&url, &out);
    CU_ASSERT_STRING_EQUAL(out.data, "https://u.example/codex/run?z=1&api_key=REDACTED");
    CU_ASSERT_PTR_NULL(strstr(out.data, "sk-secret"));

    svc.auth.mode = PIAPI_AUTH_HEADER;
    piapi_route_upstream_url(&url, &svc, &t, "sk-secret", hidden + 1, 1);
    piapi_route_redacted(&url, &out);
    CU_ASSERT_STRING_EQUAL(out.data, "https://u.example/codex/run?z=1");
    piapi_buf_dispose(&url.buf);
    piapi_buf_dispose(&out);
}

/* What a log may show of a URL whose baseUrl carries credentials. */
struct redact_case {
    const char *base_url;
    enum piapi_auth_mode mode;
    const char *uri;
    const char *want;
};

static const struct redact_case redact_cases[] = {
    { "https://fnuser:fnPassW0rd@u.example/api/fn?code=SECRETcode&v=2", PIAPI_AUTH_HEADER,
      "/piapi/cx/run?x=1", "https://u.example/api/fn/run?code=REDACTED&v=REDACTED&x=1" },
    { "http://user@127.0.0.1:8080?SECRETflag", PIAPI_AUTH_QUERY,
      "/piapi/cx", "http://127.0.0.1:8080?REDACTED&api_key=REDACTED" },
    { "https://a:b@c@u.example/p", PIAPI_AUTH_QUERY,
      "/piapi/cx/r?q=a@b", "https://u.example/p/r?q=a@b&api_key=REDACTED" },
    { "https://u.example/p?a=&b=1&&c", PIAPI_AUTH_HEADER,
      "/piapi/cx/r", "https://u.example/p/r?a=REDACTED&b=REDACTED&REDACTED&REDACTED" },
    { "https://u.example/p?x=1", PIAPI_AUTH_QUERY,
      "/piapi/cx/r?y=2", "https://u.example/p/r?x=REDACTED&y=2&api_key=REDACTED" },
};

static void test_redacted_base_url(void)
{
    struct piapi_route_url url = {0};
    struct piapi_buf out = {0};
    for (size_t i = 0; i < sizeof redact_cases / sizeof redact_cases[0]; i++) {
        const struct redact_case *c = &redact_cases[i];
        struct piapi_service svc = {
            .type = "cx", .base_url = c->base_url,
            .auth = { .mode = c->mode, .name = "api_key", .prefix = "" },
        };
        struct piapi_route_target t;
        const char *why;
        CU_ASSERT_EQUAL_FATAL(piapi_route_parse(c->uri, &t, &why), PIAPI_ROUTE_OK);
        piapi_route_upstream_url(&url, &svc, &t, "sk-secret", hidden, 2);
        piapi_route_redacted(&url, &out);
        if (strcmp(out.data, c->want) != 0)
            fprintf(stderr, "case %zu: got %s want %s\n", i, out.data, c->want);
        CU_ASSERT_STRING_EQUAL(out.data, c->want);
        CU_ASSERT_PTR_NULL(strstr(out.data, "SECRET"));
        CU_ASSERT_PTR_NULL(strstr(out.data, "PassW0rd"));
        CU_ASSERT_PTR_NULL(strstr(out.data, "sk-secret"));
    }
    piapi_buf_dispose(&url.buf);
    piapi_buf_dispose(&out);
}

struct mention_case {
    const char *text;
    int want;
};

static void test_mentions_secret(void)
{
    static const struct mention_case mention_cases[] = {
        { "Failed to connect to u.example port 443 after 3 ms: Couldn't connect to server", 0 },
        { "bad sk-prov-key here", 1 },
        { "auth fnuser:fnPassW0rd failed", 1 },
        { "password fnPassW0rd", 1 },
        { "user fnuser unknown", 1 },
        { "code SECRETcode in a message", 1 },
        { "version 2 of a message", 0 },     /* v=2: too short to look for */
        { "", 0 },
    };
    struct piapi_service svc = {
        .type = "cx", .base_url = "https://fnuser:fnPassW0rd@u.example/fn?code=SECRETcode&v=2",
        .auth = { .mode = PIAPI_AUTH_HEADER, .name = "x-functions-key", .prefix = "" },
    };
    for (size_t i = 0; i < sizeof mention_cases / sizeof mention_cases[0]; i++) {
        int got = piapi_route_mentions_secret(&svc, "sk-prov-key", mention_cases[i].text);
        if (got != mention_cases[i].want)
            fprintf(stderr, "case %zu (%s): got %d\n", i, mention_cases[i].text, got);
        CU_ASSERT_EQUAL(got, mention_cases[i].want);
    }
    svc.base_url = "https://u.example/fn";
    CU_ASSERT_EQUAL(piapi_route_mentions_secret(&svc, NULL, "fnPassW0rd SECRETcode"), 0);
}

/* Credentials in a path or a header value: raw or decoded up to four
 * times, only those of PIAPI_ROUTE_SECRET_MIN bytes or more. */
static void test_holds_secret(void)
{
    static const struct piapi_route_secret creds[] = {
        { "piapi-user-alice", 16 }, { "short", 5 }, { "junk-bearer", 11 },
    };
    static const struct mention_case holds_cases[] = {
        { "/piapi/cx/piapi-user-alice/x", 1 },
        { "/piapi/cx/x-piapi-user-alice-y", 1 },
        { "/piapi/cx/%70iapi%2Duser%2dalice", 1 },
        { "/piapi/cx/%2570iapi-user-alice", 1 },
        { "/piapi/cx/%25252570iapi-user-alice", 1 },
        { "k=junk%2Dbearer; other=1", 1 },
        { "/piapi/cx/short/x", 0 },          /* too short to look for */
        { "/piapi/cx/piapi-user-alic/e", 0 },
        { "/piapi/cx/piapi+user+alice", 0 },  /* '+' is no space in a path */
        { "/piapi/cx/%2525252570iapi-user-alice", 0 },  /* five decodings */
        { "", 0 },
    };
    for (size_t i = 0; i < sizeof holds_cases / sizeof holds_cases[0]; i++) {
        const char *t = holds_cases[i].text;
        int got = piapi_route_holds_secret(t, strlen(t), creds, 3);
        if (got != holds_cases[i].want)
            fprintf(stderr, "case %zu (%s): got %d\n", i, t, got);
        CU_ASSERT_EQUAL(got, holds_cases[i].want);
    }
    /* a long text goes through the heap, not the stack buffer */
    char big[1024];
    memset(big, 'a', sizeof big);
    memcpy(big + 900, "%2570iapi-user-alice", 20);
    CU_ASSERT_EQUAL(piapi_route_holds_secret(big, sizeof big, creds, 3), 1);
    CU_ASSERT_EQUAL(piapi_route_holds_secret(big, 900, creds, 3), 0);
    CU_ASSERT_EQUAL(piapi_route_holds_secret("piapi-user-alice", 16, creds, 0), 0);
}

static const struct unit_case cases[] = {
    { "parse table", test_parse_table },
    { "too long", test_too_long },
    { "upstream url", test_upstream_url },
    { "redacted url", test_redacted },
    { "redacted baseUrl credentials", test_redacted_base_url },
    { "secrets in foreign text", test_mentions_secret },
    { "credentials in paths and headers", test_holds_secret },
    { NULL, NULL }
};

UNIT_MAIN("route", cases)
