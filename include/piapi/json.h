/* The small JSON writer piapi needs on its hot path: string escaping that
 * survives hostile input, and the error body both SDK families read. */
#ifndef PIAPI_JSON_H
#define PIAPI_JSON_H

#include <stddef.h>
#include "piapi/util.h"

/* Appends `s` as a quoted JSON string. Control characters become \uXXXX
 * (or \n, \t, ...), quotes and backslashes are escaped, and bytes that are
 * not valid UTF-8 become U+FFFD, so the output is always valid JSON. */
void piapi_json_string(struct piapi_buf *out, const char *s, size_t len);

/* An upper bound on what piapi_json_string(out, s, len) appends (quotes
 * included), so a writer with fixed inline space can reserve before. */
size_t piapi_json_string_bound(const char *s, size_t len);

/* {"type":"error","error":{"type":"<type>","message":"<message>"}}
 * type NULL → "api_error", message NULL → "". */
void piapi_json_error(struct piapi_buf *out, const char *type,
                      const char *message);

#endif
