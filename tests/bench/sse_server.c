/* Mock SSE upstream for the benchmark: one epoll thread, HTTP/1.1 with
 * keep-alive. Any request except GET /stats is answered with a chunked
 * text/event-stream of N events: the headers and the first event at once,
 * then one event every INTERVAL ms (measured from the previous write, so a
 * late tick delays the rest of that stream instead of bunching events).
 * The last event is "data: [DONE]". It counts accepted connections and
 * requests itself; GET /stats answers
 *   accepts N requests N streams N active N
 *
 *   sse_server PORT [CHUNKS [INTERVAL_MS]]
 *
 * Loopback only. Build: cc -O2 -o sse_server sse_server.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define INBUF 16384

struct conn {
    int fd;
    char in[INBUF];
    size_t in_len;
    long long body_left;    /* request body bytes still to skip */
    int streaming;          /* events left to send, 0 when idle */
    int sent;               /* events sent on this stream */
    int close_after;        /* Connection: close */
    char *out;              /* unsent output */
    size_t out_len, out_cap;
    int want_out;
    int64_t due;            /* next event, ns */
    struct conn *prev, *next;  /* timer list, ordered by due */
    int in_list;
};

static int chunks = 50;
static int64_t interval_ns = 20 * 1000000LL;
static int ep;
static struct conn *head, *tail;
static unsigned long long n_accepts, n_requests, n_streams, n_active;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void list_remove(struct conn *c)
{
    if (!c->in_list)
        return;
    if (c->prev) c->prev->next = c->next; else head = c->next;
    if (c->next) c->next->prev = c->prev; else tail = c->prev;
    c->prev = c->next = NULL;
    c->in_list = 0;
}

/* due = now + interval is never earlier than anything already queued, so
 * appending keeps the list sorted. */
static void list_append(struct conn *c, int64_t due)
{
    c->due = due;
    c->prev = tail;
    c->next = NULL;
    if (tail) tail->next = c; else head = c;
    tail = c;
    c->in_list = 1;
}

static void conn_close(struct conn *c)
{
    list_remove(c);
    close(c->fd);
    free(c->out);
    free(c);
    n_active--;
}

static void set_events(struct conn *c, int want_out)
{
    if (c->want_out == want_out)
        return;
    struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP | (want_out ? EPOLLOUT : 0),
                              .data.ptr = c };
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = want_out;
}

/* Returns -1 when the connection died. */
static int flush_out(struct conn *c)
{
    while (c->out_len) {
        ssize_t w = write(c->fd, c->out, c->out_len);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {
                set_events(c, 1);
                return 0;
            }
            return -1;
        }
        memmove(c->out, c->out + w, c->out_len - (size_t)w);
        c->out_len -= (size_t)w;
    }
    set_events(c, 0);
    return 0;
}

static void out_append(struct conn *c, const char *s, size_t n)
{
    if (c->out_len + n > c->out_cap) {
        c->out_cap = (c->out_len + n) * 2 + 256;
        c->out = realloc(c->out, c->out_cap);
        if (!c->out)
            abort();
    }
    memcpy(c->out + c->out_len, s, n);
    c->out_len += n;
}

/* Usage as Anthropic reports it: message_start carries the input side,
 * message_delta the cumulative totals. */
#define USAGE_IN "\"input_tokens\":231,\"cache_creation_input_tokens\":64," \
                 "\"cache_read_input_tokens\":1024"

/* Event i of CHUNKS in Anthropic Messages streaming shape:
 *   0          message_start (model, usage)
 *   1          content_block_start
 *   2..N-4     content_block_delta (text padded so an event is ~186 bytes,
 *              the size of the chat.completion.chunk events used before)
 *   N-3        content_block_stop
 *   N-2        message_delta (stop_reason, cumulative usage)
 *   N-1        message_stop */
static int format_event(char *ev, size_t cap, int i)
{
    if (i == 0)
        return snprintf(ev, cap,
                        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":"
                        "{\"id\":\"msg_bench01\",\"type\":\"message\",\"role\":\"assistant\","
                        "\"model\":\"claude-bench-2024-01-01\",\"content\":[],"
                        "\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{" USAGE_IN
                        ",\"output_tokens\":1}}}\n\n");
    if (i == 1)
        return snprintf(ev, cap,
                        "event: content_block_start\ndata: {\"type\":\"content_block_start\","
                        "\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n");
    if (i == chunks - 3)
        return snprintf(ev, cap,
                        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\","
                        "\"index\":0}\n\n");
    if (i == chunks - 2)
        return snprintf(ev, cap,
                        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":"
                        "{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{"
                        USAGE_IN ",\"output_tokens\":%d}}\n\n", 2 * (chunks - 5));
    if (i == chunks - 1)
        return snprintf(ev, cap, "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
    return snprintf(ev, cap,
                    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\","
                    "\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"token %04d of "
                    "the answer, streamed a few words at a time by the model. \"}}\n\n", i - 2);
}

static void append_event(struct conn *c)
{
    char ev[640], chunk[700];
    int n = format_event(ev, sizeof ev, c->sent);
    int m = snprintf(chunk, sizeof chunk, "%x\r\n%s\r\n", n, ev);
    out_append(c, chunk, (size_t)m);
    c->sent++;
    c->streaming--;
    if (!c->streaming)
        out_append(c, "0\r\n\r\n", 5);
}

static int send_event(struct conn *c)
{
    append_event(c);
    if (c->streaming)
        list_append(c, now_ns() + interval_ns);
    else
        n_streams++;
    if (flush_out(c) < 0)
        return -1;
    if (!c->streaming && c->close_after) {
        shutdown(c->fd, SHUT_WR);
        return -1;
    }
    return 0;
}

/* Parses complete requests from c->in. Returns -1 to close. */
static int handle_input(struct conn *c)
{
    for (;;) {
        if (c->body_left > 0) {
            size_t skip = c->in_len < (size_t)c->body_left ? c->in_len : (size_t)c->body_left;
            memmove(c->in, c->in + skip, c->in_len - skip);
            c->in_len -= skip;
            c->body_left -= (long long)skip;
            if (c->body_left > 0)
                return 0;
        }
        if (c->streaming || !c->in_len)
            return 0;  /* pipelined input waits for the stream to end */
        char *end = memmem(c->in, c->in_len, "\r\n\r\n", 4);
        if (!end)
            return c->in_len >= INBUF ? -1 : 0;
        size_t hlen = (size_t)(end - c->in) + 4;
        long long cl = 0;
        int is_stats = 0, close_after = 0;
        *end = '\0';
        if (strncmp(c->in, "GET /stats", 10) == 0)
            is_stats = 1;
        for (char *line = strstr(c->in, "\r\n"); line; line = strstr(line + 2, "\r\n")) {
            char *h = line + 2;
            if (strncasecmp(h, "content-length:", 15) == 0)
                cl = atoll(h + 15);
            else if (strncasecmp(h, "connection:", 11) == 0 && strcasestr(h + 11, "close"))
                close_after = 1;
            else if (strncasecmp(h, "transfer-encoding:", 18) == 0)
                return -1;  /* not needed by the bench */
        }
        if (strstr(c->in, " HTTP/1.0"))
            close_after = 1;
        memmove(c->in, c->in + hlen, c->in_len - hlen);
        c->in_len -= hlen;
        c->body_left = cl;
        c->close_after = close_after;
        n_requests++;
        if (is_stats) {
            char body[256], resp[512];
            int bn = snprintf(body, sizeof body, "accepts %llu requests %llu streams %llu active %llu\n",
                              n_accepts, n_requests, n_streams, n_active);
            int rn = snprintf(resp, sizeof resp,
                              "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                              "Content-Length: %d\r\n\r\n%s", bn, body);
            out_append(c, resp, (size_t)rn);
            if (flush_out(c) < 0)
                return -1;
            if (close_after) {
                shutdown(c->fd, SHUT_WR);
                return -1;
            }
            continue;
        }
        static const char hdr[] =
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            "Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n";
        out_append(c, hdr, sizeof hdr - 1);
        c->streaming = chunks;
        c->sent = 0;
        if (send_event(c) < 0)
            return -1;
    }
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: sse_server PORT [CHUNKS [INTERVAL_MS]]\n");
        return 2;
    }
    int port = atoi(argv[1]);
    if (argc > 2) chunks = atoi(argv[2]);
    if (argc > 3) interval_ns = atoll(argv[3]) * 1000000LL;
    if (chunks < 6) chunks = 6;  /* the frame of an Anthropic stream */
    signal(SIGPIPE, SIG_IGN);

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (bind(lfd, (struct sockaddr *)&a, sizeof a) != 0 || listen(lfd, 4096) != 0) {
        perror("sse_server: bind/listen");
        return 1;
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = { .events = EPOLLIN, .data.ptr = NULL };
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &lev);
    fprintf(stderr, "sse_server: 127.0.0.1:%d, %d events every %lld ms\n", port, chunks,
            (long long)(interval_ns / 1000000));

    struct epoll_event evs[256];
    for (;;) {
        /* Timers first: every stream whose next event is due. */
        int64_t now = now_ns();
        while (head && head->due <= now) {
            struct conn *c = head;
            list_remove(c);
            if (send_event(c) < 0 || (!c->streaming && handle_input(c) < 0))
                conn_close(c);
        }
        struct timespec to, *top = NULL;
        if (head) {
            int64_t d = head->due - now_ns();
            if (d < 0) d = 0;
            to.tv_sec = d / 1000000000LL;
            to.tv_nsec = d % 1000000000LL;
            top = &to;
        }
        int n = epoll_pwait2(ep, evs, 256, top, NULL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("epoll_pwait2");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (!c) {
                for (;;) {
                    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (fd < 0)
                        break;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    c = calloc(1, sizeof *c);
                    c->fd = fd;
                    struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP, .data.ptr = c };
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                    n_accepts++;
                    n_active++;
                }
                continue;
            }
            if (evs[i].events & EPOLLOUT) {
                if (flush_out(c) < 0) {
                    conn_close(c);
                    continue;
                }
            }
            if (evs[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
                int dead = 0;
                for (;;) {
                    if (c->in_len == INBUF) {
                        if (c->body_left > 0 && handle_input(c) == 0 && c->in_len < INBUF)
                            continue;
                        break;  /* pipelined input waits; a full buffer otherwise is junk */
                    }
                    ssize_t r = read(c->fd, c->in + c->in_len, INBUF - c->in_len);
                    if (r > 0) {
                        c->in_len += (size_t)r;
                        continue;
                    }
                    if (r < 0 && errno == EINTR)
                        continue;
                    if (r < 0 && errno == EAGAIN)
                        break;
                    dead = 1;  /* EOF or error */
                    break;
                }
                if (dead || handle_input(c) < 0)
                    conn_close(c);
            }
        }
    }
}
