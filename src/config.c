/* config.yaml → immutable, reference-counted snapshot (stage 3 and the
 * public face of the config stages; see config_int.h for the others).
 *
 * A load reads the file once, builds the tree (config_tree.c), walks the
 * schema (config_schema.c) and, only when there are no errors, builds the
 * lookup tables and hands the snapshot out with one reference.
 *
 * Everything a snapshot points to lives in one arena, so releasing it is
 * "wipe every block, free every block": secrets cannot be missed. */
#include "piapi/config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config_int.h"
#include "piapi/sha256.h"
#include "piapi/util.h"

/* -------------------------------------------------------- lookup tables */

static size_t table_cap(size_t n)
{
    size_t cap = 4;
    while (cap < 2 * n)
        cap *= 2;
    return cap;
}

static uint64_t service_hash(const struct piapi_provider *p, const char *type,
                             size_t len)
{
    uint64_t h = piapi_hash(type, len);
    h ^= (uint64_t)(uintptr_t)p * 0x9E3779B97F4A7C15ULL;
    return h ^ (h >> 29);
}

static void build_tables(struct piapi_config *cfg)
{
    size_t cap = table_cap(cfg->nusers);
    cfg->user_tab = piapi_arena_array(&cfg->arena, cap, sizeof *cfg->user_tab);
    cfg->user_mask = cap - 1;
    for (size_t i = 0; i < cfg->nusers; i++) {
        const struct piapi_user *u = &cfg->users[i];
        size_t s = (size_t)piapi_hash(u->key_digest, PIAPI_SHA256_LEN) &
                   cfg->user_mask;
        while (cfg->user_tab[s])
            s = (s + 1) & cfg->user_mask;
        cfg->user_tab[s] = u;
    }

    cap = table_cap(cfg->nservices);
    cfg->svc_tab = piapi_arena_array(&cfg->arena, cap, sizeof *cfg->svc_tab);
    cfg->svc_mask = cap - 1;
    for (size_t p = 0; p < cfg->nproviders; p++) {
        const struct piapi_provider *prov = &cfg->providers[p];
        for (size_t i = 0; i < prov->nservices; i++) {
            const struct piapi_service *svc = &prov->services[i];
            size_t s = (size_t)service_hash(prov, svc->type, strlen(svc->type)) &
                       cfg->svc_mask;
            while (cfg->svc_tab[s])
                s = (s + 1) & cfg->svc_mask;
            cfg->svc_tab[s] = svc;
        }
    }
}

static void set_hash(struct piapi_config *cfg, const char *text, size_t len)
{
    uint64_t h = 0xcbf29ce484222325ULL;  /* FNV-1a 64 */
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)text[i];
        h *= 0x100000001b3ULL;
    }
    snprintf(cfg->hash, sizeof cfg->hash, "%012" PRIx64, h >> 16);
}

/* ------------------------------------------------------------- loading */

static void ctx_init(struct ctx *c, const char *name)
{
    *c = (struct ctx){ .name = name && *name ? name : "config" };
}

static void ctx_dispose(struct ctx *c)
{
    cfg_strset_dispose(&c->prov_names);
    cfg_strset_dispose(&c->prov_keys);
    cfg_strset_dispose(&c->svc_types);
    cfg_strset_dispose(&c->user_names);
    cfg_strset_dispose(&c->user_keys);
    cfg_strset_dispose(&c->secrets);
    cfg_strset_dispose(&c->route_names);
    piapi_arena_dispose(&c->tree);
}

static void config_free(struct piapi_config *cfg)
{
    piapi_arena_dispose(&cfg->arena);
    explicit_bzero(cfg, sizeof *cfg);
    free(cfg);
}

static struct piapi_config *parse_ctx(struct ctx *c, const char *text,
                                      size_t len)
{
    bool failed;

    if (!text)
        text = "", len = 0;
    if (len > CFG_MAX_FILE_BYTES) {
        cfg_err_file(c, "config is larger than 4 MiB", 0);
        return NULL;
    }
    c->cfg = piapi_xcalloc(1, sizeof *c->cfg);
    struct ynode *root = cfg_tree_build(c, text, len, &failed);
    if (!failed)
        cfg_walk_root(c, root);
    if (c->err.n) {
        config_free(c->cfg);
        c->cfg = NULL;
        return NULL;
    }
    build_tables(c->cfg);
    set_hash(c->cfg, text, len);
    atomic_init(&c->cfg->refs, 1);
    return c->cfg;
}

static void hand_over(struct ctx *c, char **errors, char **warnings)
{
    char *e = cfg_msgs_take(&c->err);
    char *w = cfg_msgs_take(&c->warn);

    if (errors)
        *errors = e;
    else
        free(e);
    if (warnings)
        *warnings = w;
    else
        free(w);
}

struct piapi_config *piapi_config_parse(const char *text, size_t len,
                                        const char *name, char **errors,
                                        char **warnings)
{
    struct ctx c;

    ctx_init(&c, name);
    struct piapi_config *cfg = parse_ctx(&c, text, len);
    hand_over(&c, errors, warnings);
    ctx_dispose(&c);
    return cfg;
}

/* Reads the whole file; never more than CFG_MAX_FILE_BYTES + 1 so a huge or
 * endless file (a FIFO, /dev/zero) cannot exhaust memory. */
static char *read_file(struct ctx *c, int fd, size_t *len)
{
    size_t cap = 8192, n = 0;
    char *buf = piapi_xmalloc(cap);

    for (;;) {
        if (n == cap) {
            if (cap > CFG_MAX_FILE_BYTES)
                break;
            char *nb = piapi_xmalloc(cap * 2);
            memcpy(nb, buf, n);
            explicit_bzero(buf, n);
            free(buf);
            buf = nb;
            cap *= 2;
        }
        ssize_t r = read(fd, buf + n, cap - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            int saved = errno;
            cfg_err_file(c, "cannot read config file", saved);
            explicit_bzero(buf, n);
            free(buf);
            errno = saved;
            return NULL;
        }
        if (r == 0)
            break;
        n += (size_t)r;
    }
    *len = n;
    return buf;
}

struct piapi_config *piapi_config_load_file(const char *path, char **errors,
                                            char **warnings,
                                            struct piapi_config_read *rd)
{
    struct ctx c;
    struct piapi_config *cfg = NULL;
    struct piapi_config_read scratch;
    struct stat st;
    char *text = NULL;
    size_t len = 0;
    int fd = -1;

    if (!rd)
        rd = &scratch;
    *rd = (struct piapi_config_read){ .error = EINVAL };
    ctx_init(&c, path);
    if (!path) {
        cfg_err_file(&c, "no config file given", 0);
        goto out;
    }
    /* O_NONBLOCK: a FIFO in its place must not hang a reload. */
    fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0) {
        rd->error = errno;
        cfg_err_file(&c, "cannot open config file", errno);
        goto out;
    }
    if (fstat(fd, &st) != 0) {
        rd->error = errno;
        cfg_err_file(&c, "cannot stat config file", errno);
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        cfg_err_file(&c, "config file is not a regular file", 0);
        goto out;
    }
    /* Group access is how the service user reads it (0640 root:piapi,
     * Kubernetes fsGroup); only world access is worth a warning. */
    if (st.st_mode & 007)
        cfg_warn(&c, NULL, "(file)", "config file is accessible to every user and "
                                     "holds secrets; chmod o-rwx (e.g. 0640 or 0600)");
    text = read_file(&c, fd, &len);
    if (!text) {
        rd->error = errno;
        goto out;
    }
    *rd = (struct piapi_config_read){ .read = true, .len = len,
                                      .digest = piapi_hash(text, len) };
    cfg = parse_ctx(&c, text, len);
out:
    if (text) {
        explicit_bzero(text, len);
        free(text);
    }
    if (fd >= 0)
        close(fd);
    hand_over(&c, errors, warnings);
    ctx_dispose(&c);
    return cfg;
}

/* ------------------------------------------------------ snapshot access */

struct piapi_config *piapi_config_acquire(struct piapi_config *cfg)
{
    if (cfg)
        atomic_fetch_add_explicit(&cfg->refs, 1, memory_order_relaxed);
    return cfg;
}

void piapi_config_release(struct piapi_config *cfg)
{
    if (!cfg)
        return;
    /* acq_rel: every use by other holders happens before the free. */
    if (atomic_fetch_sub_explicit(&cfg->refs, 1, memory_order_acq_rel) == 1)
        config_free(cfg);
}

const struct piapi_user *piapi_config_find_user(const struct piapi_config *cfg,
                                                const char *key, size_t len)
{
    unsigned char digest[PIAPI_SHA256_LEN];

    if (!cfg || !key || len == 0)
        return NULL;
    piapi_sha256(key, len, digest);
    size_t s = (size_t)piapi_hash(digest, sizeof digest) & cfg->user_mask;
    for (; cfg->user_tab[s]; s = (s + 1) & cfg->user_mask) {
        const struct piapi_user *u = cfg->user_tab[s];
        if (piapi_ct_equal(u->key_digest, PIAPI_SHA256_LEN, digest, sizeof digest))
            return u;
    }
    return NULL;
}

const struct piapi_service *
piapi_config_find_service(const struct piapi_config *cfg,
                          const struct piapi_provider *provider,
                          const char *type, size_t len)
{
    if (!cfg || !provider || !type)
        return NULL;
    size_t s = (size_t)service_hash(provider, type, len) & cfg->svc_mask;
    for (; cfg->svc_tab[s]; s = (s + 1) & cfg->svc_mask) {
        const struct piapi_service *svc = cfg->svc_tab[s];
        if (svc->provider == provider && strlen(svc->type) == len &&
            memcmp(svc->type, type, len) == 0)
            return svc;
    }
    return NULL;
}

const struct piapi_settings *piapi_config_settings(const struct piapi_config *cfg)
{
    return &cfg->settings;
}

const struct piapi_price *piapi_config_find_price(const struct piapi_config *cfg,
                                                  const char *model)
{
    size_t n = strlen(model);
    for (size_t i = 0; i < cfg->nprices; i++) {
        const struct piapi_price *p = &cfg->prices[i];
        if (p->prefix ? n >= p->len && memcmp(model, p->model, p->len) == 0
                      : n == p->len && memcmp(model, p->model, n) == 0)
            return p;
    }
    return NULL;
}

const char *piapi_config_hash(const struct piapi_config *cfg)
{
    return cfg->hash;
}

bool piapi_config_same(const struct piapi_config *a, const struct piapi_config *b)
{
    return strcmp(a->hash, b->hash) == 0 && a->external_id == b->external_id;
}

void piapi_config_counts(const struct piapi_config *cfg, size_t *providers,
                         size_t *services, size_t *users)
{
    if (providers)
        *providers = cfg ? cfg->nproviders : 0;
    if (services)
        *services = cfg ? cfg->nservices : 0;
    if (users)
        *users = cfg ? cfg->nusers : 0;
}

/* ------------------------------------------------------- live snapshot */

static pthread_mutex_t live_lock = PTHREAD_MUTEX_INITIALIZER;
static struct piapi_config *live;

struct piapi_config *piapi_config_current(void)
{
    pthread_mutex_lock(&live_lock);
    struct piapi_config *cfg = piapi_config_acquire(live);
    pthread_mutex_unlock(&live_lock);
    return cfg;
}

void piapi_config_publish(struct piapi_config *cfg)
{
    pthread_mutex_lock(&live_lock);
    struct piapi_config *old = live;
    live = cfg;
    pthread_mutex_unlock(&live_lock);
    /* Outside the lock: the last release frees a whole snapshot. */
    piapi_config_release(old);
}

/* ---- the snapshot's side ------------------------------------------------ */

const struct piapi_route_set *piapi_config_user_route(const struct piapi_user *user,
                                                      const char *type, size_t len)
{
    for (size_t i = 0; i < user->nservices; i++) {
        const char *t = user->services[i].type;
        if (strncmp(t, type, len) == 0 && t[len] == '\0')
            return user->services[i].route;
    }
    return &user->default_route;
}

static bool route_names(const struct piapi_route_set *r, const char *provider,
                        const char *key)
{
    for (size_t i = 0; i < r->ncandidates; i++) {
        const struct piapi_candidate *c = &r->candidates[i];
        if (c->provider && c->key && !strcmp(c->provider->name, provider) &&
            !strcmp(c->key->name, key))
            return true;
    }
    return false;
}

bool piapi_config_names_candidate(const struct piapi_config *cfg, const char *provider,
                                  const char *key)
{
    for (size_t i = 0; i < cfg->nroutes; i++)
        if (route_names(&cfg->routes[i], provider, key))
            return true;
    for (size_t u = 0; u < cfg->nusers; u++) {
        const struct piapi_user *user = &cfg->users[u];
        if (route_names(&user->default_route, provider, key))
            return true;
        for (size_t i = 0; i < user->nservices; i++)
            if (route_names(user->services[i].route, provider, key))
                return true;
    }
    return false;
}

/* ---- --check-config's route lines ---- */

static void print_route(FILE *out, const char *user, const char *type,
                        const struct piapi_route_set *r)
{
    fprintf(out, "route: user %s, service %s:", user, type);
    if (r->name)
        fprintf(out, " route %s,", r->name);
    if (r->ncandidates > 1)
        fprintf(out, " %s",
                r->strategy == PIAPI_STRATEGY_SPREAD ? "spread over" : "failover");
    for (size_t i = 0; i < r->ncandidates; i++)
        fprintf(out, "%s %s/%s", i ? "," : "", r->candidates[i].provider->name,
                r->candidates[i].key->name);
    fputc('\n', out);
}

void piapi_config_print_routes(const struct piapi_config *cfg, FILE *out)
{
    for (size_t u = 0; u < cfg->nusers; u++) {
        const struct piapi_user *user = &cfg->users[u];
        const struct piapi_provider *p = user->provider;
        for (size_t i = 0; i < p->nservices; i++) {
            const char *type = p->services[i].type;
            print_route(out, user->name, type,
                        piapi_config_user_route(user, type, strlen(type)));
        }
        for (size_t i = 0; i < user->nservices; i++) {
            const char *type = user->services[i].type;
            if (!piapi_config_find_service(cfg, p, type, strlen(type)))
                print_route(out, user->name, type, user->services[i].route);
        }
    }
}
