/* libFuzzer target for src/fcgi_frame.c: any bytes, any cut. The verdict
 * must stay in bounds, and once a prefix is whole, every longer input
 * that starts with it is whole too (the event loop relies on "whole"
 * meaning everything libfcgi will read is there).
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -Iinclude \
 *       tests/fuzz/fuzz_fcgi_frame.c src/fcgi_frame.c -o fuzz_fcgi_frame */
#include <stdint.h>
#include <stdlib.h>

#include "piapi/fcgi_frame.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* the body limit comes from the input too, so both sides of it are hit */
    size_t body_max = size ? (size_t)data[size - 1] * 4 : 0;
    enum piapi_fcgi_arrival all = piapi_fcgi_arrival(data, size, size + 1, body_max);
    if (all == PIAPI_FCGI_PARTIAL &&
        piapi_fcgi_arrival(data, size, size, body_max) != PIAPI_FCGI_UNFIT)
        abort();  /* a full peek buffer can never be "partial" */
    for (size_t cut = 0; cut < size; cut += 1 + cut / 4) {
        enum piapi_fcgi_arrival part = piapi_fcgi_arrival(data, cut, size + 1, body_max);
        if (part == PIAPI_FCGI_WHOLE && all != PIAPI_FCGI_WHOLE)
            abort();
        if (part == PIAPI_FCGI_UNFIT && all != PIAPI_FCGI_UNFIT)
            abort();  /* unfit stays unfit whatever follows */
    }
    return 0;
}
