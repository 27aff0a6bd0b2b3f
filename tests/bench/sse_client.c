/* SSE load client for the benchmark: holds N concurrent HTTP/1.1 streams
 * (single thread, epoll), times every event ("data:" line) of every stream
 * and samples the RSS of given processes while it runs.
 *
 *   sse_client --port P --path PATH [--n N] [--concurrency C] [--expect E]
 *              [--header 'Name: value']... [--body JSON] [--timeout S]
 *              [--rss LABEL:PID[,PID...]]...
 *
 * A stream counts as complete when the status is 200, exactly E events
 * arrived and the response ended cleanly (nginx's terminating chunk
 * "0\r\n\r\n", then EOF: requests are sent with "Connection: close").
 * Prints one JSON object on stdout. Writes "ALL_STARTED <ms>" to stderr
 * (and flushes) the moment every stream has had its first event, so a
 * caller can scrape gauges while all N are open.
 *
 * Build: cc -O2 -o sse_client sse_client.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum { ST_IDLE, ST_CONNECTING, ST_READING, ST_DONE };
enum { E_NONE, E_CONNECT, E_STATUS, E_INCOMPLETE, E_TIMEOUT, E_IO, E_KINDS };
static const char *const err_names[E_KINDS] = {
    "none", "connect", "status", "incomplete", "timeout", "io"
};

struct stream {
    int fd, state, err;
    double t_start, t_first, t_last, t_end, max_gap;
    int events;
    int match;              /* progress through "data:" */
    char status[13];
    int status_len;
    char tail[5];           /* last 5 bytes received */
    int tail_len;
};

#define MAX_RSS 8
struct rss_group {
    const char *label;
    int pids[64];
    int npids;
    long peak_kb;
};

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static long rss_kb(int pid)
{
    char path[64], buf[128];
    snprintf(path, sizeof path, "/proc/%d/statm", pid);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    long size, res;
    if (sscanf(buf, "%ld %ld", &size, &res) != 2)
        return 0;
    return res * (sysconf(_SC_PAGESIZE) / 1024);
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Nearest-rank percentile of a sorted array. */
static double pct(const double *v, int n, double p)
{
    if (n <= 0)
        return -1;
    int k = (int)(p / 100.0 * n + 0.999999) - 1;
    if (k < 0) k = 0;
    if (k >= n) k = n - 1;
    return v[k];
}

static void print_dist(const char *name, double *v, int n, int last)
{
    qsort(v, (size_t)n, sizeof *v, cmp_d);
    printf("\"%s\":{\"n\":%d,\"p50\":%.3f,\"p99\":%.3f,\"max\":%.3f}%s", name, n,
           pct(v, n, 50), pct(v, n, 99), n ? v[n - 1] : -1.0, last ? "" : ",");
}

int main(int argc, char **argv)
{
    int port = 0, n = 1, conc = 0, expect = 50;
    double timeout_s = 30;
    const char *path = "/", *body = "{\"model\":\"bench-model\",\"stream\":true}";
    char headers[4096] = "";
    struct rss_group rss[MAX_RSS];
    int nrss = 0;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) {
            fprintf(stderr, "sse_client: %s needs a value\n", a);
            return 2;
        }
        i++;
        if (!strcmp(a, "--port")) port = atoi(v);
        else if (!strcmp(a, "--path")) path = v;
        else if (!strcmp(a, "--n")) n = atoi(v);
        else if (!strcmp(a, "--concurrency")) conc = atoi(v);
        else if (!strcmp(a, "--expect")) expect = atoi(v);
        else if (!strcmp(a, "--timeout")) timeout_s = atof(v);
        else if (!strcmp(a, "--body")) body = v;
        else if (!strcmp(a, "--header")) {
            strncat(headers, v, sizeof headers - strlen(headers) - 3);
            strcat(headers, "\r\n");
        } else if (!strcmp(a, "--rss") && nrss < MAX_RSS) {
            struct rss_group *g = &rss[nrss++];
            memset(g, 0, sizeof *g);
            char *s = strdup(v), *colon = strchr(s, ':');
            if (!colon) {
                fprintf(stderr, "sse_client: --rss LABEL:PID[,PID]\n");
                return 2;
            }
            *colon = 0;
            g->label = s;
            for (char *p = strtok(colon + 1, ","); p && g->npids < 64; p = strtok(NULL, ","))
                g->pids[g->npids++] = atoi(p);
        } else {
            fprintf(stderr, "sse_client: unknown option %s\n", a);
            return 2;
        }
    }
    if (!port || n < 1) {
        fprintf(stderr, "sse_client: --port and --n are required\n");
        return 2;
    }
    if (conc <= 0 || conc > n)
        conc = n;

    char req[8192];
    int req_len = snprintf(req, sizeof req,
                           "POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                           "Connection: close\r\n%sContent-Length: %zu\r\n\r\n%s",
                           path, headers, strlen(body), body);

    struct stream *s = calloc((size_t)n, sizeof *s);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);

    /* live: streams that had their first event and are still open */
    int next = 0, running = 0, done = 0, live = 0, peak = 0, first_events = 0;
    double t0 = now_ms(), deadline = t0 + timeout_s * 1e3, all_started = -1;
    double next_sample = t0;
    struct epoll_event evs[512];
    char buf[65536];

    while (done < n) {
        /* Start streams up to the concurrency limit, a few per turn: a
         * stream's requests must not wait behind the connects of all the
         * others, or its TTFE would measure this loop. */
        int batch = 0;
        while (next < n && running < conc && batch++ < 8) {
            struct stream *st = &s[next++];
            st->t_start = now_ms();
            st->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
            int one = 1;
            setsockopt(st->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            running++;
            if (st->fd < 0 || (connect(st->fd, (struct sockaddr *)&addr, sizeof addr) != 0 &&
                               errno != EINPROGRESS)) {
                st->err = E_CONNECT;
                st->state = ST_DONE;
                if (st->fd >= 0)
                    close(st->fd);
                running--;
                done++;
                continue;
            }
            st->state = ST_CONNECTING;
            struct epoll_event ev = { .events = EPOLLOUT, .data.ptr = st };
            epoll_ctl(ep, EPOLL_CTL_ADD, st->fd, &ev);
        }
        double now = now_ms();
        if (now >= next_sample) {
            for (int g = 0; g < nrss; g++) {
                long sum = 0;
                for (int k = 0; k < rss[g].npids; k++)
                    sum += rss_kb(rss[g].pids[k]);
                if (sum > rss[g].peak_kb)
                    rss[g].peak_kb = sum;
            }
            next_sample = now + 20;
        }
        if (now >= deadline)
            break;
        int wait = (int)(next_sample - now) + 1;
        if (wait < 1)
            wait = 1;
        if (next < n && running < conc)
            wait = 0;  /* more streams to start */
        int k = epoll_wait(ep, evs, 512, wait);
        for (int i = 0; i < k; i++) {
            struct stream *st = evs[i].data.ptr;
            if (st->state == ST_CONNECTING) {
                int soerr = 0;
                socklen_t sl = sizeof soerr;
                getsockopt(st->fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
                if (soerr || write(st->fd, req, (size_t)req_len) != req_len) {
                    st->err = E_CONNECT;
                    goto finish;
                }
                st->state = ST_READING;
                struct epoll_event ev = { .events = EPOLLIN, .data.ptr = st };
                epoll_ctl(ep, EPOLL_CTL_MOD, st->fd, &ev);
                continue;
            }
            for (;;) {
                ssize_t r = read(st->fd, buf, sizeof buf);
                if (r < 0 && errno == EINTR)
                    continue;
                if (r < 0 && errno == EAGAIN)
                    break;
                double t = now_ms();
                if (r <= 0) {
                    st->t_end = t;
                    if (r < 0)
                        st->err = E_IO;
                    else if (st->status_len < 12 || memcmp(st->status + 9, "200", 3) != 0)
                        st->err = E_STATUS;
                    else if (st->events != expect || st->tail_len < 5 ||
                             memcmp(st->tail, "0\r\n\r\n", 5) != 0)
                        st->err = E_INCOMPLETE;
                    goto finish;
                }
                for (ssize_t j = 0; j < r; j++) {
                    char c = buf[j];
                    if (st->status_len < 12)
                        st->status[st->status_len++] = c;
                    static const char pat[] = "data:";
                    if (c == pat[st->match]) {
                        if (++st->match == 5) {
                            st->match = 0;
                            if (st->events++ == 0) {
                                st->t_first = t;
                                if (++live > peak)
                                    peak = live;
                                if (++first_events == n) {
                                    all_started = t - t0;
                                    fprintf(stderr, "ALL_STARTED %.1f\n", all_started);
                                    fflush(stderr);
                                }
                            } else if (t - st->t_last > st->max_gap) {
                                st->max_gap = t - st->t_last;
                            }
                            st->t_last = t;
                        }
                    } else {
                        st->match = c == 'd';
                    }
                }
                /* keep the last 5 bytes for the end-of-response check */
                if (r >= 5) {
                    memcpy(st->tail, buf + r - 5, 5);
                    st->tail_len = 5;
                } else {
                    for (ssize_t j = 0; j < r; j++) {
                        if (st->tail_len == 5) {
                            memmove(st->tail, st->tail + 1, 4);
                            st->tail_len = 4;
                        }
                        st->tail[st->tail_len++] = buf[j];
                    }
                }
            }
            continue;
        finish:
            epoll_ctl(ep, EPOLL_CTL_DEL, st->fd, NULL);
            close(st->fd);
            st->state = ST_DONE;
            if (st->events > 0)
                live--;
            running--;
            done++;
        }
    }

    /* Whatever is still open at the deadline timed out. */
    for (int i = 0; i < n; i++) {
        if (s[i].state != ST_DONE) {
            s[i].err = E_TIMEOUT;
            if (s[i].state != ST_IDLE)
                close(s[i].fd);
            s[i].state = ST_DONE;
        }
    }

    int errs[E_KINDS] = {0}, ok = 0;
    double *ttfe = calloc((size_t)n, sizeof(double)), *total = calloc((size_t)n, sizeof(double)),
           *gap = calloc((size_t)n, sizeof(double));
    int nt = 0, nc = 0;
    double max_gap = 0;
    for (int i = 0; i < n; i++) {
        errs[s[i].err]++;
        if (s[i].events > 0)
            ttfe[nt++] = s[i].t_first - s[i].t_start;
        if (s[i].err == E_NONE) {
            ok++;
            total[nc] = s[i].t_end - s[i].t_start;
            gap[nc++] = s[i].max_gap;
            if (s[i].max_gap > max_gap)
                max_gap = s[i].max_gap;
        }
    }
    printf("{\"n\":%d,\"ok\":%d,\"errors\":%d,\"error_kinds\":{", n, ok, n - ok);
    for (int e = 1; e < E_KINDS; e++)
        printf("\"%s\":%d%s", err_names[e], errs[e], e + 1 < E_KINDS ? "," : "");
    printf("},\"peak_live\":%d,\"all_started_ms\":%.3f,\"wall_ms\":%.3f,", peak, all_started,
           now_ms() - t0);
    print_dist("ttfe_ms", ttfe, nt, 0);
    print_dist("total_ms", total, nc, 0);
    print_dist("stream_max_gap_ms", gap, nc, 0);
    printf("\"max_gap_ms\":%.3f,\"rss_peak_kb\":{", max_gap);
    for (int g = 0; g < nrss; g++)
        printf("\"%s\":%ld%s", rss[g].label, rss[g].peak_kb, g + 1 < nrss ? "," : "");
    printf("}}\n");
    return 0;
}
