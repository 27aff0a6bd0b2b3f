/* Shared scaffolding for the CUnit suites: one binary per module, each
 * ending with "unit <suite>: N passed, M failed" that tests/run.sh sums. */
#ifndef PIAPI_UNIT_H
#define PIAPI_UNIT_H

#include <CUnit/Basic.h>
#include <stdio.h>

struct unit_case {
    const char *name;
    void (*fn)(void);
};

static inline int unit_run(const char *suite, const struct unit_case *cases)
{
    if (CU_initialize_registry() != CUE_SUCCESS)
        return 2;
    CU_pSuite s = CU_add_suite(suite, NULL, NULL);
    for (const struct unit_case *c = cases; c->name; c++)
        CU_add_test(s, c->name, c->fn);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    unsigned run = CU_get_number_of_tests_run();
    unsigned failed = CU_get_number_of_tests_failed();
    CU_cleanup_registry();
    printf("unit %s: %u passed, %u failed\n", suite, run - failed, failed);
    return failed ? 1 : 0;
}

#define UNIT_MAIN(suite, cases) \
    int main(void) { return unit_run(suite, cases); }

#endif
