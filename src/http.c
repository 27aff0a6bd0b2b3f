#include "piapi/http.h"

#include <stddef.h>

struct status_text {
    int status;
    const char *reason;
    const char *error_type;
};

static const struct status_text statuses[] = {
    { 100, "Continue", NULL },
    { 101, "Switching Protocols", NULL },
    { 200, "OK", NULL },
    { 201, "Created", NULL },
    { 202, "Accepted", NULL },
    { 204, "No Content", NULL },
    { 206, "Partial Content", NULL },
    { 301, "Moved Permanently", NULL },
    { 302, "Found", NULL },
    { 303, "See Other", NULL },
    { 304, "Not Modified", NULL },
    { 307, "Temporary Redirect", NULL },
    { 308, "Permanent Redirect", NULL },
    { 400, "Bad Request", "invalid_request_error" },
    { 401, "Unauthorized", "authentication_error" },
    { 403, "Forbidden", "permission_error" },
    { 404, "Not Found", "not_found_error" },
    { 405, "Method Not Allowed", "invalid_request_error" },
    { 408, "Request Timeout", "timeout_error" },
    { 409, "Conflict", "invalid_request_error" },
    { 411, "Length Required", "invalid_request_error" },
    { 413, "Payload Too Large", "request_too_large" },
    { 414, "URI Too Long", "invalid_request_error" },
    { 415, "Unsupported Media Type", "invalid_request_error" },
    { 422, "Unprocessable Entity", "invalid_request_error" },
    { 429, "Too Many Requests", "rate_limit_error" },
    { 431, "Request Header Fields Too Large", "invalid_request_error" },
    { 500, "Internal Server Error", "api_error" },
    { 501, "Not Implemented", "api_error" },
    { 502, "Bad Gateway", "api_error" },
    { 503, "Service Unavailable", "overloaded_error" },
    { 504, "Gateway Timeout", "timeout_error" },
    { 529, "Site Overloaded", "overloaded_error" },
};

static const struct status_text *lookup(int status)
{
    for (size_t i = 0; i < sizeof statuses / sizeof statuses[0]; i++)
        if (statuses[i].status == status)
            return &statuses[i];
    return NULL;
}

const char *piapi_http_reason(int status)
{
    const struct status_text *s = lookup(status);
    if (s)
        return s->reason;
    switch (status / 100) {
    case 1: return "Informational";
    case 2: return "Success";
    case 3: return "Redirection";
    case 4: return "Client Error";
    default: return "Server Error";
    }
}

const char *piapi_http_error_type(int status)
{
    const struct status_text *s = lookup(status);
    if (s && s->error_type)
        return s->error_type;
    return status >= 500 ? "api_error" : "invalid_request_error";
}
