/* Config stage 1: YAML text → a small private tree of nodes, built from
 * libyaml's event parser. Doing it ourselves rather than with
 * yaml_parser_load lets us refuse aliases (a self-referencing or
 * billion-laughs alias would otherwise turn the schema walk into a cycle or
 * an exponential one) and cap the nesting and the node count. Also the
 * arena and the string set every stage uses. */
#include "config_int.h"

#include <stdlib.h>
#include <string.h>
#include <yaml.h>

#include "piapi/util.h"

/* ------------------------------------------------------------------ arena */

struct arena_block {
    struct arena_block *next;
    size_t size;
    size_t used;
    max_align_t data[];
};

#define ARENA_CHUNK 4096

void *cfg_arena_alloc(struct arena *a, size_t n)
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

void *cfg_arena_array(struct arena *a, size_t count, size_t size)
{
    if (size && count > SIZE_MAX / 2 / size)
        abort();
    return cfg_arena_alloc(a, count * size);
}

char *cfg_arena_strndup(struct arena *a, const char *s, size_t n)
{
    char *p = cfg_arena_alloc(a, n + 1);
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

/* Both arenas hold key material, so every byte handed out is wiped. */
void cfg_arena_dispose(struct arena *a)
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

const struct strset_ent *cfg_strset_find(const struct strset *set,
                                         size_t group, const char *s,
                                            size_t len)
{
    if (!set->e)
        return NULL;
    const struct strset_ent *e = strset_slot(set, group, s, len);
    return e->s ? e : NULL;
}

const struct strset_ent *cfg_strset_add(struct strset *set, size_t group,
                                        const char *s, size_t len,
                                           size_t val)
{
    const struct strset_ent *old = cfg_strset_find(set, group, s, len);
    if (old)
        return old;
    if (!set->e || (set->n + 1) * 2 > set->mask + 1)
        strset_grow(set);
    struct strset_ent *e = strset_slot(set, group, s, len);
    *e = (struct strset_ent){ .s = s, .len = len, .group = group, .val = val };
    set->n++;
    return NULL;
}

void cfg_strset_dispose(struct strset *set)
{
    free(set->e);
    *set = (struct strset){ 0 };
}

/* --------------------------------------------------------- tree building */

static struct ynode *tree_node(struct ctx *c, enum ykind kind,
                               const yaml_mark_t *m)
{
    c->nodes++;
    struct ynode *n = cfg_arena_alloc(&c->tree, sizeof *n);
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

    n->str = cfg_arena_strndup(&c->tree, v, len);
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
        cfg_err_at(c, 1, "(yaml)", "out of memory while parsing");
        return;
    }
    if (p->error == YAML_READER_ERROR) {
        line = line_of_offset(text, len, p->problem_offset, &col);
        cfg_err_at(c, line, "(yaml)", "column %lu: %s", col, problem);
        return;
    }
    line = (unsigned long)p->problem_mark.line + 1;
    col = (unsigned long)p->problem_mark.column + 1;
    if (p->context)
        cfg_err_at(c, line, "(yaml)", "column %lu: %s (%s at line %lu)", col,
                   problem, p->context, (unsigned long)p->context_mark.line + 1);
    else
        cfg_err_at(c, line, "(yaml)", "column %lu: %s", col, problem);
}

struct ynode *cfg_tree_build(struct ctx *c, const char *text, size_t len,
                             bool *failed)
{
    yaml_parser_t p;
    yaml_event_t ev;
    struct ynode *stack[CFG_MAX_DEPTH];
    struct ynode *root = NULL;
    int depth = 0, docs = 0;
    bool done = false;

    *failed = true;
    if (!yaml_parser_initialize(&p)) {
        cfg_err_at(c, 1, "(yaml)", "out of memory while parsing");
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
        if (c->nodes >= CFG_MAX_NODES) {
            cfg_err_at(c, (unsigned long)ev.start_mark.line + 1, "(yaml)",
                       "more than %d nodes", CFG_MAX_NODES);
            goto fail_event;
        }
        switch (ev.type) {
        case YAML_DOCUMENT_START_EVENT:
            if (++docs > 1) {
                cfg_err_at(c, (unsigned long)ev.start_mark.line + 1, "(yaml)",
                           "only one YAML document is allowed");
                goto fail_event;
            }
            break;
        case YAML_ALIAS_EVENT:
            /* Refused rather than expanded: an alias may point at its own
             * ancestor (a cycle) or fan out exponentially. */
            cfg_err_at(c, (unsigned long)ev.start_mark.line + 1, "(yaml)",
                       "aliases (*name) are not supported; write the value out");
            goto fail_event;
        case YAML_SCALAR_EVENT:
            n = tree_scalar(c, &ev);
            break;
        case YAML_SEQUENCE_START_EVENT:
        case YAML_MAPPING_START_EVENT:
            if (depth == CFG_MAX_DEPTH) {
                cfg_err_at(c, (unsigned long)ev.start_mark.line + 1, "(yaml)",
                           "nesting deeper than %d levels", CFG_MAX_DEPTH);
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
