/* The config apply path: start-up, SIGHUP and the inotify watcher all come
 * through piapi_config_apply(), which reads the file once (the loader
 * reports a digest of the bytes it parsed), so the watcher never reads the
 * file itself and a touch or chmod costs one read and a parse, and no
 * reload. */
#include "piapi/config_apply.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "piapi/account.h"
#include "piapi/config.h"
#include "piapi/log.h"
#include "piapi/metrics.h"
#include "piapi/routes.h"
#include "piapi/util.h"

static pthread_mutex_t g_apply_lock = PTHREAD_MUTEX_INITIALIZER;
/* The bytes last handed to the loader, valid or not (under the lock). */
static struct piapi_config_read g_last;

static const char *trigger_name(enum piapi_apply_trigger t)
{
    return t == PIAPI_APPLY_STARTUP ? "startup"
         : t == PIAPI_APPLY_SIGHUP ? "sighup" : "inotify";
}

/* Loader messages are newline-separated; a log field wants one line. */
static void join_lines(struct piapi_buf *out, const char *text)
{
    const char *p = text;

    while (*p) {
        size_t n = strcspn(p, "\n");
        if (n > 0) {
            if (out->len > 0)
                piapi_buf_puts(out, "; ");
            piapi_buf_append(out, p, n);
        }
        p += n;
        if (*p == '\n')
            p++;
    }
}

static void log_warnings(const char *warnings, enum piapi_apply_trigger t)
{
    const char *p = warnings;

    while (p && *p) {
        size_t n = strcspn(p, "\n");
        struct piapi_log_line l;
        if (n > 0 && piapi_log_begin(&l, PIAPI_LOG_WARN, "config warning")) {
            piapi_log_strn(&l, "warning", p, n);
            if (t != PIAPI_APPLY_STARTUP)
                piapi_log_str(&l, "trigger", trigger_name(t));
            piapi_log_end(&l);
        }
        p += n;
        if (*p == '\n')
            p++;
    }
}

static void log_failure(const char *errors, enum piapi_apply_trigger t)
{
    struct piapi_log_line l;

    if (t == PIAPI_APPLY_STARTUP) {
        piapi_log_msg(PIAPI_LOG_ERROR, "config invalid", "error", errors);
        return;
    }
    struct piapi_buf joined = { 0 };
    join_lines(&joined, errors ? errors : "");
    if (piapi_log_begin(&l, PIAPI_LOG_ERROR, "config reload failed")) {
        piapi_log_str(&l, "error", joined.len ? joined.data : "unknown error");
        piapi_log_str(&l, "trigger", trigger_name(t));
        piapi_log_end(&l);
    }
    piapi_buf_dispose(&joined);
}

static void log_success(const char *msg, const struct piapi_config *cfg,
                        const char *hash, const char *path,
                        enum piapi_apply_trigger t)
{
    size_t providers, services, users;
    struct piapi_log_line l;

    if (!piapi_log_begin(&l, PIAPI_LOG_INFO, msg))
        return;
    piapi_config_counts(cfg, &providers, &services, &users);
    if (t == PIAPI_APPLY_STARTUP)
        piapi_log_str(&l, "path", path);
    piapi_log_int(&l, "providers", (int64_t)providers);
    piapi_log_int(&l, "services", (int64_t)services);
    piapi_log_int(&l, "users", (int64_t)users);
    piapi_log_str(&l, "hash", hash);
    if (t != PIAPI_APPLY_STARTUP)
        piapi_log_str(&l, "trigger", trigger_name(t));
    piapi_log_end(&l);
}

/* Takes over `cfg`. Swaps it in unless the live snapshot already has the
 * same bytes and the same outside keys, in which case in-flight and future
 * requests keep the one they have and nothing is logged as reloaded. */
static void publish_if_changed(struct piapi_config *cfg, const char *path,
                               enum piapi_apply_trigger t)
{
    struct piapi_config *cur = piapi_config_current();
    char hash[64];

    /* Copied out: once published, cfg may be replaced and freed by the
     * next apply. */
    snprintf(hash, sizeof hash, "%s", piapi_config_hash(cfg));
    if (cur && piapi_config_same(cur, cfg)) {
        log_success("config unchanged", cfg, hash, path, t);
        piapi_config_release(cfg);
    } else {
        log_success(t == PIAPI_APPLY_STARTUP ? "config loaded" : "config reloaded",
                    cfg, hash, path, t);
        piapi_account_follow(path, piapi_config_settings(cfg));
        /* A candidate the new file no longer names loses its cooldown. */
        piapi_routes_forget_absent(cfg);
        piapi_config_publish(cfg);
    }
    piapi_config_release(cur);
    /* An unchanged reload is still a successful one (operators count it);
     * the hash is the live one either way, so the info series stays. */
    piapi_metrics_config_reload(1, hash);
}

static int same_bytes(const struct piapi_config_read *a,
                      const struct piapi_config_read *b)
{
    return a->read && b->read && a->len == b->len && a->digest == b->digest;
}

int piapi_config_apply(const char *path, enum piapi_apply_trigger t)
{
    char *errors = NULL, *warnings = NULL;
    struct piapi_config_read rd;
    int rc = 0;

    pthread_mutex_lock(&g_apply_lock);
    struct piapi_config *cfg = piapi_config_load_file(path, &errors, &warnings, &rd);
    if (t == PIAPI_APPLY_INOTIFY && !rd.read) {
        /* Forget the old bytes: a recreated file with the same content
         * still goes through a reload, reported as unchanged. */
        g_last = rd;
        rc = PIAPI_APPLY_UNREADABLE;
        goto out;
    }
    if (t == PIAPI_APPLY_INOTIFY && same_bytes(&rd, &g_last)) {
        /* touch, chmod, an editor saving without changes: not a reload,
         * so neither a log line at info nor a reload in the metrics. */
        piapi_log_msg(PIAPI_LOG_DEBUG, "config file unchanged; not reloading",
                      "path", path);
        goto out;
    }
    g_last = rd;
    log_warnings(warnings, t);
    if (!cfg) {
        log_failure(errors, t);
        piapi_metrics_config_reload(0, NULL);
        rc = -1;
        goto out;
    }
    publish_if_changed(cfg, path, t);
    cfg = NULL;
out:
    piapi_config_release(cfg);
    pthread_mutex_unlock(&g_apply_lock);
    free(errors);
    free(warnings);
    if (rc == PIAPI_APPLY_UNREADABLE)
        errno = rd.error;
    return rc;
}
