/* config: every validation rule as a {yaml, expected error lines} table,
 * then the snapshot's behaviour: defaults, lookups, settings, URL
 * normalisation, warnings, file loading, refcounting and publishing.
 *
 * Every secret in these documents contains "SECRET" and nothing else does,
 * so one strstr proves no message ever leaks a key. */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "piapi/config.h"
#include "unit.h"

#define SEED                                                         \
    "providers:\n"                                                   \
    "  - name: provider-alpha\n"                                     \
    "    apiKeys:\n"                                                 \
    "      main-key: sk-alpha-xxx\n"                                 \
    "      backup-key: sk-alpha-backup\n"                            \
    "    services:\n"                                                \
    "      - type: cx\n"                                             \
    "        baseUrl: https://api.provider-alpha.com/v1/engines\n"   \
    "        auth:\n"                                                \
    "          mode: header\n"                                       \
    "          name: Authorization\n"                                \
    "          prefix: \"Bearer \"\n"                                \
    "      - type: cc\n"                                             \
    "        baseUrl: https://api.provider-alpha.com/v1/claude\n"    \
    "        auth:\n"                                                \
    "          mode: header\n"                                       \
    "          name: x-api-key\n"                                    \
    "  - name: provider-beta\n"                                      \
    "    apiKeys:\n"                                                 \
    "      prod-key: sk-beta-yyy\n"                                  \
    "    services:\n"                                                \
    "      - type: cx\n"                                             \
    "        baseUrl: https://api.provider-beta.com/codex\n"         \
    "        auth:\n"                                                \
    "          mode: query\n"                                        \
    "          name: api_key\n"                                      \
    "\n"                                                             \
    "users:\n"                                                       \
    "  - name: Alice\n"                                              \
    "    apiKey: piapi-user-alice\n"                                 \
    "    providerName: provider-alpha\n"                             \
    "    providerKeyName: main-key\n"                                \
    "  - name: Bob\n"                                                \
    "    apiKey: piapi-user-bob\n"                                   \
    "    providerName: provider-alpha\n"                             \
    "    providerKeyName: backup-key\n"                              \
    "  - name: Carol\n"                                              \
    "    apiKey: piapi-user-carol\n"                                 \
    "    providerName: provider-beta\n"                              \
    "    providerKeyName: prod-key\n"

/* Lines 1-4; a service list follows on line 5. */
#define HEAD                                  \
    "providers:\n"                            \
    "  - name: p\n"                           \
    "    apiKeys: {k: sk-SECRET-1}\n"         \
    "    services:\n"
/* Lines 1-5; users follow on line 6. */
#define PROV HEAD "      - {type: cx, baseUrl: 'https://h/v1'}\n"
#define NOUSERS "users: []\n"
/* A provider entry at line 2 with `extra` spliced into its mapping. */
#define PROV1(extra)                                                  \
    "providers:\n"                                                    \
    "  - {name: p, apiKeys: {k: sk-SECRET-1}, " extra                 \
    "services: [{type: cx, baseUrl: 'https://h'}]}\n" NOUSERS
/* One service at line 5 given in flow style. */
#define SVC(fields) HEAD "      - {" fields "}\n" NOUSERS
#define SVCB(fields) SVC("type: cx, baseUrl: 'https://h', " fields)
/* One user at line 7 given in flow style. */
#define USER(fields) PROV "users:\n  - {" fields "}\n"
#define USERF "name: u, apiKey: piapi-SECRET-u, providerName: p, "
/* A provider at line 2 whose one key `k` is the given value. */
#define KEYREF(v)                                                     \
    "providers:\n"                                                    \
    "  - {name: p, apiKeys: {k: " v "}, "                             \
    "services: [{type: cx, baseUrl: 'https://h'}]}\n" NOUSERS
/* SHA-256 of "piapi-SECRET-u", the key USERF gives. */
#define U_HASH "f284c9e7388784ba7a39a97b98bbc3c7b6af6dd96db982a36adec6a5901ea8dc"
#define SETTINGS(s) PROV NOUSERS "settings:\n  " s "\n"  /* setting on line 8 */

struct bad_case {
    const char *yaml;
    const char *want[4];  /* substrings of *errors; "t.yaml:<line>: <path>: ..." */
};

static const struct bad_case bad[] = {
    /* ---- document shape */
    { "- a\n", { "t.yaml:1: (top level): expected a mapping, got a sequence" } },
    { "", { "t.yaml:1: (top level): empty config" } },
    { "# just a comment\n", { "t.yaml:1: (top level): empty config" } },
    { "just text\n", { "t.yaml:1: (top level): expected a mapping, got a string" } },
    { NOUSERS, { "t.yaml:1: providers: required field is missing" } },
    { "providers: []\n" NOUSERS, { "t.yaml:1: providers: must not be empty" } },
    { "providers:\n" NOUSERS, { "providers: must not be empty" } },
    { "providers: {a: 1}\n" NOUSERS,
      { "t.yaml:1: providers: expected a sequence, got a mapping" } },
    { "providers: x\n" NOUSERS,
      { "t.yaml:1: providers: expected a sequence, got a string" } },
    { PROV, { "t.yaml:1: users: required field is missing" } },
    { PROV "users: {}\n", { "t.yaml:6: users: expected a sequence, got a mapping" } },
    { PROV "users: x\n", { "t.yaml:6: users: expected a sequence, got a string" } },
    { PROV NOUSERS "extra: 1\n",
      { "t.yaml:7: extra: unknown field (expected one of: providers, users, settings, pricing, limits, routes)" } },
    { PROV NOUSERS "Users: []\n", { "t.yaml:7: Users: unknown field; did you mean 'users'?" } },
    { PROV NOUSERS "users: []\n", { "t.yaml:7: users: duplicate key (first at line 6)" } },
    { PROV NOUSERS "? [a]\n: b\n",
      { "t.yaml:7: (top level): expected a string as mapping key, got a sequence" } },

    /* ---- providers[] */
    { "providers:\n  - just-a-string\n" NOUSERS,
      { "t.yaml:2: providers[0]: expected a mapping, got a string" } },
    { "providers:\n  - {apiKeys: {k: sk-SECRET-1}, services: [{type: cx, baseUrl: 'https://h'}]}\n" NOUSERS,
      { "t.yaml:2: providers[0].name: required field is missing" } },
    { PROV1("name: '', "), { "t.yaml:2: providers[0].name: duplicate key (first at line 2)" } },
    { "providers:\n  - name: ''\n    apiKeys: {k: sk-SECRET-1}\n    services: [{type: cx, baseUrl: 'https://h'}]\n" NOUSERS,
      { "t.yaml:2: providers[0].name: must not be empty" } },
    { "providers:\n  - name:\n    apiKeys: {k: sk-SECRET-1}\n    services: [{type: cx, baseUrl: 'https://h'}]\n" NOUSERS,
      { "providers[0].name: must not be empty" } },
    { "providers:\n  - name: {a: b}\n    apiKeys: {k: sk-SECRET-1}\n    services: [{type: cx, baseUrl: 'https://h'}]\n" NOUSERS,
      { "t.yaml:2: providers[0].name: expected a string, got a mapping" } },
    { "providers:\n  - name: \"p\\tq\"\n    apiKeys: {k: sk-SECRET-1}\n    services: [{type: cx, baseUrl: 'https://h'}]\n" NOUSERS,
      { "t.yaml:2: providers[0].name: must not contain control characters" } },
    { "providers:\n  - name: \"p\\0q\"\n    apiKeys: {k: sk-SECRET-1}\n    services: [{type: cx, baseUrl: 'https://h'}]\n" NOUSERS,
      { "t.yaml:2: providers[0].name: must not contain a NUL character" } },
    { "providers:\n  - {name: p, services: [{type: cx, baseUrl: 'https://h'}]}\n" NOUSERS,
      { "t.yaml:2: providers[0].apiKeys: required field is missing" } },
    { "providers:\n  - {name: p, apiKeys: [sk-SECRET-1], services: [{type: cx, baseUrl: 'https://h'}]}\n" NOUSERS,
      { "t.yaml:2: providers[0].apiKeys: expected a mapping, got a sequence" } },
    { "providers:\n  - {name: p, apiKeys: {}, services: [{type: cx, baseUrl: 'https://h'}]}\n" NOUSERS,
      { "t.yaml:2: providers[0].apiKeys: must not be empty" } },
    { "providers:\n  - {name: p, apiKeys: {k: ''}, services: [{type: cx, baseUrl: 'https://h'}]}\n" NOUSERS,
      { "t.yaml:2: providers[0].apiKeys: empty key value (entries are <name>: <key>)" } },
    { "providers:\n  - {name: p, apiKeys: {k: ~}, services: [{type: cx, baseUrl: 'https://h'}]}\n" NOUSERS,
      { "t.yaml:2: providers[0].apiKeys: empty key value" } },
    /* a key pasted without a name must not be echoed as the name */
    { "providers:\n  - {name: p, apiKeys: {sk-SECRET-1}, services: [{type: cx, baseUrl: 'https://h'}]}\n" NOUSERS,
      { "t.yaml:2: providers[0].apiKeys: empty key value" } },
    { "providers:\n  - {name: p, apiKeys: {k: [sk-SECRET-1]}, services: [{type: cx, baseUrl: 'https://h'}]}\n" NOUSERS,
      { "t.yaml:2: providers[0].apiKeys.k: expected a string, got a sequence" } },
    { "providers:\n  - {name: p, apiKeys: {k: \"sk-SECRET\\r\\nX-Evil: 1\"}, services: [{type: cx, baseUrl: 'https://h'}]}\n" NOUSERS,
      { "t.yaml:2: providers[0].apiKeys.k: key value must not contain whitespace or control characters" } },
    { "providers:\n  - {name: p, apiKeys: {'': sk-SECRET-1}, services: [{type: cx, baseUrl: 'https://h'}]}\n" NOUSERS,
      { "t.yaml:2: providers[0].apiKeys.: key names must be non-empty printable strings" } },
    { "providers:\n  - name: p\n    apiKeys:\n      k: sk-SECRET-1\n      k: sk-SECRET-2\n"
      "    services: [{type: cx, baseUrl: 'https://h'}]\n" NOUSERS,
      { "t.yaml:5: providers[0].apiKeys.k: duplicate key (first at line 4)" } },
    { "providers:\n  - {name: p, apiKeys: {k: sk-SECRET-1}}\n" NOUSERS,
      { "t.yaml:2: providers[0].services: required field is missing" } },
    { "providers:\n  - {name: p, apiKeys: {k: sk-SECRET-1}, services: []}\n" NOUSERS,
      { "t.yaml:2: providers[0].services: must not be empty" } },
    { "providers:\n  - {name: p, apiKeys: {k: sk-SECRET-1}, services: {type: cx}}\n" NOUSERS,
      { "t.yaml:2: providers[0].services: expected a sequence, got a mapping" } },
    { "providers:\n  - {name: p, apiKeys: {k: sk-SECRET-1}, services: [cx]}\n" NOUSERS,
      { "t.yaml:2: providers[0].services[0]: expected a mapping, got a string" } },
    { PROV1("apikeys: {}, "), { "t.yaml:2: providers[0].apikeys: unknown field; did you mean 'apiKeys'?" } },
    { PROV1("colour: red, "),
      { "t.yaml:2: providers[0].colour: unknown field (expected one of: name, apiKeys, services)" } },
    { HEAD "      - {type: cx, baseUrl: 'https://h'}\n"
      "  - name: p\n    apiKeys: {k: sk-SECRET-2}\n    services: [{type: cx, baseUrl: 'https://h'}]\n" NOUSERS,
      { "t.yaml:6: providers[1].name: duplicate provider name 'p' (first is providers[0])" } },

    /* ---- services[] */
    { SVC("baseUrl: 'https://h'"),
      { "t.yaml:5: providers[0].services[0].type: required field is missing" } },
    { SVC("type: '', baseUrl: 'https://h'"),
      { "t.yaml:5: providers[0].services[0].type: must not be empty" } },
    { SVC("type: a/b, baseUrl: 'https://h'"),
      { "t.yaml:5: providers[0].services[0].type: 'a/b' may only contain letters, digits and - . _ ~" } },
    { SVC("type: 'c x', baseUrl: 'https://h'"),
      { "t.yaml:5: providers[0].services[0].type: 'c x' may only contain letters" } },
    { SVC("type: 'c%2Fx', baseUrl: 'https://h'"),
      { "t.yaml:5: providers[0].services[0].type: 'c%2Fx' may only contain letters" } },
    { SVC("type: '.', baseUrl: 'https://h'"),
      { "t.yaml:5: providers[0].services[0].type: '.' is not a usable path segment" } },
    { SVC("type: '..', baseUrl: 'https://h'"),
      { "t.yaml:5: providers[0].services[0].type: '..' is not a usable path segment" } },
    { SVC("type: [cx], baseUrl: 'https://h'"),
      { "t.yaml:5: providers[0].services[0].type: expected a string, got a sequence" } },
    { HEAD "      - {type: cx, baseUrl: 'https://h'}\n      - {type: cx, baseUrl: 'https://i'}\n" NOUSERS,
      { "t.yaml:6: providers[0].services[1].type: duplicate service type 'cx' (first at line 5)" } },
    { SVC("type: cx"), { "t.yaml:5: providers[0].services[0].baseUrl: required field is missing" } },
    { SVC("type: cx, baseUrl: ''"), { "t.yaml:5: providers[0].services[0].baseUrl: must not be empty" } },
    { SVC("type: cx, baseUrl: 'ftp://h/x'"),
      { "t.yaml:5: providers[0].services[0].baseUrl: must be an absolute http:// or https:// URL" } },
    { SVC("type: cx, baseUrl: '/v1/x'"),
      { "t.yaml:5: providers[0].services[0].baseUrl: must be an absolute http:// or https:// URL" } },
    { SVC("type: cx, baseUrl: 'h.example/v1'"),
      { "providers[0].services[0].baseUrl: must be an absolute http:// or https:// URL" } },
    { SVC("type: cx, baseUrl: 'https://'"), { "providers[0].services[0].baseUrl: has no host" } },
    { SVC("type: cx, baseUrl: 'https:///v1'"), { "providers[0].services[0].baseUrl: has no host" } },
    { SVC("type: cx, baseUrl: 'https://:443/v1'"), { "providers[0].services[0].baseUrl: has no host" } },
    { SVC("type: cx, baseUrl: 'https://u@/v1'"), { "providers[0].services[0].baseUrl: has no host" } },
    { SVC("type: cx, baseUrl: 'https://[]/v1'"), { "providers[0].services[0].baseUrl: has no host" } },
    { SVC("type: cx, baseUrl: 'https://[::1/v1'"),
      { "providers[0].services[0].baseUrl: has an unterminated IPv6 address" } },
    { SVC("type: cx, baseUrl: 'https://h/v1#frag'"),
      { "t.yaml:5: providers[0].services[0].baseUrl: must not contain a fragment ('#')" } },
    { SVC("type: cx, baseUrl: 'https://h/v 1'"),
      { "providers[0].services[0].baseUrl: must not contain whitespace or control characters" } },
    { SVC("type: cx, baseUrl: \"https://h/v1\\x01\""),
      { "providers[0].services[0].baseUrl: must not contain whitespace or control characters" } },
    { SVC("type: cx, baseUrl: 'https://h:0/v1'"), { "providers[0].services[0].baseUrl: has an invalid port" } },
    { SVC("type: cx, baseUrl: 'https://h:65536/v1'"), { "providers[0].services[0].baseUrl: has an invalid port" } },
    { SVC("type: cx, baseUrl: 'https://h:/v1'"), { "providers[0].services[0].baseUrl: has an invalid port" } },
    { SVC("type: cx, baseUrl: 'https://h:8o/v1'"), { "providers[0].services[0].baseUrl: has an invalid port" } },
    { SVC("type: cx, baseUrl: 'https://h{x}/v1'"),
      { "providers[0].services[0].baseUrl: has an invalid character in the host" } },
    { SVC("type: cx, baseUrl: {a: b}"),
      { "t.yaml:5: providers[0].services[0].baseUrl: expected a string, got a mapping" } },
    { SVC("type: cx, baseurl: 'https://h'"),
      { "t.yaml:5: providers[0].services[0].baseurl: unknown field; did you mean 'baseUrl'?",
        "t.yaml:5: providers[0].services[0].baseUrl: required field is missing" } },
    { SVC("type: cx, baseUrl: 'https://h', bseUrl: 'https://h'"),
      { "t.yaml:5: providers[0].services[0].bseUrl: unknown field; did you mean 'baseUrl'?" } },
    { SVC("type: cx, baseUrl: 'https://h', type: cc"),
      { "t.yaml:5: providers[0].services[0].type: duplicate key (first at line 5)" } },

    /* ---- auth */
    { SVCB("auth: header"),
      { "t.yaml:5: providers[0].services[0].auth: expected a mapping, got a string" } },
    { SVCB("auth: {mode: basic}"),
      { "t.yaml:5: providers[0].services[0].auth.mode: unsupported auth mode 'basic' (use header or query)" } },
    { SVCB("auth: {mode: Header}"),
      { "providers[0].services[0].auth.mode: unsupported auth mode 'Header' (use header or query)" } },
    { SVCB("auth: {mode: ''}"), { "providers[0].services[0].auth.mode: unsupported auth mode ''" } },
    { SVCB("auth: {mode: query}"),
      { "t.yaml:5: providers[0].services[0].auth.name: required when mode is query" } },
    { SVCB("auth: {mode: query, name: ''}"),
      { "t.yaml:5: providers[0].services[0].auth.name: must not be empty" } },
    { SVCB("auth: {mode: query, name: key, prefix: 'Bearer '}"),
      { "t.yaml:5: providers[0].services[0].auth.prefix: not allowed when mode is query" } },
    { SVCB("auth: {mode: query, name: 'a&b'}"),
      { "providers[0].services[0].auth.name: 'a&b' is not a URL-safe query parameter name" } },
    { SVCB("auth: {mode: query, name: 'a b'}"),
      { "providers[0].services[0].auth.name: 'a b' is not a URL-safe query parameter name" } },
    { SVCB("auth: {mode: header, name: 'x api'}"),
      { "t.yaml:5: providers[0].services[0].auth.name: 'x api' is not a valid HTTP header name" } },
    { SVCB("auth: {name: 'x-key:'}"),
      { "providers[0].services[0].auth.name: 'x-key:' is not a valid HTTP header name" } },
    { SVCB("auth: {mode: header, name: ''}"),
      { "providers[0].services[0].auth.name: '' is not a valid HTTP header name" } },
    { SVCB("auth: {name: x-key, prefix: \"Bearer\\r\\nX: y\"}"),
      { "providers[0].services[0].auth.prefix: must not contain control characters" } },
    { SVCB("auth: {Mode: header}"),
      { "t.yaml:5: providers[0].services[0].auth.Mode: unknown field; did you mean 'mode'?" } },
    { SVCB("auth: {scheme: Bearer}"),
      { "providers[0].services[0].auth.scheme: unknown field (expected one of: mode, name, prefix)" } },
    { SVCB("auth: {mode: header, mode: query}"),
      { "t.yaml:5: providers[0].services[0].auth.mode: duplicate key (first at line 5)" } },

    /* ---- users[] */
    { PROV "users:\n  - alice\n", { "t.yaml:7: users[0]: expected a mapping, got a string" } },
    { PROV "users:\n  - [alice]\n", { "t.yaml:7: users[0]: expected a mapping, got a sequence" } },
    { USER("apiKey: piapi-SECRET-u, providerName: p, providerKeyName: k"),
      { "t.yaml:7: users[0].name: required field is missing" } },
    { USER("name: '', apiKey: piapi-SECRET-u, providerName: p, providerKeyName: k"),
      { "t.yaml:7: users[0].name: must not be empty" } },
    { USER("name: u, providerName: p, providerKeyName: k"),
      { "t.yaml:7: users[0].apiKey: required field is missing" } },
    { USER("name: u, apiKey: '', providerName: p, providerKeyName: k"),
      { "t.yaml:7: users[0].apiKey: must not be empty" } },
    { USER("name: u, apiKey: ~, providerName: p, providerKeyName: k"),
      { "t.yaml:7: users[0].apiKey: must not be empty" } },
    { USER("name: u, apiKey: 'piapi SECRET', providerName: p, providerKeyName: k"),
      { "t.yaml:7: users[0].apiKey: must not contain whitespace or control characters" } },
    { USER("name: u, apiKey: [piapi-SECRET], providerName: p, providerKeyName: k"),
      { "t.yaml:7: users[0].apiKey: expected a string, got a sequence" } },
    { USER("name: u, apiKey: piapi-SECRET-u, providerKeyName: k"),
      { "t.yaml:7: users[0].providerName: required field is missing" } },
    { USER("name: u, apiKey: piapi-SECRET-u, providerName: '', providerKeyName: k"),
      { "t.yaml:7: users[0].providerName: must not be empty" } },
    { USER("name: u, apiKey: piapi-SECRET-u, providerName: p"),
      { "t.yaml:7: users[0].providerKeyName: required field is missing" } },
    { USER(USERF "providerKeyName: ''"),
      { "t.yaml:7: users[0].providerKeyName: must not be empty" } },
    { USER("name: u, apiKey: piapi-SECRET-u, providerName: nope, providerKeyName: k"),
      { "t.yaml:7: users[0].providerName: unknown provider 'nope'" } },
    { USER(USERF "providerKeyName: x"),
      { "t.yaml:7: users[0].providerKeyName: key 'x' not defined for provider 'p'" } },
    { PROV "  - name: q\n    apiKeys: {k2: sk-SECRET-2}\n    services: [{type: cx, baseUrl: 'https://h'}]\n"
      "users:\n  - {name: u, apiKey: piapi-SECRET-u, providerName: p, providerKeyName: k2}\n",
      { "t.yaml:10: users[0].providerKeyName: key 'k2' not defined for provider 'p'" } },
    { PROV "users:\n  - {" USERF "providerKeyName: k}\n"
      "  - {name: v, apiKey: piapi-SECRET-u, providerName: p, providerKeyName: k}\n",
      { "t.yaml:8: users[1].apiKey: same key as users[0] (keys must be unique)" } },
    /* ---- users[].apiKeyHash: the same key given as its digest */
    { PROV "users:\n  - {" USERF "providerKeyName: k}\n"
      "  - {name: v, apiKeyHash: 'sha256:" U_HASH "', providerName: p, providerKeyName: k}\n",
      { "t.yaml:8: users[1].apiKeyHash: same key as users[0] (keys must be unique)" } },
    { PROV "users:\n  - {name: v, apiKeyHash: 'sha256:" U_HASH "', providerName: p, providerKeyName: k}\n"
      "  - {" USERF "providerKeyName: k}\n",
      { "t.yaml:8: users[1].apiKey: same key as users[0] (keys must be unique)" } },
    { USER(USERF "apiKeyHash: 'sha256:" U_HASH "', providerKeyName: k"),
      { "t.yaml:7: users[0].apiKeyHash: give apiKey or apiKeyHash, not both" } },
    { USER("name: u, apiKeyHash: 'sha256:abc', providerName: p, providerKeyName: k"),
      { "t.yaml:7: users[0].apiKeyHash: must be \"sha256:\" and 64 hex digits" } },
    { USER("name: u, apiKeyHash: '" U_HASH "', providerName: p, providerKeyName: k"),
      { "t.yaml:7: users[0].apiKeyHash: must be \"sha256:\" and 64 hex digits" } },
    { USER("name: u, apiKeyHash: 'sha256:" U_HASH "0', providerName: p, providerKeyName: k"),
      { "t.yaml:7: users[0].apiKeyHash: must be \"sha256:\" and 64 hex digits" } },
    { USER("name: u, apiKeyHash: 'sha256:g284c9e7388784ba7a39a97b98bbc3c7b6af6dd96db982a36adec6a5901ea8dc', "
           "providerName: p, providerKeyName: k"),
      { "t.yaml:7: users[0].apiKeyHash: must be \"sha256:\" and 64 hex digits" } },
    { USER("name: u, apiKeyHash: 'SHA256:" U_HASH "', providerName: p, providerKeyName: k"),
      { "t.yaml:7: users[0].apiKeyHash: must be \"sha256:\" and 64 hex digits" } },
    { USER("name: u, apiKeyHash: '', providerName: p, providerKeyName: k"),
      { "t.yaml:7: users[0].apiKeyHash: must not be empty" } },
    { USER("name: u, apiKeyHash: [x], providerName: p, providerKeyName: k"),
      { "t.yaml:7: users[0].apiKeyHash: expected a string, got a sequence" } },
    { USER("name: u, apikeyhash: x, providerName: p, providerKeyName: k"),
      { "t.yaml:7: users[0].apikeyhash: unknown field; did you mean 'apiKeyHash'?" } },
    /* ---- provider keys taken from outside the file: never quoted */
    { KEYREF("'env:PIAPI_TEST_UNSET_VAR'"),
      { "t.yaml:2: providers[0].apiKeys.k: 'env:PIAPI_TEST_UNSET_VAR': environment variable is not set or empty" } },
    { KEYREF("'file:/nonexistent/piapi-key'"),
      { "t.yaml:2: providers[0].apiKeys.k: 'file:/nonexistent/piapi-key': No such file or directory" } },
    { KEYREF("'file:/'"),
      { "t.yaml:2: providers[0].apiKeys.k: 'file:/': not a regular file" } },
    { KEYREF("'file:'"),
      { "t.yaml:2: providers[0].apiKeys.k: 'file:': No such file or directory" } },
    { KEYREF("sk1"),
      { "t.yaml:2: providers[0].apiKeys.k: key value is shorter than 4 characters" } },
    /* a key inside a longer string, or read from outside, is never quoted */
    { PROV "users:\n  - {" USERF "providerKeyName: 'k sk-SECRET-1'}\n",
      { "t.yaml:7: users[0].providerKeyName: key '<redacted>' not defined for provider 'p'" } },
    { KEYREF("'credential:openai'"),
      { "t.yaml:2: providers[0].apiKeys.k: 'credential:openai': $CREDENTIALS_DIRECTORY is not set" } },
    { PROV "users:\n  - {" USERF "providerKeyName: k}\n"
      "  - {name: u, apiKey: piapi-SECRET-v, providerName: p, providerKeyName: k}\n",
      { "t.yaml:8: users[1].name: duplicate user name 'u' (first is users[0])" } },
    /* keys misplaced into names are redacted wherever they would be quoted */
    { USER(USERF "providerKeyName: sk-SECRET-1"),
      { "t.yaml:7: users[0].providerKeyName: key '<redacted>' not defined for provider 'p'" } },
    { USER("name: u, apiKey: piapi-SECRET-u, providerName: piapi-SECRET-u, providerKeyName: k"),
      { "t.yaml:7: users[0].providerName: unknown provider '<redacted>'" } },
    { USER(USERF "providerKeyName: k, sk-SECRET-1: x"),
      { "t.yaml:7: users[0].<redacted>: unknown field (expected one of:" } },
    { PROV "users:\n  - {" USERF "providerKeyName: k}\n  - {name: piapi-SECRET-u, apiKey: piapi-SECRET-v, "
      "providerName: p, providerKeyName: k, piapi-SECRET-u: 1}\n",
      { "t.yaml:8: users[1].<redacted>: unknown field" } },
    { USER(USERF "providerKeyName: k, apikey: x"),
      { "t.yaml:7: users[0].apikey: unknown field; did you mean 'apiKey'?" } },
    { USER(USERF "providerKeyName: k, ProviderName: p"),
      { "t.yaml:7: users[0].ProviderName: unknown field; did you mean 'providerName'?" } },
    { USER(USERF "providerKeyName: k, name: w"),
      { "t.yaml:7: users[0].name: duplicate key (first at line 7)" } },

    /* ---- settings */
    { PROV NOUSERS "settings: 5\n", { "t.yaml:7: settings: expected a mapping, got a string" } },
    { SETTINGS("maxBodyBytes: 0"),
      { "t.yaml:8: settings.maxBodyBytes: expected an integer in 1..1099511627776" } },
    { SETTINGS("maxBodyBytes: 1099511627777"), { "t.yaml:8: settings.maxBodyBytes: expected an integer" } },
    { SETTINGS("maxBodyBytes: 99999999999999999999999"), { "t.yaml:8: settings.maxBodyBytes: expected an integer" } },
    { SETTINGS("maxBodyBytes: -1"), { "t.yaml:8: settings.maxBodyBytes: expected an integer" } },
    { SETTINGS("maxBodyBytes: +5"), { "t.yaml:8: settings.maxBodyBytes: expected an integer" } },
    { SETTINGS("maxBodyBytes: 1.5"), { "t.yaml:8: settings.maxBodyBytes: expected an integer" } },
    { SETTINGS("maxBodyBytes: 32M"), { "t.yaml:8: settings.maxBodyBytes: expected an integer" } },
    { SETTINGS("maxBodyBytes: 0x10"), { "t.yaml:8: settings.maxBodyBytes: expected an integer" } },
    { SETTINGS("maxBodyBytes: ''"), { "t.yaml:8: settings.maxBodyBytes: must not be empty" } },
    { SETTINGS("maxBodyBytes:"), { "settings.maxBodyBytes: must not be empty" } },
    { SETTINGS("maxBodyBytes: [1]"), { "t.yaml:8: settings.maxBodyBytes: expected a string, got a sequence" } },
    { SETTINGS("connectTimeoutMs: 0"),
      { "t.yaml:8: settings.connectTimeoutMs: expected an integer in 1..86400000" } },
    { SETTINGS("headerTimeoutMs: 0"),
      { "t.yaml:8: settings.headerTimeoutMs: expected an integer in 1..86400000" } },
    { SETTINGS("idleTimeoutMs: 86400001"),
      { "t.yaml:8: settings.idleTimeoutMs: expected an integer in 1..86400000" } },
    { SETTINGS("sseKeepaliveMs: 86400001"),
      { "t.yaml:8: settings.sseKeepaliveMs: expected an integer in 0..86400000" } },
    { SETTINGS("caFile: /nonexistent/ca.pem"),
      { "t.yaml:8: settings.caFile: cannot read '/nonexistent/ca.pem': No such file or directory" } },
    { SETTINGS("caFile: /"), { "t.yaml:8: settings.caFile: '/' is not a regular file" } },
    { SETTINGS("caFile: ''"), { "t.yaml:8: settings.caFile: must not be empty" } },
    { SETTINGS("maxbodybytes: 5"),
      { "t.yaml:8: settings.maxbodybytes: unknown field; did you mean 'maxBodyBytes'?" } },
    { SETTINGS("idleTimeoutMs: 5\n  idleTimeoutMs: 6"),
      { "t.yaml:9: settings.idleTimeoutMs: duplicate key (first at line 8)" } },

    /* ---- YAML itself (line and column from libyaml's problem_mark) */
    { "providers:\n  - name: p\n   bad: [\n",
      { "t.yaml:3: (yaml): column 4: did not find expected '-' indicator "
        "(while parsing a block collection at line 2)" } },
    { "providers:\n  - name: p\n    bad: x: y\n",
      { "t.yaml:3: (yaml): column 11: mapping values are not allowed in this context" } },
    { "providers:\n\t- name: p\n", { "t.yaml:2: (yaml): column 1: found character that cannot start any token" } },
    { "providers: [\n" NOUSERS,
      { "t.yaml:3: (yaml): column 1: did not find expected ',' or ']' (while parsing a flow sequence at line 1)" } },
    { "users: 'unterminated\n", { "t.yaml:2: (yaml): column 1: found unexpected end of stream" } },
    { "a: &x 1\nb: *x\n", { "t.yaml:2: (yaml): aliases (*name) are not supported" } },
    { "a: &x [*x]\n", { "t.yaml:1: (yaml): aliases (*name) are not supported" } },
    { PROV NOUSERS "---\n" PROV NOUSERS, { "t.yaml:7: (yaml): only one YAML document is allowed" } },
    { "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
      { "t.yaml:1: (yaml): nesting deeper than 32 levels" } },
    { "\x80\x81\x82\n", { "t.yaml:1: (yaml): column 1: invalid leading UTF-8 octet" } },
    { "a: 1\nb: \x01\n", { "t.yaml:2: (yaml): column 4: control characters are not allowed" } },

    /* ---- several problems at once: all reported, in line order */
    { "providers:\n"
      "  - name: p\n"
      "    apiKeys: {k: ''}\n"
      "    services:\n"
      "      - {type: cx, baseUrl: 'ftp://h', auth: {mode: basic}}\n"
      "users:\n"
      "  - {name: u, apiKey: piapi-SECRET-u, providerName: q, providerKeyName: k}\n"
      "settings: {maxBodyBytes: 0}\n",
      { "t.yaml:3: providers[0].apiKeys: empty key value (entries are <name>: <key>)\n"
        "t.yaml:5: providers[0].services[0].baseUrl: must be an absolute http:// or https:// URL\n"
        "t.yaml:5: providers[0].services[0].auth.mode: unsupported auth mode 'basic' (use header or query)\n"
        "t.yaml:7: users[0].providerName: unknown provider 'q'\n"
        "t.yaml:8: settings.maxBodyBytes: expected an integer in 1..1099511627776" } },
};

#define NBAD (sizeof bad / sizeof bad[0])

static void test_bad_table(void)
{
    unsetenv("PIAPI_TEST_UNSET_VAR");
    unsetenv("CREDENTIALS_DIRECTORY");
    for (size_t i = 0; i < NBAD; i++) {
        char *errors = NULL, *warnings = NULL;
        const struct bad_case *c = &bad[i];
        struct piapi_config *cfg = piapi_config_parse(c->yaml, strlen(c->yaml),
                                                      "t.yaml", &errors, &warnings);
        CU_ASSERT_PTR_NULL(cfg);
        CU_ASSERT_PTR_NOT_NULL(errors);
        if (!errors) {
            fprintf(stderr, "\ncase %zu: no errors for:\n%s\n", i, c->yaml);
            piapi_config_release(cfg);
            free(warnings);
            continue;
        }
        for (size_t w = 0; w < 4 && c->want[w]; w++) {
            bool found = strstr(errors, c->want[w]) != NULL;
            CU_ASSERT(found);
            if (!found)
                fprintf(stderr, "\ncase %zu: want \"%s\"\n got:\n%s\n", i,
                        c->want[w], errors);
        }
        CU_ASSERT_PTR_NULL(strstr(errors, "SECRET"));
        CU_ASSERT_PTR_NULL(warnings ? strstr(warnings, "SECRET") : NULL);
        /* One line per problem, nothing trailing. */
        CU_ASSERT(errors[strlen(errors) - 1] != '\n');
        free(errors);
        free(warnings);
    }
}

/* ------------------------------------------------------------ helpers */

static struct piapi_config *load_ok(const char *yaml, char **warnings)
{
    char *errors = NULL;
    struct piapi_config *cfg = piapi_config_parse(yaml, strlen(yaml), "t.yaml",
                                                  &errors, warnings);
    CU_ASSERT_PTR_NOT_NULL(cfg);
    CU_ASSERT_PTR_NULL(errors);
    if (errors)
        fprintf(stderr, "\nunexpected errors:\n%s\n", errors);
    free(errors);
    return cfg;
}

static const struct piapi_provider *provider(const struct piapi_config *cfg,
                                             const char *user_key)
{
    const struct piapi_user *u = piapi_config_find_user(cfg, user_key,
                                                        strlen(user_key));
    CU_ASSERT_PTR_NOT_NULL_FATAL(u);
    return u->provider;
}

static const struct piapi_service *service(const struct piapi_config *cfg,
                                           const struct piapi_provider *p,
                                           const char *type)
{
    return piapi_config_find_service(cfg, p, type, strlen(type));
}

/* ------------------------------------------------------------- the seed */

static void test_seed_loads(void)
{
    char *warnings = NULL;
    struct piapi_config *cfg = load_ok(SEED, &warnings);
    size_t np = 0, ns = 0, nu = 0;

    CU_ASSERT_PTR_NULL(warnings);
    free(warnings);
    piapi_config_counts(cfg, &np, &ns, &nu);
    CU_ASSERT_EQUAL(np, 2);
    CU_ASSERT_EQUAL(ns, 3);
    CU_ASSERT_EQUAL(nu, 3);

    const struct piapi_user *bob = piapi_config_find_user(cfg, "piapi-user-bob", 14);
    CU_ASSERT_PTR_NOT_NULL_FATAL(bob);
    CU_ASSERT_STRING_EQUAL(bob->name, "Bob");
    CU_ASSERT_STRING_EQUAL(bob->provider->name, "provider-alpha");
    CU_ASSERT_STRING_EQUAL(bob->key->name, "backup-key");
    CU_ASSERT_STRING_EQUAL(bob->key->value, "sk-alpha-backup");
    CU_ASSERT_EQUAL(bob->provider->nkeys, 2);
    CU_ASSERT_EQUAL(bob->provider->nservices, 2);
    CU_ASSERT_PTR_EQUAL(bob->provider->services[1].provider, bob->provider);
    piapi_config_release(cfg);
}

/* The shipped example starts with the seed (what follows is pricing and
 * settings) and loads as it is. */
static void test_example_file(void)
{
    FILE *f = fopen("config.yaml.example", "r");
    char buf[8192];
    size_t n;

    if (!f)
        f = fopen("../../config.yaml.example", "r");
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    CU_ASSERT_NSTRING_EQUAL(buf, SEED, strlen(SEED));
    struct piapi_config *cfg = load_ok(buf, NULL);
    CU_ASSERT_PTR_NOT_NULL_FATAL(cfg);
    CU_ASSERT_STRING_EQUAL(piapi_config_settings(cfg)->usage_db, "/var/lib/piapi/usage.db");
    CU_ASSERT_PTR_NOT_NULL(piapi_config_find_price(cfg, "claude-sonnet-4-5"));
    piapi_config_release(cfg);
}

/* First match wins; a trailing '*' is a prefix; unset cache prices are
 * the input price, cacheWrite1h is cacheWrite's. */
static void test_pricing(void)
{
    static const char yaml[] = SEED
        "pricing:\n"
        "  - {model: \"claude-sonnet-4-5\", input: 1, output: 2}\n"
        "  - {model: \"claude-sonnet-4*\", input: 3, output: 15, cacheRead: 0.3, cacheWrite: 3.75}\n"
        "  - {model: \"*\", input: 0.5, output: 0.25}\n";
    struct piapi_config *cfg = load_ok(yaml, NULL);
    CU_ASSERT_PTR_NOT_NULL_FATAL(cfg);
    const struct piapi_price *p = piapi_config_find_price(cfg, "claude-sonnet-4-5");
    CU_ASSERT_TRUE(p && p->input == 1 && p->output == 2 && p->cache_read == 1 &&
                   p->cache_write == 1 && p->cache_write_1h == 1);
    p = piapi_config_find_price(cfg, "claude-sonnet-4-5-20250929");
    CU_ASSERT_TRUE(p && p->input == 3 && p->cache_read == 0.3 && p->cache_write == 3.75 &&
                   p->cache_write_1h == 3.75);
    p = piapi_config_find_price(cfg, "claude-sonnet-4");
    CU_ASSERT_TRUE(p && p->input == 3);
    p = piapi_config_find_price(cfg, "gpt-5");
    CU_ASSERT_TRUE(p && p->input == 0.5);
    piapi_config_release(cfg);

    cfg = load_ok(SEED, NULL);
    CU_ASSERT_PTR_NULL(piapi_config_find_price(cfg, "gpt-5"));
    CU_ASSERT_PTR_NULL(piapi_config_settings(cfg)->usage_db);
    const struct piapi_service *svc =
        piapi_config_find_service(cfg, provider(cfg, "piapi-user-alice"), "cx", 2);
    CU_ASSERT_TRUE(svc && svc->inject_stream_usage);
    piapi_config_release(cfg);
}

static void test_default_auth(void)
{
    struct piapi_config *cfg = load_ok(SEED, NULL);
    const struct piapi_provider *alpha = provider(cfg, "piapi-user-alice");
    const struct piapi_provider *beta = provider(cfg, "piapi-user-carol");

    const struct piapi_service *cc = service(cfg, alpha, "cc");
    CU_ASSERT_PTR_NOT_NULL_FATAL(cc);
    CU_ASSERT_EQUAL(cc->auth.mode, PIAPI_AUTH_HEADER);
    CU_ASSERT_STRING_EQUAL(cc->auth.name, "x-api-key");
    CU_ASSERT_STRING_EQUAL(cc->auth.prefix, "");

    const struct piapi_service *cx = service(cfg, alpha, "cx");
    CU_ASSERT_PTR_NOT_NULL_FATAL(cx);
    CU_ASSERT_STRING_EQUAL(cx->auth.name, "Authorization");
    CU_ASSERT_STRING_EQUAL(cx->auth.prefix, "Bearer ");

    const struct piapi_service *q = service(cfg, beta, "cx");
    CU_ASSERT_PTR_NOT_NULL_FATAL(q);
    CU_ASSERT_EQUAL(q->auth.mode, PIAPI_AUTH_QUERY);
    CU_ASSERT_STRING_EQUAL(q->auth.name, "api_key");
    CU_ASSERT_STRING_EQUAL(q->auth.prefix, "");
    piapi_config_release(cfg);

    struct auth_case {
        const char *fields;
        enum piapi_auth_mode mode;
        const char *name, *prefix;
    } cases[] = {
        { "", PIAPI_AUTH_HEADER, "Authorization", "Bearer " },
        { ", auth: ~", PIAPI_AUTH_HEADER, "Authorization", "Bearer " },
        { ", auth: {}", PIAPI_AUTH_HEADER, "Authorization", "Bearer " },
        { ", auth: {mode: header}", PIAPI_AUTH_HEADER, "Authorization", "Bearer " },
        { ", auth: {name: authorization}", PIAPI_AUTH_HEADER, "authorization", "Bearer " },
        { ", auth: {name: Authorization, prefix: ''}", PIAPI_AUTH_HEADER, "Authorization", "" },
        { ", auth: {name: Authorization, prefix: 'Token '}", PIAPI_AUTH_HEADER, "Authorization", "Token " },
        { ", auth: {name: x-goog-api-key}", PIAPI_AUTH_HEADER, "x-goog-api-key", "" },
        { ", auth: {name: X-Key, prefix: 'k='}", PIAPI_AUTH_HEADER, "X-Key", "k=" },
        { ", auth: {mode: query, name: key}", PIAPI_AUTH_QUERY, "key", "" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char yaml[512];
        snprintf(yaml, sizeof yaml,
                 HEAD "      - {type: cx, baseUrl: 'https://h'%s}\n"
                 "users: [{name: u, apiKey: piapi-u, providerName: p, providerKeyName: k}]\n",
                 cases[i].fields);
        cfg = load_ok(yaml, NULL);
        if (!cfg)
            continue;
        const struct piapi_service *s = service(cfg, provider(cfg, "piapi-u"), "cx");
        CU_ASSERT_PTR_NOT_NULL_FATAL(s);
        CU_ASSERT_EQUAL(s->auth.mode, cases[i].mode);
        CU_ASSERT_STRING_EQUAL(s->auth.name, cases[i].name);
        CU_ASSERT_STRING_EQUAL(s->auth.prefix, cases[i].prefix);
        piapi_config_release(cfg);
    }
}

/* ------------------------------------------------------------- lookups */

static void test_find_user(void)
{
    struct piapi_config *cfg = load_ok(SEED, NULL);
    static const struct { const char *key; size_t len; const char *who; } cases[] = {
        { "piapi-user-alice", 16, "Alice" },
        { "piapi-user-bob", 14, "Bob" },
        { "piapi-user-carol", 16, "Carol" },
        /* length, not the NUL, decides: a longer buffer with Bob's key first */
        { "piapi-user-bobby", 14, "Bob" },
        { "piapi-user-bobby", 16, NULL },
        { "piapi-user-ali", 14, NULL },        /* prefix of a real key */
        { "piapi-user-alice2", 17, NULL },     /* real key is a prefix of it */
        { "PIAPI-USER-ALICE", 16, NULL },
        { "", 0, NULL },
        { "sk-alpha-xxx", 12, NULL },          /* a provider key is no user key */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const struct piapi_user *u = piapi_config_find_user(cfg, cases[i].key,
                                                            cases[i].len);
        if (cases[i].who) {
            CU_ASSERT_PTR_NOT_NULL(u);
            if (u)
                CU_ASSERT_STRING_EQUAL(u->name, cases[i].who);
        } else {
            CU_ASSERT_PTR_NULL(u);
        }
    }
    CU_ASSERT_PTR_NULL(piapi_config_find_user(cfg, NULL, 0));
    CU_ASSERT_PTR_NULL(piapi_config_find_user(NULL, "piapi-user-bob", 14));
    piapi_config_release(cfg);
}

/* Many users: every one is found through the table, none collides. */
static void test_find_user_many(void)
{
    enum { N = 300 };
    size_t cap = 64 + N * 100;
    char *yaml = malloc(cap);
    size_t o = (size_t)snprintf(yaml, cap, "%s", PROV "users:\n");

    for (int i = 0; i < N; i++)
        o += (size_t)snprintf(yaml + o, cap - o,
                              "  - {name: u%d, apiKey: k-%d, providerName: p, providerKeyName: k}\n",
                              i, i);
    struct piapi_config *cfg = load_ok(yaml, NULL);
    free(yaml);
    CU_ASSERT_PTR_NOT_NULL_FATAL(cfg);
    for (int i = 0; i < N; i++) {
        char key[32], name[32];
        snprintf(key, sizeof key, "k-%d", i);
        snprintf(name, sizeof name, "u%d", i);
        const struct piapi_user *u = piapi_config_find_user(cfg, key, strlen(key));
        CU_ASSERT_PTR_NOT_NULL(u);
        if (u)
            CU_ASSERT_STRING_EQUAL(u->name, name);
    }
    CU_ASSERT_PTR_NULL(piapi_config_find_user(cfg, "k-300", 5));
    piapi_config_release(cfg);
}

/* ------------------------------------------------- keys kept as digests */

/* A member given only as apiKeyHash is found by the key itself, in either
 * hex case, beside members given with apiKey. */
static void test_key_hash(void)
{
    static const char yaml[] = PROV "users:\n"
        "  - {name: u, apiKeyHash: 'sha256:" U_HASH "', providerName: p, providerKeyName: k}\n"
        "  - {name: d, apiKeyHash: 'sha256:576D962B6F0E941043FD23D86DB8F8CBAFA419EC383D8CE806E637E4C7DEB3C0', "
        "providerName: p, providerKeyName: k}\n"
        "  - {name: e, apiKey: piapi-user-eve, providerName: p, providerKeyName: k}\n";
    struct piapi_config *cfg = load_ok(yaml, NULL);
    CU_ASSERT_PTR_NOT_NULL_FATAL(cfg);
    static const struct { const char *key, *who; } cases[] = {
        { "piapi-SECRET-u", "u" }, { "piapi-user-dave", "d" },
        { "piapi-user-eve", "e" }, { "piapi-SECRET-U", NULL },
        { U_HASH, NULL },                      /* the digest is no key */
        { "sha256:" U_HASH, NULL },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const struct piapi_user *u = piapi_config_find_user(cfg, cases[i].key,
                                                            strlen(cases[i].key));
        if (!cases[i].who) {
            CU_ASSERT_PTR_NULL(u);
        } else {
            CU_ASSERT_PTR_NOT_NULL(u);
            if (u)
                CU_ASSERT_STRING_EQUAL(u->name, cases[i].who);
        }
    }
    piapi_config_release(cfg);
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    CU_ASSERT_PTR_NOT_NULL_FATAL(f);
    fputs(text, f);
    fclose(f);
}

/* env:, file: and credential: read the key at load time, trimmed; a
 * change shows in the next load. */
static void test_external_keys(void)
{
    char dir[] = "/tmp/piapi-keys-XXXXXX", path[64], cred[64], yaml[512];
    CU_ASSERT_PTR_NOT_NULL_FATAL(mkdtemp(dir));
    snprintf(path, sizeof path, "%s/beta", dir);
    snprintf(cred, sizeof cred, "%s/gamma", dir);
    write_file(path, "  sk-from-file\n\n");
    write_file(cred, "sk-from-credential\r\n");
    setenv("PIAPI_TEST_KEY", "sk-from-env", 1);
    setenv("CREDENTIALS_DIRECTORY", dir, 1);
    snprintf(yaml, sizeof yaml,
             "providers:\n"
             "  - name: p\n"
             "    apiKeys: {a: 'env:PIAPI_TEST_KEY', b: 'file:%s', c: 'credential:gamma', d: sk-literal}\n"
             "    services: [{type: cx, baseUrl: 'https://h'}]\n"
             "users:\n"
             "  - {name: a, apiKey: ua, providerName: p, providerKeyName: a}\n"
             "  - {name: b, apiKey: ub, providerName: p, providerKeyName: b}\n"
             "  - {name: c, apiKey: uc, providerName: p, providerKeyName: c}\n"
             "  - {name: d, apiKey: ud, providerName: p, providerKeyName: d}\n", path);
    struct piapi_config *cfg = load_ok(yaml, NULL);
    CU_ASSERT_PTR_NOT_NULL_FATAL(cfg);
    static const struct { const char *user, *value; } want[] = {
        { "ua", "sk-from-env" }, { "ub", "sk-from-file" },
        { "uc", "sk-from-credential" }, { "ud", "sk-literal" },
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        const struct piapi_user *u = piapi_config_find_user(cfg, want[i].user, 2);
        CU_ASSERT_PTR_NOT_NULL_FATAL(u);
        CU_ASSERT_STRING_EQUAL(u->key->value, want[i].value);
    }
    piapi_config_release(cfg);

    /* A key that turns empty or gains a space is refused on the next load,
     * naming the reference only. */
    write_file(path, "\n");
    char *errors = NULL;
    cfg = piapi_config_parse(yaml, strlen(yaml), "t.yaml", &errors, NULL);
    CU_ASSERT_PTR_NULL(cfg);
    CU_ASSERT_PTR_NOT_NULL_FATAL(errors);
    CU_ASSERT_PTR_NOT_NULL(strstr(errors, "providers[0].apiKeys.b: 'file:"));
    CU_ASSERT_PTR_NOT_NULL(strstr(errors, "the key it names is empty"));
    free(errors);
    setenv("PIAPI_TEST_KEY", "sk-SECRET with space", 1);
    cfg = piapi_config_parse(yaml, strlen(yaml), "t.yaml", &errors, NULL);
    CU_ASSERT_PTR_NULL(cfg);
    CU_ASSERT_PTR_NOT_NULL_FATAL(errors);
    CU_ASSERT_PTR_NOT_NULL(strstr(errors, "t.yaml:3: providers[0].apiKeys.a: 'env:PIAPI_TEST_KEY': "
                                          "the key it names contains whitespace"));
    CU_ASSERT_PTR_NULL(strstr(errors, "SECRET"));
    free(errors);

    /* A key read from outside, misplaced into a name, is not quoted. */
    setenv("PIAPI_TEST_KEY", "sk-SECRET-from-env", 1);
    static const char misplaced[] =
        "providers:\n"
        "  - {name: p, apiKeys: {a: 'env:PIAPI_TEST_KEY'}, services: [{type: cx, baseUrl: 'https://h'}]}\n"
        "users:\n"
        "  - {name: u, apiKey: ua, providerName: p, providerKeyName: sk-SECRET-from-env}\n";
    cfg = piapi_config_parse(misplaced, strlen(misplaced), "t.yaml", &errors, NULL);
    CU_ASSERT_PTR_NULL(cfg);
    CU_ASSERT_PTR_NOT_NULL_FATAL(errors);
    CU_ASSERT_PTR_NOT_NULL(strstr(errors, "key '<redacted>' not defined"));
    CU_ASSERT_PTR_NULL(strstr(errors, "SECRET"));
    free(errors);
    unsetenv("PIAPI_TEST_KEY");
    unsetenv("CREDENTIALS_DIRECTORY");
    unlink(path);
    unlink(cred);
    rmdir(dir);
}

static void test_find_service(void)
{
    struct piapi_config *cfg = load_ok(SEED, NULL);
    const struct piapi_provider *alpha = provider(cfg, "piapi-user-bob");
    const struct piapi_provider *beta = provider(cfg, "piapi-user-carol");

    const struct piapi_service *s = service(cfg, alpha, "cx");
    CU_ASSERT_PTR_NOT_NULL_FATAL(s);
    CU_ASSERT_STRING_EQUAL(s->base_url, "https://api.provider-alpha.com/v1/engines");
    CU_ASSERT_PTR_EQUAL(s->provider, alpha);
    s = service(cfg, beta, "cx");
    CU_ASSERT_PTR_NOT_NULL_FATAL(s);
    CU_ASSERT_STRING_EQUAL(s->base_url, "https://api.provider-beta.com/codex");
    CU_ASSERT_PTR_EQUAL(s->provider, beta);
    CU_ASSERT_PTR_NOT_NULL(service(cfg, alpha, "cc"));
    CU_ASSERT_PTR_NULL(service(cfg, beta, "cc"));   /* beta offers no cc */
    CU_ASSERT_PTR_NULL(service(cfg, alpha, "c"));
    CU_ASSERT_PTR_NULL(service(cfg, alpha, "cxx"));
    CU_ASSERT_PTR_NULL(service(cfg, alpha, "CX"));
    CU_ASSERT_PTR_NULL(service(cfg, alpha, ""));
    CU_ASSERT_PTR_NOT_NULL(piapi_config_find_service(cfg, alpha, "cxyz", 2));
    CU_ASSERT_PTR_NULL(piapi_config_find_service(cfg, NULL, "cx", 2));
    piapi_config_release(cfg);
}

/* ------------------------------------------------------------ settings */

static char *write_temp(const char *text, mode_t mode);

static void test_settings(void)
{
    char yaml[2048];
    char *ca = write_temp("-----BEGIN CERTIFICATE-----\n", 0644);

    struct piapi_config *cfg = load_ok(SEED, NULL);
    const struct piapi_settings *s = piapi_config_settings(cfg);
    CU_ASSERT_EQUAL(s->max_body_bytes, 33554432u);
    CU_ASSERT_EQUAL(s->connect_timeout_ms, 10000u);
    CU_ASSERT_EQUAL(s->header_timeout_ms, 300000u);
    CU_ASSERT_EQUAL(s->idle_timeout_ms, 300000u);
    CU_ASSERT_EQUAL(s->sse_keepalive_ms, 15000u);
    CU_ASSERT_FALSE(s->sse_keepalive_explicit);  /* piapi may shorten it */
    CU_ASSERT_EQUAL(s->body_idle_timeout_ms, 30000u);
    CU_ASSERT_EQUAL(s->body_timeout_ms, 300000u);
    CU_ASSERT_PTR_NULL(s->ca_file);
    piapi_config_release(cfg);

    cfg = load_ok(SEED "settings: ~\n", NULL);
    CU_ASSERT_EQUAL(piapi_config_settings(cfg)->max_body_bytes, 33554432u);
    piapi_config_release(cfg);

    snprintf(yaml, sizeof yaml, SEED "settings:\n"
             "  maxBodyBytes: 1099511627776\n"
             "  connectTimeoutMs: 1\n"
             "  headerTimeoutMs: 86400000\n"
             "  idleTimeoutMs: \"42\"\n"
             "  sseKeepaliveMs: 0\n"
             "  bodyIdleTimeoutMs: 1000\n"
             "  bodyTimeoutMs: 86400000\n"
             "  caFile: %s\n", ca);
    cfg = load_ok(yaml, NULL);
    CU_ASSERT_PTR_NOT_NULL_FATAL(cfg);
    s = piapi_config_settings(cfg);
    CU_ASSERT_EQUAL(s->max_body_bytes, 1099511627776ULL);
    CU_ASSERT_EQUAL(s->connect_timeout_ms, 1u);
    CU_ASSERT_EQUAL(s->header_timeout_ms, 86400000u);
    CU_ASSERT_EQUAL(s->idle_timeout_ms, 42u);
    CU_ASSERT_EQUAL(s->sse_keepalive_ms, 0u);
    CU_ASSERT_TRUE(s->sse_keepalive_explicit);
    CU_ASSERT_EQUAL(s->body_idle_timeout_ms, 1000u);
    CU_ASSERT_EQUAL(s->body_timeout_ms, 86400000u);
    CU_ASSERT_STRING_EQUAL(s->ca_file, ca);
    piapi_config_release(cfg);
    unlink(ca);
    free(ca);

    cfg = load_ok(SEED "settings: {maxBodyBytes: 1}\n", NULL);
    s = piapi_config_settings(cfg);
    CU_ASSERT_EQUAL(s->max_body_bytes, 1u);
    CU_ASSERT_EQUAL(s->idle_timeout_ms, 300000u);  /* others keep defaults */
    piapi_config_release(cfg);
}

/* ------------------------------------------------------------- baseUrl */

static void test_base_url(void)
{
    static const struct { const char *in, *out; int warns; } cases[] = {
        { "https://h/v1", "https://h/v1", 0 },
        { "https://h/v1/", "https://h/v1", 0 },
        { "https://h/v1///", "https://h/v1", 0 },
        { "https://h/", "https://h", 0 },
        { "https://h", "https://h", 0 },
        { "https://h:8443/a/b/", "https://h:8443/a/b", 0 },
        { "https://h/v1/?x=1", "https://h/v1?x=1", 0 },
        { "https://h/v1?x=1&y=/", "https://h/v1?x=1&y=/", 0 },
        { "https://h?api-version=2024", "https://h?api-version=2024", 0 },
        { "https://h/?", "https://h?", 0 },
        { "HTTPS://H/V1/", "HTTPS://H/V1", 0 },
        { "https://[2001:db8::1]:443/v1/", "https://[2001:db8::1]:443/v1", 0 },
        { "https://user:pw@h/v1", "https://user:pw@h/v1", 0 },
        { "http://localhost:8080/v1/", "http://localhost:8080/v1", 0 },
        { "http://LOCALHOST/v1", "http://LOCALHOST/v1", 0 },
        { "http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1", 0 },
        { "http://127.1.2.3/v1", "http://127.1.2.3/v1", 0 },
        { "http://[::1]:9/v1", "http://[::1]:9/v1", 0 },
        { "http://api.example.com/v1", "http://api.example.com/v1", 1 },
        { "http://127.0.0.1.evil.com/v1", "http://127.0.0.1.evil.com/v1", 1 },
        { "http://localhost.evil.com/", "http://localhost.evil.com", 1 },
        { "http://10.0.0.5:8080", "http://10.0.0.5:8080", 1 },
        { "http://[::2]/", "http://[::2]", 1 },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char yaml[512], *warnings = NULL;
        snprintf(yaml, sizeof yaml, HEAD "      - {type: cx, baseUrl: '%s'}\n"
                 "users: [{name: u, apiKey: piapi-u, providerName: p, providerKeyName: k}]\n",
                 cases[i].in);
        struct piapi_config *cfg = load_ok(yaml, &warnings);
        if (!cfg) {
            fprintf(stderr, "\nbaseUrl case %zu: %s\n", i, cases[i].in);
            free(warnings);
            continue;
        }
        const struct piapi_service *s = service(cfg, provider(cfg, "piapi-u"), "cx");
        CU_ASSERT_PTR_NOT_NULL_FATAL(s);
        CU_ASSERT_STRING_EQUAL(s->base_url, cases[i].out);
        if (cases[i].warns) {
            CU_ASSERT_PTR_NOT_NULL(warnings);
            CU_ASSERT(warnings && strstr(warnings,
                "t.yaml:5: providers[0].services[0].baseUrl: plain http to a "
                "non-loopback host sends the provider key unencrypted"));
        } else {
            CU_ASSERT_PTR_NULL(warnings);
        }
        free(warnings);
        piapi_config_release(cfg);
    }
}

/* ---------------------------------------------------------- edge loads */

static void test_edge_loads(void)
{
    /* users: [] and a bare "users:" are both "no users yet". */
    struct piapi_config *cfg = load_ok(PROV "users: []\n", NULL);
    size_t nu = 9, ns = 0;
    piapi_config_counts(cfg, NULL, &ns, &nu);
    CU_ASSERT_EQUAL(nu, 0);
    CU_ASSERT_EQUAL(ns, 1);
    CU_ASSERT_PTR_NULL(piapi_config_find_user(cfg, "x", 1));
    piapi_config_release(cfg);
    cfg = load_ok(PROV "users:\n", NULL);
    piapi_config_release(cfg);

    /* Not NUL-terminated: only len bytes are read. */
    char *copy = malloc(sizeof SEED - 1);
    memcpy(copy, SEED, sizeof SEED - 1);
    char *errors = NULL;
    cfg = piapi_config_parse(copy, sizeof SEED - 1, NULL, &errors, NULL);
    CU_ASSERT_PTR_NOT_NULL(cfg);
    CU_ASSERT_PTR_NULL(errors);
    free(copy);
    piapi_config_release(cfg);

    /* NULL name → "config"; NULL text is an empty document. */
    cfg = piapi_config_parse(NULL, 0, NULL, &errors, NULL);
    CU_ASSERT_PTR_NULL(cfg);
    CU_ASSERT_PTR_NOT_NULL_FATAL(errors);
    CU_ASSERT_PTR_NOT_NULL(strstr(errors, "config:1: (top level): empty config"));
    free(errors);

    /* Caller may pass NULL for both outputs. */
    CU_ASSERT_PTR_NULL(piapi_config_parse("x: [", 4, "t", NULL, NULL));

    /* A huge scalar is just a long name. */
    size_t big = 1 << 20;
    char *yaml = malloc(big + 512);
    size_t o = (size_t)sprintf(yaml, "providers:\n  - name: ");
    memset(yaml + o, 'a', big);
    o += big;
    strcpy(yaml + o, "\n    apiKeys: {k: sk-v}\n    services: [{type: cx, baseUrl: 'https://h'}]\nusers: []\n");
    cfg = load_ok(yaml, NULL);
    piapi_config_release(cfg);
    free(yaml);

    /* Comments, block scalars and quoting styles are plain YAML. */
    cfg = load_ok("# team gateway\n"
                  "providers:\n"
                  "  - name: \"p\"   # quoted\n"
                  "    apiKeys:\n"
                  "      'k': >-\n"
                  "        folded-key\n"
                  "    services:\n"
                  "      - type: cx\n"
                  "        baseUrl: |-\n"
                  "          https://h/v1/\n"
                  "users:\n"
                  "  - {name: u, apiKey: \"k\\x41\", providerName: p, providerKeyName: k}\n", NULL);
    CU_ASSERT_PTR_NOT_NULL_FATAL(cfg);
    const struct piapi_user *u = piapi_config_find_user(cfg, "kA", 2);
    CU_ASSERT_PTR_NOT_NULL_FATAL(u);
    CU_ASSERT_STRING_EQUAL(u->key->value, "folded-key");
    CU_ASSERT_STRING_EQUAL(service(cfg, u->provider, "cx")->base_url, "https://h/v1");
    piapi_config_release(cfg);
}

static void test_limits(void)
{
    /* More than 4 MiB is refused before parsing. */
    size_t big = (4u << 20) + 1;
    char *text = malloc(big);
    char *errors = NULL;
    memset(text, '#', big);
    CU_ASSERT_PTR_NULL(piapi_config_parse(text, big, "t.yaml", &errors, NULL));
    CU_ASSERT_PTR_NOT_NULL_FATAL(errors);
    CU_ASSERT_STRING_EQUAL(errors, "t.yaml: config is larger than 4 MiB");
    free(errors);

    /* A flat flow sequence of a million nodes stops at the node cap. */
    size_t n = 600000, o = 0;
    text[o++] = '[';
    for (size_t i = 0; i < n; i++)
        text[o++] = 'a', text[o++] = ',';
    text[o++] = ']';
    CU_ASSERT_PTR_NULL(piapi_config_parse(text, o, "t.yaml", &errors, NULL));
    CU_ASSERT_PTR_NOT_NULL_FATAL(errors);
    CU_ASSERT_STRING_EQUAL(errors, "t.yaml:1: (yaml): more than 500000 nodes");
    free(errors);
    free(text);
}

static void test_error_cap(void)
{
    size_t cap = 64 + 300 * 16;
    char *yaml = malloc(cap);
    size_t o = (size_t)snprintf(yaml, cap, PROV NOUSERS);
    for (int i = 0; i < 300; i++)
        o += (size_t)snprintf(yaml + o, cap - o, "x%d: 1\n", i);
    char *errors = NULL;
    struct piapi_config *cfg = piapi_config_parse(yaml, o, "t.yaml", &errors, NULL);
    CU_ASSERT_PTR_NULL(cfg);
    CU_ASSERT_PTR_NOT_NULL_FATAL(errors);
    CU_ASSERT_PTR_NOT_NULL(strstr(errors, "t.yaml:7: x0: unknown field"));
    CU_ASSERT_PTR_NOT_NULL(strstr(errors, "\n... and 200 more"));
    free(errors);
    free(yaml);
}

/* -------------------------------------------------------------- files */

static char *write_temp(const char *text, mode_t mode)
{
    char *path = strdup("/tmp/piapi-test-config-XXXXXX");
    int fd = mkstemp(path);
    CU_ASSERT_FATAL(fd >= 0);
    CU_ASSERT_FATAL(write(fd, text, strlen(text)) == (ssize_t)strlen(text));
    CU_ASSERT_FATAL(fchmod(fd, mode) == 0);
    close(fd);
    return path;
}

static void test_load_file(void)
{
    char *errors = NULL, *warnings = NULL;
    char *path = write_temp(SEED, 0600);
    struct piapi_config *cfg = piapi_config_load_file(path, &errors, &warnings, NULL);

    CU_ASSERT_PTR_NOT_NULL(cfg);
    CU_ASSERT_PTR_NULL(errors);
    CU_ASSERT_PTR_NULL(warnings);
    const char *hash = piapi_config_hash(cfg);
    CU_ASSERT_EQUAL(strlen(hash), 12);
    CU_ASSERT_EQUAL(strspn(hash, "0123456789abcdef"), 12);
    /* Same bytes from memory → same hash; different bytes → different. */
    struct piapi_config *same = load_ok(SEED, NULL);
    CU_ASSERT_STRING_EQUAL(piapi_config_hash(same), hash);
    struct piapi_config *other = load_ok(SEED "\n", NULL);
    CU_ASSERT_STRING_NOT_EQUAL(piapi_config_hash(other), hash);
    piapi_config_release(same);
    piapi_config_release(other);
    piapi_config_release(cfg);

    /* Readable by others: loads, with a warning naming the file. */
    chmod(path, 0644);
    cfg = piapi_config_load_file(path, &errors, &warnings, NULL);
    CU_ASSERT_PTR_NOT_NULL(cfg);
    CU_ASSERT_PTR_NULL(errors);
    CU_ASSERT_PTR_NOT_NULL_FATAL(warnings);
    char want[256];
    snprintf(want, sizeof want, "%s:1: (file): config file is accessible to every user "
             "and holds secrets; chmod o-rwx (e.g. 0640 or 0600)", path);
    CU_ASSERT_STRING_EQUAL(warnings, want);
    free(warnings);
    piapi_config_release(cfg);

    /* Group-readable is how a service user reads it: no warning. */
    chmod(path, 0640);
    cfg = piapi_config_load_file(path, &errors, &warnings, NULL);
    CU_ASSERT_PTR_NOT_NULL(cfg);
    CU_ASSERT_PTR_NULL(warnings);
    free(warnings);
    piapi_config_release(cfg);

    /* The warning survives a failed load too; errors carry the path. */
    FILE *f = fopen(path, "w");
    fputs("providers: [\n", f);
    fclose(f);
    chmod(path, 0604);
    cfg = piapi_config_load_file(path, &errors, &warnings, NULL);
    CU_ASSERT_PTR_NULL(cfg);
    CU_ASSERT_PTR_NOT_NULL_FATAL(errors);
    snprintf(want, sizeof want, "%s:2: (yaml): column", path);
    CU_ASSERT_PTR_NOT_NULL(strstr(errors, want));
    CU_ASSERT_PTR_NOT_NULL(warnings);
    free(errors);
    free(warnings);
    unlink(path);
    free(path);

    cfg = piapi_config_load_file("/nonexistent/piapi.yaml", &errors, &warnings, NULL);
    CU_ASSERT_PTR_NULL(cfg);
    CU_ASSERT_PTR_NOT_NULL_FATAL(errors);
    CU_ASSERT_STRING_EQUAL(errors, "/nonexistent/piapi.yaml: cannot open config "
                                   "file: No such file or directory");
    CU_ASSERT_PTR_NULL(warnings);
    free(errors);

    cfg = piapi_config_load_file("/tmp", &errors, &warnings, NULL);
    CU_ASSERT_PTR_NULL(cfg);
    CU_ASSERT_PTR_NOT_NULL_FATAL(errors);
    CU_ASSERT_STRING_EQUAL(errors, "/tmp: config file is not a regular file");
    free(errors);
    free(warnings);
}

/* ----------------------------------------------- refcount and publish */

static void test_refcount_publish(void)
{
    struct piapi_config *a = load_ok(SEED, NULL);
    struct piapi_config *b = load_ok(SEED "# b\n", NULL);

    CU_ASSERT_PTR_NULL(piapi_config_current());   /* nothing published yet */
    CU_ASSERT_PTR_EQUAL(piapi_config_acquire(a), a);
    piapi_config_release(a);                       /* back to one reference */
    piapi_config_release(NULL);
    CU_ASSERT_PTR_NULL(piapi_config_acquire(NULL));

    piapi_config_publish(a);                       /* takes our reference */
    struct piapi_config *held = piapi_config_current();
    CU_ASSERT_PTR_EQUAL(held, a);

    /* A request holding `a` keeps it usable across a reload to `b`. */
    piapi_config_publish(b);
    struct piapi_config *now = piapi_config_current();
    CU_ASSERT_PTR_EQUAL(now, b);
    const struct piapi_user *u = piapi_config_find_user(held, "piapi-user-bob", 14);
    CU_ASSERT_PTR_NOT_NULL(u);
    if (u)
        CU_ASSERT_STRING_EQUAL(u->key->value, "sk-alpha-backup");
    piapi_config_release(held);                    /* frees a (ASan/valgrind check) */
    piapi_config_release(now);

    piapi_config_publish(NULL);                    /* frees b */
    CU_ASSERT_PTR_NULL(piapi_config_current());
}

static atomic_int stop_readers;

static void *reader(void *arg)
{
    atomic_size_t *seen = arg;
    while (!atomic_load(&stop_readers)) {
        struct piapi_config *cfg = piapi_config_current();
        if (!cfg)
            continue;
        if (piapi_config_find_user(cfg, "piapi-user-carol", 16))
            atomic_fetch_add(seen, 1);
        piapi_config_release(cfg);
    }
    return NULL;
}

static int every_reader_ran(atomic_size_t *seen, int n)
{
    for (int i = 0; i < n; i++)
        if (atomic_load(&seen[i]) == 0)
            return 0;
    return 1;
}

/* At least 200 swaps, and on until every reader has read a snapshot (a
 * loaded machine may not schedule a reader before 200 swaps are over). */
static void test_publish_threads(void)
{
    pthread_t t[4];
    atomic_size_t seen[4] = { 0 };

    atomic_store(&stop_readers, 0);
    piapi_config_publish(load_ok(SEED, NULL));
    for (int i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, reader, &seen[i]);
    for (int i = 0; i < 200 || (!every_reader_ran(seen, 4) && i < 200000); i++)
        piapi_config_publish(load_ok(SEED, NULL));
    atomic_store(&stop_readers, 1);
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], NULL);
        CU_ASSERT(atomic_load(&seen[i]) > 0);
    }
    piapi_config_publish(NULL);
}

static const struct unit_case cases[] = {
    { "invalid configs: one table, every rule", test_bad_table },
    { "seed loads: 2 providers, 3 services, 3 users", test_seed_loads },
    { "config.yaml.example starts with the seed", test_example_file },
    { "pricing lookup and defaults", test_pricing },
    { "default auth name and prefix", test_default_auth },
    { "user lookup hits and misses", test_find_user },
    { "user lookup with many users", test_find_user_many },
    { "service lookup", test_find_service },
    { "apiKeyHash: members kept as digests", test_key_hash },
    { "provider keys from env:, file:, credential:", test_external_keys },
    { "settings defaults and overrides", test_settings },
    { "baseUrl normalisation and http warning", test_base_url },
    { "edge loads", test_edge_loads },
    { "error list is capped", test_error_cap },
    { "size and node limits", test_limits },
    { "load_file, hash, mode warning, missing file", test_load_file },
    { "refcount, publish, current", test_refcount_publish },
    { "publish under concurrent readers", test_publish_threads },
    { NULL, NULL },
};

UNIT_MAIN("config", cases)
