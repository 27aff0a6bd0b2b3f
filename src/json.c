/* JSON string escaping that holds up against hostile bytes, and the error
 * body piapi returns. Strings are copied in runs: only bytes that need an
 * escape or a replacement leave the memcpy path. */
#include "piapi/json.h"

#include <string.h>

/* U+FFFD REPLACEMENT CHARACTER, what invalid UTF-8 turns into. */
static const char replacement[] = "\xEF\xBF\xBD";

/* Length (2..4) of the well-formed UTF-8 sequence starting at s, or 0.
 * Follows RFC 3629 section 4 / Unicode table 3-7 exactly: the second byte's
 * range excludes overlongs (E0, F0), surrogates (ED) and code points past
 * U+10FFFF (F4), so no separate decode-and-check pass is needed. */
static size_t utf8_sequence(const unsigned char *s, size_t n)
{
    unsigned char c = s[0];
    size_t want;
    unsigned char lo = 0x80, hi = 0xBF;

    if (c >= 0xC2 && c <= 0xDF) {
        want = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        want = 3;
        if (c == 0xE0)
            lo = 0xA0;
        else if (c == 0xED)
            hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        want = 4;
        if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F;
    } else {
        return 0;       /* ASCII is handled by the caller; 80..C1, F5..FF never lead */
    }
    if (n < want || s[1] < lo || s[1] > hi)
        return 0;
    for (size_t i = 2; i < want; i++)
        if (s[i] < 0x80 || s[i] > 0xBF)
            return 0;
    return want;
}

/* 1 for ASCII bytes that are copied as they are. */
static int ascii_plain(unsigned char c)
{
    return c >= 0x20 && c < 0x7F && c != '"' && c != '\\';
}

/* Appends the escape for one ASCII byte that is not plain. */
static void escape_ascii(struct piapi_buf *out, unsigned char c)
{
    static const char hex[] = "0123456789abcdef";
    char esc[6] = { '\\', 0, 0, 0, 0, 0 };

    switch (c) {
    case '"':  esc[1] = '"'; break;
    case '\\': esc[1] = '\\'; break;
    case '\n': esc[1] = 'n'; break;
    case '\r': esc[1] = 'r'; break;
    case '\t': esc[1] = 't'; break;
    case '\b': esc[1] = 'b'; break;
    case '\f': esc[1] = 'f'; break;
    default:
        /* Other controls and DEL: DEL is legal raw JSON, but escaping it
         * keeps log lines free of anything a terminal might act on. */
        memcpy(esc, "\\u00", 4);
        esc[4] = hex[c >> 4];
        esc[5] = hex[c & 0xF];
        piapi_buf_append(out, esc, 6);
        return;
    }
    piapi_buf_append(out, esc, 2);
}

void piapi_json_string(struct piapi_buf *out, const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;

    piapi_buf_putc(out, '"');
    while (i < len) {
        size_t run = i;

        /* Extend the run over everything that passes through untouched. */
        while (run < len) {
            if (p[run] < 0x80) {
                if (!ascii_plain(p[run]))
                    break;
                run++;
            } else {
                size_t n = utf8_sequence(p + run, len - run);
                if (n == 0)
                    break;
                run += n;
            }
        }
        if (run > i)
            piapi_buf_append(out, p + i, run - i);
        i = run;
        if (i == len)
            break;
        if (p[i] < 0x80)
            escape_ascii(out, p[i]);
        else
            /* One U+FFFD per invalid byte; resync on the next byte so a
             * stray lead byte cannot swallow the valid text after it. */
            piapi_buf_append(out, replacement, 3);
        i++;
    }
    piapi_buf_putc(out, '"');
}

size_t piapi_json_string_bound(const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t n = 2;

    /* Per input byte: 6 for \u00XX, 2 for a short escape, 3 for U+FFFD (a
     * valid multibyte sequence needs no more than its own length). */
    for (size_t i = 0; i < len; i++) {
        if (p[i] >= 0x80)
            n += 3;
        else if (ascii_plain(p[i]))
            n += 1;
        else
            n += 6;
    }
    return n;
}

void piapi_json_error(struct piapi_buf *out, const char *type,
                      const char *message)
{
    if (!type)
        type = "api_error";
    if (!message)
        message = "";
    piapi_buf_puts(out, "{\"type\":\"error\",\"error\":{\"type\":");
    piapi_json_string(out, type, strlen(type));
    piapi_buf_puts(out, ",\"message\":");
    piapi_json_string(out, message, strlen(message));
    piapi_buf_puts(out, "}}");
}
