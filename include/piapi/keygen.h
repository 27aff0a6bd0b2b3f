/* `piapi keygen [--name NAME]`: a new member key, printed once, and the
 * config lines that hold only its SHA-256 (users[].apiKeyHash). */
#ifndef PIAPI_KEYGEN_H
#define PIAPI_KEYGEN_H

/* argv[0] is "keygen". Returns the process exit status: 0, 1 when no
 * randomness could be had, 2 on a usage error. */
int piapi_keygen_main(int argc, char **argv);

#endif
