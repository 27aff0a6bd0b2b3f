/* fcgi_frame: when a request counts as arrived, record by record. */
#include <string.h>

#include "piapi/fcgi_frame.h"
#include "unit.h"

struct msg {
    unsigned char b[512];
    size_t n;
};

static void record(struct msg *m, int type, const char *content, size_t len, int pad)
{
    unsigned char *h = m->b + m->n;
    h[0] = 1;
    h[1] = (unsigned char)type;
    h[2] = 0;
    h[3] = 1;
    h[4] = (unsigned char)(len >> 8);
    h[5] = (unsigned char)len;
    h[6] = (unsigned char)pad;
    h[7] = 0;
    memcpy(h + 8, content, len);
    memset(h + 8 + len, 0, (size_t)pad);
    m->n += 8 + len + (size_t)pad;
}

static void begin(struct msg *m, int flags)
{
    char body[8] = { 0, 1, (char)flags, 0, 0, 0, 0, 0 };
    record(m, 1, body, 8, 0);
}

/* begin, params "\x03\x01URIx" in two records, empty params, stdin. */
static void request(struct msg *m, int flags, const char *body)
{
    memset(m, 0, sizeof *m);
    begin(m, flags);
    record(m, 4, "\x03\x01URIx", 6, 2);
    record(m, 4, "", 0, 0);
    if (*body)
        record(m, 5, body, strlen(body), 3);
    record(m, 5, "", 0, 0);
}

static enum piapi_fcgi_arrival arrival(const struct msg *m, size_t n)
{
    return piapi_fcgi_arrival(m->b, n, sizeof m->b, 64);
}

static void test_whole_only_at_the_end(void)
{
    struct msg m;
    request(&m, 0, "{\"a\":1}");
    CU_ASSERT_EQUAL(arrival(&m, m.n), PIAPI_FCGI_WHOLE);
    for (size_t n = 0; n < m.n; n++)
        CU_ASSERT_EQUAL(arrival(&m, n), PIAPI_FCGI_PARTIAL);
}

static void test_no_body(void)
{
    struct msg m;
    request(&m, 0, "");
    CU_ASSERT_EQUAL(arrival(&m, m.n), PIAPI_FCGI_WHOLE);
    CU_ASSERT_EQUAL(arrival(&m, m.n - 1), PIAPI_FCGI_PARTIAL);
}

static void test_keep_conn_is_whole(void)
{
    struct msg m;
    request(&m, 1, "x");
    CU_ASSERT_EQUAL(arrival(&m, m.n), PIAPI_FCGI_WHOLE);
    CU_ASSERT_EQUAL(arrival(&m, m.n - 1), PIAPI_FCGI_PARTIAL);
}

/* The unread end of a kept connection's last body comes first. */
static void test_stale_stdin_is_skipped(void)
{
    struct msg m = {0}, r;
    record(&m, 5, "rest of an old body", 19, 5);
    record(&m, 5, "", 0, 0);
    CU_ASSERT_EQUAL(arrival(&m, m.n), PIAPI_FCGI_PARTIAL);
    request(&r, 1, "{}");
    memcpy(m.b + m.n, r.b, r.n);
    m.n += r.n;
    CU_ASSERT_EQUAL(arrival(&m, m.n), PIAPI_FCGI_WHOLE);
    CU_ASSERT_EQUAL(arrival(&m, m.n - 1), PIAPI_FCGI_PARTIAL);
}

static void test_out_of_order_is_unfit(void)
{
    struct msg m = {0};
    record(&m, 4, "", 0, 0);  /* params before anything */
    CU_ASSERT_EQUAL(arrival(&m, m.n), PIAPI_FCGI_UNFIT);

    memset(&m, 0, sizeof m);
    begin(&m, 0);
    record(&m, 5, "", 0, 0);  /* stdin before the end of params */
    CU_ASSERT_EQUAL(arrival(&m, m.n), PIAPI_FCGI_UNFIT);

    memset(&m, 0, sizeof m);
    begin(&m, 0);
    begin(&m, 0);
    CU_ASSERT_EQUAL(arrival(&m, m.n), PIAPI_FCGI_UNFIT);
}

static void test_beyond_what_was_seen_is_unfit(void)
{
    struct msg m;
    request(&m, 0, "{}");
    /* the caller saw only part of it, and could not have seen more */
    CU_ASSERT_EQUAL(piapi_fcgi_arrival(m.b, 20, 20, 64), PIAPI_FCGI_UNFIT);
    CU_ASSERT_EQUAL(piapi_fcgi_arrival(m.b, m.n, m.n, 64), PIAPI_FCGI_WHOLE);
}

/* A body the caller would not take whole, though all of it is there. */
static void test_body_over_the_limit_is_unfit(void)
{
    struct msg m;
    request(&m, 0, "0123456789");
    CU_ASSERT_EQUAL(piapi_fcgi_arrival(m.b, m.n, sizeof m.b, 10), PIAPI_FCGI_WHOLE);
    CU_ASSERT_EQUAL(piapi_fcgi_arrival(m.b, m.n, sizeof m.b, 9), PIAPI_FCGI_UNFIT);
    CU_ASSERT_EQUAL(piapi_fcgi_arrival(m.b, m.n - 8, sizeof m.b, 9), PIAPI_FCGI_UNFIT);
}

static const struct unit_case cases[] = {
    { "whole only at the end", test_whole_only_at_the_end },
    { "no body", test_no_body },
    { "keep-conn is whole", test_keep_conn_is_whole },
    { "stale stdin is skipped", test_stale_stdin_is_skipped },
    { "out of order is unfit", test_out_of_order_is_unfit },
    { "beyond what was seen is unfit", test_beyond_what_was_seen_is_unfit },
    { "body over the limit is unfit", test_body_over_the_limit_is_unfit },
    { NULL, NULL }
};

UNIT_MAIN("fcgi_frame", cases)
