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
    /* encoded separators, backslashes, controls, bad escapes */
    { "/piapi/cx/a%2fb", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a%2Fb", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a%5cb", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
    { "/piapi/cx/a\\b", PIAPI_ROUTE_BAD_PATH, 0, 0, 0 },
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
        piapi_route_upstream_url(&url, &svc, &t, "sk-prov+key/1", "member-key", 10);
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
    piapi_route_upstream_url(&url, &svc, &t, "sk-secret", "m", 1);
    piapi_route_redacted(&url, &out);
    CU_ASSERT_STRING_EQUAL(out.data, "https://u.example/codex/run?z=1&api_key=REDACTED");
    CU_ASSERT_PTR_NULL(strstr(out.data, "sk-secret"));

    svc.auth.mode = PIAPI_AUTH_HEADER;
    piapi_route_upstream_url(&url, &svc, &t, "sk-secret", "m", 1);
    piapi_route_redacted(&url, &out);
    CU_ASSERT_STRING_EQUAL(out.data, "https://u.example/codex/run?z=1");
    piapi_buf_dispose(&url.buf);
    piapi_buf_dispose(&out);
}

static const struct unit_case cases[] = {
    { "parse table", test_parse_table },
    { "too long", test_too_long },
    { "upstream url", test_upstream_url },
    { "redacted url", test_redacted },
    { NULL, NULL }
};

UNIT_MAIN("route", cases)
