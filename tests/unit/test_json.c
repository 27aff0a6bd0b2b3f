/* piapi_json_string / piapi_json_error: table-driven escaping, and every
 * output must parse with cJSON and decode to what we meant. */
#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>

#include "piapi/json.h"
#include "unit.h"

#define FFFD "\xEF\xBF\xBD"

struct esc_case {
    const char *name;
    const char *in;
    size_t len;
    const char *json;       /* exact expected output, quotes included */
    const char *decoded;    /* what cJSON must decode it to; NULL = skip */
};

#define C(name, in, json, decoded) { name, in, sizeof(in) - 1, json, decoded }

static const struct esc_case cases[] = {
    C("empty", "", "\"\"", ""),
    C("plain", "hello world", "\"hello world\"", "hello world"),
    C("quote", "a\"b", "\"a\\\"b\"", "a\"b"),
    C("backslash", "a\\b", "\"a\\\\b\"", "a\\b"),
    C("slash untouched", "a/b", "\"a/b\"", "a/b"),
    C("newline", "a\nb", "\"a\\nb\"", "a\nb"),
    C("cr", "a\rb", "\"a\\rb\"", "a\rb"),
    C("tab", "\t", "\"\\t\"", "\t"),
    C("backspace", "\b", "\"\\b\"", "\b"),
    C("formfeed", "\f", "\"\\f\"", "\f"),
    C("bell", "\a", "\"\\u0007\"", "\a"),
    C("escape", "\x1b[31m", "\"\\u001b[31m\"", "\x1b[31m"),
    C("unit separator", "\x1f", "\"\\u001f\"", "\x1f"),
    C("del", "\x7f", "\"\\u007f\"", "\x7f"),
    /* cJSON stops a decoded string at NUL, so only the text is checked. */
    C("nul inside", "a\0b", "\"a\\u0000b\"", NULL),
    C("2-byte", "caf\xC3\xA9", "\"caf\xC3\xA9\"", "caf\xC3\xA9"),
    C("3-byte", "\xE2\x82\xAC", "\"\xE2\x82\xAC\"", "\xE2\x82\xAC"),
    C("4-byte", "\xF0\x9F\x98\x80", "\"\xF0\x9F\x98\x80\"", "\xF0\x9F\x98\x80"),
    C("U+0080", "\xC2\x80", "\"\xC2\x80\"", "\xC2\x80"),
    C("U+07FF", "\xDF\xBF", "\"\xDF\xBF\"", "\xDF\xBF"),
    C("U+0800", "\xE0\xA0\x80", "\"\xE0\xA0\x80\"", "\xE0\xA0\x80"),
    C("U+D7FF", "\xED\x9F\xBF", "\"\xED\x9F\xBF\"", "\xED\x9F\xBF"),
    C("U+E000", "\xEE\x80\x80", "\"\xEE\x80\x80\"", "\xEE\x80\x80"),
    C("U+FFFF", "\xEF\xBF\xBF", "\"\xEF\xBF\xBF\"", "\xEF\xBF\xBF"),
    C("U+10000", "\xF0\x90\x80\x80", "\"\xF0\x90\x80\x80\"", "\xF0\x90\x80\x80"),
    C("U+10FFFF", "\xF4\x8F\xBF\xBF", "\"\xF4\x8F\xBF\xBF\"", "\xF4\x8F\xBF\xBF"),
    C("overlong 2 (C0)", "\xC0\xAF", "\"" FFFD FFFD "\"", FFFD FFFD),
    C("overlong 2 (C1)", "\xC1\xBF", "\"" FFFD FFFD "\"", FFFD FFFD),
    C("overlong 3", "\xE0\x80\xAF", "\"" FFFD FFFD FFFD "\"", FFFD FFFD FFFD),
    C("overlong 3 max", "\xE0\x9F\xBF", "\"" FFFD FFFD FFFD "\"", FFFD FFFD FFFD),
    C("overlong 4", "\xF0\x80\x80\xAF", "\"" FFFD FFFD FFFD FFFD "\"",
      FFFD FFFD FFFD FFFD),
    C("overlong 4 max", "\xF0\x8F\xBF\xBF", "\"" FFFD FFFD FFFD FFFD "\"",
      FFFD FFFD FFFD FFFD),
    C("lone high surrogate", "\xED\xA0\x80", "\"" FFFD FFFD FFFD "\"",
      FFFD FFFD FFFD),
    C("lone low surrogate", "x\xED\xBF\xBFy", "\"x" FFFD FFFD FFFD "y\"",
      "x" FFFD FFFD FFFD "y"),
    C("surrogate pair as CESU-8", "\xED\xA0\xBD\xED\xB8\x80",
      "\"" FFFD FFFD FFFD FFFD FFFD FFFD "\"", FFFD FFFD FFFD FFFD FFFD FFFD),
    C("above U+10FFFF (F4 90)", "\xF4\x90\x80\x80",
      "\"" FFFD FFFD FFFD FFFD "\"", FFFD FFFD FFFD FFFD),
    C("lead F5", "\xF5\x80\x80\x80", "\"" FFFD FFFD FFFD FFFD "\"",
      FFFD FFFD FFFD FFFD),
    C("lead FE", "\xFE", "\"" FFFD "\"", FFFD),
    C("lead FF", "a\xFF" "b", "\"a" FFFD "b\"", "a" FFFD "b"),
    C("stray continuation", "a\x80" "b", "\"a" FFFD "b\"", "a" FFFD "b"),
    C("continuation run", "\x80\xBF", "\"" FFFD FFFD "\"", FFFD FFFD),
    C("truncated 2 at end", "ab\xC3", "\"ab" FFFD "\"", "ab" FFFD),
    C("truncated 3 at end", "a\xE2\x82", "\"a" FFFD FFFD "\"", "a" FFFD FFFD),
    C("truncated 4 at end", "\xF0\x9F\x98", "\"" FFFD FFFD FFFD "\"",
      FFFD FFFD FFFD),
    C("truncated 3 then ascii", "\xE2\x82x", "\"" FFFD FFFD "x\"",
      FFFD FFFD "x"),
    C("lead before valid char", "\xE2\xC3\xA9", "\"" FFFD "\xC3\xA9\"",
      FFFD "\xC3\xA9"),
    C("lead before quote", "\xC3\"", "\"" FFFD "\\\"\"", FFFD "\""),
    C("mixed", "k=\"v\"\r\n\xC3\xA9\xFF",
      "\"k=\\\"v\\\"\\r\\n\xC3\xA9" FFFD "\"", "k=\"v\"\r\n\xC3\xA9" FFFD),
    { NULL, NULL, 0, NULL, NULL }
};

static char *escape(const char *in, size_t len)
{
    struct piapi_buf b = {0};
    piapi_json_string(&b, in, len);
    return b.data;
}

/* Every output is a JSON string cJSON accepts and decodes as expected. */
static void check_parses(const char *json, const char *decoded)
{
    cJSON *v = cJSON_Parse(json);
    CU_ASSERT_PTR_NOT_NULL_FATAL(v);
    CU_ASSERT_TRUE(cJSON_IsString(v));
    if (decoded)
        CU_ASSERT_STRING_EQUAL(cJSON_GetStringValue(v), decoded);
    cJSON_Delete(v);
}

static void test_table(void)
{
    for (const struct esc_case *c = cases; c->name; c++) {
        char *out = escape(c->in, c->len);
        if (strcmp(out, c->json) != 0)
            fprintf(stderr, "\n  case '%s': got %s\n", c->name, out);
        CU_ASSERT_STRING_EQUAL(out, c->json);
        CU_ASSERT_TRUE(strlen(out) <= piapi_json_string_bound(c->in, c->len));
        check_parses(out, c->decoded);
        free(out);
    }
}

/* Each of the 32 C0 controls gets exactly the escape JSON prefers. */
static void test_every_control(void)
{
    static const char *const short_esc[32] = {
        ['\b'] = "\\b", ['\t'] = "\\t", ['\n'] = "\\n",
        ['\f'] = "\\f", ['\r'] = "\\r",
    };
    for (unsigned c = 0; c < 0x20; c++) {
        char in[1] = { (char)c }, want[16];
        if (short_esc[c])
            snprintf(want, sizeof want, "\"%s\"", short_esc[c]);
        else
            snprintf(want, sizeof want, "\"\\u%04x\"", c);
        char *out = escape(in, 1);
        CU_ASSERT_STRING_EQUAL(out, want);
        check_parses(out, NULL);
        free(out);
    }
}

/* Every single byte on its own: ASCII escapes or passes, 80..FF are all
 * invalid alone and become one U+FFFD each. */
static void test_every_byte(void)
{
    for (unsigned c = 0; c < 256; c++) {
        char in[3] = { 'x', (char)c, 'y' };
        char *out = escape(in, 3);
        cJSON *v = cJSON_Parse(out);
        CU_ASSERT_PTR_NOT_NULL(v);
        if (c >= 0x80) {
            CU_ASSERT_STRING_EQUAL(out, "\"x" FFFD "y\"");
        } else if (c != 0 && v) {
            CU_ASSERT_EQUAL((unsigned char)cJSON_GetStringValue(v)[1], c);
        }
        cJSON_Delete(v);
        free(out);
    }
}

/* The writer appends; it never resets what the buffer already holds. */
static void test_appends(void)
{
    struct piapi_buf b = {0};
    piapi_buf_puts(&b, "[");
    piapi_json_string(&b, "a", 1);
    piapi_buf_putc(&b, ',');
    piapi_json_string(&b, NULL, 0);
    piapi_buf_putc(&b, ']');
    CU_ASSERT_STRING_EQUAL(b.data, "[\"a\",\"\"]");
    piapi_buf_dispose(&b);
}

/* Long inputs cross any internal run boundary and stay byte-exact. */
static void test_long(void)
{
    size_t n = 100000;
    char *in = malloc(n);
    for (size_t i = 0; i < n; i += 4)
        memcpy(in + i, i % 8 ? "\xF0\x9F\x98\x80" : "ab\"c", 4);
    char *out = escape(in, n);
    CU_ASSERT_TRUE(strlen(out) <= piapi_json_string_bound(in, n));
    cJSON *v = cJSON_Parse(out);
    CU_ASSERT_PTR_NOT_NULL_FATAL(v);
    CU_ASSERT_EQUAL(strlen(cJSON_GetStringValue(v)), n);
    CU_ASSERT_EQUAL(memcmp(cJSON_GetStringValue(v), in, n), 0);
    cJSON_Delete(v);
    free(out);
    free(in);
}

static void check_error(const char *type, const char *msg,
                        const char *want_type, const char *want_msg)
{
    struct piapi_buf b = {0};
    piapi_json_error(&b, type, msg);
    cJSON *v = cJSON_Parse(b.data);
    CU_ASSERT_PTR_NOT_NULL_FATAL(v);
    CU_ASSERT_EQUAL(cJSON_GetArraySize(v), 2);
    CU_ASSERT_STRING_EQUAL(cJSON_GetStringValue(
        cJSON_GetObjectItemCaseSensitive(v, "type")), "error");
    cJSON *e = cJSON_GetObjectItemCaseSensitive(v, "error");
    CU_ASSERT_TRUE_FATAL(cJSON_IsObject(e));
    CU_ASSERT_EQUAL(cJSON_GetArraySize(e), 2);
    CU_ASSERT_STRING_EQUAL(cJSON_GetStringValue(
        cJSON_GetObjectItemCaseSensitive(e, "type")), want_type);
    CU_ASSERT_STRING_EQUAL(cJSON_GetStringValue(
        cJSON_GetObjectItemCaseSensitive(e, "message")), want_msg);
    cJSON_Delete(v);
    piapi_buf_dispose(&b);
}

static void test_error_body(void)
{
    struct piapi_buf b = {0};
    piapi_json_error(&b, "authentication_error", "invalid api key");
    CU_ASSERT_STRING_EQUAL(b.data,
        "{\"type\":\"error\",\"error\":{\"type\":\"authentication_error\","
        "\"message\":\"invalid api key\"}}");
    piapi_buf_dispose(&b);

    check_error("not_found_error", "no \"svc\"\nhere\xFF",
                "not_found_error", "no \"svc\"\nhere" FFFD);
    check_error(NULL, NULL, "api_error", "");
}

static const struct unit_case tests[] = {
    { "escape table", test_table },
    { "every control char", test_every_control },
    { "every single byte", test_every_byte },
    { "appends to buffer", test_appends },
    { "long input", test_long },
    { "error body", test_error_body },
    { NULL, NULL }
};

UNIT_MAIN("json", tests)
