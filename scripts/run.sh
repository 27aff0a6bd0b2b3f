#!/usr/bin/env bash
# `make run`: piapi + nginx in the foreground, for trying piapi locally.
#
#   piapi  build/piapi --config config.yaml --socket build/run/piapi.sock
#   nginx  deploy/nginx/nginx.conf + piapi.conf, rendered into build/run/
#          (private prefix: pid, temp dirs and socket path rewritten; the
#          error log goes to stderr, the access log to stdout) on :9200
#
# Both log to this terminal (piapi: JSON lines on stderr). Ctrl-C (or
# SIGTERM) stops both gracefully: nginx finishes its requests (SIGQUIT),
# piapi lets running streams finish for up to --grace seconds; a second
# Ctrl-C stops both at once. Nothing is left behind: no process, no socket,
# no pid file. If either one dies on its own, the other is stopped too and
# the script exits non-zero.
#
# Environment:
#   PORT=9200            nginx's port
#   BIND=127.0.0.1       nginx's address; BIND=0.0.0.0 serves every
#                        interface (IPv6 too)
#   CONFIG=config.yaml   piapi's config. The default one is created from
#                        config.yaml.example (mode 0600) if missing; edits
#                        are picked up live (inotify), or `kill -HUP`.
#                        While it is byte for byte config.yaml.example (whose
#                        providers are placeholders), piapi gets a copy in
#                        RUN_DIR with every baseUrl pointed at
#                        build/demo-provider on 127.0.0.1, so requests get a
#                        real (canned) answer; any edit turns that off
#                        (restart make run after editing).
#   LOG_LEVEL=info       piapi --log-level
#   GRACE=5              piapi --grace (seconds) on Ctrl-C
#   PIAPI_ARGS=          more piapi options, e.g. "--threads 64"
#   BUILD=build          where build/piapi is
#   RUN_DIR=build/run    where the socket and nginx's rendered config go
#
# nginx's worker user: nginx.conf says `user www-data;`. Run as root, the
# rendered copy says `user root;` instead, so the workers can reach
# build/run/piapi.sock however the checkout's parent directories are
# protected (a checkout under /root is 0700; www-data would need search
# permission on every directory above the socket). This is a local dev
# server, bound to 127.0.0.1 unless BIND says otherwise. Run as another
# user, the `user` line is dropped: master and workers run as that user,
# who owns the socket. Either way the socket stays 0660 and owned by the
# invoking user. Production uses the real `user www-data;` with the socket
# in /run/piapi (see deploy/systemd/).
set -euo pipefail

# A non-interactive shell starts background jobs (`scripts/run.sh &` in a
# script or CI) with SIGINT ignored, and bash cannot trap a signal that was
# ignored on entry: re-exec once with the default disposition so Ctrl-C /
# kill -INT still stops everything cleanly.
stopping=0
trap 'stopping=1' INT TERM      # until the real handlers below are in place
if [ -z "${PIAPI_RUN_REEXEC:-}" ] && env --default-signal=INT true 2>/dev/null; then
    [ "$stopping" = 0 ] || exit 0
    export PIAPI_RUN_REEXEC=1
    exec env --default-signal=INT "$0" "$@"
fi

cd "$(dirname "$0")/.."
REPO=$PWD
BUILD=${BUILD:-build}
case $BUILD in /*) ;; *) BUILD=$REPO/$BUILD ;; esac
PIAPI=$BUILD/piapi
RUN=${RUN_DIR:-$BUILD/run}
case $RUN in /*) ;; *) RUN=$REPO/$RUN ;; esac
SOCK=$RUN/piapi.sock
PORT=${PORT:-9200}
BIND=${BIND:-127.0.0.1}
GRACE=${GRACE:-5}
LOG_LEVEL=${LOG_LEVEL:-info}
PIAPI_ARGS=${PIAPI_ARGS:-}
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

say() { printf 'run.sh: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

# ---- stopping ----------------------------------------------------------
# The traps go in first, so a signal during the set-up below is not lost
# (bash runs the handler once the current command ends).
PIAPI_PID='' NGINX_PID='' DEMO_PID='' stop_deadline=0 OWN_SOCK=0 ready=0

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }
# signal_to SIG PID: never fails (the process may be gone already)
# shellcheck disable=SC2317
signal_to() { if alive "$2"; then kill "-$1" "$2" 2>/dev/null || true; fi; }

# shellcheck disable=SC2317  # (trap handlers)
cleanup() {
    local rc=$?
    trap - INT TERM EXIT
    local p
    for p in $NGINX_PID $PIAPI_PID $DEMO_PID; do signal_to TERM "$p"; done
    for _ in $(seq 50); do
        alive "$NGINX_PID" || alive "$PIAPI_PID" || alive "$DEMO_PID" || break
        sleep 0.1
    done
    for p in $NGINX_PID $PIAPI_PID $DEMO_PID; do
        if alive "$p"; then say "killing $p (did not stop)"; signal_to KILL "$p"; fi
    done
    wait 2>/dev/null || true
    # piapi removes its own socket; this only covers a piapi that was killed
    if [ "$OWN_SOCK" = 1 ] && [ -S "$SOCK" ]; then rm -f "$SOCK"; fi
    if [ -n "$NGINX_PID" ]; then rm -f "$NGX/nginx.pid"; fi
    exit "$rc"
}

# shellcheck disable=SC2317
on_signal() {
    if [ "$stopping" = 0 ]; then
        stopping=1
        stop_deadline=$((SECONDS + GRACE + 10))
        say "stopping (graceful, up to ${GRACE}s for running streams; Ctrl-C again to stop now)"
        # QUIT = graceful; but background jobs of a script start with SIGQUIT
        # ignored, so before nginx is up (its own handlers in place) use TERM
        if [ "$ready" = 1 ]; then signal_to QUIT "$NGINX_PID"; else signal_to TERM "$NGINX_PID"; fi
        signal_to TERM "$PIAPI_PID"
    else
        say "stopping now"
        stop_deadline=$((SECONDS + 3))
        signal_to TERM "$NGINX_PID"
        # piapi: a second SIGTERM aborts the running streams at once
        signal_to TERM "$PIAPI_PID"
    fi
    return 0
}

trap cleanup EXIT
trap on_signal INT TERM

[ -x "$PIAPI" ] || die "$PIAPI not built (run: make)"
[ -x "$NGINX" ] || die "nginx not found (run: make deps)"
[ -r /etc/nginx/fastcgi_params ] || die "/etc/nginx/fastcgi_params missing (run: make deps)"
case $PORT in ''|*[!0-9]*) die "PORT must be a number: $PORT" ;; esac

# ---- config ------------------------------------------------------------
if [ -z "${CONFIG:-}" ]; then
    CONFIG=$REPO/config.yaml
    if [ ! -e "$CONFIG" ]; then
        (umask 077 && cp config.yaml.example "$CONFIG")
        chmod 600 "$CONFIG"
        say "created config.yaml from config.yaml.example (mode 0600): edit it, piapi reloads it live"
    fi
fi
[ -f "$CONFIG" ] || die "CONFIG=$CONFIG: no such file"
CONFIG=$(realpath "$CONFIG")

# ---- render nginx's config into build/run ------------------------------
# Every substitution must match, so a change to deploy/nginx/* that this
# script does not know about fails loudly instead of rendering /var paths.
subst() {  # subst FILE OLD NEW: replace every line equal (trimmed) to OLD
    local file=$1 old=$2 new=$3
    grep -qxF "$old" <(sed 's/^[[:space:]]*//;s/[[:space:]]*$//' "$file") ||
        die "render: '$old' not found in $file (deploy/nginx changed?)"
    OLD=$old NEW=$new perl -0pi -e \
        's/^([ \t]*)\Q$ENV{OLD}\E[ \t]*$/$ENV{NEW} eq "" ? "" : $1.$ENV{NEW}/gme' "$file"
}

# (/proc files have size 0: read them, do not test -s)
have_ipv6() { grep -qs . /proc/net/if_inet6; }
have_ipv6_lo() { grep -qs ' lo$' /proc/net/if_inet6; }

# Something accepting on the socket = another `make run` owns this RUN_DIR:
# leave it (its socket, its nginx files) alone.
# (perl-base's IO::Socket::UNIX: on every Debian system, unlike python3)
sock_live() {
    perl -MIO::Socket::UNIX -e 'IO::Socket::UNIX->new(Peer => $ARGV[0]) or exit 1' "$1" \
        2>/dev/null
}
if [ -e "$SOCK" ] && [ ! -S "$SOCK" ]; then die "$SOCK exists and is not a socket"; fi
if [ -S "$SOCK" ] && sock_live "$SOCK"; then
    die "$SOCK is in use (another make run?); set RUN_DIR and PORT to run a second one"
fi
rm -rf "$RUN/nginx"
mkdir -p "$RUN/nginx/tmp"
chmod 0711 "$RUN"
NGX=$RUN/nginx
cp deploy/nginx/nginx.conf deploy/nginx/piapi.conf "$NGX/"
cp /etc/nginx/fastcgi_params "$NGX/"

if [ "$(id -u)" = 0 ]; then user_line='user root;'; else user_line=''; fi
subst "$NGX/nginx.conf" 'user www-data;' "$user_line"
subst "$NGX/nginx.conf" 'pid /run/piapi-nginx.pid;' "pid $NGX/nginx.pid;"
subst "$NGX/nginx.conf" 'error_log /var/log/nginx/piapi-error.log;' 'error_log stderr notice;'
# nginx opens /dev/stdout by name (as /proc/self/fd/1): that fails when our
# stdout is a file or pipe another user owns; then log to a file instead.
if (: >>/dev/stdout) 2>/dev/null; then access_log=/dev/stdout; else access_log=$NGX/access.log; fi
subst "$NGX/nginx.conf" 'access_log /var/log/nginx/piapi-access.log;' "access_log $access_log;"
# the other temp paths nginx creates at start-up (compiled-in under /var/lib/nginx)
subst "$NGX/nginx.conf" 'client_body_temp_path /var/lib/nginx/body;' \
    "client_body_temp_path $NGX/tmp/body; proxy_temp_path $NGX/tmp/proxy; scgi_temp_path $NGX/tmp/scgi; uwsgi_temp_path $NGX/tmp/uwsgi;"
subst "$NGX/nginx.conf" 'fastcgi_temp_path /var/lib/nginx/fastcgi;' "fastcgi_temp_path $NGX/tmp/fastcgi;"
case $BIND in
0.0.0.0|'*'|'')
    v4="listen $PORT;"; v6="listen [::]:$PORT;"; URL_HOST=127.0.0.1 ;;
127.0.0.1|localhost)
    v4="listen 127.0.0.1:$PORT;"; v6="listen [::1]:$PORT;"; URL_HOST=127.0.0.1
    have_ipv6_lo || v6="" ;;
*)
    v4="listen $BIND:$PORT;"; v6=''; URL_HOST=$BIND ;;
esac
have_ipv6 || v6=''
subst "$NGX/nginx.conf" 'listen 9200;' "$v4"
subst "$NGX/nginx.conf" 'listen [::]:9200;' "$v6"
subst "$NGX/piapi.conf" 'fastcgi_pass unix:/run/piapi/piapi.sock;' "fastcgi_pass unix:$SOCK;"

NGINX_ARGS=(-p "$NGX/" -c "$NGX/nginx.conf" -e stderr)
"$NGINX" "${NGINX_ARGS[@]}" -t -q || die "nginx -t failed on $NGX/nginx.conf"

# ---- demo provider -----------------------------------------------------
# The example's providers are placeholders: every request would be a 502.
# While the config in use is config.yaml.example byte for byte (nothing
# else), piapi gets a copy whose baseUrls point at the demo provider on
# 127.0.0.1 instead, so a first request shows the gateway doing its job.
PIAPI_CONFIG=$CONFIG
if cmp -s "$CONFIG" "$REPO/config.yaml.example"; then
    DEMO=$BUILD/demo-provider
    [ -x "$DEMO" ] || die "$DEMO not built (run: make run)"
    port_file=$RUN/demo-provider.port
    rm -f "$port_file"
    setsid "$DEMO" --port-file "$port_file" </dev/null &
    DEMO_PID=$!
    for _ in $(seq 100); do
        [ -s "$port_file" ] || ! alive "$DEMO_PID" || [ "$stopping" = 1 ] && break
        sleep 0.05
    done
    [ -s "$port_file" ] || die "the demo provider did not start"
    demo_port=$(cat "$port_file")
    PIAPI_CONFIG=$RUN/demo-config.yaml
    rm -f "$PIAPI_CONFIG"
    (umask 077 && DEMO_URL="http://127.0.0.1:$demo_port" perl -pe \
        's{^(\s*baseUrl:\s*)https?://[^/\s]+}{$1$ENV{DEMO_URL}}' "$CONFIG" >"$PIAPI_CONFIG")
    [ "$(grep -c 'baseUrl:' "$CONFIG")" = "$(grep -c "baseUrl: http://127.0.0.1:$demo_port/" "$PIAPI_CONFIG")" ] ||
        die "demo: could not point every baseUrl of $CONFIG at the demo provider"
    say "demo provider: $(basename "$CONFIG") is the untouched example, so its providers are a local demo provider (127.0.0.1:$demo_port, canned answers); edit it to use real providers and restart make run"
fi

# ---- usage ledger --------------------------------------------------------
# settings.usageDb names a file in a directory piapi must be able to write
# (the example's is /var/lib/piapi). piapi never creates directories; create
# an absolute one here when we can, so the ledger works on a fresh machine.
usage_db=$(awk '$1 == "usageDb:" { gsub(/["\047]/, "", $2); print $2; exit }' "$CONFIG")
case $usage_db in
/*) usage_dir=$(dirname "$usage_db")
    if [ ! -d "$usage_dir" ]; then
        mkdir -p "$usage_dir" 2>/dev/null && chmod 0700 "$usage_dir" ||
            say "settings.usageDb: cannot create $usage_dir; no usage is recorded until it exists"
    fi ;;
esac

# ---- processes ---------------------------------------------------------
[ "$stopping" = 0 ] || exit 0   # stopped before anything was started

# Each child runs in its own session, so a Ctrl-C on the terminal reaches
# only this script, which then signals each child exactly once (otherwise
# piapi would see SIGINT from the terminal plus our SIGTERM, the second of
# which means "stop at once").
# shellcheck disable=SC2086
setsid "$PIAPI" --config "$PIAPI_CONFIG" --socket "$SOCK" --socket-mode 0660 \
    --grace "$GRACE" --log-level "$LOG_LEVEL" $PIAPI_ARGS </dev/null &
PIAPI_PID=$!
[ "$stopping" = 0 ] || signal_to TERM "$PIAPI_PID"   # a signal came before $! was known

# (a stale socket from a killed run may still be there: wait until it answers)
# A Ctrl-C during start-up skips the rest and goes on to the graceful stop.
for _ in $(seq 100); do
    [ "$stopping" = 0 ] || break
    [ -S "$SOCK" ] && sock_live "$SOCK" && break
    alive "$PIAPI_PID" || break
    sleep 0.05
done
if [ "$stopping" = 0 ]; then
    if ! alive "$PIAPI_PID" || ! sock_live "$SOCK"; then
        wait "$PIAPI_PID" 2>/dev/null && rc=0 || rc=$?
        die "piapi did not start (exit $rc); see its log above"
    fi
    OWN_SOCK=1
    setsid "$NGINX" "${NGINX_ARGS[@]}" -g 'daemon off;' </dev/null &
    NGINX_PID=$!
    [ "$stopping" = 0 ] || signal_to TERM "$NGINX_PID"
fi

for _ in $(seq 100); do
    [ "$stopping" = 0 ] || break
    alive "$NGINX_PID" || break
    if curl -fsS -o /dev/null --max-time 1 "http://$URL_HOST:$PORT/healthz" 2>/dev/null; then
        ready=1; break
    fi
    sleep 0.05
done
if [ "$stopping" = 0 ]; then
    [ "$ready" = 1 ] || die "nginx did not come up on $URL_HOST:$PORT (port in use?)"
    say "ready: http://$URL_HOST:$PORT/piapi/<service_type>/...  (health: /healthz, metrics: /metrics)"
    say "piapi pid $PIAPI_PID, nginx pid $NGINX_PID, config $PIAPI_CONFIG, access log $access_log; Ctrl-C to stop"
fi

# Wait until both have exited. A trapped signal interrupts `sleep`, runs
# on_signal, and the loop goes on waiting for the graceful stop.
while alive "$PIAPI_PID" || alive "$NGINX_PID"; do
    if [ "$stopping" = 0 ] && { ! alive "$PIAPI_PID" || ! alive "$NGINX_PID"; }; then
        if alive "$PIAPI_PID"; then who=nginx; else who=piapi; fi
        say "$who exited unexpectedly; stopping"
        exit 1
    fi
    if [ "$stopping" = 1 ] && [ "$SECONDS" -ge "$stop_deadline" ]; then
        say "still running after the grace period; killing"
        exit 1   # cleanup kills what is left
    fi
    sleep 0.2 || true
done
say "stopped"
exit 0
