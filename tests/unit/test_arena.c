/* arena: allocations from the owner's first buffer, then from blocks;
 * alignment; a large allocation; every byte handed out wiped on release. */
#include <stdint.h>
#include <string.h>

#include "piapi/arena.h"
#include "unit.h"

static void test_first_buffer_then_blocks(void)
{
    max_align_t buf[8];
    struct piapi_arena a;

    piapi_arena_init(&a, buf, sizeof buf);
    char *p = piapi_arena_alloc(&a, 10);
    CU_ASSERT((unsigned char *)p >= (unsigned char *)buf &&
              (unsigned char *)p < (unsigned char *)buf + sizeof buf);
    char *q = piapi_arena_alloc(&a, 1);
    CU_ASSERT_EQUAL((uintptr_t)q % _Alignof(max_align_t), 0);
    CU_ASSERT(q > p);
    char *r = piapi_arena_alloc(&a, sizeof buf);  /* does not fit: a block */
    CU_ASSERT((unsigned char *)r < (unsigned char *)buf ||
              (unsigned char *)r >= (unsigned char *)buf + sizeof buf);
    char *big = piapi_arena_alloc(&a, 100000);    /* a block of its own */
    memset(big, 'x', 100000);
    char *s = piapi_arena_strndup(&a, "sk-secret-key", 6);
    CU_ASSERT_STRING_EQUAL(s, "sk-sec");
    CU_ASSERT_PTR_NOT_NULL(piapi_arena_array(&a, 1000, 8));

    memcpy(p, "sk-SECRET", 10);
    piapi_arena_dispose(&a);
    /* The first buffer is the owner's: wiped, not freed. */
    static const unsigned char zero[sizeof buf];
    CU_ASSERT_EQUAL(memcmp(buf, zero, 32), 0);
    /* Empty again, and usable. */
    CU_ASSERT_PTR_NOT_NULL(piapi_arena_alloc(&a, 8));
    piapi_arena_dispose(&a);
}

static void test_no_first_buffer(void)
{
    struct piapi_arena a = { 0 };
    CU_ASSERT_PTR_NOT_NULL(piapi_arena_alloc(&a, 0));      /* an empty array */
    int *v = piapi_arena_array(&a, 16, sizeof *v);
    for (int i = 0; i < 16; i++)
        CU_ASSERT_EQUAL(v[i], 0);  /* zeroed */
    piapi_arena_dispose(&a);
    piapi_arena_dispose(&a);       /* twice is fine */
}

static const struct unit_case cases[] = {
    { "first buffer, then blocks; large; strndup; wiped", test_first_buffer_then_blocks },
    { "no first buffer; zeroed; dispose twice", test_no_first_buffer },
    { NULL, NULL },
};

UNIT_MAIN("arena", cases)
