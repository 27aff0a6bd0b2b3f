/* Arenas (arena.h): a bump allocator over the owner's first buffer, then
 * over 4 KiB blocks; a large allocation gets a block of its own behind the
 * head, so the partly used head keeps serving small ones. */
#include "piapi/arena.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "piapi/util.h"

struct piapi_arena_block {
    struct piapi_arena_block *next;
    size_t size;
    size_t used;
    max_align_t data[];
};

#define BLOCK 4096

void piapi_arena_init(struct piapi_arena *a, void *buf, size_t size)
{
    *a = (struct piapi_arena){ .first = buf, .first_size = buf ? size : 0 };
}

static void *from_blocks(struct piapi_arena *a, size_t n)
{
    struct piapi_arena_block *b = a->head;

    if (!b || b->size - b->used < n) {
        size_t size = n > BLOCK / 4 ? n : BLOCK;
        struct piapi_arena_block *nb = piapi_xmalloc(sizeof *nb + size);
        nb->size = size;
        nb->used = 0;
        if (b && size != BLOCK) {
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
    return p;
}

void *piapi_arena_alloc(struct piapi_arena *a, size_t n)
{
    const size_t align = _Alignof(max_align_t);
    void *p;

    if (n > SIZE_MAX / 2)
        abort();
    /* Zero bytes still get a distinct, non-NULL pointer. */
    n = n ? (n + align - 1) & ~(align - 1) : align;
    if (a->first_size - a->first_used >= n) {
        p = a->first + a->first_used;
        a->first_used += n;
    } else {
        p = from_blocks(a, n);
    }
    memset(p, 0, n);
    return p;
}

void *piapi_arena_array(struct piapi_arena *a, size_t count, size_t size)
{
    if (size && count > SIZE_MAX / 2 / size)
        abort();
    return piapi_arena_alloc(a, count * size);
}

char *piapi_arena_strndup(struct piapi_arena *a, const char *s, size_t n)
{
    char *p = piapi_arena_alloc(a, n + 1);
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

void piapi_arena_dispose(struct piapi_arena *a)
{
    struct piapi_arena_block *b = a->head;
    while (b) {
        struct piapi_arena_block *next = b->next;
        explicit_bzero(b->data, b->used);
        free(b);
        b = next;
    }
    if (a->first)
        explicit_bzero(a->first, a->first_used);
    a->head = NULL;
    a->first_used = 0;
}
