/* The FastCGI listening socket: created by piapi (UNIX path or host:port)
 * or inherited on fd 0 from spawn-fcgi, lighttpd bin-path or systemd.
 * FCGX_OpenSocket is not used: it unlinks a live socket blindly and calls
 * exit() on errors. */
#ifndef PIAPI_LISTEN_H
#define PIAPI_LISTEN_H

#include <stddef.h>
#include <sys/types.h>

/* `spec` is a path (contains '/') or HOST:PORT ([::1]:PORT for IPv6).
 * A UNIX socket still served by a running process is never taken over; a
 * stale one is replaced. Returns the fd, or -1 with a message in err. */
int piapi_listen_open(const char *spec, mode_t mode, int backlog,
                      char *err, size_t errlen);

/* fd 0 when it is a listening socket, else -1 with a message in err. */
int piapi_listen_inherited(char *err, size_t errlen);

/* Removes the UNIX socket file piapi_listen_open created, if any. */
void piapi_listen_cleanup(void);

#endif
