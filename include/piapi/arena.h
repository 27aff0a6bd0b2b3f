/* A region of memory with one owner: many allocations, one release. Every
 * byte it handed out is wiped on release, so copies of secrets (a config
 * snapshot's keys, a request's upstream URL and headers) never linger in
 * freed memory. Allocation failure aborts, as piapi_xmalloc does. */
#ifndef PIAPI_ARENA_H
#define PIAPI_ARENA_H

#include <stddef.h>

struct piapi_arena_block;

/* Zeroed = empty, with no first buffer. */
struct piapi_arena {
    struct piapi_arena_block *head;
    unsigned char *first;        /* the owner's buffer, used before any block */
    size_t first_size, first_used;
};

/* Serves allocations from buf (size bytes, max_align_t aligned) until it
 * is full, then from blocks of its own: an owner that embeds buf makes
 * its usual allocations without a malloc. buf may be NULL. */
void piapi_arena_init(struct piapi_arena *a, void *buf, size_t size);
void *piapi_arena_alloc(struct piapi_arena *a, size_t n);      /* zeroed */
void *piapi_arena_array(struct piapi_arena *a, size_t count, size_t size);
char *piapi_arena_strndup(struct piapi_arena *a, const char *s, size_t n);
/* Wipes and frees; the arena is empty (and keeps its first buffer). */
void piapi_arena_dispose(struct piapi_arena *a);

#endif
