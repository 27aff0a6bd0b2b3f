/* sha256: the FIPS 180-4 examples, the lengths where padding spills into
 * a second block (55, 56, 64 bytes) and the one-million-'a' vector. */
#include <stdio.h>
#include <string.h>

#include "piapi/sha256.h"
#include "unit.h"

static void hex(const unsigned char d[PIAPI_SHA256_LEN], char out[65])
{
    for (int i = 0; i < PIAPI_SHA256_LEN; i++)
        snprintf(out + 2 * i, 3, "%02x", d[i]);
}

static void test_vectors(void)
{
    static const struct { const char *in; const char *want; } cases[] = {
        { "", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" },
        { "abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" },
        { "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
          "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1" },
        { "abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu",
          "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1" },
        /* 55, 56 and 64 bytes: the padding edges */
        { "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
          "9f4390f8d30c2dd92ec9f095b65e2b9ae9b0a925a5258e241c9f1e910f734318" },
        { "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
          "b35439a4ac6f0948b6d6f9e3c6af0f5f590ce20f1bde7090ef7970686ec6738a" },
        { "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
          "ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb" },
    };
    unsigned char d[PIAPI_SHA256_LEN];
    char got[65];

    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        piapi_sha256(cases[i].in, strlen(cases[i].in), d);
        hex(d, got);
        if (strcmp(got, cases[i].want) != 0)
            printf("\n  case %zu: got %s\n", i, got);
        CU_ASSERT_STRING_EQUAL(got, cases[i].want);
    }
}

static void test_million_a(void)
{
    static char buf[1000000];
    unsigned char d[PIAPI_SHA256_LEN];
    char got[65];

    memset(buf, 'a', sizeof buf);
    piapi_sha256(buf, sizeof buf, d);
    hex(d, got);
    CU_ASSERT_STRING_EQUAL(got,
        "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

static const struct unit_case cases[] = {
    { "FIPS 180-4 vectors and padding edges", test_vectors },
    { "one million 'a'", test_million_a },
    { NULL, NULL },
};

UNIT_MAIN("sha256", cases)
