/* Config stage 1: YAML text → a small private tree of nodes, built from
 * libyaml's event parser. Doing it ourselves rather than with
 * yaml_parser_load lets us refuse aliases (a self-referencing or
 * billion-laughs alias would otherwise turn the schema walk into a cycle or
 * an exponential one) and cap the nesting and the node count. */
#include "config_int.h"

#include <stdlib.h>
#include <string.h>
#include <yaml.h>

#include "piapi/util.h"

/* --------------------------------------------------------- tree building */

static struct ynode *tree_node(struct ctx *c, enum ykind kind,
                               const yaml_mark_t *m)
{
    c->nodes++;
    struct ynode *n = piapi_arena_alloc(&c->tree, sizeof *n);
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

    n->str = piapi_arena_strndup(&c->tree, v, len);
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
