/* config.yaml → immutable, reference-counted snapshot.
 *
 * Three stages, each simple on its own:
 *   1. libyaml's event parser builds a small private tree (tree_build). Doing
 *      it ourselves rather than with yaml_parser_load lets us refuse aliases
 *      (a self-referencing or billion-laughs alias would otherwise turn the
 *      schema walk into a cycle or an exponential one) and cap the nesting.
 *   2. A schema walk over that tree validates every field and copies what it
 *      keeps into the snapshot's arena. It never stops at the first problem:
 *      every error is collected with the node's line, the way `nginx -t` and
 *      lighttpd speak to an operator.
 *   3. Only when there are no errors, the lookup tables are built and the
 *      snapshot is handed out with one reference.
 *
 * Everything a snapshot points to lives in one arena, so releasing it is
 * "wipe every block, free every block": secrets cannot be missed. */
#include "piapi/config.h"
#include "piapi/util.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml.h>

#define MAX_FILE_BYTES  (4u << 20)   /* a team's config is a few KiB */
#define MAX_NODES       500000       /* ~40 MB of tree at worst */
#define MAX_DEPTH       32           /* the schema itself needs 6 */
#define MAX_MESSAGES    100          /* per list; the rest are counted */
#define PATH_LEN        256
#define SHOW_LEN        72           /* a quoted value inside a message */

/* ------------------------------------------------------------------ arena */

struct arena_block {
    struct arena_block *next;
    size_t size;
    size_t used;
    max_align_t data[];
};

struct arena {
    struct arena_block *head;
};

#define ARENA_CHUNK 4096

static void *arena_alloc(struct arena *a, size_t n)
{
    const size_t align = sizeof(max_align_t);
    struct arena_block *b = a->head;

    if (n > SIZE_MAX / 2)
        abort();
    n = (n + align - 1) & ~(align - 1);
    if (!b || b->size - b->used < n) {
        size_t size = n > ARENA_CHUNK / 4 ? n : ARENA_CHUNK;
        struct arena_block *nb = piapi_xmalloc(sizeof *nb + size);
        nb->size = size;
        nb->used = 0;
        /* A large allocation gets its own block behind the head, so the
         * partly used head keeps serving small ones. */
        if (b && size != ARENA_CHUNK) {
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
    memset(p, 0, n);
    return p;
}

static void *arena_array(struct arena *a, size_t count, size_t size)
{
    if (size && count > SIZE_MAX / 2 / size)
        abort();
    return arena_alloc(a, count * size);
}

static char *arena_strndup(struct arena *a, const char *s, size_t n)
{
    char *p = arena_alloc(a, n + 1);
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

/* Both arenas hold key material, so every byte handed out is wiped. */
static void arena_dispose(struct arena *a)
{
    struct arena_block *b = a->head;
    while (b) {
        struct arena_block *next = b->next;
        explicit_bzero(b->data, b->used);
        free(b);
        b = next;
    }
    a->head = NULL;
}

/* ---------------------------------------------------------------- strset */

/* A growable open-addressing set of (group, string) → value, used while
 * validating: duplicate keys, provider names, key names per provider,
 * service types per provider, user names and user keys. */
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

static uint64_t strset_hash(size_t group, const char *s, size_t len)
{
    uint64_t h = piapi_hash(s, len);
    h ^= (uint64_t)group * 0x9E3779B97F4A7C15ULL;
    h ^= h >> 31;
    return h;
}

static struct strset_ent *strset_slot(const struct strset *set, size_t group,
                                      const char *s, size_t len)
{
    size_t i = (size_t)strset_hash(group, s, len) & set->mask;
    for (;; i = (i + 1) & set->mask) {
        struct strset_ent *e = &set->e[i];
        if (!e->s || (e->group == group && e->len == len &&
                      memcmp(e->s, s, len) == 0))
            return e;
    }
}

static void strset_grow(struct strset *set)
{
    struct strset old = *set;
    size_t cap = old.e ? (old.mask + 1) * 2 : 16;

    set->e = piapi_xcalloc(cap, sizeof *set->e);
    set->mask = cap - 1;
    for (size_t i = 0; old.e && i <= old.mask; i++)
        if (old.e[i].s)
            *strset_slot(set, old.e[i].group, old.e[i].s, old.e[i].len) = old.e[i];
    free(old.e);
}

static const struct strset_ent *strset_find(const struct strset *set,
                                            size_t group, const char *s,
                                            size_t len)
{
    if (!set->e)
        return NULL;
    const struct strset_ent *e = strset_slot(set, group, s, len);
    return e->s ? e : NULL;
}

/* Adds unless present. Returns the existing entry on a duplicate, else NULL. */
static const struct strset_ent *strset_add(struct strset *set, size_t group,
                                           const char *s, size_t len,
                                           size_t val)
{
    const struct strset_ent *old = strset_find(set, group, s, len);
    if (old)
        return old;
    if (!set->e || (set->n + 1) * 2 > set->mask + 1)
        strset_grow(set);
    struct strset_ent *e = strset_slot(set, group, s, len);
    *e = (struct strset_ent){ .s = s, .len = len, .group = group, .val = val };
    set->n++;
    return NULL;
}

static void strset_dispose(struct strset *set)
{
    free(set->e);
    *set = (struct strset){ 0 };
}

/* ------------------------------------------------------------- the tree */

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

static const char *kind_name(enum ykind k)
{
    return k == Y_MAP ? "mapping" : k == Y_SEQ ? "sequence" : "string";
}

/* -------------------------------------------------------------- context */

/* Messages are kept with their line and sorted when handed over, so the
 * operator reads them top to bottom whatever order the checks ran in. */
struct msg {
    unsigned long line;   /* 0 = about the file as a whole */
    size_t seq;
    char *text;
};

struct msgs {
    struct msg *v;
    size_t n;        /* stored */
    size_t cap;
    size_t dropped;  /* beyond MAX_MESSAGES */
};

struct ctx {
    const char *name;
    struct msgs err;
    struct msgs warn;
    struct arena tree;
    struct piapi_config *cfg;
    struct strset prov_names;  /* group 0: name → provider index */
    struct strset prov_keys;   /* group provider: key name → key index */
    struct strset svc_types;   /* group provider: type → line */
    struct strset user_names;  /* name → line */
    struct strset user_keys;   /* apiKey → user index */
    struct strset secrets;     /* every key value, never to be echoed */
    size_t nodes;
};

struct piapi_config {
    atomic_size_t refs;
    struct arena arena;
    struct piapi_provider *providers;
    size_t nproviders;
    size_t nservices;
    struct piapi_user *users;
    size_t nusers;
    struct piapi_settings settings;
    const struct piapi_user **user_tab;        /* open addressing, NULL = empty */
    size_t user_mask;
    const struct piapi_service **svc_tab;
    size_t svc_mask;
    char hash[13];
};

static void msgs_add(struct msgs *m, unsigned long line, char *text)
{
    if (m->n == MAX_MESSAGES) {
        m->dropped++;
        free(text);
        return;
    }
    if (m->n == m->cap) {
        m->cap = m->cap ? m->cap * 2 : 8;
        m->v = piapi_xrealloc(m->v, m->cap * sizeof *m->v);
    }
    m->v[m->n] = (struct msg){ .line = line, .seq = m->n, .text = text };
    m->n++;
}

static void vreport(struct ctx *c, struct msgs *m, unsigned long line,
                    const char *path, const char *fmt, va_list ap)
{
    char msg[512];
    struct piapi_buf b = { 0 };

    vsnprintf(msg, sizeof msg, fmt, ap);
    piapi_buf_printf(&b, "%s:%lu: %s: %s", c->name, line, path, msg);
    msgs_add(m, line, b.data);
}

__attribute__((format(printf, 4, 5)))
static void err_at(struct ctx *c, unsigned long line, const char *path,
                   const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vreport(c, &c->err, line, path, fmt, ap);
    va_end(ap);
}

__attribute__((format(printf, 4, 5)))
static void err(struct ctx *c, const struct ynode *at, const char *path,
                const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vreport(c, &c->err, at->line, path, fmt, ap);
    va_end(ap);
}

__attribute__((format(printf, 4, 5)))
static void warn(struct ctx *c, const struct ynode *at, const char *path,
                 const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vreport(c, &c->warn, at ? at->line : 1, path, fmt, ap);
    va_end(ap);
}

/* For messages that name a file, not a place in it. */
static void err_file(struct ctx *c, const char *what, int errnum)
{
    struct piapi_buf b = { 0 };
    piapi_buf_printf(&b, "%s: %s%s%s", c->name, what, errnum ? ": " : "",
                     errnum ? strerror(errnum) : "");
    msgs_add(&c->err, 0, b.data);
}

static int msg_cmp(const void *a, const void *b)
{
    const struct msg *x = a, *y = b;
    if (x->line != y->line)
        return x->line < y->line ? -1 : 1;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

/* The newline-separated list, or NULL when there is nothing to say. */
static char *msgs_take(struct msgs *m)
{
    struct piapi_buf b = { 0 };

    if (m->n)
        qsort(m->v, m->n, sizeof *m->v, msg_cmp);
    for (size_t i = 0; i < m->n; i++) {
        if (i)
            piapi_buf_putc(&b, '\n');
        piapi_buf_puts(&b, m->v[i].text);
        free(m->v[i].text);
    }
    if (m->dropped)
        piapi_buf_printf(&b, "\n... and %zu more", m->dropped);
    free(m->v);
    *m = (struct msgs){ 0 };
    return b.data;
}

/* A value quoted inside a message: one line, bounded, never a secret. */
static const char *show(const struct ctx *c, char out[SHOW_LEN], const char *s,
                        size_t len)
{
    /* Misplaced YAML can put a key where a name belongs (a provider key as
     * providerKeyName, a member key as a mapping key): never echo one. */
    if (strset_find(&c->secrets, 0, s, len)) {
        memcpy(out, "<redacted>", sizeof "<redacted>");
        return out;
    }
    size_t max = SHOW_LEN - 4, o = 0;
    for (size_t i = 0; i < len && o < max; i++) {
        unsigned char ch = (unsigned char)s[i];
        out[o++] = ch < 0x20 || ch == 0x7f ? '?' : (char)ch;
    }
    if (len > max)
        memcpy(out + o, "...", 3), o += 3;
    out[o] = '\0';
    return out;
}

/* Paths longer than PATH_LEN are cut short, which is fine for a message. */
__attribute__((format(printf, 2, 3)))
static void path_fmt(char out[PATH_LEN], const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(out, PATH_LEN, fmt, ap);
    va_end(ap);
}

static void path_key(const struct ctx *c, char out[PATH_LEN], const char *base,
                     const char *key, size_t len)
{
    char k[SHOW_LEN];
    path_fmt(out, "%s%s%s", base, *base ? "." : "", show(c, k, key, len));
}

static void path_idx(char out[PATH_LEN], const char *base, size_t i)
{
    path_fmt(out, "%s[%zu]", base, i);
}

/* --------------------------------------------------------- tree building */

static struct ynode *tree_node(struct ctx *c, enum ykind kind,
                               const yaml_mark_t *m)
{
    c->nodes++;
    struct ynode *n = arena_alloc(&c->tree, sizeof *n);
    n->kind = kind;
    n->line = (unsigned long)m->line + 1;
    return n;
}

static bool is_null_scalar(const yaml_event_t *ev)
{
    const char *v = (const char *)ev->data.scalar.value;
    size_t len = ev->data.scalar.length;

    if (ev->data.scalar.style != YAML_PLAIN_SCALAR_STYLE)
        return false;
    return len == 0 || (len == 1 && v[0] == '~') ||
           (len == 4 && (!memcmp(v, "null", 4) || !memcmp(v, "Null", 4) ||
                         !memcmp(v, "NULL", 4)));
}

static struct ynode *tree_scalar(struct ctx *c, yaml_event_t *ev)
{
    struct ynode *n = tree_node(c, Y_SCALAR, &ev->start_mark);
    const char *v = (const char *)ev->data.scalar.value;
    size_t len = ev->data.scalar.length;

    n->str = arena_strndup(&c->tree, v, len);
    n->len = len;
    n->null = is_null_scalar(ev);
    n->has_nul = memchr(v, '\0', len) != NULL;
    /* libyaml frees this buffer without wiping it; it may be a key. */
    explicit_bzero(ev->data.scalar.value, len);
    return n;
}

static void tree_attach(struct ynode *parent, struct ynode *child)
{
    if (parent->last)
        parent->last->next = child;
    else
        parent->first = child;
    parent->last = child;
    parent->count++;
}

static unsigned long line_of_offset(const char *text, size_t len, size_t off,
                                    unsigned long *col)
{
    unsigned long line = 1;
    size_t bol = 0;
    for (size_t i = 0; i < off && i < len; i++)
        if (text[i] == '\n')
            line++, bol = i + 1;
    *col = (unsigned long)(off - bol) + 1;
    return line;
}

static void report_syntax(struct ctx *c, const yaml_parser_t *p,
                          const char *text, size_t len)
{
    unsigned long line, col;
    const char *problem = p->problem ? p->problem : "malformed YAML";

    if (p->error == YAML_MEMORY_ERROR) {
        err_at(c, 1, "(yaml)", "out of memory while parsing");
        return;
    }
    if (p->error == YAML_READER_ERROR) {
        line = line_of_offset(text, len, p->problem_offset, &col);
        err_at(c, line, "(yaml)", "column %lu: %s", col, problem);
        return;
    }
    line = (unsigned long)p->problem_mark.line + 1;
    col = (unsigned long)p->problem_mark.column + 1;
    if (p->context)
        err_at(c, line, "(yaml)", "column %lu: %s (%s at line %lu)", col,
               problem, p->context, (unsigned long)p->context_mark.line + 1);
    else
        err_at(c, line, "(yaml)", "column %lu: %s", col, problem);
}

/* Returns the root node (NULL for an empty stream), or sets *failed. */
static struct ynode *tree_build(struct ctx *c, const char *text, size_t len,
                                bool *failed)
{
    yaml_parser_t p;
    yaml_event_t ev;
    struct ynode *stack[MAX_DEPTH];
    struct ynode *root = NULL;
    int depth = 0, docs = 0;
    bool done = false;

    *failed = true;
    if (!yaml_parser_initialize(&p)) {
        err_at(c, 1, "(yaml)", "out of memory while parsing");
        return NULL;
    }
    yaml_parser_set_input_string(&p, (const unsigned char *)text, len);
    while (!done) {
        if (!yaml_parser_parse(&p, &ev)) {
            report_syntax(c, &p, text, len);
            goto fail;
        }
        struct ynode *n = NULL;
        /* A 4 MiB "[a,a,a,...]" is two million nodes: bound the tree. */
        if (c->nodes >= MAX_NODES) {
            err_at(c, (unsigned long)ev.start_mark.line + 1, "(yaml)",
                   "more than %d nodes", MAX_NODES);
            goto fail_event;
        }
        switch (ev.type) {
        case YAML_DOCUMENT_START_EVENT:
            if (++docs > 1) {
                err_at(c, (unsigned long)ev.start_mark.line + 1, "(yaml)",
                       "only one YAML document is allowed");
                goto fail_event;
            }
            break;
        case YAML_ALIAS_EVENT:
            /* Refused rather than expanded: an alias may point at its own
             * ancestor (a cycle) or fan out exponentially. */
            err_at(c, (unsigned long)ev.start_mark.line + 1, "(yaml)",
                   "aliases (*name) are not supported; write the value out");
            goto fail_event;
        case YAML_SCALAR_EVENT:
            n = tree_scalar(c, &ev);
            break;
        case YAML_SEQUENCE_START_EVENT:
        case YAML_MAPPING_START_EVENT:
            if (depth == MAX_DEPTH) {
                err_at(c, (unsigned long)ev.start_mark.line + 1, "(yaml)",
                       "nesting deeper than %d levels", MAX_DEPTH);
                goto fail_event;
            }
            n = tree_node(c, ev.type == YAML_MAPPING_START_EVENT ? Y_MAP : Y_SEQ,
                          &ev.start_mark);
            break;
        case YAML_SEQUENCE_END_EVENT:
        case YAML_MAPPING_END_EVENT:
            if (depth > 0)
                depth--;
            break;
        case YAML_STREAM_END_EVENT:
            done = true;
            break;
        default:
            break;
        }
        if (n) {
            if (depth > 0)
                tree_attach(stack[depth - 1], n);
            else if (!root)
                root = n;
            if (n->kind != Y_SCALAR)
                stack[depth++] = n;
        }
        yaml_event_delete(&ev);
    }
    yaml_parser_delete(&p);
    *failed = false;
    return root;

fail_event:
    yaml_event_delete(&ev);
fail:
    yaml_parser_delete(&p);
    return NULL;
}

/* ------------------------------------------------------ generic checks */

static size_t edit_distance_ci(const char *a, size_t alen, const char *b,
                               size_t blen)
{
    size_t row[33];

    if (alen > 32 || blen > 32)
        return SIZE_MAX;
    for (size_t j = 0; j <= blen; j++)
        row[j] = j;
    for (size_t i = 1; i <= alen; i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= blen; j++) {
            size_t up = row[j];
            size_t cost = tolower((unsigned char)a[i - 1]) !=
                          tolower((unsigned char)b[j - 1]);
            size_t best = diag + cost;
            if (up + 1 < best)
                best = up + 1;
            if (row[j - 1] + 1 < best)
                best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[blen];
}

/* The known key an unknown one was probably meant to be, or NULL. */
static const char *suggest(const char *key, size_t len,
                           const char *const *known, size_t nknown)
{
    const char *best = NULL;
    size_t best_d = 3;

    for (size_t i = 0; i < nknown; i++) {
        size_t klen = strlen(known[i]);
        size_t d = edit_distance_ci(key, len, known[i], klen);
        /* Short keys would "match" almost anything at distance 2. */
        size_t limit = klen >= 6 ? 2 : 1;
        if (d <= limit && d < best_d)
            best = known[i], best_d = d;
    }
    return best;
}

static void list_known(char *out, size_t outlen, const char *const *known,
                       size_t nknown)
{
    size_t o = 0;
    out[0] = '\0';
    for (size_t i = 0; i < nknown && o < outlen; i++)
        o += (size_t)snprintf(out + o, outlen - o, "%s%s", i ? ", " : "",
                              known[i]);
}

/* Every mapping goes through here: keys must be strings, unique and (when
 * `known` is given) one of the schema's; unknown keys are usually typos. */
static void check_keys(struct ctx *c, const struct ynode *map, const char *path,
                       const char *const *known, size_t nknown)
{
    struct strset seen = { 0 };
    char kp[PATH_LEN];

    for (const struct ynode *k = map->first; k && k->next; k = k->next->next) {
        if (k->kind != Y_SCALAR) {
            err(c, k, *path ? path : "(top level)",
                "expected a string as mapping key, got a %s",
                kind_name(k->kind));
            continue;
        }
        path_key(c, kp, path, k->str, k->len);
        const struct strset_ent *dup = strset_add(&seen, 0, k->str, k->len,
                                                  k->line);
        if (dup) {
            err(c, k, kp, "duplicate key (first at line %zu)", dup->val);
            continue;
        }
        if (!known)
            continue;
        bool ok = false;
        for (size_t i = 0; i < nknown && !ok; i++)
            ok = strlen(known[i]) == k->len && !memcmp(known[i], k->str, k->len);
        if (ok)
            continue;
        const char *guess = suggest(k->str, k->len, known, nknown);
        if (guess) {
            err(c, k, kp, "unknown field; did you mean '%s'?", guess);
        } else {
            char list[160];
            list_known(list, sizeof list, known, nknown);
            err(c, k, kp, "unknown field (expected one of: %s)", list);
        }
    }
    strset_dispose(&seen);
}

static const struct ynode *map_get(const struct ynode *map, const char *key)
{
    size_t len = strlen(key);
    for (const struct ynode *k = map->first; k && k->next; k = k->next->next)
        if (k->kind == Y_SCALAR && k->len == len && !memcmp(k->str, key, len))
            return k->next;
    return NULL;
}

static bool expect_kind(struct ctx *c, const struct ynode *n, const char *path,
                        enum ykind kind)
{
    if (n->kind == kind)
        return true;
    err(c, n, path, "expected a %s, got a %s", kind_name(kind),
        n->null ? "null" : kind_name(n->kind));
    return false;
}

enum { OPTIONAL, REQUIRED };

/* A string field of `map`. Returns the scalar node, or NULL when absent,
 * null or invalid (having reported whatever `required` makes an error). */
static const struct ynode *get_str(struct ctx *c, const struct ynode *map,
                                   const char *path, const char *key,
                                   int required)
{
    char kp[PATH_LEN];
    const struct ynode *v = map_get(map, key);

    path_key(c, kp, path, key, strlen(key));
    if (!v) {
        if (required)
            err(c, map, kp, "required field is missing");
        return NULL;
    }
    if (v->kind != Y_SCALAR) {
        expect_kind(c, v, kp, Y_SCALAR);
        return NULL;
    }
    if (v->null || v->len == 0) {
        if (required) {
            err(c, v, kp, "must not be empty");
            return NULL;
        }
        return v->null ? NULL : v;  /* an explicit "" is a value */
    }
    if (v->has_nul) {
        err(c, v, kp, "must not contain a NUL character");
        return NULL;
    }
    return v;
}

/* Names end up in log lines and metric labels. */
static bool has_ctl(const char *s, size_t len, bool allow_tab)
{
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)s[i];
        if ((ch < 0x20 && !(allow_tab && ch == '\t')) || ch == 0x7f)
            return true;
    }
    return false;
}

static bool has_space_or_ctl(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)s[i] <= 0x20 || s[i] == 0x7f)
            return true;
    return false;
}

static const struct ynode *get_name(struct ctx *c, const struct ynode *map,
                                    const char *path, const char *key)
{
    const struct ynode *v = get_str(c, map, path, key, REQUIRED);
    if (v && has_ctl(v->str, v->len, false)) {
        char kp[PATH_LEN];
        path_key(c, kp, path, key, strlen(key));
        err(c, v, kp, "must not contain control characters");
        return NULL;
    }
    return v;
}

static const char *dup_str(struct ctx *c, const struct ynode *v)
{
    return arena_strndup(&c->cfg->arena, v->str, v->len);
}

/* The entry's required `name`, unique within `set` (providers, users);
 * `list` names the sequence in the duplicate message. NULL when missing. */
static const char *unique_name(struct ctx *c, const struct ynode *map,
                               const char *path, struct strset *set, size_t idx,
                               const char *what, const char *list)
{
    char kp[PATH_LEN], shown[SHOW_LEN];
    const struct ynode *name = get_name(c, map, path, "name");

    if (!name)
        return NULL;
    const struct strset_ent *dup = strset_add(set, 0, name->str, name->len, idx);
    if (dup) {
        path_key(c, kp, path, "name", 4);
        err(c, name, kp, "duplicate %s name '%s' (first is %s[%zu])", what,
            show(c, shown, name->str, name->len), list, dup->val);
    }
    return dup_str(c, name);
}

/* -------------------------------------------------------------- settings */

static const struct setting_spec {
    const char *key;
    uint64_t def, min, max;
    size_t off;
    bool wide;   /* uint64_t, else uint32_t */
} setting_specs[] = {
    { "maxBodyBytes",     33554432, 1, 1ULL << 40,
      offsetof(struct piapi_settings, max_body_bytes), true },
    { "connectTimeoutMs", 10000,    1, 86400000,
      offsetof(struct piapi_settings, connect_timeout_ms), false },
    { "headerTimeoutMs",  300000,   1, 86400000,
      offsetof(struct piapi_settings, header_timeout_ms), false },
    { "idleTimeoutMs",    300000,   1, 86400000,
      offsetof(struct piapi_settings, idle_timeout_ms), false },
    { "sseKeepaliveMs",   15000,    0, 86400000,
      offsetof(struct piapi_settings, sse_keepalive_ms), false },
};
#define NSETTINGS (sizeof setting_specs / sizeof setting_specs[0])

static void setting_store(struct piapi_settings *s,
                          const struct setting_spec *spec, uint64_t v)
{
    unsigned char *field = (unsigned char *)s + spec->off;
    if (spec->wide) {
        memcpy(field, &v, sizeof v);
    } else {
        uint32_t v32 = (uint32_t)v;
        memcpy(field, &v32, sizeof v32);
    }
}

static void walk_ca_file(struct ctx *c, const struct ynode *map)
{
    struct stat st;
    char shown[SHOW_LEN];

    if (!map_get(map, "caFile"))
        return;  /* the system's CA store */
    const struct ynode *v = get_str(c, map, "settings", "caFile", REQUIRED);
    if (!v)
        return;
    show(c, shown, v->str, v->len);
    if (stat(v->str, &st) != 0 || access(v->str, R_OK) != 0)
        err(c, v, "settings.caFile", "cannot read '%s': %s", shown,
            strerror(errno));
    else if (!S_ISREG(st.st_mode))
        err(c, v, "settings.caFile", "'%s' is not a regular file", shown);
    else
        c->cfg->settings.ca_file = dup_str(c, v);
}

static void walk_settings(struct ctx *c, const struct ynode *map)
{
    static const char *const known[] = {
        "maxBodyBytes", "connectTimeoutMs", "headerTimeoutMs",
        "idleTimeoutMs", "sseKeepaliveMs", "caFile",
    };
    struct piapi_settings *s = &c->cfg->settings;

    for (size_t i = 0; i < NSETTINGS; i++)
        setting_store(s, &setting_specs[i], setting_specs[i].def);
    if (!map || (map->kind == Y_SCALAR && map->null))
        return;
    if (!expect_kind(c, map, "settings", Y_MAP))
        return;
    check_keys(c, map, "settings", known, sizeof known / sizeof known[0]);
    for (size_t i = 0; i < NSETTINGS; i++) {
        const struct setting_spec *spec = &setting_specs[i];
        char kp[PATH_LEN];
        uint64_t n;

        if (!map_get(map, spec->key))
            continue;  /* the default stays */
        /* Present but empty is an error: "maxBodyBytes:" with the number
         * forgotten should not silently mean the default. */
        const struct ynode *v = get_str(c, map, "settings", spec->key, REQUIRED);
        if (!v)
            continue;
        path_key(c, kp, "settings", spec->key, strlen(spec->key));
        if (piapi_parse_u64(v->str, spec->min, spec->max, &n) != 0) {
            err(c, v, kp, "expected an integer in %" PRIu64 "..%" PRIu64,
                spec->min, spec->max);
            continue;
        }
        setting_store(s, spec, n);
    }
    walk_ca_file(c, map);
}

/* ------------------------------------------------------------- services */

static bool is_tchar(unsigned char ch)
{
    /* RFC 9110 §5.6.2 token characters. */
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
           (ch >= '0' && ch <= '9') || (ch && strchr("!#$%&'*+-.^_`|~", ch));
}

static bool is_unreserved(unsigned char ch)
{
    /* RFC 3986 §2.3: needs no escaping anywhere in a URL. */
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
           (ch >= '0' && ch <= '9') || (ch && strchr("-._~", ch));
}

static bool all_chars(const char *s, size_t len, bool (*ok)(unsigned char))
{
    for (size_t i = 0; i < len; i++)
        if (!ok((unsigned char)s[i]))
            return false;
    return len > 0;
}

static bool is_loopback(const char *h, size_t len)
{
    if (len == 9 && !strncasecmp(h, "localhost", 9))
        return true;
    if (len == 5 && !memcmp(h, "[::1]", 5))
        return true;
    if (len == 17 && !memcmp(h, "[0:0:0:0:0:0:0:1]", 17))
        return true;
    if (len < 4 || memcmp(h, "127.", 4) != 0)
        return false;
    for (size_t i = 4; i < len; i++)
        if (!(h[i] == '.' || (h[i] >= '0' && h[i] <= '9')))
            return false;
    return true;
}

struct url_parts {
    bool plain_http;
    const char *host;
    size_t host_len;
    size_t path_start;   /* offset of the path (== end of the authority) */
};

/* NULL when `u` is an acceptable baseUrl, else why not. Never quotes the URL:
 * a baseUrl may carry credentials in its userinfo or query. */
static const char *url_check(const char *u, size_t len, struct url_parts *out)
{
    size_t scheme;

    if (has_space_or_ctl(u, len))
        return "must not contain whitespace or control characters";
    if (memchr(u, '#', len))
        return "must not contain a fragment ('#')";
    if (len >= 7 && !strncasecmp(u, "http://", 7))
        scheme = 7, out->plain_http = true;
    else if (len >= 8 && !strncasecmp(u, "https://", 8))
        scheme = 8, out->plain_http = false;
    else
        return "must be an absolute http:// or https:// URL";

    size_t end = scheme;
    while (end < len && u[end] != '/' && u[end] != '?')
        end++;
    out->path_start = end;
    const char *auth = u + scheme;
    size_t alen = end - scheme;
    const char *at = NULL;
    for (size_t i = 0; i < alen; i++)
        if (auth[i] == '@')
            at = auth + i;
    if (at) {
        alen -= (size_t)(at + 1 - auth);
        auth = at + 1;
    }

    const char *port = NULL;
    size_t hlen;
    if (alen && auth[0] == '[') {
        const char *close = memchr(auth, ']', alen);
        if (!close)
            return "has an unterminated IPv6 address";
        hlen = (size_t)(close - auth) + 1;
        if (hlen < alen && auth[hlen] != ':')
            return "has junk after the IPv6 address";
    } else {
        const char *colon = memchr(auth, ':', alen);
        hlen = colon ? (size_t)(colon - auth) : alen;
        for (size_t i = 0; i < hlen; i++)
            if (strchr("[]<>\\^`{|}\"", auth[i]))
                return "has an invalid character in the host";
    }
    if (hlen == 0 || (hlen == 2 && auth[0] == '['))
        return "has no host";
    if (hlen < alen)
        port = auth + hlen + 1;
    if (port) {
        char buf[8];
        size_t plen = (size_t)(auth + alen - port);
        uint64_t pn;
        if (plen == 0 || plen >= sizeof buf)
            return "has an invalid port";
        memcpy(buf, port, plen);
        buf[plen] = '\0';
        if (piapi_parse_u64(buf, 1, 65535, &pn) != 0)
            return "has an invalid port";
    }
    out->host = auth;
    out->host_len = hlen;
    return NULL;
}

/* Trailing '/' of the path go, so "<baseUrl>/<rest>" never has "//"; the
 * query string (if any) is kept as written. */
static const char *url_normalize(struct ctx *c, const char *u, size_t len,
                                 size_t path_start)
{
    const char *q = memchr(u, '?', len);
    size_t qpos = q ? (size_t)(q - u) : len;
    size_t cut = qpos;

    while (cut > path_start && u[cut - 1] == '/')
        cut--;
    char *out = arena_alloc(&c->cfg->arena, cut + (len - qpos) + 1);
    memcpy(out, u, cut);
    memcpy(out + cut, u + qpos, len - qpos);
    return out;
}

static void walk_base_url(struct ctx *c, const struct ynode *svc,
                          const char *path, struct piapi_service *out)
{
    char kp[PATH_LEN];
    struct url_parts parts;
    const struct ynode *v = get_str(c, svc, path, "baseUrl", REQUIRED);

    if (!v)
        return;
    path_key(c, kp, path, "baseUrl", 7);
    const char *why = url_check(v->str, v->len, &parts);
    if (why) {
        err(c, v, kp, "%s", why);
        return;
    }
    if (parts.plain_http && !is_loopback(parts.host, parts.host_len))
        warn(c, v, kp, "plain http to a non-loopback host sends the provider "
                       "key unencrypted");
    out->base_url = url_normalize(c, v->str, v->len, parts.path_start);
}

static void walk_auth(struct ctx *c, const struct ynode *svc, const char *path,
                      struct piapi_auth *out)
{
    static const char *const known[] = { "mode", "name", "prefix" };
    char ap[PATH_LEN], kp[PATH_LEN], shown[SHOW_LEN];
    const struct ynode *auth = map_get(svc, "auth");

    out->mode = PIAPI_AUTH_HEADER;
    out->name = "Authorization";
    out->prefix = "Bearer ";
    if (!auth || (auth->kind == Y_SCALAR && auth->null))
        return;
    path_key(c, ap, path, "auth", 4);
    if (!expect_kind(c, auth, ap, Y_MAP))
        return;
    check_keys(c, auth, ap, known, 3);

    const struct ynode *mode = get_str(c, auth, ap, "mode", OPTIONAL);
    if (mode && !(mode->len == 6 && !memcmp(mode->str, "header", 6))) {
        if (mode->len == 5 && !memcmp(mode->str, "query", 5)) {
            out->mode = PIAPI_AUTH_QUERY;
        } else {
            path_key(c, kp, ap, "mode", 4);
            err(c, mode, kp, "unsupported auth mode '%s' (use header or query)",
                show(c, shown, mode->str, mode->len));
            return;
        }
    }

    /* Query mode has no sensible default parameter name. */
    bool query = out->mode == PIAPI_AUTH_QUERY;
    bool has_name = map_get(auth, "name") != NULL;
    const struct ynode *name = get_str(c, auth, ap, "name", query && has_name);
    const struct ynode *prefix_key = map_get(auth, "prefix");
    path_key(c, kp, ap, "name", 4);
    if (query) {
        out->prefix = "";
        if (!has_name)
            err(c, auth, kp, "required when mode is query");
        if (name && !all_chars(name->str, name->len, is_unreserved))
            err(c, name, kp, "'%s' is not a URL-safe query parameter name "
                "(letters, digits, - . _ ~)", show(c, shown, name->str, name->len));
        else if (name)
            out->name = dup_str(c, name);
        if (prefix_key) {
            path_key(c, kp, ap, "prefix", 6);
            err(c, prefix_key, kp, "not allowed when mode is query");
        }
        return;
    }

    if (name && !all_chars(name->str, name->len, is_tchar)) {
        err(c, name, kp, "'%s' is not a valid HTTP header name",
            show(c, shown, name->str, name->len));
        return;
    }
    if (name && name->len)
        out->name = dup_str(c, name);
    const struct ynode *prefix = get_str(c, auth, ap, "prefix", OPTIONAL);
    if (prefix && has_ctl(prefix->str, prefix->len, true)) {
        path_key(c, kp, ap, "prefix", 6);
        err(c, prefix, kp, "must not contain control characters");
    } else if (prefix) {
        out->prefix = dup_str(c, prefix);
    } else {
        /* Only Authorization carries a scheme; x-api-key and friends take
         * the bare key (RFC 6750 §2.1 vs. Anthropic's x-api-key). */
        out->prefix = strcasecmp(out->name, "Authorization") == 0 ? "Bearer " : "";
    }
}

static void walk_service_type(struct ctx *c, const struct ynode *svc,
                              const char *path, size_t pi,
                              struct piapi_service *out)
{
    char kp[PATH_LEN], shown[SHOW_LEN];
    const struct ynode *t = get_str(c, svc, path, "type", REQUIRED);

    if (!t)
        return;
    path_key(c, kp, path, "type", 4);
    show(c, shown, t->str, t->len);
    /* It is one URL path segment: /piapi/<type>/... */
    if (!all_chars(t->str, t->len, is_unreserved)) {
        err(c, t, kp, "'%s' may only contain letters, digits and - . _ ~",
            shown);
        return;
    }
    if ((t->len == 1 && t->str[0] == '.') ||
        (t->len == 2 && !memcmp(t->str, "..", 2))) {
        err(c, t, kp, "'%s' is not a usable path segment", shown);
        return;
    }
    const struct strset_ent *dup = strset_add(&c->svc_types, pi, t->str,
                                              t->len, t->line);
    if (dup) {
        err(c, t, kp, "duplicate service type '%s' (first at line %zu)",
            shown, dup->val);
        return;
    }
    out->type = dup_str(c, t);
}

static void walk_service(struct ctx *c, const struct ynode *svc,
                         const char *path, size_t pi, struct piapi_service *out)
{
    static const char *const known[] = { "type", "baseUrl", "auth" };

    out->provider = &c->cfg->providers[pi];
    if (!expect_kind(c, svc, path, Y_MAP))
        return;
    check_keys(c, svc, path, known, 3);
    walk_service_type(c, svc, path, pi, out);
    walk_base_url(c, svc, path, out);
    walk_auth(c, svc, path, &out->auth);
}

/* ------------------------------------------------------------ providers */

/* A required, non-empty sequence or mapping field. */
static const struct ynode *get_coll(struct ctx *c, const struct ynode *map,
                                    const char *path, const char *key,
                                    enum ykind kind)
{
    char kp[PATH_LEN];
    const struct ynode *v = map_get(map, key);

    path_key(c, kp, path, key, strlen(key));
    if (!v) {
        err(c, map, kp, "required field is missing");
        return NULL;
    }
    if (v->kind == Y_SCALAR && v->null) {
        err(c, v, kp, "must not be empty");
        return NULL;
    }
    if (!expect_kind(c, v, kp, kind))
        return NULL;
    if (v->count == 0) {
        err(c, v, kp, "must not be empty");
        return NULL;
    }
    return v;
}

static void walk_api_keys(struct ctx *c, const struct ynode *prov,
                          const char *path, size_t pi,
                          struct piapi_provider *out)
{
    char mp[PATH_LEN], kp[PATH_LEN];
    const struct ynode *map = get_coll(c, prov, path, "apiKeys", Y_MAP);

    if (!map)
        return;
    path_key(c, mp, path, "apiKeys", 7);
    check_keys(c, map, mp, NULL, 0);
    struct piapi_provider_key *keys = arena_array(&c->cfg->arena,
                                                  map->count / 2, sizeof *keys);
    size_t n = 0;
    for (const struct ynode *k = map->first; k && k->next; k = k->next->next) {
        const struct ynode *v = k->next;
        if (k->kind != Y_SCALAR)
            continue;  /* reported by check_keys */
        path_key(c, kp, mp, k->str, k->len);
        if (k->null || k->len == 0 || k->has_nul ||
            has_ctl(k->str, k->len, false)) {
            err(c, k, kp, "key names must be non-empty printable strings");
            continue;
        }
        if (strset_add(&c->prov_keys, pi, k->str, k->len, n))
            continue;  /* duplicate: reported by check_keys */
        struct piapi_provider_key *key = &keys[n++];
        key->name = dup_str(c, k);
        if (v->kind != Y_SCALAR) {
            expect_kind(c, v, kp, Y_SCALAR);
        } else if (v->null || v->len == 0) {
            /* Not named: "{sk-...}" is a key pasted without a name. */
            err(c, v, mp, "empty key value (entries are <name>: <key>)");
        } else if (has_space_or_ctl(v->str, v->len)) {
            /* It goes into a header or a query string verbatim. */
            err(c, v, kp, "key value must not contain whitespace or control "
                          "characters");
        } else {
            key->value = dup_str(c, v);
        }
    }
    out->keys = keys;
    out->nkeys = n;
}

static void walk_provider(struct ctx *c, const struct ynode *prov, size_t pi)
{
    static const char *const known[] = { "name", "apiKeys", "services" };
    struct piapi_provider *out = &c->cfg->providers[pi];
    char path[PATH_LEN], sp[PATH_LEN], ip[PATH_LEN];

    path_idx(path, "providers", pi);
    if (!expect_kind(c, prov, path, Y_MAP))
        return;
    check_keys(c, prov, path, known, 3);
    out->name = unique_name(c, prov, path, &c->prov_names, pi, "provider", "providers");
    walk_api_keys(c, prov, path, pi, out);

    const struct ynode *svcs = get_coll(c, prov, path, "services", Y_SEQ);
    if (!svcs)
        return;
    struct piapi_service *services = arena_array(&c->cfg->arena, svcs->count,
                                                 sizeof *services);
    path_key(c, sp, path, "services", 8);
    size_t i = 0;
    for (const struct ynode *s = svcs->first; s; s = s->next, i++) {
        path_idx(ip, sp, i);
        walk_service(c, s, ip, pi, &services[i]);
    }
    out->services = services;
    out->nservices = svcs->count;
    c->cfg->nservices += svcs->count;
}

static void walk_providers(struct ctx *c, const struct ynode *root)
{
    const struct ynode *seq = get_coll(c, root, "", "providers", Y_SEQ);

    if (!seq)
        return;
    c->cfg->providers = arena_array(&c->cfg->arena, seq->count,
                                    sizeof *c->cfg->providers);
    c->cfg->nproviders = seq->count;
    size_t i = 0;
    for (const struct ynode *p = seq->first; p; p = p->next, i++)
        walk_provider(c, p, i);
}

/* ---------------------------------------------------------------- users */

static void walk_user_binding(struct ctx *c, const struct ynode *u,
                              const char *path, struct piapi_user *out)
{
    char kp[PATH_LEN], s1[SHOW_LEN], s2[SHOW_LEN];
    const struct ynode *pn = get_name(c, u, path, "providerName");
    const struct ynode *kn = get_name(c, u, path, "providerKeyName");

    if (!pn)
        return;
    const struct strset_ent *pe = strset_find(&c->prov_names, 0, pn->str, pn->len);
    if (!pe) {
        path_key(c, kp, path, "providerName", 12);
        err(c, pn, kp, "unknown provider '%s'", show(c, s1, pn->str, pn->len));
        return;
    }
    out->provider = &c->cfg->providers[pe->val];
    if (!kn)
        return;
    const struct strset_ent *ke = strset_find(&c->prov_keys, pe->val, kn->str,
                                              kn->len);
    if (!ke) {
        path_key(c, kp, path, "providerKeyName", 15);
        err(c, kn, kp, "key '%s' not defined for provider '%s'",
            show(c, s1, kn->str, kn->len), show(c, s2, pn->str, pn->len));
        return;
    }
    out->key = &out->provider->keys[ke->val];
}

static void walk_user(struct ctx *c, const struct ynode *u, size_t ui)
{
    static const char *const known[] = {
        "name", "apiKey", "providerName", "providerKeyName",
    };
    struct piapi_user *out = &c->cfg->users[ui];
    char path[PATH_LEN], kp[PATH_LEN];

    path_idx(path, "users", ui);
    if (!expect_kind(c, u, path, Y_MAP))
        return;
    check_keys(c, u, path, known, 4);
    out->name = unique_name(c, u, path, &c->user_names, ui, "user", "users");

    const struct ynode *key = get_str(c, u, path, "apiKey", REQUIRED);
    path_key(c, kp, path, "apiKey", 6);
    if (key && has_space_or_ctl(key->str, key->len)) {
        /* Clients send it in a header; it could never match. */
        err(c, key, kp, "must not contain whitespace or control characters");
    } else if (key) {
        const struct strset_ent *dup = strset_add(&c->user_keys, 0, key->str,
                                                  key->len, ui);
        if (dup)
            err(c, key, kp, "same key as users[%zu].apiKey (keys must be unique)",
                dup->val);
        out->api_key = dup_str(c, key);
        out->api_key_len = key->len;
    }
    walk_user_binding(c, u, path, out);
}

static void walk_users(struct ctx *c, const struct ynode *root)
{
    const struct ynode *seq = map_get(root, "users");

    if (!seq) {
        err(c, root, "users", "required field is missing (use [] for none)");
        return;
    }
    if (seq->kind == Y_SCALAR && seq->null)
        return;  /* "users:" with every entry commented out */
    if (!expect_kind(c, seq, "users", Y_SEQ))
        return;
    c->cfg->users = arena_array(&c->cfg->arena, seq->count, sizeof *c->cfg->users);
    c->cfg->nusers = seq->count;
    size_t i = 0;
    for (const struct ynode *u = seq->first; u; u = u->next, i++)
        walk_user(c, u, i);
}

static void add_secret(struct ctx *c, const struct ynode *v)
{
    if (v && v->kind == Y_SCALAR && v->len)
        strset_add(&c->secrets, 0, v->str, v->len, 0);
}

static void add_secret_str(struct ctx *c, const char *s, size_t len)
{
    if (len)
        strset_add(&c->secrets, 0, s, len, 0);
}

/* A baseUrl may carry credentials too: basic auth in its userinfo, a key
 * in its query (Azure Functions' ?code=). The userinfo whole, its user and
 * password, and every query value are secrets like the keys. */
static void add_url_secrets(struct ctx *c, const struct ynode *v)
{
    if (!v || v->kind != Y_SCALAR || !v->len)
        return;
    const char *s = v->str, *end = s + v->len;
    const char *scheme = memmem(s, v->len, "://", 3);
    const char *auth = scheme ? scheme + 3 : end, *at = NULL;
    for (const char *p = auth; p < end && *p != '/' && *p != '?'; p++)
        if (*p == '@')
            at = p;
    if (at) {
        const char *colon = memchr(auth, ':', (size_t)(at - auth));
        add_secret_str(c, auth, (size_t)(at - auth));
        if (colon) {
            add_secret_str(c, auth, (size_t)(colon - auth));
            add_secret_str(c, colon + 1, (size_t)(at - colon - 1));
        }
    }
    const char *q = memchr(s, '?', v->len);
    for (const char *p = q ? q + 1 : end; p < end;) {
        const char *amp = memchr(p, '&', (size_t)(end - p));
        const char *pend = amp ? amp : end;
        const char *eq = memchr(p, '=', (size_t)(pend - p));
        const char *val = eq ? eq + 1 : p;
        add_secret_str(c, val, (size_t)(pend - val));
        p = pend + (amp ? 1 : 0);
    }
}

/* Before anything is reported: every value that sits where a key belongs,
 * so show() can refuse to quote it wherever else it turns up. */
static void collect_secrets(struct ctx *c, const struct ynode *root)
{
    const struct ynode *provs = map_get(root, "providers");
    const struct ynode *users = map_get(root, "users");

    for (const struct ynode *p = provs && provs->kind == Y_SEQ ? provs->first : NULL;
         p; p = p->next) {
        const struct ynode *keys = p->kind == Y_MAP ? map_get(p, "apiKeys") : NULL;
        if (!keys || keys->kind != Y_MAP)
            continue;
        for (const struct ynode *k = keys->first; k && k->next; k = k->next->next)
            add_secret(c, k->next);
    }
    for (const struct ynode *p = provs && provs->kind == Y_SEQ ? provs->first : NULL;
         p; p = p->next) {
        const struct ynode *svcs = p->kind == Y_MAP ? map_get(p, "services") : NULL;
        for (const struct ynode *sv = svcs && svcs->kind == Y_SEQ ? svcs->first : NULL;
             sv; sv = sv->next)
            if (sv->kind == Y_MAP)
                add_url_secrets(c, map_get(sv, "baseUrl"));
    }
    for (const struct ynode *u = users && users->kind == Y_SEQ ? users->first : NULL;
         u; u = u->next)
        if (u->kind == Y_MAP)
            add_secret(c, map_get(u, "apiKey"));
}

static void walk_root(struct ctx *c, const struct ynode *root)
{
    static const char *const known[] = { "providers", "users", "settings" };

    if (!root) {
        err_at(c, 1, "(top level)", "empty config: expected a mapping with "
                                    "providers and users");
        return;
    }
    if (!expect_kind(c, root, "(top level)", Y_MAP))
        return;
    collect_secrets(c, root);
    check_keys(c, root, "", known, 3);
    walk_settings(c, map_get(root, "settings"));
    walk_providers(c, root);
    walk_users(c, root);
}

/* -------------------------------------------------------- lookup tables */

static size_t table_cap(size_t n)
{
    size_t cap = 4;
    while (cap < 2 * n)
        cap *= 2;
    return cap;
}

static uint64_t service_hash(const struct piapi_provider *p, const char *type,
                             size_t len)
{
    uint64_t h = piapi_hash(type, len);
    h ^= (uint64_t)(uintptr_t)p * 0x9E3779B97F4A7C15ULL;
    return h ^ (h >> 29);
}

static void build_tables(struct piapi_config *cfg)
{
    size_t cap = table_cap(cfg->nusers);
    cfg->user_tab = arena_array(&cfg->arena, cap, sizeof *cfg->user_tab);
    cfg->user_mask = cap - 1;
    for (size_t i = 0; i < cfg->nusers; i++) {
        const struct piapi_user *u = &cfg->users[i];
        size_t s = (size_t)piapi_hash(u->api_key, u->api_key_len) & cfg->user_mask;
        while (cfg->user_tab[s])
            s = (s + 1) & cfg->user_mask;
        cfg->user_tab[s] = u;
    }

    cap = table_cap(cfg->nservices);
    cfg->svc_tab = arena_array(&cfg->arena, cap, sizeof *cfg->svc_tab);
    cfg->svc_mask = cap - 1;
    for (size_t p = 0; p < cfg->nproviders; p++) {
        const struct piapi_provider *prov = &cfg->providers[p];
        for (size_t i = 0; i < prov->nservices; i++) {
            const struct piapi_service *svc = &prov->services[i];
            size_t s = (size_t)service_hash(prov, svc->type, strlen(svc->type)) &
                       cfg->svc_mask;
            while (cfg->svc_tab[s])
                s = (s + 1) & cfg->svc_mask;
            cfg->svc_tab[s] = svc;
        }
    }
}

static void set_hash(struct piapi_config *cfg, const char *text, size_t len)
{
    uint64_t h = 0xcbf29ce484222325ULL;  /* FNV-1a 64 */
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)text[i];
        h *= 0x100000001b3ULL;
    }
    snprintf(cfg->hash, sizeof cfg->hash, "%012" PRIx64, h >> 16);
}

/* ------------------------------------------------------------- loading */

static void ctx_init(struct ctx *c, const char *name)
{
    *c = (struct ctx){ .name = name && *name ? name : "config" };
}

static void ctx_dispose(struct ctx *c)
{
    strset_dispose(&c->prov_names);
    strset_dispose(&c->prov_keys);
    strset_dispose(&c->svc_types);
    strset_dispose(&c->user_names);
    strset_dispose(&c->user_keys);
    strset_dispose(&c->secrets);
    arena_dispose(&c->tree);
}

static void config_free(struct piapi_config *cfg)
{
    arena_dispose(&cfg->arena);
    explicit_bzero(cfg, sizeof *cfg);
    free(cfg);
}

static struct piapi_config *parse_ctx(struct ctx *c, const char *text,
                                      size_t len)
{
    bool failed;

    if (!text)
        text = "", len = 0;
    if (len > MAX_FILE_BYTES) {
        err_file(c, "config is larger than 4 MiB", 0);
        return NULL;
    }
    c->cfg = piapi_xcalloc(1, sizeof *c->cfg);
    struct ynode *root = tree_build(c, text, len, &failed);
    if (!failed)
        walk_root(c, root);
    if (c->err.n) {
        config_free(c->cfg);
        c->cfg = NULL;
        return NULL;
    }
    build_tables(c->cfg);
    set_hash(c->cfg, text, len);
    atomic_init(&c->cfg->refs, 1);
    return c->cfg;
}

static void hand_over(struct ctx *c, char **errors, char **warnings)
{
    char *e = msgs_take(&c->err);
    char *w = msgs_take(&c->warn);

    if (errors)
        *errors = e;
    else
        free(e);
    if (warnings)
        *warnings = w;
    else
        free(w);
}

struct piapi_config *piapi_config_parse(const char *text, size_t len,
                                        const char *name, char **errors,
                                        char **warnings)
{
    struct ctx c;

    ctx_init(&c, name);
    struct piapi_config *cfg = parse_ctx(&c, text, len);
    hand_over(&c, errors, warnings);
    ctx_dispose(&c);
    return cfg;
}

/* Reads the whole file; never more than MAX_FILE_BYTES + 1 so a huge or
 * endless file (a FIFO, /dev/zero) cannot exhaust memory. */
static char *read_file(struct ctx *c, int fd, size_t *len)
{
    size_t cap = 8192, n = 0;
    char *buf = piapi_xmalloc(cap);

    for (;;) {
        if (n == cap) {
            if (cap > MAX_FILE_BYTES)
                break;
            char *nb = piapi_xmalloc(cap * 2);
            memcpy(nb, buf, n);
            explicit_bzero(buf, n);
            free(buf);
            buf = nb;
            cap *= 2;
        }
        ssize_t r = read(fd, buf + n, cap - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            err_file(c, "cannot read config file", errno);
            explicit_bzero(buf, n);
            free(buf);
            return NULL;
        }
        if (r == 0)
            break;
        n += (size_t)r;
    }
    *len = n;
    return buf;
}

struct piapi_config *piapi_config_load_file(const char *path, char **errors,
                                            char **warnings)
{
    struct ctx c;
    struct piapi_config *cfg = NULL;
    struct stat st;
    char *text = NULL;
    size_t len = 0;
    int fd = -1;

    ctx_init(&c, path);
    if (!path) {
        err_file(&c, "no config file given", 0);
        goto out;
    }
    /* O_NONBLOCK: a FIFO in its place must not hang a reload. */
    fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0) {
        err_file(&c, "cannot open config file", errno);
        goto out;
    }
    if (fstat(fd, &st) != 0) {
        err_file(&c, "cannot stat config file", errno);
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        err_file(&c, "config file is not a regular file", 0);
        goto out;
    }
    /* Group access is how the service user reads it (0640 root:piapi,
     * Kubernetes fsGroup); only world access is worth a warning. */
    if (st.st_mode & 007)
        warn(&c, NULL, "(file)", "config file is accessible to every user and "
                                 "holds secrets; chmod o-rwx (e.g. 0640 or 0600)");
    text = read_file(&c, fd, &len);
    if (!text)
        goto out;
    cfg = parse_ctx(&c, text, len);
out:
    if (text) {
        explicit_bzero(text, len);
        free(text);
    }
    if (fd >= 0)
        close(fd);
    hand_over(&c, errors, warnings);
    ctx_dispose(&c);
    return cfg;
}

/* ------------------------------------------------------ snapshot access */

struct piapi_config *piapi_config_acquire(struct piapi_config *cfg)
{
    if (cfg)
        atomic_fetch_add_explicit(&cfg->refs, 1, memory_order_relaxed);
    return cfg;
}

void piapi_config_release(struct piapi_config *cfg)
{
    if (!cfg)
        return;
    /* acq_rel: every use by other holders happens before the free. */
    if (atomic_fetch_sub_explicit(&cfg->refs, 1, memory_order_acq_rel) == 1)
        config_free(cfg);
}

const struct piapi_user *piapi_config_find_user(const struct piapi_config *cfg,
                                                const char *key, size_t len)
{
    if (!cfg || !key || len == 0)
        return NULL;
    size_t s = (size_t)piapi_hash(key, len) & cfg->user_mask;
    for (; cfg->user_tab[s]; s = (s + 1) & cfg->user_mask) {
        const struct piapi_user *u = cfg->user_tab[s];
        if (piapi_ct_equal(u->api_key, u->api_key_len, key, len))
            return u;
    }
    return NULL;
}

const struct piapi_service *
piapi_config_find_service(const struct piapi_config *cfg,
                          const struct piapi_provider *provider,
                          const char *type, size_t len)
{
    if (!cfg || !provider || !type)
        return NULL;
    size_t s = (size_t)service_hash(provider, type, len) & cfg->svc_mask;
    for (; cfg->svc_tab[s]; s = (s + 1) & cfg->svc_mask) {
        const struct piapi_service *svc = cfg->svc_tab[s];
        if (svc->provider == provider && strlen(svc->type) == len &&
            memcmp(svc->type, type, len) == 0)
            return svc;
    }
    return NULL;
}

const struct piapi_settings *piapi_config_settings(const struct piapi_config *cfg)
{
    return &cfg->settings;
}

const char *piapi_config_hash(const struct piapi_config *cfg)
{
    return cfg->hash;
}

void piapi_config_counts(const struct piapi_config *cfg, size_t *providers,
                         size_t *services, size_t *users)
{
    if (providers)
        *providers = cfg ? cfg->nproviders : 0;
    if (services)
        *services = cfg ? cfg->nservices : 0;
    if (users)
        *users = cfg ? cfg->nusers : 0;
}

/* ------------------------------------------------------- live snapshot */

static pthread_mutex_t live_lock = PTHREAD_MUTEX_INITIALIZER;
static struct piapi_config *live;

struct piapi_config *piapi_config_current(void)
{
    pthread_mutex_lock(&live_lock);
    struct piapi_config *cfg = piapi_config_acquire(live);
    pthread_mutex_unlock(&live_lock);
    return cfg;
}

void piapi_config_publish(struct piapi_config *cfg)
{
    pthread_mutex_lock(&live_lock);
    struct piapi_config *old = live;
    live = cfg;
    pthread_mutex_unlock(&live_lock);
    /* Outside the lock: the last release frees a whole snapshot. */
    piapi_config_release(old);
}
