/* Hot reload: an inotify watcher thread on the config file's directory, and
 * the reload routine SIGHUP also uses. A reload builds and validates a new
 * snapshot and publishes it only when valid and changed; the old snapshot
 * keeps serving otherwise. */
#ifndef PIAPI_CONFIG_WATCH_H
#define PIAPI_CONFIG_WATCH_H

#include <stddef.h>

/* Starts the watcher thread for `path` (the file need not exist later: a
 * deleted file is logged and the old config keeps serving). Returns 0, or
 * -1 with a message in err. */
int piapi_config_watch_start(const char *path, char *err, size_t errlen);
/* Stops and joins the watcher thread; safe if never started. */
void piapi_config_watch_stop(void);

/* Loads `path` now. `trigger` ("inotify", "sighup", ...) goes into the log
 * line. Logs "config reloaded" / "config reload failed" / "config
 * unchanged", records piapi_config_reloads_total, publishes on success.
 * Returns 0 when the live config is (now) valid and current, -1 on failure.
 * Serialised internally: concurrent callers never race. */
int piapi_config_reload(const char *path, const char *trigger);

#endif
