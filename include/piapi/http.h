/* HTTP vocabulary shared by the modules that answer clients. */
#ifndef PIAPI_HTTP_H
#define PIAPI_HTTP_H

/* Reason phrase for a status; nginx copies the FastCGI Status line
 * verbatim, so piapi always sends one. */
const char *piapi_http_reason(int status);

/* The error "type" of piapi's own JSON errors, in the vocabulary both the
 * Anthropic and OpenAI SDKs understand. */
const char *piapi_http_error_type(int status);

#endif
