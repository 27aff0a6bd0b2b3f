/* The string set the config validation uses to find duplicates. (The
 * arenas a snapshot and a load's tree live in are piapi_arena.) */
#include "config_int.h"

#include <stdlib.h>
#include <string.h>

#include "piapi/util.h"

/* ---------------------------------------------------------------- strset */

static uint64_t strset_hash(size_t group, const char *s, size_t len)
{
    uint64_t h = piapi_hash(s, len);
    h ^= (uint64_t)group * 0x9E3779B97F4A7C15ULL;
    h ^= h >> 31;
    return h;
}

static struct strset_ent *strset_slot(const struct strset *set, size_t group,
                                      const char *s, size_t len)
{
    size_t i = (size_t)strset_hash(group, s, len) & set->mask;
    for (;; i = (i + 1) & set->mask) {
        struct strset_ent *e = &set->e[i];
        if (!e->s || (e->group == group && e->len == len &&
                      memcmp(e->s, s, len) == 0))
            return e;
    }
}

static void strset_grow(struct strset *set)
{
    struct strset old = *set;
    size_t cap = old.e ? (old.mask + 1) * 2 : 16;

    set->e = piapi_xcalloc(cap, sizeof *set->e);
    set->mask = cap - 1;
    for (size_t i = 0; old.e && i <= old.mask; i++)
        if (old.e[i].s)
            *strset_slot(set, old.e[i].group, old.e[i].s, old.e[i].len) = old.e[i];
    free(old.e);
}

const struct strset_ent *cfg_strset_find(const struct strset *set,
                                         size_t group, const char *s,
                                            size_t len)
{
    if (!set->e)
        return NULL;
    const struct strset_ent *e = strset_slot(set, group, s, len);
    return e->s ? e : NULL;
}

const struct strset_ent *cfg_strset_add(struct strset *set, size_t group,
                                        const char *s, size_t len,
                                           size_t val)
{
    const struct strset_ent *old = cfg_strset_find(set, group, s, len);
    if (old)
        return old;
    if (!set->e || (set->n + 1) * 2 > set->mask + 1)
        strset_grow(set);
    struct strset_ent *e = strset_slot(set, group, s, len);
    *e = (struct strset_ent){ .s = s, .len = len, .group = group, .val = val };
    set->n++;
    return NULL;
}

void cfg_strset_dispose(struct strset *set)
{
    free(set->e);
    *set = (struct strset){ 0 };
}
