/* Token usage of answers (all three shapes, JSON and SSE, cut, stripped,
 * hostile), the request scan and the include_usage injection. Every answer
 * fixture is fed whole, byte by byte and in random splits, with LF, CRLF
 * and CR line ends: the results must not differ. */
#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>

#include "piapi/usage.h"
#include "unit.h"

/* ---- fixtures (shaped like the providers' real answers) -------------- */

#define A_START_SPLIT \
    "event: message_start\n" \
    "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01XFDUDYJgAACzvnptvVoYEL\"," \
    "\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5-20250929\"," \
    "\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":12," \
    "\"cache_creation_input_tokens\":2048,\"cache_read_input_tokens\":1024," \
    "\"cache_creation\":{\"ephemeral_5m_input_tokens\":1536,\"ephemeral_1h_input_tokens\":512}," \
    "\"output_tokens\":1,\"service_tier\":\"standard\"}}}\n\n"

#define A_BODY \
    "event: content_block_start\n" \
    "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n" \
    "event: ping\n" \
    "data: {\"type\": \"ping\"}\n\n" \
    "event: content_block_delta\n" \
    "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\"," \
    "\"text\":\"The \\\"usage\\\": {\\\"input_tokens\\\": 99} you asked\"}}\n\n" \
    "event: content_block_delta\n" \
    "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" about.\"}}\n\n" \
    "event: content_block_stop\n" \
    "data: {\"type\":\"content_block_stop\",\"index\":0}\n\n"

/* message_delta's totals exceed message_start's: they replace, never add */
static const char anthropic_sse[] =
    A_START_SPLIT A_BODY
    "event: message_delta\n"
    "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},"
    "\"usage\":{\"input_tokens\":20,\"cache_creation_input_tokens\":3000,"
    "\"cache_read_input_tokens\":1100,\"cache_creation\":{\"ephemeral_5m_input_tokens\":1000,"
    "\"ephemeral_1h_input_tokens\":2000},\"output_tokens\":503}}\n\n"
    "event: message_stop\n"
    "data: {\"type\":\"message_stop\"}\n\n";

/* the classic delta: output_tokens only, the rest stays message_start's */
static const char anthropic_sse_short_delta[] =
    A_START_SPLIT A_BODY
    "event: message_delta\n"
    "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},"
    "\"usage\":{\"output_tokens\":15}}\n\n"
    "event: message_stop\n"
    "data: {\"type\":\"message_stop\"}\n\n";

/* cut after message_start and part of a delta */
static const char anthropic_sse_cut[] =
    A_START_SPLIT
    "event: content_block_start\n"
    "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n"
    "event: message_delta\n"
    "data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":77}}";

/* no event: lines (some relays drop them): the data's type decides */
static const char anthropic_sse_unnamed[] =
    "data: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-haiku-4-5\",\"content\":[],"
    "\"usage\":{\"input_tokens\":5,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,"
    "\"output_tokens\":1}}}\n\n"
    "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n"
    "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":9}}\n\n";

static const char anthropic_json[] =
    "{\"id\":\"msg_01\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-opus-4-1-20250805\","
    "\"content\":[{\"type\":\"text\",\"text\":\"{\\\"usage\\\":{\\\"input_tokens\\\":1}}\"}],"
    "\"stop_reason\":\"end_turn\",\"stop_sequence\":null,\n  \"usage\" : {\"input_tokens\":3,"
    "\"cache_creation_input_tokens\":700,\"cache_read_input_tokens\":5000,"
    "\"cache_creation\":{\"ephemeral_5m_input_tokens\":0,\"ephemeral_1h_input_tokens\":700},"
    "\"output_tokens\":42,\"service_tier\":\"standard\"}}";

/* only the split parts: cache_write is their sum */
static const char anthropic_json_parts[] =
    "{\"type\":\"message\",\"model\":\"claude-x\",\"content\":[],\"usage\":{\"input_tokens\":3,"
    "\"cache_read_input_tokens\":0,\"cache_creation\":{\"ephemeral_5m_input_tokens\":100,"
    "\"ephemeral_1h_input_tokens\":400},\"output_tokens\":2}}";

#define CHAT_CHUNK(body) \
    "data: {\"id\":\"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT\",\"object\":\"chat.completion.chunk\"," \
    "\"created\":1741569952,\"model\":\"gpt-4o-2024-08-06\",\"service_tier\":\"default\"," \
    "\"system_fingerprint\":\"fp_f9f4fb6dbf\"," body "}\n\n"

#define CHAT_HEAD \
    CHAT_CHUNK("\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null}," \
               "\"logprobs\":null,\"finish_reason\":null}],\"usage\":null") \
    CHAT_CHUNK("\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\\\"usage\\\":{}\"}," \
               "\"logprobs\":null,\"finish_reason\":null}],\"usage\":null") \
    CHAT_CHUNK("\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}]," \
               "\"usage\":null")

#define CHAT_USAGE \
    CHAT_CHUNK("\"choices\":[],\"usage\":{\"prompt_tokens\":2006,\"completion_tokens\":300," \
               "\"total_tokens\":2306,\"prompt_tokens_details\":{\"cached_tokens\":1920," \
               "\"audio_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":0," \
               "\"audio_tokens\":0,\"accepted_prediction_tokens\":0,\"rejected_prediction_tokens\":0}}")

static const char chat_sse[] = CHAT_HEAD CHAT_USAGE "data: [DONE]\n\n";
static const char chat_sse_stripped[] = CHAT_HEAD "data: [DONE]\n\n";
static const char chat_sse_plain[] = CHAT_HEAD "data: [DONE]\n\n";

static const char chat_json[] =
    "{\n  \"id\": \"chatcmpl-abc123\",\n  \"object\": \"chat.completion\",\n"
    "  \"created\": 1677858242,\n  \"model\": \"gpt-4.1-mini-2025-04-14\",\n"
    "  \"choices\": [{\"index\": 0, \"message\": {\"role\": \"assistant\", \"content\": \"ok\"},"
    " \"finish_reason\": \"stop\"}],\n"
    "  \"usage\": {\n    \"prompt_tokens\": 1200,\n    \"completion_tokens\": 17,\n"
    "    \"total_tokens\": 1217,\n    \"prompt_tokens_details\": {\"cached_tokens\": 1024}\n  }\n}\n";

#define R_CREATED \
    "event: response.created\n" \
    "data: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_67c9fdcecf488190\"," \
    "\"object\":\"response\",\"created_at\":1741290958,\"status\":\"in_progress\",\"instructions\":null," \
    "\"model\":\"gpt-5-codex\",\"output\":[],\"usage\":null}}\n\n" \
    "event: response.in_progress\n" \
    "data: {\"type\":\"response.in_progress\",\"sequence_number\":1,\"response\":{\"id\":\"resp_67c9fdcecf488190\"," \
    "\"status\":\"in_progress\",\"model\":\"gpt-5-codex\",\"usage\":null}}\n\n" \
    "event: response.output_text.delta\n" \
    "data: {\"type\":\"response.output_text.delta\",\"sequence_number\":4,\"item_id\":\"msg_67c9\"," \
    "\"output_index\":1,\"content_index\":0,\"delta\":\"Hi\"}\n\n"

#define R_FINAL(event, status) \
    "event: " event "\n" \
    "data: {\"type\":\"" event "\",\"sequence_number\":9,\"response\":{\"id\":\"resp_67c9fdcecf488190\"," \
    "\"object\":\"response\",\"status\":\"" status "\",\"model\":\"gpt-5-codex-2025-09-15\"," \
    "\"output\":[{\"type\":\"reasoning\",\"summary\":[]},{\"type\":\"message\",\"content\":[{\"type\":" \
    "\"output_text\",\"text\":\"Hi \\\"usage\\\":{}\"}]}],\"usage\":{\"input_tokens\":3000," \
    "\"input_tokens_details\":{\"cached_tokens\":2048},\"output_tokens\":700," \
    "\"output_tokens_details\":{\"reasoning_tokens\":512},\"total_tokens\":3700}}}\n\n"

static const char responses_completed[] =
    R_CREATED R_FINAL("response.completed", "completed");
static const char responses_incomplete[] =
    R_CREATED R_FINAL("response.incomplete", "incomplete");
static const char responses_failed[] =
    R_CREATED R_FINAL("response.failed", "failed");
static const char responses_failed_null[] =
    R_CREATED
    "event: response.failed\n"
    "data: {\"type\":\"response.failed\",\"response\":{\"status\":\"failed\",\"model\":\"gpt-5-codex\","
    "\"error\":{\"code\":\"server_error\"},\"usage\":null}}\n\n";
static const char responses_cut[] = R_CREATED;

static const char responses_json[] =
    "{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"completed\",\"model\":\"gpt-5-mini\","
    "\"output\":[{\"type\":\"message\",\"content\":[{\"type\":\"output_text\",\"text\":\"x\"}]}],"
    "\"usage\":{\"input_tokens\":90,\"input_tokens_details\":{\"cached_tokens\":64},"
    "\"output_tokens\":30,\"output_tokens_details\":{\"reasoning_tokens\":20},\"total_tokens\":120}}";

/* ---- driving a scan -------------------------------------------------- */

struct run {
    struct piapi_usage u;
    struct piapi_buf out;
};

static unsigned rng_state = 12345;

static unsigned rng(void)
{
    rng_state = rng_state * 1103515245u + 12345u;
    return rng_state >> 16;
}

/* split: 0 whole, 1 byte by byte, else random pieces of 1..split bytes */
static void run_split(enum piapi_usage_shape shape, int es, int strip,
                      const char *in, size_t len, size_t split, struct run *r)
{
    struct piapi_usage_scan s;
    size_t i = 0;

    memset(r, 0, sizeof *r);
    piapi_usage_scan_init(&s, shape, es, strip);
    while (i < len) {
        size_t k = split == 0 ? len - i : split == 1 ? 1 : 1 + rng() % split;
        if (k > len - i)
            k = len - i;
        piapi_usage_feed(&s, in + i, k, &r->out);
        i += k;
    }
    piapi_usage_finish(&s, &r->out, &r->u);
    piapi_usage_scan_dispose(&s);
}

static int same_run(const struct run *a, const struct run *b)
{
    return a->u.input == b->u.input && a->u.output == b->u.output
        && a->u.cache_read == b->u.cache_read
        && a->u.cache_write == b->u.cache_write
        && a->u.cache_write_1h == b->u.cache_write_1h
        && strcmp(a->u.model, b->u.model) == 0 && a->u.found == b->u.found
        && a->u.complete == b->u.complete && a->out.len == b->out.len
        && (a->out.len == 0 || memcmp(a->out.data, b->out.data, a->out.len) == 0);
}

/* in with every "\n" turned into eol (the fixtures use LF only) */
static char *with_eol(const char *in, size_t len, const char *eol,
                      size_t *outlen)
{
    struct piapi_buf b = {0};
    for (size_t i = 0; i < len; i++) {
        if (in[i] == '\n')
            piapi_buf_puts(&b, eol);
        else
            piapi_buf_putc(&b, in[i]);
    }
    *outlen = b.len;
    return b.data ? b.data : piapi_xstrdup("");
}

/* Scans in whole, then byte by byte and in random splits, and checks they
 * agree; r gets the whole-feed result (its out is the caller's to free). */
static void scan(enum piapi_usage_shape shape, int es, int strip,
                 const char *in, size_t len, struct run *r)
{
    static const size_t splits[] = { 1, 2, 3, 7, 16, 64, 500 };
    run_split(shape, es, strip, in, len, 0, r);
    for (size_t k = 0; k < sizeof splits / sizeof splits[0]; k++) {
        for (int rep = 0; rep < (splits[k] == 1 ? 1 : 4); rep++) {
            struct run o;
            run_split(shape, es, strip, in, len, splits[k], &o);
            if (!same_run(r, &o))
                fprintf(stderr, "split %zu differs\n", splits[k]);
            CU_ASSERT(same_run(r, &o));
            piapi_buf_dispose(&o.out);
        }
    }
}

struct want {
    int64_t input, output, cache_read, cache_write, cache_write_1h;
    const char *model;
    int found, complete;
};

static void check_usage(const char *name, const struct piapi_usage *u,
                        const struct want *w)
{
    CU_ASSERT_EQUAL(u->input, w->input);
    CU_ASSERT_EQUAL(u->output, w->output);
    CU_ASSERT_EQUAL(u->cache_read, w->cache_read);
    CU_ASSERT_EQUAL(u->cache_write, w->cache_write);
    CU_ASSERT_EQUAL(u->cache_write_1h, w->cache_write_1h);
    CU_ASSERT_STRING_EQUAL(u->model, w->model);
    CU_ASSERT_EQUAL(u->found, w->found);
    CU_ASSERT_EQUAL(u->complete, w->complete);
    if (u->input != w->input || u->output != w->output
        || u->cache_read != w->cache_read || u->cache_write != w->cache_write
        || u->cache_write_1h != w->cache_write_1h || u->found != w->found
        || u->complete != w->complete || strcmp(u->model, w->model))
        fprintf(stderr, "%s: got in=%lld out=%lld cr=%lld cw=%lld cw1h=%lld model=%s found=%d complete=%d\n",
                name, (long long)u->input, (long long)u->output,
                (long long)u->cache_read, (long long)u->cache_write,
                (long long)u->cache_write_1h, u->model, u->found, u->complete);
}

/* ---- answers, table-driven ------------------------------------------- */

struct answer_case {
    const char *name;
    enum piapi_usage_shape shape;
    int event_stream;
    const char *in;
    size_t len;
    struct want want;
};

#define ANS(name, shape, es, in, ...) \
    { name, PIAPI_USAGE_##shape, es, in, sizeof(in) - 1, __VA_ARGS__ }

static const struct answer_case answer_cases[] = {
    ANS("anthropic sse, delta totals win", ANTHROPIC, 1, anthropic_sse,
        { 20, 503, 1100, 3000, 2000, "claude-sonnet-4-5-20250929", 1, 1 }),
    ANS("anthropic sse, short delta keeps start's", ANTHROPIC, 1,
        anthropic_sse_short_delta,
        { 12, 15, 1024, 2048, 512, "claude-sonnet-4-5-20250929", 1, 1 }),
    ANS("anthropic sse cut", ANTHROPIC, 1, anthropic_sse_cut,
        { 12, 0, 1024, 2048, 512, "claude-sonnet-4-5-20250929", 1, 0 }),
    ANS("anthropic sse unnamed", ANTHROPIC, 1, anthropic_sse_unnamed,
        { 5, 9, 0, 0, 0, "claude-haiku-4-5", 1, 1 }),
    ANS("anthropic json", ANTHROPIC, 0, anthropic_json,
        { 3, 42, 5000, 700, 700, "claude-opus-4-1-20250805", 1, 1 }),
    ANS("anthropic json, split parts only", ANTHROPIC, 0, anthropic_json_parts,
        { 3, 2, 0, 500, 400, "claude-x", 1, 1 }),
    ANS("chat sse with usage", CHAT, 1, chat_sse,
        { 86, 300, 1920, 0, 0, "gpt-4o-2024-08-06", 1, 1 }),
    ANS("chat sse without usage", CHAT, 1, chat_sse_plain,
        { 0, 0, 0, 0, 0, "gpt-4o-2024-08-06", 0, 0 }),
    ANS("chat json cached", CHAT, 0, chat_json,
        { 176, 17, 1024, 0, 0, "gpt-4.1-mini-2025-04-14", 1, 1 }),
    ANS("responses completed", RESPONSES, 1, responses_completed,
        { 952, 700, 2048, 0, 0, "gpt-5-codex-2025-09-15", 1, 1 }),
    ANS("responses incomplete", RESPONSES, 1, responses_incomplete,
        { 952, 700, 2048, 0, 0, "gpt-5-codex-2025-09-15", 1, 1 }),
    ANS("responses failed", RESPONSES, 1, responses_failed,
        { 952, 700, 2048, 0, 0, "gpt-5-codex-2025-09-15", 1, 1 }),
    ANS("responses failed, usage null", RESPONSES, 1, responses_failed_null,
        { 0, 0, 0, 0, 0, "gpt-5-codex", 0, 0 }),
    ANS("responses cut after created", RESPONSES, 1, responses_cut,
        { 0, 0, 0, 0, 0, "gpt-5-codex", 0, 0 }),
    ANS("responses json", RESPONSES, 0, responses_json,
        { 26, 30, 64, 0, 0, "gpt-5-mini", 1, 1 }),
    /* the wrong shape finds nothing it should not */
    ANS("anthropic stream read as responses", RESPONSES, 1, anthropic_sse,
        { 0, 0, 0, 0, 0, "", 0, 0 }),
    ANS("no shape", NONE, 1, chat_sse, { 0, 0, 0, 0, 0, "", 0, 0 }),
    ANS("no shape json", NONE, 0, chat_json, { 0, 0, 0, 0, 0, "", 0, 0 }),
};

static void test_answers(void)
{
    static const char *const eols[] = { "\n", "\r\n", "\r" };
    for (size_t i = 0; i < sizeof answer_cases / sizeof answer_cases[0]; i++) {
        const struct answer_case *c = &answer_cases[i];
        for (size_t e = 0; e < 3; e++) {
            if (!c->event_stream && e > 0)
                continue;
            size_t len;
            char *in = with_eol(c->in, c->len, eols[e], &len);
            for (int strip = 0; strip <= 1; strip++) {
                struct run r;
                scan(c->shape, c->event_stream, strip, in, len, &r);
                check_usage(c->name, &r.u, &c->want);
                if (!strip)
                    CU_ASSERT_EQUAL(r.out.len, 0);
                /* stripping only ever removes Chat's usage chunk */
                if (strip && !(c->shape == PIAPI_USAGE_CHAT && c->want.complete
                               && c->event_stream)) {
                    CU_ASSERT_EQUAL(r.out.len, len);
                    CU_ASSERT(r.out.len == len && memcmp(r.out.data, in, len) == 0);
                }
                piapi_buf_dispose(&r.out);
            }
            free(in);
        }
    }
}

/* Stripping removes exactly the usage chunk, whatever the line ends. */
static void test_strip(void)
{
    static const char *const eols[] = { "\n", "\r\n", "\r" };
    for (size_t e = 0; e < 3; e++) {
        size_t len, wlen;
        char *in = with_eol(chat_sse, sizeof chat_sse - 1, eols[e], &len);
        char *want = with_eol(chat_sse_stripped, sizeof chat_sse_stripped - 1,
                              eols[e], &wlen);
        struct run r;
        scan(PIAPI_USAGE_CHAT, 1, 1, in, len, &r);
        CU_ASSERT_EQUAL(r.out.len, wlen);
        CU_ASSERT(r.out.len == wlen && memcmp(r.out.data, want, wlen) == 0);
        CU_ASSERT_EQUAL(r.u.output, 300);
        CU_ASSERT_EQUAL(r.u.complete, 1);
        piapi_buf_dispose(&r.out);
        free(in);
        free(want);
    }
}

/* Each complete event goes out the moment its blank line arrives; only
 * the incomplete one is held. */
static void test_strip_is_prompt(void)
{
    static const char ev1[] = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n";
    static const char ev2_head[] = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\"";
    static const char ev2_tail[] = ":5,\"completion_tokens\":2}}\n\n";
    static const char done[] = "data: [DONE]\n\n";
    struct piapi_usage_scan s;
    struct piapi_buf out = {0};
    struct piapi_usage u;

    piapi_usage_scan_init(&s, PIAPI_USAGE_CHAT, 1, 1);
    piapi_usage_feed(&s, ev1, sizeof ev1 - 2, &out);     /* not ended yet */
    CU_ASSERT_EQUAL(out.len, 0);
    piapi_usage_feed(&s, "\n", 1, &out);
    CU_ASSERT_EQUAL(out.len, sizeof ev1 - 1);
    CU_ASSERT_STRING_EQUAL(out.data, ev1);
    piapi_usage_feed(&s, ev2_head, sizeof ev2_head - 1, &out);
    piapi_usage_feed(&s, ev2_tail, sizeof ev2_tail - 1, &out);
    CU_ASSERT_EQUAL(out.len, sizeof ev1 - 1);             /* dropped */
    piapi_usage_feed(&s, done, sizeof done - 1, &out);
    CU_ASSERT_EQUAL(out.len, sizeof ev1 - 1 + sizeof done - 1);
    piapi_usage_feed(&s, ": tail", 6, &out);             /* cut mid-event */
    piapi_usage_finish(&s, &out, &u);
    CU_ASSERT_STRING_EQUAL(out.data, "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n"
                                     "data: [DONE]\n\n: tail");
    CU_ASSERT_EQUAL(u.input, 5);
    CU_ASSERT_EQUAL(u.output, 2);
    CU_ASSERT_EQUAL(u.complete, 1);
    piapi_usage_scan_dispose(&s);
    piapi_buf_dispose(&out);

    /* a CR-ended event goes out at its CR; the LF after it follows it */
    piapi_usage_scan_init(&s, PIAPI_USAGE_CHAT, 1, 1);
    piapi_usage_feed(&s, "data: x\r\n\r", 10, &out);
    CU_ASSERT_EQUAL(out.len, 10);
    piapi_usage_feed(&s, "\ndata: y\r\n\r\n", 12, &out);
    CU_ASSERT_EQUAL(out.len, 22);
    CU_ASSERT_STRING_EQUAL(out.data, "data: x\r\n\r\ndata: y\r\n\r\n");
    piapi_usage_finish(&s, &out, &u);
    piapi_usage_scan_dispose(&s);
    piapi_buf_dispose(&out);
}

/* A usage chunk that still has choices (some compatible servers) counts
 * but reaches the client: only the usage-only chunk is ours to remove. */
static void test_strip_keeps_choice_chunks(void)
{
    static const char in[] =
        "data: {\"model\":\"m\",\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],"
        "\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":3}}\n\n"
        "data: [DONE]\n\n";
    struct run r;
    scan(PIAPI_USAGE_CHAT, 1, 1, in, sizeof in - 1, &r);
    CU_ASSERT_EQUAL(r.out.len, sizeof in - 1);
    CU_ASSERT_EQUAL(r.u.input, 4);
    CU_ASSERT_EQUAL(r.u.output, 3);
    CU_ASSERT_STRING_EQUAL(r.u.model, "m");
    piapi_buf_dispose(&r.out);
}

/* SSE details: comments, fields without a value, several data lines,
 * a "data" line without a colon, event names split across feeds. */
static void test_sse_framing(void)
{
    static const char in[] =
        ": keep-alive\n\n"
        "id: 7\nretry: 100\n"
        "event:message_start\n"
        "data:{\"type\":\"message_start\",\"message\":{\"model\":\"c\",\n"
        "data: \"usage\":{\"input_tokens\":4,\"output_tokens\":1}}}\n\n"
        "event: content_block_delta\n"
        "data: {\"usage\":{\"output_tokens\":1000}}\n\n"
        "event: message_delta_x\n"
        "data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":1000}}\n\n"
        "event: message_deltaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n"
        "data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":1000}}\n\n"
        "event: ping\n"
        "data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":1000}}\n"
        "event: message_delta\n"
        "data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":1000}}\n\n"
        "data\n"
        "event: message_delta\n"
        "data: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":6}}\n\n";
    struct run r;
    scan(PIAPI_USAGE_ANTHROPIC, 1, 0, in, sizeof in - 1, &r);
    struct want w = { 4, 6, 0, 0, 0, "c", 1, 1 };
    check_usage("framing", &r.u, &w);
    piapi_buf_dispose(&r.out);
}

/* ---- hostile answers ------------------------------------------------- */

static void test_numbers(void)
{
    static const struct {
        const char *usage;
        int64_t input, output;
        int found;
    } cases[] = {
        { "{\"prompt_tokens\":-5,\"completion_tokens\":-0}", 0, 0, 1 },
        { "{\"prompt_tokens\":1.5,\"completion_tokens\":2.0}", 0, 2, 1 },
        { "{\"prompt_tokens\":1e3,\"completion_tokens\":1E2}", 1000, 100, 1 },
        { "{\"prompt_tokens\":1e300,\"completion_tokens\":123456789012345678901234567890}",
          PIAPI_USAGE_MAX_TOKENS, PIAPI_USAGE_MAX_TOKENS, 1 },
        { "{\"prompt_tokens\":-1e300,\"completion_tokens\":9223372036854775807}",
          0, PIAPI_USAGE_MAX_TOKENS, 1 },
        { "{\"prompt_tokens\":\"12\",\"completion_tokens\":true}", 0, 0, 0 },
        { "{\"prompt_tokens\":null,\"completion_tokens\":[1]}", 0, 0, 0 },
        { "{\"prompt_tokens\":3,\"completion_tokens\":4,}", 0, 0, 0 },   /* invalid */
        { "{\"prompt_tokens\":3,\"prompt_tokens_details\":{\"cached_tokens\":9}}", 0, 0, 1 },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct piapi_buf in = {0};
        piapi_buf_printf(&in, "{\"model\":\"m\",\"usage\":%s}", cases[i].usage);
        struct run r;
        scan(PIAPI_USAGE_CHAT, 0, 0, in.data, in.len, &r);
        if (r.u.input != cases[i].input || r.u.output != cases[i].output
            || r.u.found != cases[i].found)
            fprintf(stderr, "numbers case %zu: %lld %lld %d\n", i,
                    (long long)r.u.input, (long long)r.u.output, r.u.found);
        CU_ASSERT_EQUAL(r.u.input, cases[i].input);
        CU_ASSERT_EQUAL(r.u.output, cases[i].output);
        CU_ASSERT_EQUAL(r.u.found, cases[i].found);
        piapi_buf_dispose(&in);
        piapi_buf_dispose(&r.out);
    }
}

static void test_garbage(void)
{
#define G(s) { s, sizeof(s) - 1 }
    static const struct {
        const char *in;
        size_t len;
    } inputs[] = {
        G(""), G("{"), G("}"), G("[]"), G("null"), G("\"usage\":{"),
        G("{\"usage\":{\"prompt_tokens\":1}"),
        G("{\"usage\" {\"prompt_tokens\":1}}"),
        G("{\"usage\":[{\"prompt_tokens\":1}]}"),
        G("data: {\"usage\":{\"prompt_tokens\":\n\n"), G("data: \"usage\":{\n\n"),
        G("\xff\xfe\x00\x01"), G("event:\nevent\ndata\n\n\n\n\r\r\r\n\n:"),
        G("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}\n\n"),
        G("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}"),
        G("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n"),
        G("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\r\n"),
    };
#undef G
    for (size_t i = 0; i < sizeof inputs / sizeof inputs[0]; i++) {
        const char *in = inputs[i].in;
        size_t len = inputs[i].len;
        for (int shape = 0; shape <= PIAPI_USAGE_RESPONSES; shape++)
            for (int es = 0; es <= 1; es++)
                for (int strip = 0; strip <= 1; strip++) {
                    struct run r;
                    scan((enum piapi_usage_shape)shape, es, strip, in, len, &r);
                    /* nothing complete, and a strip drops nothing */
                    if (r.u.complete)
                        fprintf(stderr, "garbage %zu complete (shape %d es %d)\n", i, shape, es);
                    CU_ASSERT_EQUAL(r.u.complete, 0);
                    if (strip)
                        CU_ASSERT(r.out.len == len
                                  && (len == 0 || memcmp(r.out.data, in, len) == 0));
                    piapi_buf_dispose(&r.out);
                }
    }
    /* a complete object with trailing bytes still counts: the answer's
     * object is what the upstream billed, its trailer is the client's */
    static const char tail[] = "{\"usage\":{\"prompt_tokens\":1}}} x";
    struct run r;
    scan(PIAPI_USAGE_CHAT, 0, 0, tail, sizeof tail - 1, &r);
    CU_ASSERT_EQUAL(r.u.input, 1);
    piapi_buf_dispose(&r.out);
}

/* Deep nesting: the skipping scanner needs no stack; cJSON's limit makes
 * a deep usage object count for nothing rather than crash. */
static void test_deep(void)
{
    enum { DEPTH = 200000 };
    struct piapi_buf in = {0};
    piapi_buf_puts(&in, "data: {\"x\":");
    for (int i = 0; i < DEPTH; i++)
        piapi_buf_putc(&in, '[');
    for (int i = 0; i < DEPTH; i++)
        piapi_buf_putc(&in, ']');
    piapi_buf_puts(&in, ",\"model\":\"deep\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":1}}\n\n");
    size_t first = in.len;
    piapi_buf_puts(&in, "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":8,\"x\":");
    for (int i = 0; i < 2000; i++)
        piapi_buf_puts(&in, "{\"a\":");
    piapi_buf_puts(&in, "1");
    for (int i = 0; i < 2000; i++)
        piapi_buf_putc(&in, '}');
    piapi_buf_puts(&in, "}}\n\n");

    struct run r;
    run_split(PIAPI_USAGE_CHAT, 1, 1, in.data, in.len, 0, &r);
    CU_ASSERT_EQUAL(r.u.input, 7);      /* the second usage is too deep */
    CU_ASSERT_STRING_EQUAL(r.u.model, "deep");
    /* the first was stripped, the second (unreadable) passed */
    CU_ASSERT_EQUAL(r.out.len, in.len - first);
    CU_ASSERT(r.out.len == in.len - first
              && memcmp(r.out.data, in.data + first, r.out.len) == 0);
    piapi_buf_dispose(&r.out);
    piapi_buf_dispose(&in);
}

/* An event or a body past the cap counts for nothing, memory stays
 * bounded, and a strip still relays every byte of it. */
static void test_caps(void)
{
    size_t big = PIAPI_USAGE_MAX_BODY + 1000;
    struct piapi_buf in = {0};

    piapi_buf_puts(&in, "data: {\"choices\":[],\"pad\":\"");
    piapi_buf_reserve(&in, big);
    memset(in.data + in.len, 'a', big);
    in.len += big;
    piapi_buf_puts(&in, "\",\"usage\":{\"prompt_tokens\":100,\"completion_tokens\":1}}\n\n");
    piapi_buf_puts(&in, "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n");
    piapi_buf_puts(&in, "data: [DONE]\n\n");

    for (int split = 0; split < 2; split++) {
        struct piapi_usage_scan s;
        struct piapi_buf out = {0};
        struct piapi_usage u;
        size_t piece = split ? 65536 : in.len, maxhold = 0;
        piapi_usage_scan_init(&s, PIAPI_USAGE_CHAT, 1, 1);
        for (size_t i = 0; i < in.len; i += piece) {
            size_t k = in.len - i < piece ? in.len - i : piece;
            piapi_usage_feed(&s, in.data + i, k, &out);
            if (s.hold.cap > maxhold)
                maxhold = s.hold.cap;
            CU_ASSERT(s.data.cap <= 2 * (size_t)PIAPI_USAGE_MAX_BODY);
        }
        piapi_usage_finish(&s, &out, &u);
        piapi_usage_scan_dispose(&s);
        CU_ASSERT(maxhold <= 2 * (size_t)PIAPI_USAGE_MAX_HOLD);
        CU_ASSERT_EQUAL(u.input, 3);
        CU_ASSERT_EQUAL(u.output, 2);
        /* the big event passed whole; the small usage chunk was removed */
        size_t small = strlen("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n");
        CU_ASSERT_EQUAL(out.len, in.len - small);
        CU_ASSERT(out.len == in.len - small
                  && memcmp(out.data, in.data, out.len - 14) == 0);
        piapi_buf_dispose(&out);
    }

    /* a JSON body past the cap */
    struct piapi_buf body = {0};
    piapi_buf_puts(&body, "{\"pad\":\"");
    piapi_buf_reserve(&body, big);
    memset(body.data + body.len, 'b', big);
    body.len += big;
    piapi_buf_puts(&body, "\",\"usage\":{\"prompt_tokens\":100,\"completion_tokens\":1}}");
    struct run r;
    run_split(PIAPI_USAGE_CHAT, 0, 0, body.data, body.len, 0, &r);
    CU_ASSERT_EQUAL(r.u.found, 0);
    run_split(PIAPI_USAGE_CHAT, 0, 1, body.data, body.len, 0, &r);
    CU_ASSERT_EQUAL(r.u.found, 0);
    CU_ASSERT_EQUAL(r.out.len, body.len);
    piapi_buf_dispose(&r.out);
    piapi_buf_dispose(&body);
    piapi_buf_dispose(&in);
}

/* ---- paths ----------------------------------------------------------- */

static void test_shape_of(void)
{
    static const struct {
        const char *path;
        enum piapi_usage_shape want;
    } cases[] = {
        { "/v1/messages", PIAPI_USAGE_ANTHROPIC },
        { "/v1/messages/", PIAPI_USAGE_ANTHROPIC },
        { "/messages", PIAPI_USAGE_ANTHROPIC },
        { "/v1/messages?beta=true", PIAPI_USAGE_ANTHROPIC },
        { "/v1/messages/count_tokens", PIAPI_USAGE_NONE },
        { "/v1/messages/batches", PIAPI_USAGE_NONE },
        { "/v1/messages//", PIAPI_USAGE_NONE },
        { "/v1/xmessages", PIAPI_USAGE_NONE },
        { "/v1/Messages", PIAPI_USAGE_NONE },
        { "/v1/chat/completions", PIAPI_USAGE_CHAT },
        { "/openai/deployments/gpt/chat/completions/", PIAPI_USAGE_CHAT },
        { "/v1/completions", PIAPI_USAGE_NONE },
        { "/v1/responses", PIAPI_USAGE_RESPONSES },
        { "/backend-api/codex/responses", PIAPI_USAGE_RESPONSES },
        { "/v1/responses/resp_123", PIAPI_USAGE_NONE },
        { "/v1/responses/resp_123/cancel", PIAPI_USAGE_NONE },
        { "/v1/models", PIAPI_USAGE_NONE },
        { "", PIAPI_USAGE_NONE },
        { "/", PIAPI_USAGE_NONE },
        /* a service's rest: no leading '/' */
        { "messages", PIAPI_USAGE_ANTHROPIC },
        { "chat/completions", PIAPI_USAGE_CHAT },
        { "responses", PIAPI_USAGE_RESPONSES },
        { "xresponses", PIAPI_USAGE_NONE },
        { "v1/chat/completions", PIAPI_USAGE_CHAT },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        enum piapi_usage_shape got =
            piapi_usage_shape_of(cases[i].path, strlen(cases[i].path));
        if (got != cases[i].want)
            fprintf(stderr, "%s: %d\n", cases[i].path, (int)got);
        CU_ASSERT_EQUAL(got, cases[i].want);
    }
}

/* ---- requests -------------------------------------------------------- */

static void test_scan_request(void)
{
    static const struct {
        const char *body;
        int rc;
        const char *model;
        int stream, asked, has_opts;
    } cases[] = {
        { "{\"model\":\"gpt-4o\",\"stream\":true,\"messages\":[]}", 0, "gpt-4o", 1, 0, 0 },
        { " \n{ \"stream\" : false , \"model\" : \"claude-sonnet-4-5\" }\n", 0, "claude-sonnet-4-5", 0, 0, 0 },
        { "{\"stream\":\"true\"}", 0, "", 0, 0, 0 },
        { "{\"stream\":1}", 0, "", 0, 0, 0 },
        { "{\"stream\":truex}", 0, "", 0, 0, 0 },
        { "{}", 0, "", 0, 0, 0 },
        { "{\"model\":42}", 0, "", 0, 0, 0 },
        /* "model" nested, in strings, with escaped quotes and braces */
        { "{\"messages\":[{\"role\":\"user\",\"content\":\"\\\"model\\\":\\\"x\\\"}{[\","
          "\"model\":\"nested\"}],\"metadata\":{\"model\":\"meta\",\"stream\":true},"
          "\"model\":\"top\",\"tools\":[{\"a\":\"\\\\\"}]}", 0, "top", 0, 0, 0 },
        { "{\"a\":\"}\",\"model\":\"m\\\\\",\"b\":\"\\\\\\\"}\"}", 0, "m\\", 0, 0, 0 },
        { "{\"model\":\"a\",\"model\":\"b\"}", 0, "b", 0, 0, 0 },
        { "{\"mod\\u0065l\":\"esc\",\"str\\u0065am\":true}", 0, "esc", 1, 0, 0 },
        { "{\"model\\u0000\":\"nul\"}", 0, "", 0, 0, 0 },
        { "{\"model\":\"caf\\u00e9\\n\"}", 0, "caf\xc3\xa9\n", 0, 0, 0 },
        { "{\"stream\":true,\"stream_options\":{\"include_usage\":true}}", 0, "", 1, 1, 1 },
        { "{\"stream\":true,\"stream_options\":{\"include_usage\":false}}", 0, "", 1, 0, 1 },
        { "{\"stream_options\":{\"x\":{\"include_usage\":true}}}", 0, "", 0, 0, 1 },
        { "{\"stream_options\":null}", 0, "", 0, 0, 1 },
        { "{\"stream_options\":{\"include_usage\":true},\"stream_options\":{}}", 0, "", 0, 0, 1 },
        /* not an object */
        { "", -1, "", 0, 0, 0 },
        { "[{\"model\":\"x\"}]", -1, "", 0, 0, 0 },
        { "\"model\"", -1, "", 0, 0, 0 },
        { "{\"model\":\"x\"", -1, "", 0, 0, 0 },
        { "{\"model\":\"x}", -1, "", 0, 0, 0 },
        { "{\"model\":\"x\"} {}", -1, "", 0, 0, 0 },
        { "{\"model\" \"x\"}", -1, "", 0, 0, 0 },
        { "{\"model\":\"x\",}", -1, "", 0, 0, 0 },
        { "{model:\"x\"}", -1, "", 0, 0, 0 },
        { "{\"a\":[1,2}", -1, "", 0, 0, 0 },
        { "{\"a\":}", -1, "", 0, 0, 0 },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct piapi_usage_request rq;
        int rc = piapi_usage_scan_request(cases[i].body, strlen(cases[i].body), &rq);
        if (rc != cases[i].rc || strcmp(rq.model, cases[i].model)
            || rq.stream != cases[i].stream || rq.asked_usage != cases[i].asked
            || rq.has_stream_options != cases[i].has_opts)
            fprintf(stderr, "scan case %zu: rc %d model %s stream %d asked %d opts %d\n",
                    i, rc, rq.model, rq.stream, rq.asked_usage, rq.has_stream_options);
        CU_ASSERT_EQUAL(rc, cases[i].rc);
        CU_ASSERT_STRING_EQUAL(rq.model, cases[i].model);
        CU_ASSERT_EQUAL(rq.stream, cases[i].stream);
        CU_ASSERT_EQUAL(rq.asked_usage, cases[i].asked);
        CU_ASSERT_EQUAL(rq.has_stream_options, cases[i].has_opts);
    }

    /* a model name too long to keep whole is none (cut short it could
     * end in a key's first bytes), a big body is walked */
    struct piapi_buf b = {0};
    piapi_buf_puts(&b, "{\"messages\":[");
    for (int i = 0; i < 100000; i++)
        piapi_buf_puts(&b, "{\"role\":\"user\",\"content\":\"\\\"model\\\": \\\\\"},");
    piapi_buf_puts(&b, "{}],\"model\":\"");
    for (int i = 0; i < 300; i++)
        piapi_buf_putc(&b, 'm');
    piapi_buf_puts(&b, "\",\"stream\":true}");
    struct piapi_usage_request rq;
    CU_ASSERT_EQUAL(piapi_usage_scan_request(b.data, b.len, &rq), 0);
    CU_ASSERT_STRING_EQUAL(rq.model, "");
    CU_ASSERT_EQUAL(rq.stream, 1);
    piapi_buf_dispose(&b);
}

/* A model name longer than its 127 bytes is dropped, not cut: its kept
 * part could end in the first bytes of a key, which the check for whole
 * keys in the log and ledger would not see. Both the request's and the
 * answer's, escaped or not. */
static void test_long_model(void)
{
    char m127[128], body[512];
    memset(m127, 'm', 127);
    m127[127] = '\0';
    struct piapi_usage_request rq;

    snprintf(body, sizeof body, "{\"model\":\"%s\"}", m127);
    CU_ASSERT_EQUAL(piapi_usage_scan_request(body, strlen(body), &rq), 0);
    CU_ASSERT_STRING_EQUAL(rq.model, m127);
    snprintf(body, sizeof body, "{\"model\":\"%sx\"}", m127);
    CU_ASSERT_EQUAL(piapi_usage_scan_request(body, strlen(body), &rq), 0);
    CU_ASSERT_STRING_EQUAL(rq.model, "");
    snprintf(body, sizeof body, "{\"model\":\"%s\\u0078\"}", m127);
    CU_ASSERT_EQUAL(piapi_usage_scan_request(body, strlen(body), &rq), 0);
    CU_ASSERT_STRING_EQUAL(rq.model, "");

    struct piapi_usage_scan s;
    struct piapi_usage u;
    snprintf(body, sizeof body, "{\"model\":\"%ssk-xyz\",\"usage\":{\"input_tokens\":3,"
             "\"output_tokens\":4}}", m127);
    piapi_usage_scan_init(&s, PIAPI_USAGE_ANTHROPIC, 0, 0);
    piapi_usage_feed(&s, body, strlen(body), NULL);
    piapi_usage_finish(&s, NULL, &u);
    piapi_usage_scan_dispose(&s);
    CU_ASSERT_STRING_EQUAL(u.model, "");
    CU_ASSERT_EQUAL(u.input, 3);
    CU_ASSERT_EQUAL(u.complete, 1);
}

static void test_inject(void)
{
    static const struct {
        const char *in;
        const char *out;    /* NULL: -1 */
    } cases[] = {
        { "{\"model\":\"gpt-4o\",\"stream\":true}",
          "{\"model\":\"gpt-4o\",\"stream\":true,\"stream_options\":{\"include_usage\":true}}" },
        { "{ \"model\" : \"gpt-4o\" , \"stream\" : true }\n",
          "{ \"model\" : \"gpt-4o\" , \"stream\" : true,\"stream_options\":{\"include_usage\":true} }\n" },
        { "{}", "{\"stream_options\":{\"include_usage\":true}}" },
        { " { \n } ", " {\"stream_options\":{\"include_usage\":true} \n } " },
        { "{\"stream\":true,\"stream_options\":{}}",
          "{\"stream\":true,\"stream_options\":{\"include_usage\":true}}" },
        { "{\"stream_options\":{\"x\":1},\"stream\":true}",
          "{\"stream_options\":{\"x\":1,\"include_usage\":true},\"stream\":true}" },
        { "{\"stream_options\":{\"include_usage\":false,\"x\":1},\"stream\":true}",
          "{\"stream_options\":{\"include_usage\":true,\"x\":1},\"stream\":true}" },
        { "{\"stream_options\":{\"include_usage\" : null}}",
          "{\"stream_options\":{\"include_usage\" : true}}" },
        { "{\"stream_options\":null,\"stream\":true}",
          "{\"stream_options\":{\"include_usage\":true},\"stream\":true}" },
        /* the last stream_options is the one the upstream reads */
        { "{\"stream_options\":{\"include_usage\":true},\"stream_options\":{}}",
          "{\"stream_options\":{\"include_usage\":true},\"stream_options\":{\"include_usage\":true}}" },
        { "{\"messages\":[{\"content\":\"\\\"stream_options\\\":{}\"}],\"metadata\":{\"stream_options\":null}}",
          "{\"messages\":[{\"content\":\"\\\"stream_options\\\":{}\"}],\"metadata\":{\"stream_options\":null},"
          "\"stream_options\":{\"include_usage\":true}}" },
        { "{\"stream_options\":{\"include_usage\":true}}", NULL },
        { "{\"stream_options\":{\"include_usage\":1}}", NULL },
        { "{\"stream_options\":[]}", NULL },
        { "{\"stream_options\":\"x\"}", NULL },
        { "[]", NULL },
        { "{\"a\":1", NULL },
        { "", NULL },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct piapi_buf out = {0};
        int rc = piapi_usage_inject(cases[i].in, strlen(cases[i].in), &out);
        if (!cases[i].out) {
            CU_ASSERT_EQUAL(rc, -1);
            CU_ASSERT_EQUAL(out.len, 0);
            continue;
        }
        CU_ASSERT_EQUAL(rc, 0);
        if (rc != 0 || strcmp(out.data, cases[i].out))
            fprintf(stderr, "inject case %zu: %s\n", i, out.data ? out.data : "(none)");
        CU_ASSERT(rc == 0 && strcmp(out.data, cases[i].out) == 0);
        cJSON *v = cJSON_ParseWithLength(out.data, out.len);
        CU_ASSERT(cJSON_IsObject(v));
        struct piapi_usage_request rq;
        CU_ASSERT_EQUAL(piapi_usage_scan_request(out.data, out.len, &rq), 0);
        CU_ASSERT_EQUAL(rq.asked_usage, 1);
        cJSON_Delete(v);
        piapi_buf_dispose(&out);
    }
}

static const struct unit_case cases[] = {
    { "answers, every shape and split", test_answers },
    { "strip removes only the usage chunk", test_strip },
    { "strip relays each event when it ends", test_strip_is_prompt },
    { "strip keeps chunks with choices", test_strip_keeps_choice_chunks },
    { "sse framing", test_sse_framing },
    { "numbers", test_numbers },
    { "garbage", test_garbage },
    { "deep nesting", test_deep },
    { "caps", test_caps },
    { "shape of path", test_shape_of },
    { "request scan", test_scan_request },
    { "long model name dropped", test_long_model },
    { "inject include_usage", test_inject },
    { NULL, NULL }
};

UNIT_MAIN("usage", cases)
