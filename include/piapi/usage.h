/* Token usage of LLM API answers, read as they stream past, and the small
 * request-body work that goes with it (the model asked for, whether the
 * client streams, adding stream_options.include_usage).
 *
 * Three answer shapes are understood:
 *   Anthropic Messages   JSON: top-level usage. SSE: message_start's
 *                        message.usage, then message_delta's usage, which
 *                        is cumulative: the last value of each field wins,
 *                        a field a delta leaves out keeps its earlier value.
 *   Chat Completions     usage.prompt_tokens / completion_tokens /
 *                        prompt_tokens_details.cached_tokens. In SSE only
 *                        the last chunk (choices: []) carries it, and only
 *                        when the request set stream_options.include_usage.
 *   Responses            the response object's usage; in SSE that of
 *                        response.completed / .incomplete / .failed.
 *
 * Nothing here allocates per byte or builds a JSON tree of a whole answer
 * or request: objects are walked by a scanner that skips values, and cJSON
 * only ever sees a usage object or a single string. */
#ifndef PIAPI_USAGE_H
#define PIAPI_USAGE_H

#include <stddef.h>
#include <stdint.h>

#include "piapi/util.h"

/* The most one JSON answer or one SSE event may hold before it is given
 * up on (it then simply does not count). A hostile upstream cannot make
 * the scanner's buffers grow past this. */
#define PIAPI_USAGE_MAX_BODY (8u << 20)
/* Stripping holds back at most this much of one event: a usage chunk is
 * well under 1 KiB, and what is held is what the client waits for (and
 * what the end of a stream writes at once). */
#define PIAPI_USAGE_MAX_HOLD (64u << 10)
/* A usage object larger than this is not parsed (real ones are < 1 KiB;
 * the limit keeps cJSON from building a huge tree out of one). */
#define PIAPI_USAGE_MAX_OBJECT (64u << 10)
/* Counts are clamped to [0, PIAPI_USAGE_MAX_TOKENS], so sums of them in
 * metrics never overflow whatever an upstream writes. */
#define PIAPI_USAGE_MAX_TOKENS INT64_C(1000000000000)

enum piapi_usage_shape {
    PIAPI_USAGE_NONE,
    PIAPI_USAGE_ANTHROPIC,
    PIAPI_USAGE_CHAT,
    PIAPI_USAGE_RESPONSES,
};

/* By the upstream path, without its query (anything from a '?' on is
 * ignored all the same): ending in "/messages" -> ANTHROPIC (not
 * "/messages/count_tokens" nor anything else after it), "/chat/completions"
 * -> CHAT, "/responses" -> RESPONSES, else NONE. One trailing '/' is
 * tolerated. Case-sensitive, like the providers' routers. */
enum piapi_usage_shape piapi_usage_shape_of(const char *path, size_t len);

/* What an answer said, normalised across the shapes:
 *   input          input tokens that were neither read from nor written to
 *                  the cache (OpenAI: prompt/input tokens - cached_tokens,
 *                  never negative; Anthropic: input_tokens as is)
 *   cache_read     tokens read from the prompt cache
 *   cache_write    every cache write (Anthropic cache_creation_input_tokens,
 *                  or the sum of its 5m and 1h parts when only those come)
 *   cache_write_1h the 1-hour part of cache_write when the answer splits
 *                  it, else 0
 *   output         output tokens, reasoning included
 *   model          the model the answer names ("" when none; the caller
 *                  falls back to the request's); one longer than 127
 *                  bytes is none (cut short it could end in a key's
 *                  first bytes)
 *   found          at least one count was read
 *   complete       the final usage arrived (JSON: a usage object; SSE:
 *                  Anthropic message_delta's usage, Chat's usage chunk,
 *                  Responses' completed/incomplete/failed with a usage)
 * A cut stream keeps what it had said (Anthropic's message_start gives
 * input and cache counts; its output_tokens is a placeholder, so output
 * stays 0 until message_delta's usage) with complete = 0.
 * Numbers: a count that is not a JSON number or not an integer (1.5) is
 * ignored as if absent; negative ones count as 0, ones above
 * PIAPI_USAGE_MAX_TOKENS as that. Only events that ended (blank line) are
 * read, as an SSE client would: a stream's unterminated tail never counts. */
struct piapi_usage {
    int64_t input;
    int64_t output;
    int64_t cache_read;
    int64_t cache_write;
    int64_t cache_write_1h;
    char model[128];
    int found;
    int complete;
};

/* The request body's top level: "model" (a string, decoded; "" when longer
 * than 127 bytes), "stream": true, whether "stream_options" is present (any
 * value) and whether it is an object whose include_usage is true. With a
 * key given twice the last one counts, as in the providers' parsers. */
struct piapi_usage_request {
    char model[128];
    int stream;
    int asked_usage;
    int has_stream_options;
    /* "model" is there but not read into model: not a string, longer
     * than 127 bytes, an escape cJSON refuses (a lone surrogate) or a
     * \u0000 (decoding would stop there); an allow-list cannot pass it */
    int model_unread;
};

/* Walks the top level only, skipping values without building a tree, so
 * an 8 MiB body costs about one pass of memchr. 0, or -1 when the body is
 * not one JSON object (out then zeroed). Values are skipped structurally
 * (strings, brackets), not validated: garbage inside a value is the
 * upstream's to refuse. */
int piapi_usage_scan_request(const char *body, size_t len,
                             struct piapi_usage_request *out);

/* Appends to out the body with stream_options.include_usage true: a new
 * last top-level member "stream_options":{"include_usage":true} when there
 * is none, a new last member "include_usage":true inside an existing
 * stream_options object, or an include_usage false/null (or a
 * stream_options null) replaced. Every other byte is kept as it was.
 * 0, or -1 with out untouched when the body is not a JSON object, when
 * include_usage is already true (nothing to strip then: the client asked)
 * or when stream_options/include_usage hold a value of another type (the
 * upstream's error is the client's to see). With stream_options given
 * twice the last one is changed, the one the upstream reads. */
int piapi_usage_inject(const char *body, size_t len, struct piapi_buf *out);

/* The state of one answer's scan. Embedded by the caller; its fields are
 * the scanner's own (init, feed, finish, dispose are the only way in).
 * dispose frees what it holds; init needs no dispose before it. */
struct piapi_usage_scan {
    enum piapi_usage_shape shape;
    unsigned event_stream : 1;
    unsigned relay : 1;         /* the caller wants the client's bytes in out */
    unsigned strip : 1;         /* ...and events may be dropped (Chat SSE) */
    unsigned gave_up : 1;       /* JSON body past the cap */
    unsigned chat_walked : 1;   /* Chat: the first event was read for the model */
    /* SSE line parser, resumable at any byte */
    unsigned char line_state;
    unsigned char field;        /* which field the current line is */
    unsigned char cr;           /* the last byte was CR: a LF ends nothing */
    unsigned char lf_keep;      /* strip: an event ended at that CR; its LF
                                   goes out (1) or is dropped with it (2) */
    unsigned char name_len;     /* bytes of the field name so far */
    char name[8];
    /* the current event */
    unsigned ev_named : 1;      /* an event: line was seen */
    unsigned ev_skip : 1;       /* its name says it holds nothing for us */
    unsigned ev_lost : 1;       /* its data was cut (cap) or skipped */
    unsigned ev_pass : 1;       /* strip: too big to hold, relayed as it comes */
    unsigned ev_unread : 1;     /* lines were passed over while skipping */
    unsigned ev_lines;          /* data lines so far */
    unsigned char ev_name_len;
    char ev_name[32];
    struct piapi_buf data;      /* data lines joined by "\n", or JSON body */
    struct piapi_buf hold;      /* strip: raw bytes of the incomplete event */
    /* what the answer said so far (raw, normalised by finish) */
    int64_t raw[8];
    unsigned have;              /* bit per raw[] slot read */
    int complete;
    char model[128];
};

void piapi_usage_scan_init(struct piapi_usage_scan *s,
                           enum piapi_usage_shape shape, int event_stream,
                           int strip);

/* n bytes of the answer body, split anywhere. Not stripping: out is left
 * untouched (the caller relays the data itself). Stripping (only a Chat
 * event stream ever loses anything): appends to out what the client gets
 * now; every complete event goes out when its blank line arrives, except
 * a usage-only chunk (choices [] with a usage object), which is counted
 * and dropped. Only the current incomplete event is held back. */
void piapi_usage_feed(struct piapi_usage_scan *s, const char *data, size_t n,
                      struct piapi_buf *out);

/* The body ended, cleanly or cut. JSON answers are parsed here; stripping,
 * the held incomplete event goes to out unchanged. Fills u. */
void piapi_usage_finish(struct piapi_usage_scan *s, struct piapi_buf *out,
                        struct piapi_usage *u);

/* Bytes held back (stripping: the current incomplete event), which the
 * next feed may hand back at once. */
size_t piapi_usage_held(const struct piapi_usage_scan *s);

void piapi_usage_scan_dispose(struct piapi_usage_scan *s);

#endif
