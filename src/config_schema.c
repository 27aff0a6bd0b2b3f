/* Config stage 2: the schema. Its tables list every mapping of
 * config.yaml with its keys, which values are secrets and the bounds of
 * every number; a walker per mapping validates the tree against them and
 * copies what it keeps into the snapshot's arena. It never stops at the
 * first problem: every error is collected with the node's line, the way
 * `nginx -t` and lighttpd speak to an operator. A new section is a table
 * entry and a walker. */
#include "config_int.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "piapi/sha256.h"
#include "piapi/util.h"

/* ---------------------------------------------------------------- tables */

#define SETTING_NOTED(field, def, min, max, noted)                         \
    (&(const struct cfg_number){ def, min, max,                           \
     offsetof(struct piapi_settings, field),                           \
        sizeof ((struct piapi_settings *)0)->field == sizeof(uint64_t), noted })
#define SETTING(field, def, min, max) SETTING_NOTED(field, def, min, max, 0)
#define GIVEN(flag) (offsetof(struct piapi_settings, flag) + 1)

static const struct cfg_field settings_fields[] = {
    { .key = "maxBodyBytes",     .number = SETTING(max_body_bytes, 33554432, 1, 1ULL << 40) },
    { .key = "connectTimeoutMs", .number = SETTING(connect_timeout_ms, 10000, 1, 86400000) },
    { .key = "headerTimeoutMs",  .number = SETTING(header_timeout_ms, 300000, 1, 86400000) },
    { .key = "idleTimeoutMs",    .number = SETTING(idle_timeout_ms, 300000, 1, 86400000) },
    { .key = "sseKeepaliveMs",   .number = SETTING_NOTED(sse_keepalive_ms, 15000, 0, 86400000,
                                                        GIVEN(sse_keepalive_explicit)) },
    { .key = "bodyIdleTimeoutMs", .number = SETTING(body_idle_timeout_ms, 30000, 1, 86400000) },
    { .key = "bodyTimeoutMs",    .number = SETTING(body_timeout_ms, 300000, 1, 86400000) },
    { .key = "caFile" },
    { .key = "usageDb" },
    { .key = "redis" },
};
static const struct cfg_schema settings_schema = CFG_SCHEMA(settings_fields);

static const struct cfg_field auth_fields[] = {
    { .key = "mode" }, { .key = "name" }, { .key = "prefix" },
};
static const struct cfg_schema auth_schema = CFG_SCHEMA(auth_fields);

static const struct cfg_field service_fields[] = {
    { .key = "type" },
    { .key = "baseUrl", .secret_url = true },   /* user:pass@, ?code= */
    { .key = "auth", .items = &auth_schema },
    { .key = "usage", .items = &cfg_service_usage_schema },
};
static const struct cfg_schema service_schema = CFG_SCHEMA(service_fields);

static const struct cfg_field provider_fields[] = {
    { .key = "name" },
    { .key = "apiKeys", .secret_values = true },   /* <key name>: <key> */
    { .key = "services", .items = &service_schema },
};
static const struct cfg_schema provider_schema = CFG_SCHEMA(provider_fields);

static const struct cfg_field user_fields[] = {
    { .key = "name" },
    { .key = "apiKey", .secret = true },
    { .key = "apiKeyHash", .secret = true },   /* a weak key's digest can be guessed */
    { .key = "providerName" },
    { .key = "providerKeyName" },
    { .key = "limits", .items = &cfg_limits_schema },
    { .key = "models" },
    { .key = "services" },       /* config_routes.c */
};
static const struct cfg_schema user_schema = CFG_SCHEMA(user_fields);

static const struct cfg_field root_fields[] = {
    { .key = "providers", .items = &provider_schema },
    { .key = "users", .items = &user_schema },
    { .key = "settings", .items = &settings_schema },
    { .key = "pricing", .items = &cfg_pricing_schema },
    { .key = "limits", .items = &cfg_limits_schema },
    { .key = "routes" },         /* config_routes.c */
};
static const struct cfg_schema root_schema = CFG_SCHEMA(root_fields);

/* -------------------------------------------------------------- settings */

static void setting_store(struct piapi_settings *s, const struct cfg_number *num,
                          uint64_t v)
{
    unsigned char *field = (unsigned char *)s + num->off;
    if (num->wide) {
        memcpy(field, &v, sizeof v);
    } else {
        uint32_t v32 = (uint32_t)v;
        memcpy(field, &v32, sizeof v32);
    }
}

static void walk_ca_file(struct ctx *c, const struct ynode *map)
{
    struct stat st;
    char shown[CFG_SHOW_LEN];

    if (!cfg_map_get(map, "caFile"))
        return;  /* the system's CA store */
    const struct ynode *v = cfg_get_str(c, map, "settings", "caFile", CFG_REQUIRED);
    if (!v)
        return;
    cfg_show(c, shown, v->str, v->len);
    if (stat(v->str, &st) != 0 || access(v->str, R_OK) != 0)
        cfg_err(c, v, "settings.caFile", "cannot read '%s': %s", shown,
                strerror(errno));
    else if (!S_ISREG(st.st_mode))
        cfg_err(c, v, "settings.caFile", "'%s' is not a regular file", shown);
    else
        c->cfg->settings.ca_file = cfg_dup_str(c, v);
}

static void walk_settings(struct ctx *c, const struct ynode *map)
{
    struct piapi_settings *s = &c->cfg->settings;

    for (size_t i = 0; i < settings_schema.n; i++)
        if (settings_fields[i].number)
            setting_store(s, settings_fields[i].number, settings_fields[i].number->def);
    if (!map || (map->kind == Y_SCALAR && map->null))
        return;
    if (!cfg_expect_kind(c, map, "settings", Y_MAP))
        return;
    cfg_check_keys(c, map, "settings", &settings_schema);
    for (size_t i = 0; i < settings_schema.n; i++) {
        const struct cfg_field *f = &settings_fields[i];
        const struct cfg_number *spec = f->number;
        char kp[CFG_PATH_LEN];
        uint64_t n;

        if (!spec || !cfg_map_get(map, f->key))
            continue;  /* the default stays */
        /* Present but empty is an error: "maxBodyBytes:" with the number
         * forgotten should not silently mean the default. */
        const struct ynode *v = cfg_get_str(c, map, "settings", f->key, CFG_REQUIRED);
        if (!v)
            continue;
        cfg_path_key(c, kp, "settings", f->key, strlen(f->key));
        if (piapi_parse_u64(v->str, spec->min, spec->max, &n) != 0) {
            cfg_err(c, v, kp, "expected an integer in %" PRIu64 "..%" PRIu64,
                    spec->min, spec->max);
            continue;
        }
        setting_store(s, spec, n);
        if (spec->given)
            *(int *)((unsigned char *)s + spec->given - 1) = 1;
    }
    walk_ca_file(c, map);
    cfg_walk_usage_db(c, map);
}

/* ------------------------------------------------------------- services */

static bool is_tchar(unsigned char ch)
{
    /* RFC 9110 §5.6.2 token characters. */
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
           (ch >= '0' && ch <= '9') || (ch && strchr("!#$%&'*+-.^_`|~", ch));
}

static bool is_unreserved(unsigned char ch)
{
    /* RFC 3986 §2.3: needs no escaping anywhere in a URL. */
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
           (ch >= '0' && ch <= '9') || (ch && strchr("-._~", ch));
}

static bool all_chars(const char *s, size_t len, bool (*ok)(unsigned char))
{
    for (size_t i = 0; i < len; i++)
        if (!ok((unsigned char)s[i]))
            return false;
    return len > 0;
}

static bool is_loopback(const char *h, size_t len)
{
    if (len == 9 && !strncasecmp(h, "localhost", 9))
        return true;
    if (len == 5 && !memcmp(h, "[::1]", 5))
        return true;
    if (len == 17 && !memcmp(h, "[0:0:0:0:0:0:0:1]", 17))
        return true;
    if (len < 4 || memcmp(h, "127.", 4) != 0)
        return false;
    for (size_t i = 4; i < len; i++)
        if (!(h[i] == '.' || (h[i] >= '0' && h[i] <= '9')))
            return false;
    return true;
}

struct url_parts {
    bool plain_http;
    const char *host;
    size_t host_len;
    size_t path_start;   /* offset of the path (== end of the authority) */
};

/* NULL when `u` is an acceptable baseUrl, else why not. Never quotes the URL:
 * a baseUrl may carry credentials in its userinfo or query. */
static const char *url_check(const char *u, size_t len, struct url_parts *out)
{
    size_t scheme;

    if (cfg_has_space_or_ctl(u, len))
        return "must not contain whitespace or control characters";
    if (memchr(u, '#', len))
        return "must not contain a fragment ('#')";
    if (len >= 7 && !strncasecmp(u, "http://", 7))
        scheme = 7, out->plain_http = true;
    else if (len >= 8 && !strncasecmp(u, "https://", 8))
        scheme = 8, out->plain_http = false;
    else
        return "must be an absolute http:// or https:// URL";

    size_t end = scheme;
    while (end < len && u[end] != '/' && u[end] != '?')
        end++;
    out->path_start = end;
    const char *auth = u + scheme;
    size_t alen = end - scheme;
    const char *at = NULL;
    for (size_t i = 0; i < alen; i++)
        if (auth[i] == '@')
            at = auth + i;
    if (at) {
        alen -= (size_t)(at + 1 - auth);
        auth = at + 1;
    }

    const char *port = NULL;
    size_t hlen;
    if (alen && auth[0] == '[') {
        const char *close = memchr(auth, ']', alen);
        if (!close)
            return "has an unterminated IPv6 address";
        hlen = (size_t)(close - auth) + 1;
        if (hlen < alen && auth[hlen] != ':')
            return "has junk after the IPv6 address";
    } else {
        const char *colon = memchr(auth, ':', alen);
        hlen = colon ? (size_t)(colon - auth) : alen;
        for (size_t i = 0; i < hlen; i++)
            if (strchr("[]<>\\^`{|}\"", auth[i]))
                return "has an invalid character in the host";
    }
    if (hlen == 0 || (hlen == 2 && auth[0] == '['))
        return "has no host";
    if (hlen < alen)
        port = auth + hlen + 1;
    if (port) {
        char buf[8];
        size_t plen = (size_t)(auth + alen - port);
        uint64_t pn;
        if (plen == 0 || plen >= sizeof buf)
            return "has an invalid port";
        memcpy(buf, port, plen);
        buf[plen] = '\0';
        if (piapi_parse_u64(buf, 1, 65535, &pn) != 0)
            return "has an invalid port";
    }
    out->host = auth;
    out->host_len = hlen;
    return NULL;
}

/* Trailing '/' of the path go, so "<baseUrl>/<rest>" never has "//"; the
 * query string (if any) is kept as written. */
static const char *url_normalize(struct ctx *c, const char *u, size_t len,
                                 size_t path_start)
{
    const char *q = memchr(u, '?', len);
    size_t qpos = q ? (size_t)(q - u) : len;
    size_t cut = qpos;

    while (cut > path_start && u[cut - 1] == '/')
        cut--;
    char *out = piapi_arena_alloc(&c->cfg->arena, cut + (len - qpos) + 1);
    memcpy(out, u, cut);
    memcpy(out + cut, u + qpos, len - qpos);
    return out;
}

static void walk_base_url(struct ctx *c, const struct ynode *svc,
                          const char *path, struct piapi_service *out)
{
    char kp[CFG_PATH_LEN];
    struct url_parts parts;
    const struct ynode *v = cfg_get_str(c, svc, path, "baseUrl", CFG_REQUIRED);

    if (!v)
        return;
    cfg_path_key(c, kp, path, "baseUrl", 7);
    const char *why = url_check(v->str, v->len, &parts);
    if (why) {
        cfg_err(c, v, kp, "%s", why);
        return;
    }
    if (parts.plain_http && !is_loopback(parts.host, parts.host_len))
        cfg_warn(c, v, kp, "plain http to a non-loopback host sends the provider "
                       "key unencrypted");
    out->base_url = url_normalize(c, v->str, v->len, parts.path_start);
}

static void walk_auth(struct ctx *c, const struct ynode *svc, const char *path,
                      struct piapi_auth *out)
{
    char ap[CFG_PATH_LEN], kp[CFG_PATH_LEN], shown[CFG_SHOW_LEN];
    const struct ynode *auth = cfg_map_get(svc, "auth");

    out->mode = PIAPI_AUTH_HEADER;
    out->name = "Authorization";
    out->prefix = "Bearer ";
    if (!auth || (auth->kind == Y_SCALAR && auth->null))
        return;
    cfg_path_key(c, ap, path, "auth", 4);
    if (!cfg_expect_kind(c, auth, ap, Y_MAP))
        return;
    cfg_check_keys(c, auth, ap, &auth_schema);

    const struct ynode *mode = cfg_get_str(c, auth, ap, "mode", CFG_OPTIONAL);
    if (mode && !(mode->len == 6 && !memcmp(mode->str, "header", 6))) {
        if (mode->len == 5 && !memcmp(mode->str, "query", 5)) {
            out->mode = PIAPI_AUTH_QUERY;
        } else {
            cfg_path_key(c, kp, ap, "mode", 4);
            cfg_err(c, mode, kp, "unsupported auth mode '%s' (use header or query)",
                    cfg_show(c, shown, mode->str, mode->len));
            return;
        }
    }

    /* Query mode has no sensible default parameter name. */
    bool query = out->mode == PIAPI_AUTH_QUERY;
    bool has_name = cfg_map_get(auth, "name") != NULL;
    const struct ynode *name = cfg_get_str(c, auth, ap, "name", query && has_name);
    const struct ynode *prefix_key = cfg_map_get(auth, "prefix");
    cfg_path_key(c, kp, ap, "name", 4);
    if (query) {
        out->prefix = "";
        if (!has_name)
            cfg_err(c, auth, kp, "required when mode is query");
        if (name && !all_chars(name->str, name->len, is_unreserved))
            cfg_err(c, name, kp, "'%s' is not a URL-safe query parameter name "
                    "(letters, digits, - . _ ~)",
                    cfg_show(c, shown, name->str, name->len));
        else if (name)
            out->name = cfg_dup_str(c, name);
        if (prefix_key) {
            cfg_path_key(c, kp, ap, "prefix", 6);
            cfg_err(c, prefix_key, kp, "not allowed when mode is query");
        }
        return;
    }

    if (name && !all_chars(name->str, name->len, is_tchar)) {
        cfg_err(c, name, kp, "'%s' is not a valid HTTP header name",
                cfg_show(c, shown, name->str, name->len));
        return;
    }
    if (name && name->len)
        out->name = cfg_dup_str(c, name);
    const struct ynode *prefix = cfg_get_str(c, auth, ap, "prefix", CFG_OPTIONAL);
    if (prefix && cfg_has_ctl(prefix->str, prefix->len, true)) {
        cfg_path_key(c, kp, ap, "prefix", 6);
        cfg_err(c, prefix, kp, "must not contain control characters");
    } else if (prefix) {
        out->prefix = cfg_dup_str(c, prefix);
    } else {
        /* Only Authorization carries a scheme; x-api-key and friends take
         * the bare key (RFC 6750 §2.1 vs. Anthropic's x-api-key). */
        out->prefix = strcasecmp(out->name, "Authorization") == 0 ? "Bearer " : "";
    }
}

static void walk_service_type(struct ctx *c, const struct ynode *svc,
                              const char *path, size_t pi,
                              struct piapi_service *out)
{
    char kp[CFG_PATH_LEN], shown[CFG_SHOW_LEN];
    const struct ynode *t = cfg_get_str(c, svc, path, "type", CFG_REQUIRED);

    if (!t)
        return;
    cfg_path_key(c, kp, path, "type", 4);
    cfg_show(c, shown, t->str, t->len);
    /* It is one URL path segment: /piapi/<type>/... */
    if (!all_chars(t->str, t->len, is_unreserved)) {
        cfg_err(c, t, kp, "'%s' may only contain letters, digits and - . _ ~",
                shown);
        return;
    }
    if ((t->len == 1 && t->str[0] == '.') ||
        (t->len == 2 && !memcmp(t->str, "..", 2))) {
        cfg_err(c, t, kp, "'%s' is not a usable path segment", shown);
        return;
    }
    const struct strset_ent *dup = cfg_strset_add(&c->svc_types, pi, t->str,
                                                  t->len, t->line);
    if (dup) {
        cfg_err(c, t, kp, "duplicate service type '%s' (first at line %zu)",
                shown, dup->val);
        return;
    }
    out->type = cfg_dup_str(c, t);
}

static void walk_service(struct ctx *c, const struct ynode *svc,
                         const char *path, size_t pi, struct piapi_service *out)
{
    out->provider = &c->cfg->providers[pi];
    if (!cfg_expect_kind(c, svc, path, Y_MAP))
        return;
    cfg_check_keys(c, svc, path, &service_schema);
    walk_service_type(c, svc, path, pi, out);
    walk_base_url(c, svc, path, out);
    walk_auth(c, svc, path, &out->auth);
    cfg_walk_service_usage(c, svc, path, out);
}

/* ------------------------------------------------------------ providers */

/* ------------------------------------------------------- provider keys */

#define MAX_KEY_FILE 16384  /* a key is tens of bytes; a certificate is not one */

/* Reads a key file whole into buf (NUL-terminated). Only a regular file:
 * opening a FIFO or a device must not hang or flood a reload. Returns NULL
 * on success, else what went wrong (errno's words or our own). */
static const char *read_key_file(const char *path, char *buf, size_t cap,
                                 size_t *len)
{
    struct stat st;
    const char *why = NULL;
    int fd = open(path, O_RDONLY | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);

    if (fd < 0)
        return strerror(errno);
    if (fstat(fd, &st) != 0)
        why = strerror(errno);
    else if (!S_ISREG(st.st_mode))
        why = "not a regular file";
    else if ((uint64_t)st.st_size >= cap)
        why = "larger than 16 KiB";
    *len = 0;
    while (!why && *len < cap - 1) {
        ssize_t n = read(fd, buf + *len, cap - 1 - *len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            why = strerror(errno);
        if (n <= 0)
            break;
        *len += (size_t)n;
    }
    close(fd);
    buf[*len] = '\0';
    return why;
}

/* `env:NAME`, `file:PATH` and `credential:NAME` (systemd LoadCredential=,
 * read from $CREDENTIALS_DIRECTORY) take the key from outside the file, at
 * every load, so a secret store never has to be copied into config.yaml.
 * Messages name the reference, never what it holds. The value is copied
 * into the arena and every scratch copy is wiped. */
static const char *external_key(struct ctx *c, const struct ynode *v,
                                const char *kp)
{
    char buf[MAX_KEY_FILE], path[PATH_MAX], shown[CFG_SHOW_LEN];
    const char *ref = v->str, *src = NULL, *why = NULL;
    size_t len = 0;

    if (strncmp(ref, "env:", 4) == 0) {
        src = getenv(ref + 4);
        if (!src || !*src)
            why = "environment variable is not set or empty";
        else
            len = strlen(src);
    } else {
        const char *dir = getenv("CREDENTIALS_DIRECTORY");
        bool cred = strncmp(ref, "credential:", 11) == 0;
        if (cred && (!dir || !*dir))
            why = "$CREDENTIALS_DIRECTORY is not set (systemd LoadCredential=)";
        else if ((size_t)snprintf(path, sizeof path, "%s%s%s", cred ? dir : "",
                                  cred ? "/" : "", ref + (cred ? 11 : 5)) >= sizeof path)
            why = "path too long";
        else if (!(why = read_key_file(path, buf, sizeof buf, &len)))
            src = buf;
    }
    /* Files end with a newline, and `echo` or an editor puts one there. */
    while (src && len && isspace((unsigned char)src[len - 1]))
        len--;
    while (src && len && isspace((unsigned char)*src))
        src++, len--;
    const char *out = NULL;
    if (!why && len == 0)
        why = "the key it names is empty";
    else if (!why && cfg_has_space_or_ctl(src, len))
        why = "the key it names contains whitespace or control characters";
    else if (!why && len < PIAPI_SECRET_MIN_LEN)
        why = "the key it names is shorter than 4 characters";
    else if (!why) {
        out = piapi_arena_strndup(&c->cfg->arena, src, len);
        /* Known from now on, so no later message quotes it. */
        cfg_strset_add(&c->secrets, 0, out, len, 0);
        /* A rotated secret changes what is live while the file's bytes,
         * and so its public hash, stay the same. */
        c->cfg->external_id = (c->cfg->external_id ^ piapi_hash(src, len)) *
                              0x100000001b3ULL;
    }
    if (why)
        cfg_err(c, v, kp, "'%s': %s", cfg_show(c, shown, ref, v->len), why);
    explicit_bzero(buf, sizeof buf);
    return out;
}

static bool is_key_reference(const struct ynode *v)
{
    return v->kind == Y_SCALAR && !v->null && !v->has_nul &&
           (strncmp(v->str, "env:", 4) == 0 || strncmp(v->str, "file:", 5) == 0 ||
           strncmp(v->str, "credential:", 11) == 0);
}

static const char *key_value(struct ctx *c, const struct ynode *v, const char *kp)
{
    if (is_key_reference(v))
        return external_key(c, v, kp);
    if (v->has_nul || cfg_has_space_or_ctl(v->str, v->len)) {
        /* It goes into a header or a query string verbatim. */
        cfg_err(c, v, kp, "key value must not contain whitespace or control "
                          "characters");
        return NULL;
    }
    if (v->len < PIAPI_SECRET_MIN_LEN) {
        /* piapi keeps the key out of every answer by looking for it: a
         * key of a character or two would match ordinary text. */
        cfg_err(c, v, kp, "key value is shorter than 4 characters");
        return NULL;
    }
    return cfg_dup_str(c, v);
}

static void walk_api_keys(struct ctx *c, const struct ynode *prov,
                          const char *path, size_t pi,
                          struct piapi_provider *out)
{
    char mp[CFG_PATH_LEN], kp[CFG_PATH_LEN];
    const struct ynode *map = cfg_get_coll(c, prov, path, "apiKeys", Y_MAP);

    if (!map)
        return;
    cfg_path_key(c, mp, path, "apiKeys", 7);
    cfg_check_keys(c, map, mp, NULL);
    struct piapi_provider_key *keys = piapi_arena_array(&c->cfg->arena,
                                                      map->count / 2, sizeof *keys);
    size_t n = 0;
    for (const struct ynode *k = map->first; k && k->next; k = k->next->next) {
        const struct ynode *v = k->next;
        if (k->kind != Y_SCALAR)
            continue;  /* reported by check_keys */
        cfg_path_key(c, kp, mp, k->str, k->len);
        if (k->null || k->len == 0 || k->has_nul ||
            cfg_has_ctl(k->str, k->len, false)) {
            cfg_err(c, k, kp, "key names must be non-empty printable strings");
            continue;
        }
        if (cfg_strset_add(&c->prov_keys, pi, k->str, k->len, n))
            continue;  /* duplicate: reported by check_keys */
        struct piapi_provider_key *key = &keys[n++];
        key->name = cfg_dup_str(c, k);
        if (v->kind != Y_SCALAR) {
            cfg_expect_kind(c, v, kp, Y_SCALAR);
        } else if (v->null || v->len == 0) {
            /* Not named: "{sk-...}" is a key pasted without a name. */
            cfg_err(c, v, mp, "empty key value (entries are <name>: <key>)");
        } else {
            key->value = key_value(c, v, kp);
        }
    }
    out->keys = keys;
    out->nkeys = n;
}

static void walk_provider(struct ctx *c, const struct ynode *prov, size_t pi)
{
    struct piapi_provider *out = &c->cfg->providers[pi];
    char path[CFG_PATH_LEN], sp[CFG_PATH_LEN], ip[CFG_PATH_LEN];

    cfg_path_idx(path, "providers", pi);
    if (!cfg_expect_kind(c, prov, path, Y_MAP))
        return;
    cfg_check_keys(c, prov, path, &provider_schema);
    out->name = cfg_unique_name(c, prov, path, &c->prov_names, pi, "provider",
                                "providers");
    walk_api_keys(c, prov, path, pi, out);

    const struct ynode *svcs = cfg_get_coll(c, prov, path, "services", Y_SEQ);
    if (!svcs)
        return;
    struct piapi_service *services = piapi_arena_array(&c->cfg->arena, svcs->count,
                                                     sizeof *services);
    cfg_path_key(c, sp, path, "services", 8);
    size_t i = 0;
    for (const struct ynode *s = svcs->first; s; s = s->next, i++) {
        cfg_path_idx(ip, sp, i);
        walk_service(c, s, ip, pi, &services[i]);
    }
    out->services = services;
    out->nservices = svcs->count;
    c->cfg->nservices += svcs->count;
}

static void walk_providers(struct ctx *c, const struct ynode *root)
{
    const struct ynode *seq = cfg_get_coll(c, root, "", "providers", Y_SEQ);

    if (!seq)
        return;
    c->cfg->providers = piapi_arena_array(&c->cfg->arena, seq->count,
                                        sizeof *c->cfg->providers);
    c->cfg->nproviders = seq->count;
    size_t i = 0;
    for (const struct ynode *p = seq->first; p; p = p->next, i++)
        walk_provider(c, p, i);
}

/* ---------------------------------------------------------------- users */

static void walk_user_binding(struct ctx *c, const struct ynode *u,
                              const char *path, struct piapi_user *out)
{
    char kp[CFG_PATH_LEN], s1[CFG_SHOW_LEN], s2[CFG_SHOW_LEN];
    const struct ynode *pn = cfg_get_name(c, u, path, "providerName");
    const struct ynode *kn = cfg_get_name(c, u, path, "providerKeyName");

    if (!pn)
        return;
    const struct strset_ent *pe = cfg_strset_find(&c->prov_names, 0, pn->str, pn->len);
    if (!pe) {
        cfg_path_key(c, kp, path, "providerName", 12);
        cfg_err(c, pn, kp, "unknown provider '%s'", cfg_show(c, s1, pn->str, pn->len));
        return;
    }
    out->provider = &c->cfg->providers[pe->val];
    if (!kn)
        return;
    const struct strset_ent *ke = cfg_strset_find(&c->prov_keys, pe->val, kn->str,
                                                  kn->len);
    if (!ke) {
        cfg_path_key(c, kp, path, "providerKeyName", 15);
        cfg_err(c, kn, kp, "key '%s' not defined for provider '%s'",
                cfg_show(c, s1, kn->str, kn->len), cfg_show(c, s2, pn->str, pn->len));
        return;
    }
    out->key = &out->provider->keys[ke->val];
}

/* "sha256:" and 64 hex digits, either case. 0 on success. */
static int parse_key_hash(const char *s, size_t len,
                          unsigned char out[PIAPI_SHA256_LEN])
{
    static const char prefix[] = "sha256:";
    const size_t plen = sizeof prefix - 1;

    if (len != plen + 2 * PIAPI_SHA256_LEN || strncmp(s, prefix, plen) != 0)
        return -1;
    for (size_t i = 0; i < PIAPI_SHA256_LEN; i++) {
        int hi = piapi_hex_digit(s[plen + 2 * i]);
        int lo = piapi_hex_digit(s[plen + 2 * i + 1]);
        if (hi < 0 || lo < 0)
            return -1;
        out[i] = (unsigned char)(hi << 4 | lo);
    }
    return 0;
}

/* A member key is kept only as its SHA-256, taken from apiKey or given as
 * apiKeyHash (a config that never holds the key itself). Exactly one of
 * the two; duplicates are found across both forms. */
static void walk_user_key(struct ctx *c, const struct ynode *u,
                          const char *path, size_t ui, struct piapi_user *out)
{
    const struct ynode *plain = cfg_map_get(u, "apiKey");
    const struct ynode *hashed = cfg_map_get(u, "apiKeyHash");
    const char *field = hashed ? "apiKeyHash" : "apiKey";
    char kp[CFG_PATH_LEN];

    cfg_path_key(c, kp, path, field, strlen(field));
    if (plain && hashed) {
        cfg_err(c, hashed, kp, "give apiKey or apiKeyHash, not both");
        return;
    }
    if (!plain && !hashed) {
        cfg_err(c, u, kp, "required field is missing (or apiKeyHash)");
        return;
    }
    const struct ynode *v = cfg_get_str(c, u, path, field, CFG_REQUIRED);
    if (!v)
        return;
    if (hashed) {
        if (parse_key_hash(v->str, v->len, out->key_digest) != 0) {
            cfg_err(c, v, kp, "must be \"sha256:\" and 64 hex digits "
                          "(piapi keygen prints one)");
            return;
        }
    } else if (cfg_has_space_or_ctl(v->str, v->len)) {
        /* Clients send it in a header; it could never match. */
        cfg_err(c, v, kp, "must not contain whitespace or control characters");
        return;
    } else {
        piapi_sha256(v->str, v->len, out->key_digest);
    }
    const struct strset_ent *dup = cfg_strset_add(&c->user_keys, 0,
                                                  (const char *)out->key_digest,
                                              PIAPI_SHA256_LEN, ui);
    if (dup)
        cfg_err(c, v, kp, "same key as users[%zu] (keys must be unique)", dup->val);
}

static void walk_user(struct ctx *c, const struct ynode *u, size_t ui)
{
    struct piapi_user *out = &c->cfg->users[ui];
    char path[CFG_PATH_LEN];

    cfg_path_idx(path, "users", ui);
    if (!cfg_expect_kind(c, u, path, Y_MAP))
        return;
    cfg_check_keys(c, u, path, &user_schema);
    out->name = cfg_unique_name(c, u, path, &c->user_names, ui, "user", "users");
    walk_user_key(c, u, path, ui, out);
    walk_user_binding(c, u, path, out);
    cfg_walk_user_services(c, u, path, out);
}

static void walk_users(struct ctx *c, const struct ynode *root)
{
    const struct ynode *seq = cfg_map_get(root, "users");

    if (!seq) {
        cfg_err(c, root, "users", "required field is missing (use [] for none)");
        return;
    }
    if (seq->kind == Y_SCALAR && seq->null)
        return;  /* "users:" with every entry commented out */
    if (!cfg_expect_kind(c, seq, "users", Y_SEQ))
        return;
    c->cfg->users = piapi_arena_array(&c->cfg->arena, seq->count, sizeof *c->cfg->users);
    c->cfg->nusers = seq->count;
    size_t i = 0;
    for (const struct ynode *u = seq->first; u; u = u->next, i++)
        walk_user(c, u, i);
}

static void add_secret(struct ctx *c, const struct ynode *v)
{
    if (v && v->kind == Y_SCALAR && v->len)
        cfg_strset_add(&c->secrets, 0, v->str, v->len, 0);
}

static void add_secret_str(struct ctx *c, const char *s, size_t len)
{
    if (len)
        cfg_strset_add(&c->secrets, 0, s, len, 0);
}

/* A baseUrl may carry credentials too: basic auth in its userinfo, a key
 * in its query (Azure Functions' ?code=). The userinfo whole, its user and
 * password, and every query value are secrets like the keys. */
static void add_url_secrets(struct ctx *c, const struct ynode *v)
{
    if (!v || v->kind != Y_SCALAR || !v->len)
        return;
    const char *s = v->str, *end = s + v->len;
    const char *scheme = memmem(s, v->len, "://", 3);
    const char *auth = scheme ? scheme + 3 : end, *at = NULL;
    for (const char *p = auth; p < end && *p != '/' && *p != '?'; p++)
        if (*p == '@')
            at = p;
    if (at) {
        const char *colon = memchr(auth, ':', (size_t)(at - auth));
        add_secret_str(c, auth, (size_t)(at - auth));
        if (colon) {
            add_secret_str(c, auth, (size_t)(colon - auth));
            add_secret_str(c, colon + 1, (size_t)(at - colon - 1));
        }
    }
    const char *q = memchr(s, '?', v->len);
    for (const char *p = q ? q + 1 : end; p < end;) {
        const char *amp = memchr(p, '&', (size_t)(end - p));
        const char *pend = amp ? amp : end;
        const char *eq = memchr(p, '=', (size_t)(pend - p));
        const char *val = eq ? eq + 1 : p;
        add_secret_str(c, val, (size_t)(pend - val));
        p = pend + (amp ? 1 : 0);
    }
}

/* Before anything is reported: every value that sits where the schema
 * keeps a secret. A reference to a key kept elsewhere (env:, file:,
 * credential:) is no secret and may be quoted. */
static void collect_secrets(struct ctx *c, const struct ynode *map,
                         const struct cfg_schema *schema)
{
    if (!map || map->kind != Y_MAP)
        return;
    for (size_t i = 0; i < schema->n; i++) {
        const struct cfg_field *f = &schema->fields[i];
        const struct ynode *v = cfg_map_get(map, f->key);
        if (!v)
            continue;
        if (f->secret)
            add_secret(c, v);
        if (f->secret_url)
            add_url_secrets(c, v);
        if (f->secret_values && v->kind == Y_MAP)
            for (const struct ynode *k = v->first; k && k->next; k = k->next->next)
                if (!is_key_reference(k->next))
                    add_secret(c, k->next);
        if (f->items && v->kind == Y_SEQ)
            for (const struct ynode *e = v->first; e; e = e->next)
                collect_secrets(c, e, f->items);
        else if (f->items)
            collect_secrets(c, v, f->items);
    }
}

void cfg_walk_root(struct ctx *c, const struct ynode *root)
{
    if (!root) {
        cfg_err_at(c, 1, "(top level)", "empty config: expected a mapping with "
                                    "providers and users");
        return;
    }
    if (!cfg_expect_kind(c, root, "(top level)", Y_MAP))
        return;
    collect_secrets(c, root, &root_schema);
    cfg_check_keys(c, root, "", &root_schema);
    walk_settings(c, cfg_map_get(root, "settings"));
    walk_providers(c, root);
    cfg_walk_routes(c, root);
    walk_users(c, root);
    cfg_walk_pricing(c, root);
    cfg_walk_limits(c, root);
}
