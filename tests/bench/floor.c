/* The floor: the cheapest possible libfcgi responder. N threads in the
 * textbook FCGX_Accept_r loop; each request's body is read and dropped and
 * the same fixed chat-completion JSON as the mock upstream is answered.
 * Whatever piapi costs above this is piapi's own; below it is nginx's
 * FastCGI hop and libfcgi.
 *
 *   floor SOCKET_PATH THREADS RESPONSE_FILE
 *
 * Behind `fastcgi_keep_conn on` the same loop serves successive requests
 * of one kept connection (FCGX_Finish_r keeps the fd, FCGX_Accept_r reads
 * the next request from it), and a thread stays bound to its connection
 * while nginx keeps it idle. So THREADS must cover every connection nginx
 * can hold: keepalive x workers (idle) + requests in flight, or requests
 * wait in the backlog for good. make bench runs it
 * with keepalive 32 x 1 worker + 64 = 96 threads for /floor-kc/.
 *
 * Build: cc -O2 -pthread -o floor floor.c -lfcgi
 */
#include <fcgiapp.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static int listen_fd;
static char *resp;
static int resp_len;

static void *serve(void *arg)
{
    (void)arg;
    FCGX_Request r;
    char buf[16384];
    FCGX_InitRequest(&r, listen_fd, 0);
    while (FCGX_Accept_r(&r) == 0) {
        while (FCGX_GetStr(buf, sizeof buf, r.in) > 0)
            ;
        FCGX_PutStr(resp, resp_len, r.out);
        FCGX_Finish_r(&r);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: floor SOCKET_PATH THREADS RESPONSE_FILE\n");
        return 2;
    }
    int n = atoi(argv[2]);
    FILE *f = fopen(argv[3], "rb");
    if (!f || n < 1) {
        perror(argv[3]);
        return 2;
    }
    char body[8192];
    size_t blen = fread(body, 1, sizeof body, f);
    fclose(f);
    resp = malloc(blen + 256);
    resp_len = snprintf(resp, 256, "Status: 200 OK\r\nContent-Type: application/json\r\n"
                                   "Content-Length: %zu\r\n\r\n", blen);
    memcpy(resp + resp_len, body, blen);
    resp_len += (int)blen;

    if (FCGX_Init() != 0)
        return 1;
    /* FCGX_Init's SIGTERM handler only sets a flag:
     * let the bench stop the floor with a plain kill. */
    signal(SIGTERM, SIG_DFL);
    listen_fd = FCGX_OpenSocket(argv[1], 1024);  /* exits on failure */
    chmod(argv[1], 0666);
    pthread_t *t = calloc((size_t)n, sizeof *t);
    for (int i = 0; i < n; i++)
        pthread_create(&t[i], NULL, serve, NULL);
    fprintf(stderr, "floor: %s, %d threads\n", argv[1], n);
    for (int i = 0; i < n; i++)
        pthread_join(t[i], NULL);
    return 0;
}
