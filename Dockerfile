# piapi — container image: build on Debian bookworm, run on bookworm-slim
# with only the runtime libraries.
#
#   docker build -t piapi .
#   docker run -v "$PWD/config:/etc/piapi:ro" -v piapi-run:/run/piapi piapi
#
# The image runs piapi alone; a web server (nginx, lighttpd) in another
# container reaches it through the socket in the /run/piapi volume. See
# docker-compose.yml for the nginx sidecar pair and deploy/k8s/piapi.yaml
# for the same pair in one Kubernetes pod.
#
# Config: mount a DIRECTORY holding config.yaml at /etc/piapi (not the
# single file: piapi watches the directory with inotify, and a single-file
# bind mount keeps showing the old inode after a rename-style save such as
# vim's or `sed -i`). The image ships no config; config.yaml.example is in
# /usr/local/share/doc/piapi/.

ARG DEBIAN_TAG=bookworm-slim

# ---- build ---------------------------------------------------------------
FROM debian:${DEBIAN_TAG} AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        build-essential pkg-config \
        libfcgi-dev libcurl4-openssl-dev libyaml-dev libcjson-dev libsqlite3-dev libhiredis-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Only what `make all` reads (.dockerignore keeps build/, config.yaml and
# the rest out of the context).
COPY Makefile ./
COPY include/ include/
COPY src/ src/
COPY config.yaml.example ./
RUN make -j"$(nproc)" all \
 && install -D -m 0755 build/piapi /out/usr/local/bin/piapi \
 && install -D -m 0644 config.yaml.example /out/usr/local/share/doc/piapi/config.yaml.example \
 && /out/usr/local/bin/piapi --version \
 && /out/usr/local/bin/piapi --check-config --config config.yaml.example

# ---- runtime -------------------------------------------------------------
FROM debian:${DEBIAN_TAG}
# libfcgi0ldbl, libcurl4, libyaml-0-2, libcjson1, libsqlite3-0 (the usage
# ledger), libhiredis0.14 (settings.redis): what the -dev packages above link against. ca-certificates: TLS
# to the providers. libfcgi-bin: cgi-fcgi, used by HEALTHCHECK to ask
# /healthz over the FastCGI socket (34 kB; no curl needed, and there is no
# HTTP listener in this container).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        libfcgi0ldbl libcurl4 libyaml-0-2 libcjson1 libsqlite3-0 libhiredis0.14 ca-certificates libfcgi-bin \
 && rm -rf /var/lib/apt/lists/*

# A fixed, numeric non-root user: Kubernetes' runAsNonRoot can only verify
# a numeric USER, and the uid is what docker-compose.yml / deploy/k8s
# give ownership of the socket directory to.
RUN groupadd --system --gid 10001 piapi \
 && useradd --system --uid 10001 --gid piapi --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin piapi \
 && install -d -m 0755 -o piapi -g piapi /run/piapi \
 && install -d -m 0700 -o piapi -g piapi /var/lib/piapi \
 && install -d -m 0755 /etc/piapi

COPY --from=build /out/ /

USER 10001:10001
# The FastCGI socket lives here, shared with the web server's container.
VOLUME /run/piapi
# The usage ledger (settings.usageDb: /var/lib/piapi/usage.db): a volume, so
# usage outlives the container.
VOLUME /var/lib/piapi

# Asks piapi itself over the socket (the same /healthz nginx routes to it).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD SCRIPT_NAME=/healthz REQUEST_URI=/healthz REQUEST_METHOD=GET cgi-fcgi -bind -connect /run/piapi/piapi.sock | grep -q '^ok'

# SIGTERM: piapi stops accepting, lets running streams finish for --grace
# (default 30 s) and removes its socket; give `docker stop -t 40` or
# compose's stop_grace_period: 40s for that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/piapi"]
# --socket-mode 0666: the image cannot know the web server's uid/gid. The
# socket is only reachable through the /run/piapi volume, so only the
# containers that mount it can connect. docker-compose.yml and
# deploy/k8s/piapi.yaml narrow it to 0660 with a group shared with nginx.
CMD ["--config", "/etc/piapi/config.yaml", "--socket", "/run/piapi/piapi.sock", "--socket-mode", "0666"]
