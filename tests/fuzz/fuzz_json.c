/* libFuzzer target for src/json.c: whatever the bytes, piapi_json_string
 * and piapi_json_error must produce JSON that cJSON parses, within the
 * advertised bound, and already-valid UTF-8 (re-escaping the decoded string
 * gives back the same text, so no invalid byte slipped through).
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -Iinclude \
 *       tests/fuzz/fuzz_json.c src/json.c src/util.c -lcjson -o fuzz_json */
#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "piapi/json.h"

static void check_string(const char *in, size_t len)
{
    struct piapi_buf out = {0};
    piapi_json_string(&out, in, len);
    if (out.len > piapi_json_string_bound(in, len))
        abort();
    cJSON *v = cJSON_Parse(out.data);
    if (!v || !cJSON_IsString(v))
        abort();
    /* cJSON ends a decoded string at U+0000, so the round trip only holds
     * for inputs without NUL. */
    if (!memchr(in, '\0', len)) {
        const char *dec = cJSON_GetStringValue(v);
        struct piapi_buf again = {0};
        piapi_json_string(&again, dec, strlen(dec));
        if (again.len != out.len || memcmp(again.data, out.data, out.len))
            abort();
        piapi_buf_dispose(&again);
    }
    cJSON_Delete(v);
    piapi_buf_dispose(&out);
}

static void check_error(const char *in, size_t len)
{
    /* First NUL splits type from message. */
    const char *nul = memchr(in, '\0', len);
    size_t tlen = nul ? (size_t)(nul - in) : len / 2;
    char *type = piapi_xstrndup(in, tlen);
    char *msg = piapi_xstrndup(in + tlen, len - tlen);
    struct piapi_buf out = {0};

    piapi_json_error(&out, type, msg);
    cJSON *v = cJSON_Parse(out.data);
    cJSON *e = cJSON_GetObjectItemCaseSensitive(v, "error");
    if (!v || cJSON_GetArraySize(v) != 2 || !cJSON_IsObject(e)
        || !cJSON_IsString(cJSON_GetObjectItemCaseSensitive(v, "type"))
        || !cJSON_IsString(cJSON_GetObjectItemCaseSensitive(e, "type"))
        || !cJSON_IsString(cJSON_GetObjectItemCaseSensitive(e, "message")))
        abort();
    cJSON_Delete(v);
    piapi_buf_dispose(&out);
    free(type);
    free(msg);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    check_string((const char *)data, size);
    check_error((const char *)data, size);
    return 0;
}
