/* The memory every config stage uses: the arena a snapshot (and a load's
 * tree) lives in, wiped when disposed since both hold key material, and
 * the string set the validation uses to find duplicates. */
#include "config_int.h"

#include <stdlib.h>
#include <string.h>

#include "piapi/util.h"

/* ------------------------------------------------------------------ arena */

struct arena_block {
    struct arena_block *next;
    size_t size;
    size_t used;
    max_align_t data[];
};

#define ARENA_CHUNK 4096

void *cfg_arena_alloc(struct arena *a, size_t n)
{
    const size_t align = sizeof(max_align_t);
    struct arena_block *b = a->head;

    if (n > SIZE_MAX / 2)
        abort();
    n = (n + align - 1) & ~(align - 1);
    if (!b || b->size - b->used < n) {
        size_t size = n > ARENA_CHUNK / 4 ? n : ARENA_CHUNK;
        struct arena_block *nb = piapi_xmalloc(sizeof *nb + size);
        nb->size = size;
        nb->used = 0;
        /* A large allocation gets its own block behind the head, so the
         * partly used head keeps serving small ones. */
        if (b && size != ARENA_CHUNK) {
            nb->next = b->next;
            b->next = nb;
        } else {
            nb->next = b;
            a->head = nb;
        }
        b = nb;
    }
    void *p = (unsigned char *)b->data + b->used;
    b->used += n;
    memset(p, 0, n);
    return p;
}

void *cfg_arena_array(struct arena *a, size_t count, size_t size)
{
    if (size && count > SIZE_MAX / 2 / size)
        abort();
    return cfg_arena_alloc(a, count * size);
}

char *cfg_arena_strndup(struct arena *a, const char *s, size_t n)
{
    char *p = cfg_arena_alloc(a, n + 1);
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

/* Both arenas hold key material, so every byte handed out is wiped. */
void cfg_arena_dispose(struct arena *a)
{
    struct arena_block *b = a->head;
    while (b) {
        struct arena_block *next = b->next;
        explicit_bzero(b->data, b->used);
        free(b);
        b = next;
    }
    a->head = NULL;
}

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
