/* Hot reload: an inotify watcher thread on the config file's directory
 * that hands every relevant change to the apply path (config_apply.h). */
#ifndef PIAPI_CONFIG_WATCH_H
#define PIAPI_CONFIG_WATCH_H

#include <stddef.h>

/* Starts the watcher thread for `path` (the file need not exist later: a
 * deleted file is logged and the old config keeps serving). Returns 0, or
 * -1 with a message in err. */
int piapi_config_watch_start(const char *path, char *err, size_t errlen);
/* Stops and joins the watcher thread; safe if never started. */
void piapi_config_watch_stop(void);

#endif
