/* libFuzzer target for everything piapi does with a client's request
 * before it reaches libcurl: REQUEST_URI parsing and validation, upstream
 * URL composition, credential extraction and the header policy.
 *
 * Input: the first line is REQUEST_URI, every further line one FastCGI
 * param ("NAME=value"). Invariants checked: an accepted path never carries
 * a dot segment or an encoded slash into the upstream URL, and the
 * member's key never appears in the upstream query or headers. */
#include <curl/curl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "piapi/headers.h"
#include "piapi/route.h"

#define MEMBER_KEY "member-secret-key"

static const struct piapi_service svc = {
    .type = "cx", .base_url = "https://u.example/v1?ver=1",
    .auth = { .mode = PIAPI_AUTH_QUERY, .name = "api_key", .prefix = "" },
};
static const struct piapi_service hsvc = {
    .type = "cx", .base_url = "https://u.example/v1",
    .auth = { .mode = PIAPI_AUTH_HEADER, .name = "Authorization", .prefix = "Bearer " },
};

static char **split_lines(char *text, size_t *count)
{
    size_t n = 1;
    for (char *p = text; *p; p++)
        n += *p == '\n';
    char **v = calloc(n + 1, sizeof *v);
    size_t i = 0;
    for (char *line = text; line && i < n; i++) {
        v[i] = line;
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = '\0';
        line = nl ? nl + 1 : NULL;
    }
    *count = i;
    return v;
}

/* The path part is the client's own business (it chose what to put in
 * it); the query must never carry the member's key. */
static void check_url(const char *url)
{
    const char *q = strchr(url, '?');
    size_t path_len = q ? (size_t)(q - url) : strlen(url);
    char *path = strndup(url, path_len);
    size_t n = strlen(path);
    int dots = strstr(path, "/../") || strstr(path, "/./") ||
               (n >= 3 && strcmp(path + n - 3, "/..") == 0) ||
               (n >= 2 && strcmp(path + n - 2, "/.") == 0);
    if (dots || strcasestr(path, "%2f") || strcasestr(path, "%5c") ||
        strchr(path, '\\') || (q && strstr(q, MEMBER_KEY)))
        abort();
    free(path);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 1);
    memcpy(text, data, size);
    text[size] = '\0';
    size_t n;
    char **lines = split_lines(text, &n);
    char **envp = lines + 1;

    struct piapi_route_target t;
    const char *why;
    if (piapi_route_parse(lines[0], &t, &why) == PIAPI_ROUTE_OK) {
        struct piapi_route_url url = {0};
        piapi_route_upstream_url(&url, &svc, &t, "sk-prov", MEMBER_KEY, strlen(MEMBER_KEY));
        check_url(url.buf.data);
        struct piapi_buf red = {0};
        piapi_route_redacted(&url, &red);
        /* the injected key is the last parameter, and the only one named
         * like the service's auth parameter */
        static const char tail[] = "api_key=REDACTED";
        if (red.len < sizeof tail || strcmp(red.data + red.len - (sizeof tail - 1), tail) != 0)
            abort();
        char *q = strchr(url.buf.data, '?');
        int named = 0;
        for (char *p = q; p; p = strchr(p + 1, '&'))
            named += strncmp(p + 1, "api_key=", 8) == 0 || strcmp(p + 1, "api_key") == 0 ||
                     strncmp(p + 1, "api_key&", 8) == 0;
        if (named != 1)
            abort();
        piapi_buf_dispose(&red);
        piapi_buf_dispose(&url.buf);
    }

    struct piapi_client_keys keys;
    piapi_headers_client_keys(envp, &keys);
    struct curl_slist *list = NULL;
    if (piapi_headers_forward(envp, &hsvc, "sk-prov", "rid", &list, &why) == 0) {
        for (struct curl_slist *l = list; l; l = l->next) {
            if (strchr(l->data, '\r') || strchr(l->data, '\n'))
                abort();
            if (strncasecmp(l->data, "x-api-key", 9) == 0 &&
                (l->data[9] == ':' || l->data[9] == ';'))
                abort();
        }
        curl_slist_free_all(list);
    }
    free(lines);
    free(text);
    return 0;
}
