/* piapi: command line, start-up, signals and shutdown. Signals are blocked
 * in every thread and taken here with sigwait(): libfcgi's own SIGTERM
 * handler only sets a flag nobody reads. */
#include <curl/curl.h>
#include <errno.h>
#include <fcgiapp.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "piapi/account.h"
#include "piapi/config.h"
#include "piapi/config_apply.h"
#include "piapi/config_watch.h"
#include "piapi/keygen.h"
#include "piapi/ledger.h"
#include "piapi/limits.h"
#include "piapi/listen.h"
#include "piapi/log.h"
#include "piapi/loop.h"
#include "piapi/metrics.h"
#include "piapi/pool.h"
#include "piapi/routes_share.h"
#include "piapi/usage_report.h"
#include "piapi/util.h"

struct options {
    const char *config;
    const char *socket;
    unsigned socket_mode;
    unsigned threads;
    unsigned queue_timeout_ms;
    unsigned grace_s;
    const char *log_file;
    int log_level;
    int check_only;
};

static void usage(FILE *f)
{
    fprintf(f,
        "usage: piapi [--config FILE] [--socket PATH|HOST:PORT] [options]\n"
        "       piapi --check-config [--config FILE]\n"
        "       piapi keygen [--name NAME]   a new member key and its config lines\n"
        "       piapi usage [--config FILE] [--since DAY] [--until DAY]\n"
        "                   [--by user|model|service|day] [--json]\n"
        "                                    tokens and cost from the usage ledger\n"
        "\n"
        "LLM coding-assistant gateway (FastCGI responder).\n"
        "\n"
        "  -c, --config FILE        config file (default: config.yaml)\n"
        "  -s, --socket SPEC        listen on a UNIX socket path or HOST:PORT;\n"
        "                           without it, serve the listening socket on fd 0\n"
        "                           (spawn-fcgi, lighttpd bin-path, systemd)\n"
        "  -m, --socket-mode OCTAL  permissions of a created UNIX socket (default 0660)\n"
        "  -t, --threads N          concurrent requests (default 1024); pool\n"
        "                           threads grow to at most N + 4\n"
        "      --queue-timeout MS   when N requests run, a new one waits this long\n"
        "                           for a slot, then gets 503 (default 5000)\n"
        "  -g, --grace SECONDS      on SIGTERM/SIGINT, let running requests finish\n"
        "                           this long before aborting them (default 30)\n"
        "  -l, --log-level LEVEL    debug, info, warn or error (default info)\n"
        "      --log-file PATH      JSON log lines to PATH instead of stderr;\n"
        "                           reopened on SIGUSR1\n"
        "      --check-config       validate the config, print problems, exit\n"
        "  -V, --version            print the version\n"
        "  -h, --help               this text\n"
        "\n"
        "Signals: SIGHUP reloads the config, SIGUSR1 reopens the log file,\n"
        "SIGTERM/SIGINT stop gracefully (a second one stops at once).\n");
}

static int parse_uint(const char *flag, const char *s, uint64_t min, uint64_t max,
                      unsigned *out)
{
    uint64_t v;
    if (piapi_parse_u64(s, min, max, &v) != 0) {
        fprintf(stderr, "piapi: %s: expected a number from %llu to %llu, got '%s'\n",
                flag, (unsigned long long)min, (unsigned long long)max, s);
        return -1;
    }
    *out = (unsigned)v;
    return 0;
}

static int parse_mode(const char *s, unsigned *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 8);
    if (errno || end == s || *end || v > 0777) {
        fprintf(stderr, "piapi: --socket-mode: expected an octal mode like 0660, got '%s'\n", s);
        return -1;
    }
    *out = (unsigned)v;
    return 0;
}

/* 0: run; 1: exit 0 (help/version); -1: exit 2 (usage error). */
static int parse_args(int argc, char **argv, struct options *o)
{
    enum { OPT_CHECK = 256, OPT_LOG_FILE, OPT_QUEUE };
    static const struct option longopts[] = {
        { "config",        required_argument, NULL, 'c' },
        { "socket",        required_argument, NULL, 's' },
        { "socket-mode",   required_argument, NULL, 'm' },
        { "threads",       required_argument, NULL, 't' },
        { "queue-timeout", required_argument, NULL, OPT_QUEUE },
        { "grace",         required_argument, NULL, 'g' },
        { "log-level",     required_argument, NULL, 'l' },
        { "log-file",      required_argument, NULL, OPT_LOG_FILE },
        { "check-config",  no_argument,       NULL, OPT_CHECK },
        { "version",       no_argument,       NULL, 'V' },
        { "help",          no_argument,       NULL, 'h' },
        { NULL, 0, NULL, 0 }
    };
    int c;

    *o = (struct options){
        .config = "config.yaml", .socket_mode = 0660, .threads = 1024,
        .queue_timeout_ms = 5000, .grace_s = 30, .log_level = PIAPI_LOG_INFO,
    };
    while ((c = getopt_long(argc, argv, "c:s:m:t:g:l:Vh", longopts, NULL)) != -1) {
        switch (c) {
        case 'c': o->config = optarg; break;
        case 's': o->socket = optarg; break;
        case 'm': if (parse_mode(optarg, &o->socket_mode)) return -1; break;
        case 't': if (parse_uint("--threads", optarg, 1, 100000, &o->threads)) return -1; break;
        case OPT_QUEUE:
            if (parse_uint("--queue-timeout", optarg, 0, 600000, &o->queue_timeout_ms)) return -1;
            break;
        case 'g': if (parse_uint("--grace", optarg, 0, 86400, &o->grace_s)) return -1; break;
        case 'l':
            if ((o->log_level = piapi_log_level_parse(optarg)) < 0) {
                fprintf(stderr, "piapi: --log-level: expected debug, info, warn or error\n");
                return -1;
            }
            break;
        case OPT_LOG_FILE: o->log_file = optarg; break;
        case OPT_CHECK: o->check_only = 1; break;
        case 'V': printf("piapi %s\n", PIAPI_VERSION); return 1;
        case 'h': usage(stdout); return 1;
        default: usage(stderr); return -1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "piapi: unexpected argument '%s'\n", argv[optind]);
        return -1;
    }
    return 0;
}

static int check_config(const char *path)
{
    char *errors = NULL, *warnings = NULL;
    struct piapi_config *cfg = piapi_config_load_file(path, &errors, &warnings, NULL);
    int rc = 0;

    if (warnings && *warnings)
        fprintf(stderr, "%s%s", warnings, warnings[strlen(warnings) - 1] == '\n' ? "" : "\n");
    if (!cfg) {
        fprintf(stderr, "%s%s", errors ? errors : "invalid configuration",
                errors && errors[strlen(errors) - 1] == '\n' ? "" : "\n");
        fprintf(stderr, "%s: configuration invalid\n", path);
        rc = 1;
    } else {
        size_t p, s, u;
        piapi_config_counts(cfg, &p, &s, &u);
        printf("%s: configuration OK (%zu providers, %zu services, %zu users, hash %s)\n",
               path, p, s, u, piapi_config_hash(cfg));
        piapi_config_print_routes(cfg, stdout);
    }
    piapi_config_release(cfg);
    free(errors);
    free(warnings);
    return rc;
}

/* `piapi usage`: the report of the ledger the config names (the report
 * skips --config among its options). */
static int usage_main(int argc, char **argv)
{
    const char *config = "config.yaml";
    for (int i = 1; i < argc; i++) {
        if ((!strcmp(argv[i], "--config") || !strcmp(argv[i], "-c")) && i + 1 < argc)
            config = argv[++i];
        else if (!strncmp(argv[i], "--config=", 9))
            config = argv[i] + 9;
    }
    char *errors = NULL;
    struct piapi_config *cfg = piapi_config_load_file(config, &errors, NULL, NULL);
    if (!cfg) {
        fprintf(stderr, "%s\n%s: configuration invalid\n", errors ? errors : "", config);
        free(errors);
        return 1;
    }
    const char *db = piapi_config_settings(cfg)->usage_db;
    char *path = db ? piapi_account_ledger_path(config, db) : NULL;
    int rc = piapi_usage_report(path, argc, argv, stdout, stderr);
    free(path);
    piapi_config_release(cfg);
    return rc;
}

/* Waits up to `seconds` for running requests; a second stop signal cuts
 * the wait short. Returns 1 when that happened. */
static int drain(const sigset_t *set, unsigned seconds)
{
    double deadline = piapi_now_mono() + seconds;
    while (piapi_pool_active() > 0 && piapi_now_mono() < deadline) {
        struct timespec ts = { 0, 50 * 1000000L };
        int sig = sigtimedwait(set, NULL, &ts);
        if (sig == SIGTERM || sig == SIGINT)
            return 1;
        if (sig == SIGUSR1)
            piapi_log_reopen();
    }
    return 0;
}

static void signal_loop(const sigset_t *set, const char *config_path)
{
    for (;;) {
        int sig;
        if (sigwait(set, &sig) != 0)
            continue;
        switch (sig) {
        case SIGHUP:
            piapi_config_apply(config_path, PIAPI_APPLY_SIGHUP);
            break;
        case SIGUSR1:
            piapi_log_reopen();
            break;
        case SIGTERM:
        case SIGINT:
            piapi_log_msg(PIAPI_LOG_INFO, "shutting down", "signal",
                          sig == SIGTERM ? "SIGTERM" : "SIGINT");
            return;
        }
    }
}

/* Each request holds up to four descriptors: its FastCGI connection, its
 * upstream connection and the curl multi handle's wake-up pair. The usual
 * soft limit of 1024 would cap piapi near 250 streams; raise it toward the
 * hard limit, as nginx and redis do. */
static void raise_fd_limit(unsigned threads)
{
    struct rlimit rl;
    rlim_t want = (rlim_t)threads * 4 + 256;

    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur >= want)
        return;
    rl.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max > want ? want : rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < want) {
        char msg[160];
        snprintf(msg, sizeof msg, "open-file limit %llu is below the %llu that --threads %u "
                 "may need (raise it: ulimit -n, LimitNOFILE=)",
                 (unsigned long long)rl.rlim_cur, (unsigned long long)want, threads);
        piapi_log_msg(PIAPI_LOG_WARN, "low open-file limit", "warning", msg);
    }
}

static int open_socket(const struct options *o)
{
    char err[512];
    int fd = o->socket
        ? piapi_listen_open(o->socket, (mode_t)o->socket_mode, 1024, err, sizeof err)
        : piapi_listen_inherited(err, sizeof err);
    if (fd < 0)
        piapi_log_msg(PIAPI_LOG_ERROR, "cannot listen", "error", err);
    return fd;
}

static void start_shared(void *arg)
{
    (void)arg;
    piapi_routes_share_start();
}

static void stop_shared(void *arg)
{
    (void)arg;
    piapi_routes_share_stop();
    piapi_limits_stop();
}

int main(int argc, char **argv)
{
    struct options o;
    sigset_t set;
    char err[512];
    int rc;

    if (argc > 1 && strcmp(argv[1], "keygen") == 0)
        return piapi_keygen_main(argc - 1, argv + 1);
    if (argc > 1 && strcmp(argv[1], "usage") == 0)
        return usage_main(argc - 1, argv + 1);
    rc = parse_args(argc, argv, &o);
    if (rc)
        return rc > 0 ? 0 : 2;
    if (o.check_only)
        return check_config(o.config);
    if (piapi_log_open(o.log_file, (enum piapi_log_level)o.log_level) != 0) {
        fprintf(stderr, "piapi: --log-file %s: %s\n", o.log_file, strerror(errno));
        return 1;
    }

    /* Before any thread exists, so every thread inherits the mask. */
    signal(SIGPIPE, SIG_IGN);
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    sigaddset(&set, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    if (piapi_log_start_writer() != 0)
        piapi_log_msg(PIAPI_LOG_WARN, "log writer thread not running; threads write lines",
                      NULL, NULL);

    raise_fd_limit(o.threads);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    piapi_metrics_init(PIAPI_VERSION);
    piapi_metrics_set_usage_db_probe(piapi_ledger_errors);
    piapi_metrics_set_extra_probe(piapi_limits_render_metrics);
    rc = 1;
    if (piapi_config_apply(o.config, PIAPI_APPLY_STARTUP) != 0)
        goto out;
    if (FCGX_Init() != 0) {
        piapi_log_msg(PIAPI_LOG_ERROR, "FCGX_Init failed", NULL, NULL);
        goto out;
    }
    int fd = open_socket(&o);
    if (fd < 0)
        goto out;

    struct piapi_pool_opts po = {
        .fd = fd, .max_requests = o.threads, .extra_threads = 4,
        .stack_size = 512 * 1024, .queue_timeout_ms = o.queue_timeout_ms,
    };
    /* The watcher takes the file as it is now as its baseline: start it
     * right after the load, before anyone can be served and edit. */
    if (piapi_config_watch_start(o.config, err, sizeof err) != 0)
        piapi_log_msg(PIAPI_LOG_WARN, "config watcher not running; SIGHUP still reloads",
                      "error", err);
    if (piapi_pool_start(&po, err, sizeof err) != 0 ||
        piapi_loop_start(o.threads, fd, piapi_pool_connection_ready, err, sizeof err) != 0) {
        piapi_log_msg(PIAPI_LOG_ERROR, "cannot start the pool", "error", err);
        goto out_watch;
    }

    piapi_loop_post(start_shared, NULL);

    struct piapi_log_line l;
    if (piapi_log_begin(&l, PIAPI_LOG_INFO, "piapi started")) {
        piapi_log_str(&l, "version", PIAPI_VERSION);
        piapi_log_str(&l, "socket", o.socket ? o.socket : "fd 0");
        piapi_log_int(&l, "threads", o.threads);
        piapi_log_int(&l, "pid", getpid());
        piapi_log_end(&l);
    }

    signal_loop(&set, o.config);
    piapi_pool_stop_accepting();
    if (drain(&set, o.grace_s)) {
        piapi_log_msg(PIAPI_LOG_WARN, "second signal: exiting now", NULL, NULL);
        piapi_listen_cleanup();
        piapi_log_close();
        _exit(1);
    }
    if (piapi_pool_active() > 0)
        piapi_log_msg(PIAPI_LOG_WARN, "grace period over: aborting running requests",
                      NULL, NULL);
    piapi_pool_abort();
    piapi_loop_post(stop_shared, NULL);  /* leases, cooldowns, Redis: on the loop */
    piapi_loop_stop();
    piapi_pool_join();
    rc = 0;
    piapi_log_msg(PIAPI_LOG_INFO, "piapi stopped", NULL, NULL);
out_watch:
    piapi_loop_stop();
    piapi_config_watch_stop();
    close(fd);
    piapi_listen_cleanup();
out:
    piapi_account_stop();
    piapi_config_publish(NULL);
    curl_global_cleanup();
    piapi_log_close();
    return rc;
}
