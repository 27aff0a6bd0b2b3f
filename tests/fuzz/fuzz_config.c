/* libFuzzer target for the config loader (src/config.c). Whatever the
 * bytes: no crash, leak or runaway work; exactly one of snapshot / error
 * list; the same answer twice; and a snapshot that loads is consistent:
 * any user found by a key drawn from the input has a provider and key of
 * that provider, and every service of that provider is found again by
 * (provider, type) with a normalised baseUrl and complete auth.
 *   clang -std=c11 -D_GNU_SOURCE -g -O1 -fsanitize=fuzzer,address,undefined \
 *       -Iinclude tests/fuzz/fuzz_config.c src/config*.c src/sha256.c src/util.c -lyaml \
 *       -pthread -o fuzz_config */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "piapi/config.h"
#include "piapi/sha256.h"

#define MAX_PROBES 256

static void check_service(const struct piapi_config *cfg,
                          const struct piapi_provider *p,
                          const struct piapi_service *s)
{
    if (!s->type || !s->base_url || !s->auth.name || !s->auth.prefix ||
        s->provider != p)
        abort();
    if (piapi_config_find_service(cfg, p, s->type, strlen(s->type)) != s)
        abort();
    /* Trailing '/' of the path were stripped at load. */
    size_t path_end = strcspn(s->base_url, "?");
    if (path_end > 8 && s->base_url[path_end - 1] == '/')
        abort();
    if (s->auth.mode == PIAPI_AUTH_QUERY && s->auth.prefix[0])
        abort();
}

static void check_user(const struct piapi_config *cfg, const char *key,
                       size_t len)
{
    const struct piapi_user *u = piapi_config_find_user(cfg, key, len);
    if (!u)
        return;
    unsigned char digest[PIAPI_SHA256_LEN];
    piapi_sha256(key, len, digest);
    if (memcmp(u->key_digest, digest, sizeof digest) != 0 ||
        !u->name || !u->provider || !u->key || !u->key->value)
        abort();
    const struct piapi_provider *p = u->provider;
    if (u->key < p->keys || u->key >= p->keys + p->nkeys || p->nservices == 0)
        abort();
    for (size_t i = 0; i < p->nservices; i++)
        check_service(cfg, p, &p->services[i]);
}

/* Candidate user keys: the input's words. */
static void probe_users(const struct piapi_config *cfg, const char *d,
                        size_t size)
{
    static const char seps[] = " \t\r\n,:{}[]'\"#";
    size_t i = 0, probes = 0;

    while (i < size && probes < MAX_PROBES) {
        while (i < size && memchr(seps, d[i], sizeof seps))
            i++;
        size_t start = i;
        while (i < size && !memchr(seps, d[i], sizeof seps))
            i++;
        if (i > start) {
            check_user(cfg, d + start, i - start);
            probes++;
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *text = (const char *)data;
    char *errors = NULL, *warnings = NULL, *errors2 = NULL;
    struct piapi_config *cfg = piapi_config_parse(text, size, "fuzz", &errors,
                                                  &warnings);
    struct piapi_config *cfg2 = piapi_config_parse(text, size, "fuzz", &errors2,
                                                   NULL);

    if (!cfg == !errors || !cfg != !cfg2)
        abort();
    if (errors && strcmp(errors, errors2) != 0)
        abort();
    if (cfg) {
        size_t np, ns, nu;
        piapi_config_counts(cfg, &np, &ns, &nu);
        if (np == 0 || ns < np ||
            strcmp(piapi_config_hash(cfg), piapi_config_hash(cfg2)) != 0)
            abort();
        probe_users(cfg, text, size);
    }
    free(errors);
    free(errors2);
    free(warnings);
    piapi_config_release(cfg);
    piapi_config_release(cfg2);
    return 0;
}
