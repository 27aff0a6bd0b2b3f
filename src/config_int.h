/* Private to the config stages; nothing outside src/config*.c includes it.
 *
 *   config_mem.c     the string set every stage uses
 *   config_tree.c    YAML text → a small tree of nodes (libyaml events)
 *   config_check.c   messages with file and line, and the generic checks
 *                    a schema walker calls (keys, kinds, strings, names)
 *   config_schema.c  the schema: field tables and walkers that validate
 *                    the tree and fill a snapshot
 *   config_usage.c   the same for usage accounting: pricing:, usageDb,
 *                    a service's usage:
 *   config_limits.c  limits:, a member's limits: and models:, settings.redis
 *   config_routes.c  the same for routes: routes:, a member's services:
 *   config.c         the snapshot: loading, lookup tables, references,
 *                    the live snapshot
 */
#ifndef PIAPI_CONFIG_INT_H
#define PIAPI_CONFIG_INT_H

#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "piapi/arena.h"
#include "piapi/config.h"

#define CFG_MAX_FILE_BYTES  (4u << 20)   /* a team's config is a few KiB */
#define CFG_MAX_NODES       500000       /* ~40 MB of tree at worst */
#define CFG_MAX_DEPTH       32           /* the schema itself needs 6 */
#define CFG_MAX_MESSAGES    100          /* per list; the rest are counted */
#define CFG_PATH_LEN        256
#define CFG_SHOW_LEN        72           /* a quoted value inside a message */

/* ---- memory (arena.h, config_mem.c) ---- */

/* Open-addressing set of (group, bytes) → value, used while validating:
 * duplicate keys, names, key names per provider, service types, member
 * keys. Entries point at the caller's bytes, which must outlive the set. */
struct strset_ent {
    const char *s;  /* NULL = empty slot */
    size_t len;
    size_t group;
    size_t val;
};

struct strset {
    struct strset_ent *e;
    size_t mask;
    size_t n;
};

const struct strset_ent *cfg_strset_find(const struct strset *set, size_t group,
                                         const char *s, size_t len);
/* Adds unless present. Returns the existing entry on a duplicate, else NULL. */
const struct strset_ent *cfg_strset_add(struct strset *set, size_t group,
                                        const char *s, size_t len, size_t val);
void cfg_strset_dispose(struct strset *set);

/* ---- the tree (config_tree.c) ---- */

enum ykind { Y_SCALAR, Y_SEQ, Y_MAP };

struct ynode {
    enum ykind kind;
    bool null;            /* plain "", "~" or "null": YAML's null */
    bool has_nul;         /* a "\0" escape: unusable as a C string */
    unsigned long line;   /* 1-based */
    const char *str;      /* scalar value, NUL-terminated */
    size_t len;
    struct ynode *first;  /* children; a mapping alternates key, value */
    struct ynode *last;
    struct ynode *next;
    size_t count;         /* children (a mapping: 2 per pair) */
};

/* ---- one load: messages, the snapshot being built, validation sets ---- */

struct msg {
    unsigned long line;   /* 0 = about the file as a whole */
    size_t seq;
    char *text;
};

struct msgs {
    struct msg *v;
    size_t n;        /* stored */
    size_t cap;
    size_t dropped;  /* beyond CFG_MAX_MESSAGES */
};

struct ctx {
    const char *name;
    struct msgs err;
    struct msgs warn;
    struct piapi_arena tree;
    struct piapi_config *cfg;
    struct strset prov_names;  /* group 0: name → provider index */
    struct strset prov_keys;   /* group provider: key name → key index */
    struct strset svc_types;   /* group provider: type → line */
    struct strset user_names;  /* name → line */
    struct strset user_keys;   /* key digest → user index */
    struct strset secrets;     /* every key value, never to be echoed */
    struct strset route_names; /* routes: name → index */
    const struct ynode **route_nodes;  /* routes: each one's mapping */
    size_t nodes;
};

struct piapi_config {
    atomic_size_t refs;
    struct piapi_arena arena;
    struct piapi_provider *providers;
    size_t nproviders;
    size_t nservices;
    struct piapi_user *users;
    size_t nusers;
    struct piapi_settings settings;
    struct piapi_price *prices;
    size_t nprices;
    struct piapi_route_set *routes;            /* top-level routes: */
    size_t nroutes;
    const struct piapi_user **user_tab;        /* open addressing, NULL = empty */
    size_t user_mask;
    const struct piapi_service **svc_tab;
    size_t svc_mask;
    char hash[13];
    uint64_t external_id;  /* keys read from outside the file (seeded hash) */
};

/* Returns the root node (NULL for an empty stream), or sets *failed after
 * reporting why. Aliases are refused, depth and node count bounded. */
struct ynode *cfg_tree_build(struct ctx *c, const char *text, size_t len,
                             bool *failed);

/* ---- messages (config_check.c) ---- */

__attribute__((format(printf, 4, 5)))
void cfg_err_at(struct ctx *c, unsigned long line, const char *path,
                const char *fmt, ...);
__attribute__((format(printf, 4, 5)))
void cfg_err(struct ctx *c, const struct ynode *at, const char *path,
             const char *fmt, ...);
__attribute__((format(printf, 4, 5)))
void cfg_warn(struct ctx *c, const struct ynode *at, const char *path,
              const char *fmt, ...);
/* For messages that name a file, not a place in it. */
void cfg_err_file(struct ctx *c, const char *what, int errnum);
/* The newline-separated list sorted by line (malloc'd), or NULL. */
char *cfg_msgs_take(struct msgs *m);

/* A value quoted inside a message: one line, bounded, never a secret nor
 * a string holding one. */
const char *cfg_show(const struct ctx *c, char out[CFG_SHOW_LEN], const char *s,
                     size_t len);
void cfg_path_key(const struct ctx *c, char out[CFG_PATH_LEN], const char *base,
                  const char *key, size_t len);
void cfg_path_idx(char out[CFG_PATH_LEN], const char *base, size_t i);

/* ---- generic checks (config_check.c) ---- */

/* An unsigned integer setting: default, bounds and where it is stored in
 * struct piapi_settings (uint64_t when wide, else uint32_t). */
struct cfg_number {
    uint64_t def, min, max;
    size_t off;
    bool wide;
    /* when non-zero: the offset + 1 of an int set to 1 when the file gives
     * the setting (piapi may choose another value for an unset one) */
    size_t given;
};

/* One key of a mapping in the schema. A secret's value is never quoted in
 * any message (secret_values: each value of this mapping is one;
 * secret_url: a URL's userinfo and query values are); `items` describes
 * the mapping below (or each mapping of a sequence below). */
struct cfg_field {
    const char *key;
    bool secret;
    bool secret_values;
    bool secret_url;
    const struct cfg_schema *items;
    const struct cfg_number *number;
};

struct cfg_schema {
    const struct cfg_field *fields;
    size_t n;
};

#define CFG_SCHEMA(fields) { fields, sizeof fields / sizeof fields[0] }

enum { CFG_OPTIONAL, CFG_REQUIRED };

const char *cfg_kind_name(enum ykind k);
/* Keys must be strings, unique and (when `schema` is given) one of its
 * fields; an unknown key gets a "did you mean". */
void cfg_check_keys(struct ctx *c, const struct ynode *map, const char *path,
                    const struct cfg_schema *schema);
const struct ynode *cfg_map_get(const struct ynode *map, const char *key);
bool cfg_expect_kind(struct ctx *c, const struct ynode *n, const char *path,
                     enum ykind kind);
/* The scalar at `key`: NULL when absent, not a string, null or invalid
 * (having reported whatever `required` makes an error). */
const struct ynode *cfg_get_str(struct ctx *c, const struct ynode *map,
                                const char *path, const char *key, int required);
/* A required, non-empty sequence or mapping field. */
const struct ynode *cfg_get_coll(struct ctx *c, const struct ynode *map,
                                 const char *path, const char *key,
                                 enum ykind kind);
/* A required string without control characters (names in logs, labels). */
const struct ynode *cfg_get_name(struct ctx *c, const struct ynode *map,
                                 const char *path, const char *key);
bool cfg_has_ctl(const char *s, size_t len, bool allow_tab);
bool cfg_has_space_or_ctl(const char *s, size_t len);
const char *cfg_dup_str(struct ctx *c, const struct ynode *v);
/* The entry's required `name`, unique within `set`; `list` names the
 * sequence in the duplicate message. NULL when missing. */
const char *cfg_unique_name(struct ctx *c, const struct ynode *map,
                            const char *path, struct strset *set, size_t idx,
                            const char *what, const char *list);
/* ---- the schema (config_schema.c) ---- */

/* Validates the whole document into c->cfg, reporting every problem. */
void cfg_walk_root(struct ctx *c, const struct ynode *root);

/* ---- usage accounting's sections (config_usage.c) ---- */

extern const struct cfg_schema cfg_pricing_schema;
extern const struct cfg_schema cfg_service_usage_schema;
/* `pricing:` into c->cfg->prices. */
void cfg_walk_pricing(struct ctx *c, const struct ynode *root);
/* A service's optional `usage:` mapping. */
void cfg_walk_service_usage(struct ctx *c, const struct ynode *svc, const char *path,
                            struct piapi_service *out);
/* settings.usageDb. */
void cfg_walk_usage_db(struct ctx *c, const struct ynode *settings);

/* ---- per-member limits (config_limits.c) ---- */

extern const struct cfg_schema cfg_limits_schema;
/* `limits:`, every member's `limits:` and `models:`, settings.redis; after
 * the users were walked. */
void cfg_walk_limits(struct ctx *c, const struct ynode *root);

/* ---- routes (config_routes.c) ---- */

extern const struct cfg_schema cfg_route_schema;
/* Top-level `routes:` into c->cfg->routes; before the users. */
void cfg_walk_routes(struct ctx *c, const struct ynode *root);
/* A member's default route and optional `services:`, after its
 * providerName/providerKeyName. */
void cfg_walk_user_services(struct ctx *c, const struct ynode *u, const char *path,
                            struct piapi_user *out);

#endif
