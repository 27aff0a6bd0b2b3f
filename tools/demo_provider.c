/* The demo provider `make run` puts behind the untouched example config, so
 * that a first request through piapi gets a real answer instead of a 502.
 * It is not part of piapi (libc only, built as build/demo-provider) and it
 * listens on 127.0.0.1 only: scripts/run.sh starts it solely when the config
 * in use is byte for byte config.yaml.example, whose providers are
 * placeholders anyway.
 *
 * It speaks just enough of the providers' formats for their clients to show
 * an answer, always the same short text:
 *   POST .../messages           Anthropic Messages
 *   POST .../chat/completions   OpenAI Chat Completions
 *   POST .../responses          OpenAI Responses
 *   POST .../completions        OpenAI legacy completions
 *   GET  .../models             a one-model list
 * With "stream": true in the body it answers with server-sent events, one
 * event per word, written as they are produced (a pause between them), so
 * the stream visibly arrives event by event through piapi.
 *
 *   demo-provider --port-file FILE [--port N]   (N = 0: any free port)
 *
 * The bound port is written to FILE once the socket listens. One thread per
 * connection (at most MAX_CONNS); HTTP/1.1 keep-alive for plain answers, a
 * stream ends with the connection.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define HEAD_MAX   (64 * 1024)     /* request line + headers */
#define BODY_MAX   (1024 * 1024)   /* a demo needs no more */
#define MAX_CONNS  256
#define IDLE_SECS  30              /* a silent client loses its thread */
#define WORD_PAUSE_US 60000        /* between two streamed events */
#define MODEL_MAX  64

static const char *const ANSWER_WORDS[] = {
    "Hello", "from", "piapi's", "demo", "provider!", "piapi", "checked", "your",
    "member", "key,", "picked", "your", "provider", "service", "and", "forwarded",
    "this", "request", "with", "the", "provider", "key", "injected.", "Edit",
    "config.yaml", "to", "reach", "a", "real", "provider.",
};
#define N_WORDS (sizeof(ANSWER_WORDS) / sizeof(ANSWER_WORDS[0]))

static atomic_int n_conns;
static atomic_ulong n_requests;

struct request {
    char method[16];
    char path[1024];        /* without the query */
    char model[MODEL_MAX];
    int stream;             /* "stream": true in the body */
    int keep_alive;
    size_t body_len;
};

/* ---- output -------------------------------------------------------------- */

static int write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* printf to the socket; the few messages here fit 8 KiB (the answer text is
 * a constant and the model name is bounded). */
__attribute__((format(printf, 2, 3)))
static int sendf(int fd, const char *fmt, ...)
{
    char buf[8192];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof(buf))
        return -1;
    return write_all(fd, buf, (size_t)n);
}

static unsigned long next_id(void)
{
    return atomic_fetch_add(&n_requests, 1) + 1;
}

static void answer_text(char *out, size_t cap)
{
    size_t len = 0;
    out[0] = '\0';
    for (size_t i = 0; i < N_WORDS; i++)
        len += (size_t)snprintf(out + len, cap - len, "%s%s", i ? " " : "", ANSWER_WORDS[i]);
}

static int send_json(int fd, const struct request *rq, int status, const char *body)
{
    const char *reason = status == 200 ? "OK" : status == 404 ? "Not Found"
                       : status == 413 ? "Payload Too Large" : "Bad Request";
    /* a final newline, so that curl's output ends the line in a terminal */
    if (sendf(fd, "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                  "Content-Length: %zu\r\nx-request-id: demo-%lu\r\n%s\r\n",
              status, reason, strlen(body) + 1, next_id(),
              rq->keep_alive ? "" : "Connection: close\r\n") < 0 ||
        write_all(fd, body, strlen(body)) < 0)
        return -1;
    return write_all(fd, "\n", 1);
}

static int start_stream(int fd)
{
    return sendf(fd, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     "Cache-Control: no-cache\r\nx-request-id: demo-%lu\r\n"
                     "Connection: close\r\n\r\n", next_id());
}

static void pause_between_events(void)
{
    usleep(WORD_PAUSE_US);
}

/* ---- the formats ----------------------------------------------------------- */

static int anthropic_messages(int fd, const struct request *rq)
{
    char text[1024], body[4096];
    answer_text(text, sizeof(text));
    size_t in_tokens = rq->body_len / 4 + 1;
    if (!rq->stream) {
        snprintf(body, sizeof(body),
                 "{\"id\":\"msg_demo\",\"type\":\"message\",\"role\":\"assistant\","
                 "\"model\":\"%s\",\"content\":[{\"type\":\"text\",\"text\":\"%s\"}],"
                 "\"stop_reason\":\"end_turn\",\"stop_sequence\":null,"
                 "\"usage\":{\"input_tokens\":%zu,\"output_tokens\":%zu}}",
                 rq->model, text, in_tokens, N_WORDS);
        return send_json(fd, rq, 200, body);
    }
    if (start_stream(fd) < 0 ||
        sendf(fd, "event: message_start\ndata: {\"type\":\"message_start\",\"message\":"
                  "{\"id\":\"msg_demo\",\"type\":\"message\",\"role\":\"assistant\","
                  "\"model\":\"%s\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,"
                  "\"usage\":{\"input_tokens\":%zu,\"output_tokens\":1}}}\n\n"
                  "event: content_block_start\ndata: {\"type\":\"content_block_start\","
                  "\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
              rq->model, in_tokens) < 0)
        return -1;
    for (size_t i = 0; i < N_WORDS; i++) {
        pause_between_events();
        if (sendf(fd, "event: content_block_delta\ndata: {\"type\":\"content_block_delta\","
                      "\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"%s%s\"}}\n\n",
                  i ? " " : "", ANSWER_WORDS[i]) < 0)
            return -1;
    }
    sendf(fd, "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n"
              "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":"
              "{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},"
              "\"usage\":{\"output_tokens\":%zu}}\n\n"
              "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n", N_WORDS);
    return -1;      /* the stream ends with the connection */
}

static int openai_chat(int fd, const struct request *rq)
{
    char text[1024], body[4096];
    answer_text(text, sizeof(text));
    long now = (long)time(NULL);
    size_t in_tokens = rq->body_len / 4 + 1;
    if (!rq->stream) {
        snprintf(body, sizeof(body),
                 "{\"id\":\"chatcmpl-demo\",\"object\":\"chat.completion\",\"created\":%ld,"
                 "\"model\":\"%s\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
                 "\"content\":\"%s\"},\"finish_reason\":\"stop\"}],\"usage\":"
                 "{\"prompt_tokens\":%zu,\"completion_tokens\":%zu,\"total_tokens\":%zu}}",
                 now, rq->model, text, in_tokens, N_WORDS, in_tokens + N_WORDS);
        return send_json(fd, rq, 200, body);
    }
    static const char chunk[] = "data: {\"id\":\"chatcmpl-demo\",\"object\":\"chat.completion.chunk\","
                                "\"created\":%ld,\"model\":\"%s\",\"choices\":[{\"index\":0,"
                                "\"delta\":{%s%s%s},\"finish_reason\":%s}]}\n\n";
    if (start_stream(fd) < 0 ||
        sendf(fd, chunk, now, rq->model, "\"role\":\"assistant\",\"content\":\"", "", "\"",
              "null") < 0)
        return -1;
    for (size_t i = 0; i < N_WORDS; i++) {
        char word[64];
        snprintf(word, sizeof(word), "%s%s", i ? " " : "", ANSWER_WORDS[i]);
        pause_between_events();
        if (sendf(fd, chunk, now, rq->model, "\"content\":\"", word, "\"", "null") < 0)
            return -1;
    }
    sendf(fd, chunk, now, rq->model, "", "", "", "\"stop\"");
    sendf(fd, "data: [DONE]\n\n");
    return -1;
}

static int openai_responses(int fd, const struct request *rq)
{
    char text[1024], body[4096];
    answer_text(text, sizeof(text));
    long now = (long)time(NULL);
    size_t in_tokens = rq->body_len / 4 + 1;
    const char *item = "{\"type\":\"message\",\"id\":\"msg_demo\",\"status\":\"%s\","
                       "\"role\":\"assistant\",\"content\":[%s]}";
    char part[1200], done_item[1400];
    snprintf(part, sizeof(part),
             "{\"type\":\"output_text\",\"text\":\"%s\",\"annotations\":[]}", text);
    snprintf(done_item, sizeof(done_item), item, "completed", part);
    char response[3072];
    snprintf(response, sizeof(response),
             "{\"id\":\"resp_demo\",\"object\":\"response\",\"created_at\":%ld,"
             "\"status\":\"completed\",\"model\":\"%s\",\"output\":[%s],\"usage\":"
             "{\"input_tokens\":%zu,\"output_tokens\":%zu,\"total_tokens\":%zu}}",
             now, rq->model, done_item, in_tokens, N_WORDS, in_tokens + N_WORDS);
    if (!rq->stream) {
        snprintf(body, sizeof(body), "%s", response);
        return send_json(fd, rq, 200, body);
    }
    if (start_stream(fd) < 0 ||
        sendf(fd, "event: response.created\ndata: {\"type\":\"response.created\",\"response\":"
                  "{\"id\":\"resp_demo\",\"object\":\"response\",\"created_at\":%ld,"
                  "\"status\":\"in_progress\",\"model\":\"%s\",\"output\":[]}}\n\n",
              now, rq->model) < 0 ||
        sendf(fd, "event: response.output_item.added\ndata: {\"type\":"
                  "\"response.output_item.added\",\"output_index\":0,\"item\":"
                  "{\"type\":\"message\",\"id\":\"msg_demo\",\"status\":\"in_progress\","
                  "\"role\":\"assistant\",\"content\":[]}}\n\n"
                  "event: response.content_part.added\ndata: {\"type\":"
                  "\"response.content_part.added\",\"item_id\":\"msg_demo\",\"output_index\":0,"
                  "\"content_index\":0,\"part\":{\"type\":\"output_text\",\"text\":\"\","
                  "\"annotations\":[]}}\n\n") < 0)
        return -1;
    for (size_t i = 0; i < N_WORDS; i++) {
        pause_between_events();
        if (sendf(fd, "event: response.output_text.delta\ndata: {\"type\":"
                      "\"response.output_text.delta\",\"item_id\":\"msg_demo\","
                      "\"output_index\":0,\"content_index\":0,\"delta\":\"%s%s\"}\n\n",
                  i ? " " : "", ANSWER_WORDS[i]) < 0)
            return -1;
    }
    if (sendf(fd, "event: response.output_text.done\ndata: {\"type\":"
                  "\"response.output_text.done\",\"item_id\":\"msg_demo\",\"output_index\":0,"
                  "\"content_index\":0,\"text\":\"%s\"}\n\n"
                  "event: response.content_part.done\ndata: {\"type\":"
                  "\"response.content_part.done\",\"item_id\":\"msg_demo\",\"output_index\":0,"
                  "\"content_index\":0,\"part\":%s}\n\n", text, part) < 0 ||
        sendf(fd, "event: response.output_item.done\ndata: {\"type\":"
                  "\"response.output_item.done\",\"output_index\":0,\"item\":%s}\n\n",
              done_item) < 0)
        return -1;
    sendf(fd, "event: response.completed\ndata: {\"type\":\"response.completed\","
              "\"response\":%s}\n\n", response);
    return -1;
}

static int openai_completions(int fd, const struct request *rq)
{
    char text[1024], body[4096];
    answer_text(text, sizeof(text));
    long now = (long)time(NULL);
    static const char chunk[] = "{\"id\":\"cmpl-demo\",\"object\":\"text_completion\","
                                "\"created\":%ld,\"model\":\"%s\",\"choices\":[{\"text\":"
                                "\"%s%s\",\"index\":0,\"finish_reason\":%s}]}";
    if (!rq->stream) {
        snprintf(body, sizeof(body), chunk, now, rq->model, "", text, "\"stop\"");
        return send_json(fd, rq, 200, body);
    }
    if (start_stream(fd) < 0)
        return -1;
    for (size_t i = 0; i < N_WORDS; i++) {
        char event[1024];
        snprintf(event, sizeof(event), chunk, now, rq->model, i ? " " : "", ANSWER_WORDS[i],
                 i + 1 == N_WORDS ? "\"stop\"" : "null");
        if (i)
            pause_between_events();
        if (sendf(fd, "data: %s\n\n", event) < 0)
            return -1;
    }
    sendf(fd, "data: [DONE]\n\n");
    return -1;
}

static int models(int fd, const struct request *rq)
{
    return send_json(fd, rq, 200,
                     "{\"object\":\"list\",\"data\":[{\"id\":\"piapi-demo\",\"object\":\"model\","
                     "\"type\":\"model\",\"display_name\":\"piapi demo\",\"created\":0,"
                     "\"created_at\":\"1970-01-01T00:00:00Z\",\"owned_by\":\"piapi-demo\"}],"
                     "\"has_more\":false,\"first_id\":\"piapi-demo\",\"last_id\":\"piapi-demo\"}");
}

static int error_reply(int fd, const struct request *rq, int status, const char *type,
                       const char *message)
{
    char body[512];
    snprintf(body, sizeof(body),
             "{\"type\":\"error\",\"error\":{\"type\":\"%s\",\"message\":\"demo provider: %s\"}}",
             type, message);
    return send_json(fd, rq, status, body);
}

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* 0: keep the connection for the next request; -1: close it. */
static int dispatch(int fd, const struct request *rq)
{
    int post = strcmp(rq->method, "POST") == 0;
    if (post && ends_with(rq->path, "/messages"))
        return anthropic_messages(fd, rq);
    if (post && ends_with(rq->path, "/chat/completions"))
        return openai_chat(fd, rq);
    if (post && ends_with(rq->path, "/responses"))
        return openai_responses(fd, rq);
    if (post && ends_with(rq->path, "/completions"))
        return openai_completions(fd, rq);
    if (strcmp(rq->method, "GET") == 0 && ends_with(rq->path, "/models"))
        return models(fd, rq);
    return error_reply(fd, rq, 404, "not_found_error",
                       "POST .../messages, .../chat/completions, .../responses, "
                       ".../completions or GET .../models");
}

/* ---- input ------------------------------------------------------------------ */

/* Value of header `name` in the raw header block, trimmed, or NULL. */
static const char *header_value(const char *head, const char *name, char *out, size_t cap)
{
    size_t n = strlen(name);
    for (const char *line = strstr(head, "\r\n"); line; line = strstr(line, "\r\n")) {
        line += 2;
        if (strncasecmp(line, name, n) != 0 || line[n] != ':')
            continue;
        const char *v = line + n + 1;
        while (*v == ' ' || *v == '\t')
            v++;
        size_t len = strcspn(v, "\r\n");
        while (len > 0 && (v[len - 1] == ' ' || v[len - 1] == '\t'))
            len--;
        if (len >= cap)
            len = cap - 1;
        memcpy(out, v, len);
        out[len] = '\0';
        return out;
    }
    return NULL;
}

/* "stream": true and "model": "..." from the JSON body, read loosely: the
 * demo only needs to know which kind of answer to give. The model name is
 * kept to characters that need no JSON escaping. */
static void scan_body(const char *body, size_t len, struct request *rq)
{
    const char *end = body + len;
    const char *p = memmem(body, len, "\"stream\"", 8);
    if (p) {
        p += 8;
        while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r' || *p == ':'))
            p++;
        rq->stream = end - p >= 4 && memcmp(p, "true", 4) == 0;
    }
    snprintf(rq->model, sizeof(rq->model), "piapi-demo");
    p = memmem(body, len, "\"model\"", 7);
    if (!p)
        return;
    p += 7;
    while (p < end && (*p == ' ' || *p == ':'))
        p++;
    if (p >= end || *p != '"')
        return;
    p++;
    size_t n = 0;
    while (p + n < end && n < sizeof(rq->model) - 1 &&
           (strchr("-._:/@", p[n]) || (p[n] >= '0' && p[n] <= '9') ||
            (p[n] >= 'a' && p[n] <= 'z') || (p[n] >= 'A' && p[n] <= 'Z')))
        n++;
    if (n > 0 && p + n < end && p[n] == '"') {
        memcpy(rq->model, p, n);
        rq->model[n] = '\0';
    }
}

/* Reads one request (head and body) from fd into buf, which keeps any bytes
 * of the next request at its start. 0: a request; -1: close (EOF, error, or
 * a reply was already sent). */
static int read_request(int fd, char *buf, size_t *have, struct request *rq)
{
    char *head_end;
    for (;;) {
        buf[*have] = '\0';
        head_end = strstr(buf, "\r\n\r\n");
        if (head_end)
            break;
        if (*have >= HEAD_MAX)
            return -1;
        ssize_t r = recv(fd, buf + *have, HEAD_MAX - *have, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        *have += (size_t)r;
    }
    memset(rq, 0, sizeof(*rq));
    size_t head_len = (size_t)(head_end - buf) + 4;
    char target[sizeof(rq->path)];
    if (sscanf(buf, "%15s %1023s", rq->method, target) != 2)
        return -1;
    target[strcspn(target, "?")] = '\0';
    snprintf(rq->path, sizeof(rq->path), "%s", target);

    char v[64];
    head_end[2] = '\0';     /* header_value stops at the head */
    rq->keep_alive = !(header_value(buf, "Connection", v, sizeof(v)) &&
                       strcasecmp(v, "close") == 0);
    if (header_value(buf, "Transfer-Encoding", v, sizeof(v))) {
        rq->keep_alive = 0;
        error_reply(fd, rq, 413, "request_too_large", "send a Content-Length body (up to 1 MiB)");
        return -1;
    }
    long long clen = 0;
    if (header_value(buf, "Content-Length", v, sizeof(v))) {
        char *e;
        errno = 0;
        clen = strtoll(v, &e, 10);
        if (errno || *e || clen < 0 || clen > BODY_MAX) {
            rq->keep_alive = 0;
            error_reply(fd, rq, 413, "request_too_large", "body over 1 MiB");
            return -1;
        }
    }
    if (header_value(buf, "Expect", v, sizeof(v)) && strcasecmp(v, "100-continue") == 0 &&
        write_all(fd, "HTTP/1.1 100 Continue\r\n\r\n", 25) < 0)
        return -1;

    char *body = malloc((size_t)clen + 1);
    if (!body)
        return -1;
    size_t got = *have - head_len < (size_t)clen ? *have - head_len : (size_t)clen;
    memcpy(body, buf + head_len, got);
    while (got < (size_t)clen) {
        ssize_t r = recv(fd, body + got, (size_t)clen - got, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            free(body);
            return -1;
        }
        got += (size_t)r;
    }
    rq->body_len = (size_t)clen;
    scan_body(body, rq->body_len, rq);
    free(body);
    /* keep what follows (a pipelined request) at the start of buf */
    size_t used = head_len + (size_t)clen;
    size_t rest = *have > used ? *have - used : 0;
    memmove(buf, buf + used, rest);
    *have = rest;
    return 0;
}

static void *serve_connection(void *arg)
{
    int fd = (int)(intptr_t)arg;
    char *buf = malloc(HEAD_MAX + 1);
    size_t have = 0;
    struct request rq;
    if (buf) {
        while (read_request(fd, buf, &have, &rq) == 0 && dispatch(fd, &rq) == 0 && rq.keep_alive)
            ;
    }
    free(buf);
    close(fd);
    atomic_fetch_sub(&n_conns, 1);
    return NULL;
}

/* ---- main ------------------------------------------------------------------- */

static int listen_loopback(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(fd, 128) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Written whole under a temporary name, then renamed: a reader never sees
 * half a number. */
static int write_port_file(const char *path, int lfd)
{
    struct sockaddr_in a;
    socklen_t alen = sizeof(a);
    if (getsockname(lfd, (struct sockaddr *)&a, &alen) < 0)
        return -1;
    char tmp[PATH_MAX];
    if (snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= (int)sizeof(tmp))
        return -1;
    FILE *f = fopen(tmp, "w");
    if (!f)
        return -1;
    int ok = fprintf(f, "%d\n", ntohs(a.sin_port)) > 0;
    ok = fclose(f) == 0 && ok;
    return ok && rename(tmp, path) == 0 ? 0 : -1;
}

static void spawn_connection(int cfd, pthread_attr_t *attr)
{
    struct timeval idle = { .tv_sec = IDLE_SECS };
    setsockopt(cfd, SOL_SOCKET, SO_RCVTIMEO, &idle, sizeof(idle));
    setsockopt(cfd, SOL_SOCKET, SO_SNDTIMEO, &idle, sizeof(idle));
    if (atomic_fetch_add(&n_conns, 1) >= MAX_CONNS) {
        atomic_fetch_sub(&n_conns, 1);
        close(cfd);
        return;
    }
    pthread_t t;
    if (pthread_create(&t, attr, serve_connection, (void *)(intptr_t)cfd) != 0) {
        atomic_fetch_sub(&n_conns, 1);
        close(cfd);
    }
}

static void usage(void)
{
    fprintf(stderr, "usage: demo-provider --port-file FILE [--port N]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *port_file = NULL;
    long port = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--port-file") == 0 && i + 1 < argc) {
            port_file = argv[++i];
        } else if (strcmp(argv[i], "--port") == 0 && i + 1 < argc) {
            char *e;
            port = strtol(argv[++i], &e, 10);
            if (*e || port < 0 || port > 65535)
                usage();
        } else {
            usage();
        }
    }
    if (!port_file)
        usage();
    /* never outlive the `make run` that started it */
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    signal(SIGPIPE, SIG_IGN);

    int lfd = listen_loopback((int)port);
    if (lfd < 0) {
        fprintf(stderr, "demo-provider: cannot listen on 127.0.0.1:%ld: %s\n", port,
                strerror(errno));
        return 1;
    }
    if (write_port_file(port_file, lfd) < 0) {
        fprintf(stderr, "demo-provider: cannot write %s: %s\n", port_file, strerror(errno));
        return 1;
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    for (;;) {
        int cfd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (cfd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno == EMFILE || errno == ENFILE) {   /* wait for a thread to finish */
                usleep(100000);
                continue;
            }
            fprintf(stderr, "demo-provider: accept: %s\n", strerror(errno));
            return 1;
        }
        spawn_connection(cfd, &attr);
    }
}
