/* Usage accounting of one finished request: which model, what it cost
 * by the config's pricing, and where that goes: the log line's fields,
 * the token and cost metrics, the ledger row and the member's tally. */
#ifndef PIAPI_ACCOUNT_H
#define PIAPI_ACCOUNT_H

#include "piapi/config.h"
#include "piapi/log.h"
#include "piapi/usage.h"

struct piapi_account {
    /* in */
    const struct piapi_config *cfg;
    const char *request_id;
    const char *user;
    const char *service_type;
    const char *provider;
    const char *key_name;
    int status;
    enum piapi_usage_shape shape;   /* NONE: an answer without usage */
    const struct piapi_usage *usage;
    const char *request_model;      /* "" when none */
    /* out, from piapi_account_settle */
    const char *model;              /* the answer's, else the request's; "" */
    int expected;                   /* a 2xx answer of a shape with usage */
    int complete;                   /* not expected, or its final usage came */
    int priced;
    double cost_usd;
};

/* Fills the out fields. An unpriced model is warned about once. */
void piapi_account_settle(struct piapi_account *a);
/* The usage fields of the log line (only for an answer that has usage). */
void piapi_account_log(const struct piapi_account *a, struct piapi_log_line *l);
/* Metrics, ledger row and tally; `now` in unix seconds. */
void piapi_account_record(const struct piapi_account *a, double now);

/* GET /usage's answer: the member's totals of the UTC day and month
 * `now` is in. */
void piapi_account_usage_json(const char *user, double now, struct piapi_buf *out);

/* settings.usageDb as a path: relative to the config file's directory.
 * malloc'd. */
char *piapi_account_ledger_path(const char *config_path, const char *usage_db);
/* A config took effect: opens, switches or closes the ledger to match it
 * (a new ledger restores the members' day and month from its rows). */
void piapi_account_follow(const char *config_path, const struct piapi_settings *s);
/* At exit, after the last request: every row written, the ledger closed. */
void piapi_account_stop(void);

#endif
