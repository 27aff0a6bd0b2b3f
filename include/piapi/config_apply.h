/* The one way a config file becomes live, at start-up, on SIGHUP and on an
 * inotify event alike: read the file once, validate it, log what happened,
 * count it in piapi_config_reloads_total and publish the new snapshot when
 * it is valid and differs from the live one. The old snapshot keeps serving
 * otherwise. */
#ifndef PIAPI_CONFIG_APPLY_H
#define PIAPI_CONFIG_APPLY_H

/* Returned for PIAPI_APPLY_INOTIFY when the file cannot be read (errno
 * says why): a removed file is the watcher's to report, not a failed
 * reload. */
#define PIAPI_APPLY_UNREADABLE (-2)

enum piapi_apply_trigger {
    PIAPI_APPLY_STARTUP,  /* "config loaded" / "config invalid" */
    PIAPI_APPLY_SIGHUP,   /* always re-reads: keys kept outside the file */
    PIAPI_APPLY_INOTIFY,  /* nothing to do when the bytes did not change */
};

/* 0 when the live config is (now) valid and current, -1 when the file was
 * refused, PIAPI_APPLY_UNREADABLE (inotify only). Serialised internally:
 * concurrent callers never race to publish. */
int piapi_config_apply(const char *path, enum piapi_apply_trigger trigger);

#endif
