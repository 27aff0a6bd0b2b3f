/* libFuzzer target for src/usage.c.
 *
 * Input: byte 0 picks the scan (bits 0-1 the shape, bit 2 event stream,
 * bit 3 strip), byte 1 seeds the split; the rest is the answer body, and
 * also a request body for the scan and the injection. Invariants:
 *   - the answer fed whole, byte by byte and in random pieces gives the
 *     same usage and the same bytes for the client;
 *   - counts stay in [0, PIAPI_USAGE_MAX_TOKENS], cache_write_1h within
 *     cache_write;
 *   - stripping only removes: the client's bytes are a subsequence of the
 *     answer, all of it when the answer holds no "usage" or when it is not
 *     a Chat event stream;
 *   - every body cJSON reads as one object is one for the request scan;
 *     an injection into it is still one object, now asking for usage, with
 *     the same model and stream.
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -Iinclude \
 *       tests/fuzz/fuzz_usage.c src/usage.c src/util.c -lcjson -o fuzz_usage */
#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "piapi/usage.h"

struct run {
    struct piapi_usage u;
    struct piapi_buf out;
};

/* step 0: whole; 1: byte by byte; else pieces from an LCG seeded by seed */
static void run(enum piapi_usage_shape shape, int es, int strip,
                const char *in, size_t len, int step, unsigned seed,
                struct run *r)
{
    struct piapi_usage_scan s;
    size_t i = 0;

    memset(r, 0, sizeof *r);
    piapi_usage_scan_init(&s, shape, es, strip);
    while (i < len) {
        size_t k = len - i;
        if (step == 1) {
            k = 1;
        } else if (step) {
            seed = seed * 1103515245u + 12345u;
            k = 1 + (seed >> 16) % 97;
        }
        if (k > len - i)
            k = len - i;
        piapi_usage_feed(&s, in + i, k, &r->out);
        i += k;
    }
    piapi_usage_finish(&s, &r->out, &r->u);
    piapi_usage_scan_dispose(&s);
}

static void same(const struct run *a, const struct run *b)
{
    if (memcmp(&a->u, &b->u, offsetof(struct piapi_usage, model))
        || strcmp(a->u.model, b->u.model) || a->u.found != b->u.found
        || a->u.complete != b->u.complete || a->out.len != b->out.len
        || (a->out.len && memcmp(a->out.data, b->out.data, a->out.len)))
        abort();
}

static int is_subsequence(const char *sub, size_t n, const char *of, size_t m)
{
    size_t j = 0;
    for (size_t i = 0; i < m && j < n; i++)
        if (of[i] == sub[j])
            j++;
    return j == n;
}

static void check_answer(const uint8_t *data, size_t size)
{
    enum piapi_usage_shape shape = (enum piapi_usage_shape)(data[0] & 3);
    int es = (data[0] >> 2) & 1, strip = (data[0] >> 3) & 1;
    const char *in = (const char *)data + 2;
    size_t len = size - 2;
    struct run whole, bytes, pieces;

    run(shape, es, strip, in, len, 0, 0, &whole);
    run(shape, es, strip, in, len, 1, 0, &bytes);
    run(shape, es, strip, in, len, 2, data[1], &pieces);
    same(&whole, &bytes);
    same(&whole, &pieces);

    const struct piapi_usage *u = &whole.u;
    const int64_t counts[] = { u->input, u->output, u->cache_read,
                               u->cache_write, u->cache_write_1h };
    for (size_t i = 0; i < sizeof counts / sizeof counts[0]; i++)
        if (counts[i] < 0 || counts[i] > PIAPI_USAGE_MAX_TOKENS)
            abort();
    if (u->cache_write_1h > u->cache_write || memchr(u->model, '\0', 128) == NULL)
        abort();

    if (!strip) {
        if (whole.out.len)
            abort();
    } else {
        int can_drop = shape == PIAPI_USAGE_CHAT && es
                       && memmem(in, len, "\"usage\"", 7);
        if (whole.out.len > len
            || !is_subsequence(whole.out.data, whole.out.len, in, len))
            abort();
        if (!can_drop && (whole.out.len != len
                          || (len && memcmp(whole.out.data, in, len))))
            abort();
    }
    piapi_buf_dispose(&whole.out);
    piapi_buf_dispose(&bytes.out);
    piapi_buf_dispose(&pieces.out);
}

/* cJSON reads body as exactly one object (whitespace around it allowed).
 * cJSON takes every control character for whitespace, JSON (and the
 * scanner) only four: bodies with others are not JSON to compare. */
static int one_object(const char *body, size_t len)
{
    const char *end = NULL;
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)body[i] < 0x20 && body[i] != '\t'
            && body[i] != '\n' && body[i] != '\r')
            return 0;
    cJSON *v = cJSON_ParseWithLengthOpts(body, len, &end, 0);
    int ok = cJSON_IsObject(v);
    cJSON_Delete(v);
    if (!ok)
        return 0;
    for (; end < body + len; end++)
        if (*end != ' ' && *end != '\t' && *end != '\n' && *end != '\r')
            return 0;
    return 1;
}

static void check_request(const char *body, size_t len)
{
    struct piapi_usage_request rq, again;
    struct piapi_buf out = {0};
    int valid = one_object(body, len);
    int rc = piapi_usage_scan_request(body, len, &rq);

    if (valid && rc != 0)
        abort();
    if (rc != 0) {
        if (piapi_usage_inject(body, len, &out) != -1 || out.len)
            abort();
        return;
    }
    if (memchr(rq.model, '\0', sizeof rq.model) == NULL)
        abort();
    if (piapi_usage_inject(body, len, &out) < 0) {
        /* only when it asked already or stream_options is something odd */
        if (out.len || (valid && !rq.asked_usage && !rq.has_stream_options))
            abort();
        return;
    }
    if (out.len + 1 < len
        || piapi_usage_scan_request(out.data, out.len, &again) != 0
        || !again.asked_usage || !again.has_stream_options
        || again.stream != rq.stream || strcmp(again.model, rq.model)
        || (valid && !one_object(out.data, out.len)))
        abort();
    piapi_buf_dispose(&out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    check_answer(data, size);
    check_request((const char *)data + 2, size - 2);
    return 0;
}
