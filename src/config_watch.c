/* Config hot reload: the watcher thread.
 *
 * It watches the config file's directory, never the file, because editors,
 * `sed -i`, `mv` and the Kubernetes ConfigMap swap all replace the file's
 * inode and a watch on the file dies with it. Relevant events are debounced
 * into one check, handed to the apply path, which reloads only when the
 * file's bytes changed: a `touch` or a chmod is no reload. */
#include "piapi/config_watch.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <unistd.h>

#include "piapi/config_apply.h"
#include "piapi/log.h"
#include "piapi/metrics.h"
#include "piapi/util.h"

/* No IN_MODIFY: it fires while a writer is still half way through. Every
 * complete replacement ends in CLOSE_WRITE, MOVED_TO or CREATE of the name;
 * ATTRIB catches `touch` and chmod (filtered out later by the hash). */
#define WATCH_MASK (IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_CREATE | \
                    IN_DELETE | IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF |    \
                    IN_ONLYDIR)
/* Events on the directory itself: after any of these the watch is gone or
 * follows a directory that is no longer at our path. */
#define LOST_MASK (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF)

#define DEBOUNCE_S   0.100  /* quiet time after the last relevant event */
#define MAX_DELAY_S  1.000  /* a file rewritten non-stop still reloads */
#define RETRY_S      1.000  /* re-adding a lost directory watch */

/* ConfigMap volumes: `cfg -> ..data/cfg`, and an update renames a new
 * `..data` symlink into place; no event ever names `cfg` itself. */
static const char configmap_link[] = "..data";

struct watcher {
    char *path;          /* as given: opened on every check (follows symlinks) */
    char *dir;           /* what we watch */
    char *base;          /* the event name that concerns us */
    int ifd;             /* inotify */
    int wakefd;          /* eventfd: stop() writes, the thread returns */
    int wd;              /* -1 while the directory watch is lost */
    double check_at;     /* debounce deadline, 0 = none pending */
    double burst_start;  /* first event of the pending burst */
    double retry_at;     /* next attempt to re-add the watch, 0 = none */
    int missing;         /* "removed" was logged; log it once per removal */
    pthread_t thread;
};

static struct watcher *g_watcher;  /* start/stop are called from main only */
/* ---- the watcher thread ------------------------------------------------ */

static void log_path(enum piapi_log_level level, const char *msg,
                     const char *key, const char *path, int err)
{
    struct piapi_log_line l;

    if (!piapi_log_begin(&l, level, msg))
        return;
    piapi_log_str(&l, key, path);
    if (err)
        piapi_log_str(&l, "error", strerror(err));
    piapi_log_end(&l);
}

/* Called when the file cannot be read. Keeping the current snapshot is the
 * whole point: a deleted file must not take the gateway down. */
static void file_unreadable(struct watcher *w, int err)
{
    if (err == ENOENT || err == ENOTDIR) {
        if (!w->missing)
            log_path(PIAPI_LOG_WARN,
                     "config file removed; keeping the current config",
                     "path", w->path, 0);
        w->missing = 1;
        return;
    }
    w->missing = 0;
    log_path(PIAPI_LOG_WARN, "config file unreadable; keeping the current config",
             "path", w->path, err);
}

/* The debounced check: the apply path reads the file and reloads only
 * when its bytes differ from what it last read. */
static void check_file(struct watcher *w)
{
    if (piapi_config_apply(w->path, PIAPI_APPLY_INOTIFY) == PIAPI_APPLY_UNREADABLE)
        file_unreadable(w, errno);
    else
        w->missing = 0;
}

static void arm_check(struct watcher *w, double now)
{
    if (w->check_at == 0)
        w->burst_start = now;
    w->check_at = now + DEBOUNCE_S;
    if (w->check_at > w->burst_start + MAX_DELAY_S)
        w->check_at = w->burst_start + MAX_DELAY_S;
}

static void lose_watch(struct watcher *w, double now, uint32_t mask)
{
    /* After MOVE_SELF the kernel keeps watching the moved directory; drop
     * it so its events cannot be mistaken for ours. Its IN_IGNORED then
     * carries a stale wd and is skipped. */
    if (mask & IN_MOVE_SELF)
        inotify_rm_watch(w->ifd, w->wd);
    w->wd = -1;
    w->retry_at = now + RETRY_S;
    log_path(PIAPI_LOG_WARN, "config directory watch lost; retrying",
             "dir", w->dir, 0);
}

static void try_rewatch(struct watcher *w, double now)
{
    int wd = inotify_add_watch(w->ifd, w->dir, WATCH_MASK);

    if (wd < 0) {
        w->retry_at = now + RETRY_S;
        return;
    }
    w->wd = wd;
    w->retry_at = 0;
    log_path(PIAPI_LOG_INFO, "config directory watch restored", "dir", w->dir, 0);
    /* Whatever happened while we were blind produced no event we saw. */
    arm_check(w, now);
}

static int relevant_name(const struct watcher *w, const struct inotify_event *ev)
{
    return ev->len > 0 && (strcmp(ev->name, w->base) == 0 ||
                           strcmp(ev->name, configmap_link) == 0);
}

static void handle_event(struct watcher *w, const struct inotify_event *ev,
                         double now)
{
    /* Events were dropped: any of them might have been ours. */
    if (ev->mask & IN_Q_OVERFLOW) {
        arm_check(w, now);
        return;
    }
    if (w->wd < 0 || ev->wd != w->wd)
        return;  /* left over from a watch we already gave up */
    if (ev->mask & LOST_MASK) {
        lose_watch(w, now, ev->mask);
        return;
    }
    if (relevant_name(w, ev))
        arm_check(w, now);
}

/* Drains the (non-blocking) inotify fd. */
static void read_events(struct watcher *w)
{
    char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));

    for (;;) {
        ssize_t n = read(w->ifd, buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;  /* EAGAIN: drained */
        double now = piapi_now_mono();
        for (char *p = buf; p < buf + n;) {
            const struct inotify_event *ev = (const struct inotify_event *)p;
            handle_event(w, ev, now);
            p += sizeof *ev + ev->len;
        }
    }
}

/* poll() timeout (ms) until the earlier of the two timers; -1 = none. */
static int next_timeout(const struct watcher *w, double now)
{
    double next = 0;

    if (w->check_at > 0)
        next = w->check_at;
    if (w->retry_at > 0 && (next == 0 || w->retry_at < next))
        next = w->retry_at;
    if (next == 0)
        return -1;
    if (next <= now)
        return 0;
    /* Rounded up: waking a hair early would only spin once more. */
    return (int)((next - now) * 1000.0) + 1;
}

static void run_timers(struct watcher *w)
{
    double now = piapi_now_mono();

    if (w->retry_at > 0 && now >= w->retry_at)
        try_rewatch(w, now);
    if (w->check_at > 0 && now >= w->check_at) {
        w->check_at = 0;
        check_file(w);
    }
}

static void *watch_main(void *arg)
{
    struct watcher *w = arg;
    sigset_t all;

    /* Inherited from start() already; repeated so the thread is correct
     * on its own: signals belong to main's sigwait(). */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);

    for (;;) {
        struct pollfd fds[2] = {
            { .fd = w->wakefd, .events = POLLIN },
            { .fd = w->ifd, .events = POLLIN },
        };
        int n = poll(fds, 2, next_timeout(w, piapi_now_mono()));
        if (n < 0 && errno != EINTR) {
            log_path(PIAPI_LOG_ERROR, "config watcher stopped", "dir", w->dir,
                     errno);
            break;
        }
        if (n > 0 && (fds[0].revents & POLLIN))
            break;
        if (n > 0 && fds[1].revents)
            read_events(w);
        run_timers(w);
    }
    return NULL;
}

/* ---- start / stop ------------------------------------------------------ */

static void watcher_free(struct watcher *w)
{
    if (!w)
        return;
    if (w->ifd >= 0)
        close(w->ifd);
    if (w->wakefd >= 0)
        close(w->wakefd);
    free(w->path);
    free(w->dir);
    free(w->base);
    free(w);
}

/* Splits path into the directory to watch and the name events carry.
 * "config.yaml" watches "."; "/config.yaml" watches "/". */
static struct watcher *watcher_new(const char *path)
{
    struct watcher *w = piapi_xcalloc(1, sizeof *w);
    const char *slash = strrchr(path, '/');

    w->ifd = w->wakefd = w->wd = -1;
    w->path = piapi_xstrdup(path);
    if (!slash) {
        w->dir = piapi_xstrdup(".");
        w->base = piapi_xstrdup(path);
    } else {
        w->dir = slash == path ? piapi_xstrdup("/")
                               : piapi_xstrndup(path, (size_t)(slash - path));
        w->base = piapi_xstrdup(slash + 1);
    }
    return w;
}

static int spawn(struct watcher *w, char *err, size_t errlen)
{
    sigset_t all, old;
    int rc;

    /* Block everything before the thread exists so no signal can land on
     * it in the window before watch_main blocks them itself. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = pthread_create(&w->thread, NULL, watch_main, w);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        snprintf(err, errlen, "config watcher: pthread_create: %s",
                 strerror(rc));
        return -1;
    }
    return 0;
}

int piapi_config_watch_start(const char *path, char *err, size_t errlen)
{
    char dummy[1];
    struct watcher *w = NULL;

    if (!err || errlen == 0) {
        err = dummy;
        errlen = sizeof dummy;
    }
    if (g_watcher) {
        snprintf(err, errlen, "config watcher: already running");
        return -1;
    }
    if (!path || !*path || path[strlen(path) - 1] == '/') {
        snprintf(err, errlen, "config watcher: not a file path: '%s'",
                 path ? path : "");
        return -1;
    }
    w = watcher_new(path);
    w->wakefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (w->wakefd < 0) {
        snprintf(err, errlen, "config watcher: eventfd: %s", strerror(errno));
        goto fail;
    }
    w->ifd = inotify_init1(IN_CLOEXEC | IN_NONBLOCK);
    if (w->ifd < 0) {
        snprintf(err, errlen, "config watcher: inotify_init1: %s",
                 strerror(errno));
        goto fail;
    }
    w->wd = inotify_add_watch(w->ifd, w->dir, WATCH_MASK);
    if (w->wd < 0) {
        snprintf(err, errlen, "config watcher: cannot watch '%s': %s", w->dir,
                 strerror(errno));
        goto fail;
    }
    if (spawn(w, err, errlen) < 0)
        goto fail;
    g_watcher = w;
    return 0;
fail:
    watcher_free(w);
    return -1;
}

void piapi_config_watch_stop(void)
{
    struct watcher *w = g_watcher;
    uint64_t one = 1;

    if (!w)
        return;
    /* An eventfd write only fails on counter overflow (impossible here) or
     * a bad fd (a bug); joining without a wakeup would hang shutdown. */
    if (write(w->wakefd, &one, sizeof one) != (ssize_t)sizeof one)
        abort();
    pthread_join(w->thread, NULL);
    g_watcher = NULL;
    watcher_free(w);
}
