/* SHA-256 (FIPS 180-4), one call over a buffer in memory. Used for member
 * keys: a config may hold only their digests (users[].apiKeyHash), and a
 * presented key is found by its digest. Written out here rather than
 * linking libcrypto: a request hashes one short key, and this needs no
 * library fetch, lock or allocation. */
#ifndef PIAPI_SHA256_H
#define PIAPI_SHA256_H

#include <stddef.h>

#define PIAPI_SHA256_LEN 32

void piapi_sha256(const void *data, size_t len,
                  unsigned char out[PIAPI_SHA256_LEN]);

#endif
