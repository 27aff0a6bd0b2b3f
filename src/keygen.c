/* piapi keygen: 32 bytes from the kernel's CSPRNG (256 bits), written as
 * URL-safe base64 without padding behind "piapi-", so the key survives a
 * header, a query string, a shell and YAML unquoted. Only the digest goes
 * into the config; the key itself is shown this once. */
#include <stdio.h>
#include <string.h>
#include <sys/random.h>

#include "piapi/keygen.h"
#include "piapi/sha256.h"

#define KEY_BYTES 32

static void base64url(const unsigned char *in, size_t n, char *out)
{
    static const char abc[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    size_t o = 0;
    unsigned bits = 0, nbits = 0;

    for (size_t i = 0; i < n; i++) {
        bits = bits << 8 | in[i];
        nbits += 8;
        while (nbits >= 6) {
            nbits -= 6;
            out[o++] = abc[(bits >> nbits) & 63];
        }
    }
    if (nbits)
        out[o++] = abc[(bits << (6 - nbits)) & 63];
    out[o] = '\0';
}

/* A name goes into a YAML double-quoted scalar: printable ASCII or UTF-8,
 * no control characters, quotes and backslashes escaped on output. */
static int name_ok(const char *s)
{
    if (!*s)
        return 0;
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f)
            return 0;
    return 1;
}

static void print_yaml_string(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            putchar('\\');
        putchar(*s);
    }
    putchar('"');
}

static int parse(int argc, char **argv, const char **name)
{
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--name") == 0 && i + 1 < argc)
            *name = argv[++i];
        else if (strncmp(argv[i], "--name=", 7) == 0)
            *name = argv[i] + 7;
        else
            return -1;
    }
    return name_ok(*name) ? 0 : -1;
}

int piapi_keygen_main(int argc, char **argv)
{
    unsigned char raw[KEY_BYTES], digest[PIAPI_SHA256_LEN];
    char key[sizeof "piapi-" + (KEY_BYTES * 4 + 2) / 3];
    const char *name = "NAME";

    if (parse(argc, argv, &name) != 0) {
        fprintf(stderr, "usage: piapi keygen [--name NAME]  (a name without "
                        "control characters)\n");
        return 2;
    }
    if (getrandom(raw, sizeof raw, 0) != (ssize_t)sizeof raw) {
        perror("piapi keygen: getrandom");
        return 1;
    }
    memcpy(key, "piapi-", 6);
    base64url(raw, sizeof raw, key + 6);
    piapi_sha256(key, strlen(key), digest);

    printf("%s\n\n", key);
    printf("# Give the key above to the member: piapi keeps only its hash and\n"
           "# cannot show it again. Under users: in config.yaml:\n"
           "  - name: ");
    print_yaml_string(name);
    printf("\n    apiKeyHash: \"sha256:");
    for (size_t i = 0; i < sizeof digest; i++)
        printf("%02x", digest[i]);
    printf("\"\n    providerName: <provider>\n    providerKeyName: <key name>\n");
    explicit_bzero(raw, sizeof raw);
    explicit_bzero(key, sizeof key);
    return fflush(stdout) == 0 ? 0 : 1;
}
