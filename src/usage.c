/* Token usage of LLM answers, read on the fly (see usage.h for the three
 * shapes and what is reported).
 *
 * Cost is the design constraint: this runs for every answer byte. An SSE
 * event whose `event:` line names something without usage is skipped
 * without its data being copied; an unnamed event (Chat) is copied but
 * only looked at when a byte check finds a `"usage":{` in it. Objects are
 * walked by a skipping scanner (strings by memchr), and cJSON only parses
 * a usage object or a string that needs unescaping, never a whole answer
 * or request. */
#include "piapi/usage.h"

#include <cjson/cJSON.h>
#include <string.h>

/* ---- skipping JSON scanner ------------------------------------------ */

#define BAD ((size_t)-1)

/* A value's bytes inside the scanned text; p == NULL when absent. */
struct span {
    const char *p;
    size_t n;
};

/* Where an object's members sit, for inserting a new last member. */
struct object_walk {
    size_t open;        /* just after '{' */
    size_t last_end;    /* just after the last member's value; open if none */
    size_t end;         /* just after '}' */
};

static int is_ws(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static size_t skip_ws(const char *p, size_t n, size_t i)
{
    while (i < n && is_ws(p[i]))
        i++;
    return i;
}

/* i at the opening quote: the index after the closing one, or BAD. A quote
 * is escaped when an odd run of backslashes precedes it; each run is
 * counted once, so hostile backslashes stay linear. */
static size_t skip_string(const char *p, size_t n, size_t i)
{
    size_t start = ++i;

    while (i < n) {
        const char *q = memchr(p + i, '"', n - i);
        if (!q)
            return BAD;
        size_t j = (size_t)(q - p), bs = 0;
        while (j - bs > start && p[j - bs - 1] == '\\')
            bs++;
        i = j + 1;
        if (bs % 2 == 0)
            return i;
    }
    return BAD;
}

/* Brackets are counted, not matched by kind: the scanner finds members,
 * it does not validate (the upstream refuses what is malformed). Depth is
 * a counter, so nesting costs no stack. */
static size_t skip_container(const char *p, size_t n, size_t i)
{
    size_t depth = 0;

    while (i < n) {
        char c = p[i];
        if (c == '"') {
            i = skip_string(p, n, i);
            if (i == BAD)
                return BAD;
            continue;
        }
        if (c == '{' || c == '[') {
            depth++;
        } else if (c == '}' || c == ']') {
            if (--depth == 0)
                return i + 1;
        }
        i++;
    }
    return BAD;
}

static int is_scalar_byte(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
        || (c >= '0' && c <= '9') || c == '-' || c == '+' || c == '.';
}

/* i at a value's first byte: the index after it, or BAD. */
static size_t skip_value(const char *p, size_t n, size_t i)
{
    if (i >= n)
        return BAD;
    if (p[i] == '"')
        return skip_string(p, n, i);
    if (p[i] == '{' || p[i] == '[')
        return skip_container(p, n, i);
    size_t j = i;
    while (j < n && is_scalar_byte(p[j]))
        j++;
    return j > i ? j : BAD;
}

static int span_is(struct span v, const char *lit)
{
    size_t n = strlen(lit);
    return v.p && v.n == n && memcmp(v.p, lit, n) == 0;
}

/* "[" ws "]" */
static int span_is_empty_array(struct span v)
{
    if (!v.p || v.n < 2 || v.p[0] != '[')
        return 0;
    size_t i = skip_ws(v.p, v.n, 1);
    return i == v.n - 1 && v.p[i] == ']';
}

/* Decodes the JSON string token t (quotes included) into dst (cap >= 1).
 * -1 with dst untouched when it does not fit in cap - 1 bytes: a name cut
 * short could end in the first bytes of a key, which the caller's check
 * for whole keys would miss (no model name is that long). Tokens without
 * a backslash are copied as they are; others go through cJSON, which only
 * ever sees this token. */
static int decode_string(struct span t, char *dst, size_t cap)
{
    const char *raw = t.p + 1;
    size_t rlen = t.n - 2;

    if (!memchr(raw, '\\', rlen)) {
        if (rlen >= cap)
            return -1;
        memcpy(dst, raw, rlen);
        dst[rlen] = '\0';
        return 0;
    }
    if (t.n > 4096)
        return -1;
    cJSON *v = cJSON_ParseWithLength(t.p, t.n);
    const char *s = cJSON_GetStringValue(v);
    if (!s) {
        cJSON_Delete(v);
        return -1;
    }
    size_t k = strlen(s);
    if (k >= cap) {
        cJSON_Delete(v);
        return -1;
    }
    memcpy(dst, s, k + 1);
    cJSON_Delete(v);
    return 0;
}

/* Whether the key token t (quotes included) spells name once decoded. A
 * \u0000 would end cJSON's decoding early and make "model\u0000x" look
 * like "model"; such a key matches nothing. */
static int key_is(struct span t, const char *name, size_t len)
{
    const char *raw = t.p + 1;
    size_t rlen = t.n - 2;

    if (!memchr(raw, '\\', rlen))
        return rlen == len && memcmp(raw, name, len) == 0;
    if (rlen > 64 || memmem(raw, rlen, "\\u0000", 6))
        return 0;
    char buf[72];
    if (decode_string(t, buf, sizeof buf) < 0)
        return 0;
    return strlen(buf) == len && memcmp(buf, name, len) == 0;
}

/* Walks the object at p[i] (after whitespace), storing in vals[k] the
 * value of the last member named keys[k]. 0, or -1 when it is not a
 * well-formed object. */
static int walk_object(const char *p, size_t n, size_t i,
                       const char *const *keys, size_t nkeys,
                       struct span *vals, struct object_walk *w)
{
    for (size_t k = 0; k < nkeys; k++)
        vals[k] = (struct span){ NULL, 0 };
    i = skip_ws(p, n, i);
    if (i >= n || p[i] != '{')
        return -1;
    w->open = w->last_end = ++i;
    i = skip_ws(p, n, i);
    if (i < n && p[i] == '}') {
        w->end = i + 1;
        return 0;
    }
    for (;;) {
        if (i >= n || p[i] != '"')
            return -1;
        size_t ke = skip_string(p, n, i);
        if (ke == BAD)
            return -1;
        struct span key = { p + i, ke - i };
        i = skip_ws(p, n, ke);
        if (i >= n || p[i] != ':')
            return -1;
        size_t vs = skip_ws(p, n, i + 1);
        size_t ve = skip_value(p, n, vs);
        if (ve == BAD)
            return -1;
        for (size_t k = 0; k < nkeys; k++)
            if (key_is(key, keys[k], strlen(keys[k])))
                vals[k] = (struct span){ p + vs, ve - vs };
        w->last_end = ve;
        i = skip_ws(p, n, ve);
        if (i < n && p[i] == ',') {
            i = skip_ws(p, n, i + 1);
            continue;
        }
        if (i < n && p[i] == '}') {
            w->end = i + 1;
            return 0;
        }
        return -1;
    }
}

static int walk_span(struct span v, const char *const *keys, size_t nkeys,
                     struct span *vals)
{
    struct object_walk w;
    if (!v.p || v.n == 0 || v.p[0] != '{')
        return -1;
    return walk_object(v.p, v.n, 0, keys, nkeys, vals, &w);
}

/* ---- shape by path --------------------------------------------------- */

/* Whether the path's last segments are `suffix`: the whole path, or after
 * a '/' (the path may be a service's rest, which has no leading '/'). */
static int ends_with(const char *p, size_t n, const char *suffix)
{
    size_t k = strlen(suffix);
    return n >= k && memcmp(p + n - k, suffix, k) == 0 && (n == k || p[n - k - 1] == '/');
}

enum piapi_usage_shape piapi_usage_shape_of(const char *path, size_t len)
{
    const char *q = memchr(path, '?', len);
    if (q)
        len = (size_t)(q - path);
    if (len > 1 && path[len - 1] == '/')
        len--;
    if (ends_with(path, len, "messages"))
        return PIAPI_USAGE_ANTHROPIC;
    if (ends_with(path, len, "chat/completions"))
        return PIAPI_USAGE_CHAT;
    if (ends_with(path, len, "responses"))
        return PIAPI_USAGE_RESPONSES;
    return PIAPI_USAGE_NONE;
}

/* ---- request body ---------------------------------------------------- */

enum { RQ_MODEL, RQ_STREAM, RQ_OPTIONS, RQ_N };
static const char *const request_keys[RQ_N] = { "model", "stream",
                                                "stream_options" };
static const char *const include_key[1] = { "include_usage" };

/* The top level, which must be the whole body (whitespace around it). */
static int walk_body(const char *body, size_t len, struct span *vals,
                     struct object_walk *w)
{
    if (walk_object(body, len, 0, request_keys, RQ_N, vals, w) < 0)
        return -1;
    return skip_ws(body, len, w->end) == len ? 0 : -1;
}

int piapi_usage_scan_request(const char *body, size_t len,
                             struct piapi_usage_request *out)
{
    struct span v[RQ_N], inc;
    struct object_walk w;

    memset(out, 0, sizeof *out);
    if (walk_body(body, len, v, &w) < 0)
        return -1;
    struct span m = v[RQ_MODEL];
    if (m.p)
        out->model_unread = m.p[0] != '"' || memmem(m.p, m.n, "\\u0000", 6) ||
                            decode_string(m, out->model, sizeof out->model) != 0;
    out->stream = span_is(v[RQ_STREAM], "true");
    out->has_stream_options = v[RQ_OPTIONS].p != NULL;
    if (walk_span(v[RQ_OPTIONS], include_key, 1, &inc) == 0)
        out->asked_usage = span_is(inc, "true");
    return 0;
}

/* body with [at, at + cut) replaced by text */
static void splice(struct piapi_buf *out, const char *body, size_t len,
                   size_t at, size_t cut, const char *text)
{
    piapi_buf_reserve(out, len - cut + strlen(text));
    piapi_buf_append(out, body, at);
    piapi_buf_puts(out, text);
    piapi_buf_append(out, body + at + cut, len - at - cut);
}

/* A new last member of the object w describes (a comma when not empty). */
static void add_member(struct piapi_buf *out, const char *body, size_t len,
                       size_t base, const struct object_walk *w,
                       const char *member)
{
    int empty = w->last_end == w->open;
    piapi_buf_reserve(out, len + strlen(member) + 1);
    piapi_buf_append(out, body, base + w->last_end);
    if (!empty)
        piapi_buf_putc(out, ',');
    piapi_buf_puts(out, member);
    piapi_buf_append(out, body + base + w->last_end,
                     len - base - w->last_end);
}

int piapi_usage_inject(const char *body, size_t len, struct piapi_buf *out)
{
    struct span v[RQ_N], inc;
    struct object_walk w, ow;

    if (walk_body(body, len, v, &w) < 0)
        return -1;
    struct span so = v[RQ_OPTIONS];
    if (!so.p) {
        add_member(out, body, len, 0, &w,
                   "\"stream_options\":{\"include_usage\":true}");
        return 0;
    }
    size_t at = (size_t)(so.p - body);
    if (span_is(so, "null")) {
        splice(out, body, len, at, so.n, "{\"include_usage\":true}");
        return 0;
    }
    if (so.p[0] != '{'
        || walk_object(so.p, so.n, 0, include_key, 1, &inc, &ow) < 0)
        return -1;
    if (!inc.p) {
        add_member(out, body, len, at, &ow, "\"include_usage\":true");
        return 0;
    }
    if (span_is(inc, "false") || span_is(inc, "null")) {
        splice(out, body, len, (size_t)(inc.p - body), inc.n, "true");
        return 0;
    }
    return -1;      /* already true, or a value of another type */
}

/* ---- usage objects --------------------------------------------------- */

/* Slots of piapi_usage_scan.raw. OpenAI's prompt/input tokens go to
 * R_INPUT and its cached_tokens to R_CACHE_READ; the subtraction happens
 * once, when the result is read. */
enum { R_INPUT, R_OUTPUT, R_CACHE_READ, R_CACHE_WRITE, R_CACHE_5M,
       R_CACHE_1H };

struct usage_field {
    const char *name;
    const char *sub;    /* a member of name's object, or NULL */
    int slot;
};

static const struct usage_field anthropic_fields[] = {
    { "input_tokens", NULL, R_INPUT },
    { "output_tokens", NULL, R_OUTPUT },
    { "cache_read_input_tokens", NULL, R_CACHE_READ },
    { "cache_creation_input_tokens", NULL, R_CACHE_WRITE },
    { "cache_creation", "ephemeral_5m_input_tokens", R_CACHE_5M },
    { "cache_creation", "ephemeral_1h_input_tokens", R_CACHE_1H },
    { NULL, NULL, 0 }
};

static const struct usage_field chat_fields[] = {
    { "prompt_tokens", NULL, R_INPUT },
    { "completion_tokens", NULL, R_OUTPUT },
    { "prompt_tokens_details", "cached_tokens", R_CACHE_READ },
    { NULL, NULL, 0 }
};

/* output_tokens already includes output_tokens_details.reasoning_tokens. */
static const struct usage_field responses_fields[] = {
    { "input_tokens", NULL, R_INPUT },
    { "output_tokens", NULL, R_OUTPUT },
    { "input_tokens_details", "cached_tokens", R_CACHE_READ },
    { NULL, NULL, 0 }
};

static const struct usage_field *fields_of(enum piapi_usage_shape shape)
{
    switch (shape) {
    case PIAPI_USAGE_ANTHROPIC: return anthropic_fields;
    case PIAPI_USAGE_CHAT: return chat_fields;
    case PIAPI_USAGE_RESPONSES: return responses_fields;
    default: return NULL;
    }
}

/* A count from an upstream: integers only (1.5 is refused, -1 is 0, 1e300
 * is the ceiling). -1 when v is not one, so the field counts as absent. */
static int count_of(const cJSON *v, int64_t *out)
{
    if (!cJSON_IsNumber(v))
        return -1;
    double d = v->valuedouble;
    if (d >= (double)PIAPI_USAGE_MAX_TOKENS) {
        *out = PIAPI_USAGE_MAX_TOKENS;
        return 0;
    }
    if (d <= -(double)PIAPI_USAGE_MAX_TOKENS) {
        *out = 0;
        return 0;
    }
    int64_t i = (int64_t)d;
    if ((double)i != d)
        return -1;
    *out = i < 0 ? 0 : i;
    return 0;
}

/* Reads the usage object u into the scan: each field present overwrites
 * (Anthropic's deltas are cumulative), absent ones keep their value.
 * 0 when u was an object. */
static int apply_usage(struct piapi_usage_scan *s, struct span u)
{
    if (!u.p || u.p[0] != '{' || u.n > PIAPI_USAGE_MAX_OBJECT)
        return -1;
    cJSON *root = cJSON_ParseWithLength(u.p, u.n);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return -1;
    }
    for (const struct usage_field *f = fields_of(s->shape); f->name; f++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, f->name);
        if (f->sub)
            v = cJSON_GetObjectItemCaseSensitive(v, f->sub);
        int64_t x;
        if (count_of(v, &x) == 0) {
            s->raw[f->slot] = x;
            s->have |= 1u << f->slot;
        }
    }
    cJSON_Delete(root);
    return 0;
}

static void take_model(struct piapi_usage_scan *s, struct span m)
{
    char buf[sizeof s->model];
    if (!m.p || m.p[0] != '"' || decode_string(m, buf, sizeof buf) < 0
        || !buf[0])
        return;
    memcpy(s->model, buf, strlen(buf) + 1);
}

/* "usage" ws ':' ws '{' somewhere in p: the cheap test before any walk.
 * Inside a JSON string a quote is escaped, so text cannot fake it; only a
 * real key (at any depth) matches. memchr for the 'u' beats memmem's
 * general search several times over on chunk-sized data. */
static int may_hold_usage(const char *p, size_t n)
{
    size_t i = 1;

    while (i + 6 <= n) {
        const char *u = memchr(p + i, 'u', n - i - 5);
        if (!u)
            return 0;
        i = (size_t)(u - p) + 1;
        if (u[-1] != '"' || memcmp(u + 1, "sage\"", 5) != 0)
            continue;
        size_t j = skip_ws(p, n, i + 5);
        if (j < n && p[j] == ':') {
            j = skip_ws(p, n, j + 1);
            if (j < n && p[j] == '{')
                return 1;
        }
    }
    return 0;
}

/* ---- one event (or one JSON body) ------------------------------------ */

enum { K_TYPE, K_MODEL, K_USAGE, K_MESSAGE, K_RESPONSE, K_CHOICES, K_N };
static const char *const event_keys[K_N] = { "type", "model", "usage",
                                             "message", "response",
                                             "choices" };
static const char *const inner_keys[2] = { "model", "usage" };

/* model and usage of the object o (Anthropic's message, a response);
 * 0 when it held a usage object. */
static int take_inner(struct piapi_usage_scan *s, struct span o)
{
    struct span v[2];
    if (walk_span(o, inner_keys, 2, v) < 0)
        return -1;
    take_model(s, v[0]);
    return apply_usage(s, v[1]);
}

/* The event's type: its event: line, else the data's "type" string. */
static struct span event_type(const struct piapi_usage_scan *s,
                              const struct span *v)
{
    if (s->ev_named)
        return (struct span){ s->ev_name, s->ev_name_len };
    if (v[K_TYPE].p && v[K_TYPE].p[0] == '"' && v[K_TYPE].n >= 2)
        return (struct span){ v[K_TYPE].p + 1, v[K_TYPE].n - 2 };
    return (struct span){ NULL, 0 };
}

static void anthropic_event(struct piapi_usage_scan *s, struct span type,
                            const struct span *v)
{
    if (span_is(type, "message_start"))
        take_inner(s, v[K_MESSAGE]);
    else if (span_is(type, "message_delta") && apply_usage(s, v[K_USAGE]) == 0)
        s->complete = 1;
}

static void responses_event(struct piapi_usage_scan *s, struct span type,
                            const struct span *v)
{
    if (span_is(type, "response.created")) {
        struct span m;
        static const char *const model_key[1] = { "model" };
        if (walk_span(v[K_RESPONSE], model_key, 1, &m) == 0)
            take_model(s, m);
    } else if (span_is(type, "response.completed")
               || span_is(type, "response.incomplete")
               || span_is(type, "response.failed")) {
        if (take_inner(s, v[K_RESPONSE]) == 0)
            s->complete = 1;
    }
}

/* 1 when the event is the usage-only chunk a strip removes. */
static int chat_event(struct piapi_usage_scan *s, const struct span *v)
{
    take_model(s, v[K_MODEL]);
    if (apply_usage(s, v[K_USAGE]) < 0)
        return 0;
    s->complete = 1;
    return span_is_empty_array(v[K_CHOICES]);
}

/* Whether an event worth a walk: Chat's first (for the model) and any
 * that may hold usage; for the others, their named events of interest
 * always (response.created carries only the model), unnamed ones on the
 * byte check. */
static int worth_walking(const struct piapi_usage_scan *s)
{
    if (s->shape == PIAPI_USAGE_CHAT && !s->model[0] && !s->chat_walked)
        return 1;
    if (s->shape != PIAPI_USAGE_CHAT && s->ev_named)
        return 1;
    return may_hold_usage(s->data.data, s->data.len);
}

/* 1 when the event must not reach the client. */
static int handle_event(struct piapi_usage_scan *s)
{
    struct span v[K_N];
    struct object_walk w;

    if (s->data.len == 0 || !worth_walking(s))
        return 0;
    s->chat_walked = 1;
    if (walk_object(s->data.data, s->data.len, 0, event_keys, K_N, v, &w) < 0)
        return 0;
    switch (s->shape) {
    case PIAPI_USAGE_ANTHROPIC:
        anthropic_event(s, event_type(s, v), v);
        return 0;
    case PIAPI_USAGE_RESPONSES:
        responses_event(s, event_type(s, v), v);
        return 0;
    case PIAPI_USAGE_CHAT:
        return chat_event(s, v) && s->strip;
    default:
        return 0;
    }
}

/* A whole JSON answer: the top level holds model and usage in all three
 * shapes (a Responses answer is the response object). */
static void handle_body(struct piapi_usage_scan *s)
{
    struct span v[2];
    struct object_walk w;

    if (walk_object(s->data.data, s->data.len, 0, inner_keys, 2, v, &w) < 0)
        return;
    take_model(s, v[0]);
    if (apply_usage(s, v[1]) == 0)
        s->complete = 1;
}

/* ---- SSE framing ----------------------------------------------------- */

/* WHATWG HTML "event stream interpretation": lines end in CRLF, LF or CR;
 * a blank line dispatches; "name:value" with one optional space after the
 * colon; a line starting with ':' is a comment; a line without a colon is
 * a field with an empty value. */
enum { LS_START, LS_NAME, LS_SPACE, LS_VALUE, LS_IGNORE };
enum { F_OTHER, F_EVENT, F_DATA };

/* Event names whose data may carry usage or the model, by shape. */
struct event_name {
    const char *name;
    size_t len;
};
#define EV(lit) { lit, sizeof(lit) - 1 }
static const struct event_name anthropic_events[] = {
    EV("message_start"), EV("message_delta"), { NULL, 0 }
};
static const struct event_name responses_events[] = {
    EV("response.created"), EV("response.completed"),
    EV("response.incomplete"), EV("response.failed"), { NULL, 0 }
};
#undef EV

static int interesting_name(const struct piapi_usage_scan *s)
{
    const struct event_name *e;

    if (s->shape == PIAPI_USAGE_CHAT)
        return 1;       /* chat streams name no events: look at every one */
    e = s->shape == PIAPI_USAGE_ANTHROPIC ? anthropic_events
                                          : responses_events;
    for (; e->name; e++)
        if (e->len == s->ev_name_len
            && memcmp(e->name, s->ev_name, e->len) == 0)
            return 1;
    return 0;
}

static void data_cap_exceeded(struct piapi_usage_scan *s)
{
    s->ev_lost = 1;
    piapi_buf_dispose(&s->data);
}

static void data_append(struct piapi_usage_scan *s, const char *p, size_t n)
{
    if (s->ev_skip || s->ev_lost)
        return;
    if (s->data.len + n > PIAPI_USAGE_MAX_BODY) {
        data_cap_exceeded(s);
        return;
    }
    piapi_buf_append(&s->data, p, n);
}

/* The value of the current line starts. */
static void begin_value(struct piapi_usage_scan *s)
{
    if (s->field == F_DATA) {
        if (s->ev_lines++ > 0)
            data_append(s, "\n", 1);
    } else if (s->field == F_EVENT) {
        s->ev_name_len = 0;     /* the last event: line counts */
    }
}

static void value_bytes(struct piapi_usage_scan *s, const char *p, size_t n)
{
    if (s->field == F_DATA) {
        data_append(s, p, n);
    } else if (s->field == F_EVENT) {
        /* longer than any name we look for: make sure it matches none */
        if (s->ev_name_len + n >= sizeof s->ev_name) {
            s->ev_name_len = sizeof s->ev_name - 1;
            memset(s->ev_name, 0, sizeof s->ev_name);
            return;
        }
        memcpy(s->ev_name + s->ev_name_len, p, n);
        s->ev_name_len = (unsigned char)(s->ev_name_len + n);
    }
}

/* An event: line ended: its name decides whether the data is kept. */
static void event_named(struct piapi_usage_scan *s)
{
    s->ev_named = 1;
    if (!interesting_name(s)) {
        s->ev_skip = 1;
        piapi_buf_reset(&s->data);
        return;
    }
    if (s->ev_skip && (s->ev_lines > 0 || s->ev_unread))
        s->ev_lost = 1;     /* data came under another name: it is gone */
    s->ev_skip = 0;
}

static void end_line(struct piapi_usage_scan *s, char eol)
{
    if (s->line_state != LS_IGNORE && s->field == F_EVENT)
        event_named(s);
    s->cr = eol == '\r';
    s->line_state = LS_START;
}

static void set_field(struct piapi_usage_scan *s)
{
    if (s->name_len == 4 && memcmp(s->name, "data", 4) == 0)
        s->field = F_DATA;
    else if (s->name_len == 5 && memcmp(s->name, "event", 5) == 0)
        s->field = F_EVENT;
    else
        s->field = F_OTHER;
}

static void reset_event(struct piapi_usage_scan *s)
{
    s->ev_named = 0;
    s->ev_skip = 0;
    s->ev_lost = 0;
    s->ev_pass = 0;
    s->ev_unread = 0;
    s->ev_lines = 0;
    s->ev_name_len = 0;
    /* one huge event must not pin its memory for the rest of the stream */
    if (s->data.cap > 65536)
        piapi_buf_dispose(&s->data);
    else
        piapi_buf_reset(&s->data);
    if (s->hold.cap > 65536)
        piapi_buf_dispose(&s->hold);
    else
        piapi_buf_reset(&s->hold);
}

/* A blank line ended the event whose bytes are hold + data[*start, end).
 * Stripping, those go out unless the event is the usage-only chunk. */
static void dispatch(struct piapi_usage_scan *s, const char *data,
                     size_t *start, size_t end, struct piapi_buf *out)
{
    int drop = 0;
    /* an event with no data line dispatches nothing (the SSE rules) */
    if (s->ev_lines > 0 && !s->ev_skip && !s->ev_lost)
        drop = handle_event(s);
    if (s->strip) {
        if (!drop) {
            piapi_buf_append(out, s->hold.data, s->hold.len);
            piapi_buf_append(out, data + *start, end - *start);
        }
        /* a LF right after this CR still belongs to this event */
        s->lf_keep = s->cr ? (drop ? 2 : 1) : 0;
    }
    *start = end;
    reset_event(s);
}

/* Index of the first CR or LF in p[i, n), or n. */
static size_t find_eol(const char *p, size_t n, size_t i)
{
    const char *lf = memchr(p + i, '\n', n - i);
    size_t end = lf ? (size_t)(lf - p) : n;
    const char *cr = memchr(p + i, '\r', end - i);
    return cr ? (size_t)(cr - p) : end;
}

/* One byte at a line's start. */
static void line_start(struct piapi_usage_scan *s, const char *data,
                       size_t *i, size_t *start, struct piapi_buf *out)
{
    char c = data[*i];

    if (s->cr && c == '\n') {       /* the LF of a CRLF */
        s->cr = 0;
        if (s->lf_keep) {
            if (s->lf_keep == 1)
                piapi_buf_putc(out, '\n');
            *start = *i + 1;
        }
        s->lf_keep = 0;
        (*i)++;
        return;
    }
    s->cr = 0;
    s->lf_keep = 0;
    if (c == '\n' || c == '\r') {
        (*i)++;
        s->cr = c == '\r';
        dispatch(s, data, start, *i, out);
        return;
    }
    if (c == ':') {
        s->line_state = LS_IGNORE;
        (*i)++;
        return;
    }
    /* A skipped event's data is not read; only a later event: line could
     * change its name (the last one counts), so just those are parsed. */
    if (s->ev_skip && c != 'e') {
        s->ev_unread = 1;
        s->line_state = LS_IGNORE;
        return;
    }
    s->line_state = LS_NAME;
    s->name_len = 0;
}

/* Field-name bytes, up to the colon or the line's end. */
static void line_name(struct piapi_usage_scan *s, const char *data, size_t n,
                      size_t *i)
{
    /* the usual lines, whole in this piece: no byte-wise walk */
    if (s->name_len == 0 && n - *i >= 6) {
        if (memcmp(data + *i, "data:", 5) == 0) {
            memcpy(s->name, "data", 4);
            s->name_len = 4;
            *i += 4;
        } else if (memcmp(data + *i, "event:", 6) == 0) {
            memcpy(s->name, "event", 5);
            s->name_len = 5;
            *i += 5;
        }
    }
    while (*i < n) {
        char c = data[(*i)++];
        if (c == ':') {
            set_field(s);
            s->line_state = LS_SPACE;
            return;
        }
        if (c == '\n' || c == '\r') {   /* "data" alone: an empty value */
            set_field(s);
            begin_value(s);
            end_line(s, c);
            return;
        }
        if (s->name_len < sizeof s->name)
            s->name[s->name_len] = c;
        if (s->name_len < 255)
            s->name_len++;
    }
}

static void sse_feed(struct piapi_usage_scan *s, const char *data, size_t n,
                     struct piapi_buf *out)
{
    size_t i = 0, start = 0;

    while (i < n) {
        switch (s->line_state) {
        case LS_START:
            line_start(s, data, &i, &start, out);
            break;
        case LS_NAME:
            line_name(s, data, n, &i);
            break;
        case LS_SPACE:
            if (data[i] == ' ')
                i++;
            begin_value(s);
            s->line_state = LS_VALUE;
            break;
        case LS_VALUE:
        case LS_IGNORE: {
            size_t e = find_eol(data, n, i);
            if (s->line_state == LS_VALUE)
                value_bytes(s, data + i, e - i);
            i = e;
            if (e < n)
                end_line(s, data[i++]);
            break;
        }
        }
    }
    if (!s->strip)
        return;
    /* the incomplete event waits, unless it grew too big to be a usage
     * chunk: then it passes as it comes and counts for nothing */
    if (!s->ev_pass && s->hold.len + (n - start) > PIAPI_USAGE_MAX_HOLD) {
        s->ev_pass = 1;
        data_cap_exceeded(s);
        piapi_buf_append(out, s->hold.data, s->hold.len);
        piapi_buf_dispose(&s->hold);
    }
    if (s->ev_pass)
        piapi_buf_append(out, data + start, n - start);
    else
        piapi_buf_append(&s->hold, data + start, n - start);
}

/* ---- the scan -------------------------------------------------------- */

void piapi_usage_scan_init(struct piapi_usage_scan *s,
                           enum piapi_usage_shape shape, int event_stream,
                           int strip)
{
    memset(s, 0, sizeof *s);
    s->shape = shape;
    s->event_stream = event_stream != 0;
    s->relay = strip != 0;
    /* only a Chat event stream ever loses an event; for everything else
     * stripping is relaying every byte at once */
    s->strip = strip && event_stream && shape == PIAPI_USAGE_CHAT;
}

void piapi_usage_feed(struct piapi_usage_scan *s, const char *data, size_t n,
                      struct piapi_buf *out)
{
    if (n == 0)
        return;
    if (s->relay && !s->strip)
        piapi_buf_append(out, data, n);
    if (s->shape == PIAPI_USAGE_NONE)
        return;
    if (s->event_stream) {
        sse_feed(s, data, n, out);
        return;
    }
    if (s->gave_up)
        return;
    if (s->data.len + n > PIAPI_USAGE_MAX_BODY) {
        s->gave_up = 1;
        piapi_buf_dispose(&s->data);
        return;
    }
    piapi_buf_append(&s->data, data, n);
}

static void result(const struct piapi_usage_scan *s, struct piapi_usage *u)
{
    const int64_t *r = s->raw;
#define HAVE(slot) (s->have & (1u << (slot)))

    memset(u, 0, sizeof *u);
    u->input = r[R_INPUT];
    u->output = r[R_OUTPUT];
    u->cache_read = r[R_CACHE_READ];
    if (s->shape != PIAPI_USAGE_ANTHROPIC) {
        /* OpenAI's cached tokens are a part of its prompt tokens */
        u->input = r[R_INPUT] > r[R_CACHE_READ] ? r[R_INPUT] - r[R_CACHE_READ]
                                                : 0;
    } else {
        u->cache_write = HAVE(R_CACHE_WRITE) ? r[R_CACHE_WRITE]
                                             : r[R_CACHE_5M] + r[R_CACHE_1H];
        if (u->cache_write > PIAPI_USAGE_MAX_TOKENS)  /* a sum of two clamped parts */
            u->cache_write = PIAPI_USAGE_MAX_TOKENS;
        u->cache_write_1h = r[R_CACHE_1H] < u->cache_write ? r[R_CACHE_1H]
                                                          : u->cache_write;
        /* message_start's output_tokens is a placeholder, not what was
         * generated: a stream cut before message_delta has no output
         * count, and none is guessed */
        if (!s->complete)
            u->output = 0;
    }
#undef HAVE
    memcpy(u->model, s->model, sizeof u->model);
    u->found = s->have != 0;
    u->complete = s->complete;
}

void piapi_usage_finish(struct piapi_usage_scan *s, struct piapi_buf *out,
                        struct piapi_usage *u)
{
    if (s->strip) {
        /* a cut stream's tail goes out as it came; like an SSE client,
         * the scan never reads an event that did not end */
        piapi_buf_append(out, s->hold.data, s->hold.len);
        piapi_buf_reset(&s->hold);
    } else if (!s->event_stream && s->shape != PIAPI_USAGE_NONE
               && !s->gave_up && s->data.len) {
        handle_body(s);
        piapi_buf_reset(&s->data);
    }
    result(s, u);
}

size_t piapi_usage_held(const struct piapi_usage_scan *s)
{
    return s->hold.len;
}

void piapi_usage_scan_dispose(struct piapi_usage_scan *s)
{
    piapi_buf_dispose(&s->data);
    piapi_buf_dispose(&s->hold);
}
