/* Listening sockets, created with the checks FCGX_OpenSocket lacks. */
#include "piapi/listen.h"

#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "piapi/util.h"

static char created_path[sizeof(((struct sockaddr_un *)0)->sun_path)];

/* 1: something accepts connections there; 0: nothing does (stale file or
 * no file); -1: the path is something else we must not remove. */
static int unix_path_live(const struct sockaddr_un *sa, char *err, size_t errlen)
{
    struct stat st;
    if (lstat(sa->sun_path, &st) != 0)
        return 0;
    if (!S_ISSOCK(st.st_mode)) {
        snprintf(err, errlen, "%s exists and is not a socket", sa->sun_path);
        return -1;
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return 0;
    int live = connect(fd, (const struct sockaddr *)sa, sizeof *sa) == 0 ||
               (errno != ECONNREFUSED && errno != ENOENT);
    close(fd);
    if (live)
        snprintf(err, errlen, "%s is in use by a running process; not taking it over",
                 sa->sun_path);
    return live;
}

static int open_unix(const char *path, mode_t mode, int backlog,
                     char *err, size_t errlen)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof sa.sun_path) {
        snprintf(err, errlen, "socket path too long (max %zu bytes): %s",
                 sizeof sa.sun_path - 1, path);
        return -1;
    }
    strcpy(sa.sun_path, path);
    if (unix_path_live(&sa, err, errlen) != 0)
        return -1;
    unlink(path);

    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        goto fail_errno;
    /* Create it with no access, then open it up to exactly `mode`: the
     * socket is never briefly reachable by more than intended. */
    mode_t old = umask(0777);
    int rc = bind(fd, (struct sockaddr *)&sa, sizeof sa);
    umask(old);
    if (rc != 0)
        goto fail_errno_close;
    snprintf(created_path, sizeof created_path, "%s", path);
    if (chmod(path, mode) != 0 || listen(fd, backlog) != 0)
        goto fail_errno_unlink;
    return fd;

fail_errno_unlink:
    snprintf(err, errlen, "%s: %s", path, strerror(errno));
    close(fd);
    piapi_listen_cleanup();
    return -1;
fail_errno_close:
    snprintf(err, errlen, "%s: %s", path, strerror(errno));
    close(fd);
    return -1;
fail_errno:
    snprintf(err, errlen, "%s: %s", path, strerror(errno));
    return -1;
}

static int open_tcp(const char *spec, int backlog, char *err, size_t errlen)
{
    char host[256];
    const char *colon = strrchr(spec, ':');
    const char *h = spec;
    size_t hlen;

    if (!colon || colon == spec || !colon[1]) {
        snprintf(err, errlen, "expected a socket path or HOST:PORT, got '%s'", spec);
        return -1;
    }
    hlen = (size_t)(colon - spec);
    if (spec[0] == '[' && hlen >= 2 && spec[hlen - 1] == ']') {
        h++;
        hlen -= 2;
    }
    if (hlen >= sizeof host) {
        snprintf(err, errlen, "host name too long in '%s'", spec);
        return -1;
    }
    memcpy(host, h, hlen);
    host[hlen] = '\0';

    struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE };
    struct addrinfo *res;
    int gai = getaddrinfo(host, colon + 1, &hints, &res);
    if (gai != 0) {
        snprintf(err, errlen, "%s: %s", spec, gai_strerror(gai));
        return -1;
    }
    int fd = socket(res->ai_family, res->ai_socktype | SOCK_CLOEXEC, res->ai_protocol);
    int one = 1;
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        bind(fd, res->ai_addr, res->ai_addrlen) != 0 || listen(fd, backlog) != 0) {
        snprintf(err, errlen, "%s: %s", spec, strerror(errno));
        if (fd >= 0)
            close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    return fd;
}

int piapi_listen_open(const char *spec, mode_t mode, int backlog,
                      char *err, size_t errlen)
{
    if (strchr(spec, '/'))
        return open_unix(spec, mode, backlog, err, errlen);
    return open_tcp(spec, backlog, err, errlen);
}

int piapi_listen_inherited(char *err, size_t errlen)
{
    struct stat st;
    int acc = 0;
    socklen_t len = sizeof acc;

    if (fstat(0, &st) != 0 || !S_ISSOCK(st.st_mode) ||
        getsockopt(0, SOL_SOCKET, SO_ACCEPTCONN, &acc, &len) != 0 || !acc) {
        snprintf(err, errlen,
                 "no --socket given and fd 0 is not a listening socket "
                 "(start piapi with --socket PATH, or under spawn-fcgi, "
                 "lighttpd bin-path or systemd socket activation)");
        return -1;
    }
    return 0;
}

void piapi_listen_cleanup(void)
{
    if (created_path[0]) {
        unlink(created_path);
        created_path[0] = '\0';
    }
}
