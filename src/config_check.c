/* Config stage 2's tools: messages that name the file, line and place
 * (kept with their line and sorted when handed over, so the operator reads
 * them top to bottom whatever order the checks ran in), and the generic
 * checks every schema walker uses. Lower layers only report; the caller
 * of a load decides what to print or log. */
#include "config_int.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "piapi/util.h"

static void msgs_add(struct msgs *m, unsigned long line, char *text)
{
    if (m->n == CFG_MAX_MESSAGES) {
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

void cfg_err_at(struct ctx *c, unsigned long line, const char *path,
                const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vreport(c, &c->err, line, path, fmt, ap);
    va_end(ap);
}

void cfg_err(struct ctx *c, const struct ynode *at, const char *path,
             const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vreport(c, &c->err, at->line, path, fmt, ap);
    va_end(ap);
}

void cfg_warn(struct ctx *c, const struct ynode *at, const char *path,
              const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vreport(c, &c->warn, at ? at->line : 1, path, fmt, ap);
    va_end(ap);
}

void cfg_err_file(struct ctx *c, const char *what, int errnum)
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

char *cfg_msgs_take(struct msgs *m)
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

/* A secret itself, or one of at least PIAPI_SECRET_MIN_LEN bytes inside s. */
static bool mentions_secret(const struct ctx *c, const char *s, size_t len)
{
    const struct strset *set = &c->secrets;

    if (cfg_strset_find(set, 0, s, len))
        return true;
    for (size_t i = 0; set->e && i <= set->mask; i++) {
        const struct strset_ent *e = &set->e[i];
        if (e->s && e->len >= PIAPI_SECRET_MIN_LEN && e->len <= len && memmem(s, len, e->s, e->len))
            return true;
    }
    return false;
}

const char *cfg_show(const struct ctx *c, char out[CFG_SHOW_LEN], const char *s,
                     size_t len)
{
    /* Misplaced YAML can put a key where a name belongs (a provider key as
     * providerKeyName, a member key as a mapping key), or inside a longer
     * string: never echo one. */
    if (mentions_secret(c, s, len)) {
        memcpy(out, "<redacted>", sizeof "<redacted>");
        return out;
    }
    size_t max = CFG_SHOW_LEN - 4, o = 0;
    for (size_t i = 0; i < len && o < max; i++) {
        unsigned char ch = (unsigned char)s[i];
        out[o++] = ch < 0x20 || ch == 0x7f ? '?' : (char)ch;
    }
    if (len > max)
        memcpy(out + o, "...", 3), o += 3;
    out[o] = '\0';
    return out;
}

/* Paths longer than CFG_PATH_LEN are cut short, which is fine for a message. */
__attribute__((format(printf, 2, 3)))
static void path_fmt(char out[CFG_PATH_LEN], const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(out, CFG_PATH_LEN, fmt, ap);
    va_end(ap);
}

void cfg_path_key(const struct ctx *c, char out[CFG_PATH_LEN], const char *base,
                  const char *key, size_t len)
{
    char k[CFG_SHOW_LEN];
    path_fmt(out, "%s%s%s", base, *base ? "." : "", cfg_show(c, k, key, len));
}

void cfg_path_idx(char out[CFG_PATH_LEN], const char *base, size_t i)
{
    path_fmt(out, "%s[%zu]", base, i);
}


/* ------------------------------------------------------ generic checks */

const char *cfg_kind_name(enum ykind k)
{
    return k == Y_MAP ? "mapping" : k == Y_SEQ ? "sequence" : "string";
}

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
                           const struct cfg_schema *schema)
{
    const char *best = NULL;
    size_t best_d = 3;

    for (size_t i = 0; i < schema->n; i++) {
        const char *known = schema->fields[i].key;
        size_t klen = strlen(known);
        size_t d = edit_distance_ci(key, len, known, klen);
        /* Short keys would "match" almost anything at distance 2. */
        size_t limit = klen >= 6 ? 2 : 1;
        if (d <= limit && d < best_d)
            best = known, best_d = d;
    }
    return best;
}

static void list_known(char *out, size_t outlen, const struct cfg_schema *schema)
{
    size_t o = 0;
    out[0] = '\0';
    for (size_t i = 0; i < schema->n && o < outlen; i++)
        o += (size_t)snprintf(out + o, outlen - o, "%s%s", i ? ", " : "",
                              schema->fields[i].key);
}

static const struct cfg_field *field_of(const struct cfg_schema *schema,
                                        const char *key, size_t len)
{
    for (size_t i = 0; i < schema->n; i++)
        if (strlen(schema->fields[i].key) == len &&
            memcmp(schema->fields[i].key, key, len) == 0)
            return &schema->fields[i];
    return NULL;
}

/* Every mapping goes through here; unknown keys are usually typos. */
void cfg_check_keys(struct ctx *c, const struct ynode *map, const char *path,
                    const struct cfg_schema *schema)
{
    struct strset seen = { 0 };
    char kp[CFG_PATH_LEN];

    for (const struct ynode *k = map->first; k && k->next; k = k->next->next) {
        if (k->kind != Y_SCALAR) {
            cfg_err(c, k, *path ? path : "(top level)",
                    "expected a string as mapping key, got a %s",
                cfg_kind_name(k->kind));
            continue;
        }
        cfg_path_key(c, kp, path, k->str, k->len);
        const struct strset_ent *dup = cfg_strset_add(&seen, 0, k->str, k->len,
                                                      k->line);
        if (dup) {
            cfg_err(c, k, kp, "duplicate key (first at line %zu)", dup->val);
            continue;
        }
        if (!schema || field_of(schema, k->str, k->len))
            continue;
        const char *guess = suggest(k->str, k->len, schema);
        if (guess) {
            cfg_err(c, k, kp, "unknown field; did you mean '%s'?", guess);
        } else {
            char list[160];
            list_known(list, sizeof list, schema);
            cfg_err(c, k, kp, "unknown field (expected one of: %s)", list);
        }
    }
    cfg_strset_dispose(&seen);
}

const struct ynode *cfg_map_get(const struct ynode *map, const char *key)
{
    size_t len = strlen(key);
    for (const struct ynode *k = map->first; k && k->next; k = k->next->next)
        if (k->kind == Y_SCALAR && k->len == len && !memcmp(k->str, key, len))
            return k->next;
    return NULL;
}

bool cfg_expect_kind(struct ctx *c, const struct ynode *n, const char *path,
                     enum ykind kind)
{
    if (n->kind == kind)
        return true;
    cfg_err(c, n, path, "expected a %s, got a %s", cfg_kind_name(kind),
            n->null ? "null" : cfg_kind_name(n->kind));
    return false;
}

/* A string field of `map`. Returns the scalar node, or NULL when absent,
 * null or invalid (having reported whatever `required` makes an error). */
const struct ynode *cfg_get_str(struct ctx *c, const struct ynode *map,
                                const char *path, const char *key,
                                   int required)
{
    char kp[CFG_PATH_LEN];
    const struct ynode *v = cfg_map_get(map, key);

    cfg_path_key(c, kp, path, key, strlen(key));
    if (!v) {
        if (required)
            cfg_err(c, map, kp, "required field is missing");
        return NULL;
    }
    if (v->kind != Y_SCALAR) {
        cfg_expect_kind(c, v, kp, Y_SCALAR);
        return NULL;
    }
    if (v->null || v->len == 0) {
        if (required) {
            cfg_err(c, v, kp, "must not be empty");
            return NULL;
        }
        return v->null ? NULL : v;  /* an explicit "" is a value */
    }
    if (v->has_nul) {
        cfg_err(c, v, kp, "must not contain a NUL character");
        return NULL;
    }
    return v;
}

/* Names end up in log lines and metric labels. */
bool cfg_has_ctl(const char *s, size_t len, bool allow_tab)
{
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)s[i];
        if ((ch < 0x20 && !(allow_tab && ch == '\t')) || ch == 0x7f)
            return true;
    }
    return false;
}

bool cfg_has_space_or_ctl(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)s[i] <= 0x20 || s[i] == 0x7f)
            return true;
    return false;
}

const struct ynode *cfg_get_name(struct ctx *c, const struct ynode *map,
                                 const char *path, const char *key)
{
    const struct ynode *v = cfg_get_str(c, map, path, key, CFG_REQUIRED);
    if (v && cfg_has_ctl(v->str, v->len, false)) {
        char kp[CFG_PATH_LEN];
        cfg_path_key(c, kp, path, key, strlen(key));
        cfg_err(c, v, kp, "must not contain control characters");
        return NULL;
    }
    return v;
}

const char *cfg_dup_str(struct ctx *c, const struct ynode *v)
{
    return piapi_arena_strndup(&c->cfg->arena, v->str, v->len);
}

/* The entry's required `name`, unique within `set` (providers, users);
 * `list` names the sequence in the duplicate message. NULL when missing. */
const char *cfg_unique_name(struct ctx *c, const struct ynode *map,
                            const char *path, struct strset *set, size_t idx,
                               const char *what, const char *list)
{
    char kp[CFG_PATH_LEN], shown[CFG_SHOW_LEN];
    const struct ynode *name = cfg_get_name(c, map, path, "name");

    if (!name)
        return NULL;
    const struct strset_ent *dup = cfg_strset_add(set, 0, name->str, name->len, idx);
    if (dup) {
        cfg_path_key(c, kp, path, "name", 4);
        cfg_err(c, name, kp, "duplicate %s name '%s' (first is %s[%zu])", what,
                cfg_show(c, shown, name->str, name->len), list, dup->val);
    }
    return cfg_dup_str(c, name);
}

const struct ynode *cfg_get_coll(struct ctx *c, const struct ynode *map,
                                 const char *path, const char *key,
                                    enum ykind kind)
{
    char kp[CFG_PATH_LEN];
    const struct ynode *v = cfg_map_get(map, key);

    cfg_path_key(c, kp, path, key, strlen(key));
    if (!v) {
        cfg_err(c, map, kp, "required field is missing");
        return NULL;
    }
    if (v->kind == Y_SCALAR && v->null) {
        cfg_err(c, v, kp, "must not be empty");
        return NULL;
    }
    if (!cfg_expect_kind(c, v, kp, kind))
        return NULL;
    if (v->count == 0) {
        cfg_err(c, v, kp, "must not be empty");
        return NULL;
    }
    return v;
}
