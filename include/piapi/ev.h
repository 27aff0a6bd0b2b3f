/* A general epoll event loop for one thread: fd handlers, timers, posts
 * from other threads and end-of-round hooks. It knows nothing of libcurl
 * or FastCGI; the gateway's loop (loop.c) and the upstream driver
 * (upstream.c) are its clients.
 *
 * Handlers, timers and posts are records the caller embeds in its own
 * structs and owns; the loop only links them. Everything runs on the
 * thread that calls piapi_ev_run_once(), except piapi_ev_post() and
 * piapi_ev_wake(), which any thread may call. */
#ifndef PIAPI_EV_H
#define PIAPI_EV_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

struct piapi_ev;

/* A file descriptor to watch. `cb` gets the epoll event bits. */
struct piapi_ev_io {
    void (*cb)(struct piapi_ev_io *io, uint32_t events);
    int fd;
    uint32_t events;  /* as armed; 0 and !in_set: not in the epoll set */
    int in_set;
};

/* A one-shot deadline on the monotonic clock (piapi_now_mono()). */
struct piapi_ev_timer {
    void (*cb)(struct piapi_ev_timer *t);
    double at;
    size_t slot;      /* heap position + 1; 0: not armed */
};

/* A call to run on the loop's thread; the record must stay valid until
 * fn runs (fn may free it). */
struct piapi_ev_post {
    void (*fn)(struct piapi_ev_post *p);
    struct piapi_ev_post *next;
};

/* Runs at the end of every round, after every event, post and timer of
 * the round: work batched over the round (flushing writes, freeing what
 * callbacks let go of). */
struct piapi_ev_hook {
    void (*fn)(struct piapi_ev_hook *h);
    struct piapi_ev_hook *next;
};

/* NULL with a message in err when epoll or the eventfd cannot be had. */
struct piapi_ev *piapi_ev_create(char *err, size_t errlen);
/* Every posted call has run or been dropped by the caller; fds the
 * owners still hold are theirs to close. */
void piapi_ev_destroy(struct piapi_ev *ev);

/* Adds, changes or (events == 0 is fine: hang-ups are still reported)
 * re-arms io. A number that was closed behind the loop's back is added
 * again. 0, or -1 with errno. */
int piapi_ev_io_arm(struct piapi_ev *ev, struct piapi_ev_io *io, uint32_t events);
/* Out of the epoll set (a no-op when not in it). */
void piapi_ev_io_stop(struct piapi_ev *ev, struct piapi_ev_io *io);

/* Arms (or moves) t to fire at `at`; a past deadline fires next round. */
void piapi_ev_timer_set(struct piapi_ev *ev, struct piapi_ev_timer *t, double at);
void piapi_ev_timer_stop(struct piapi_ev *ev, struct piapi_ev_timer *t);
/* The earliest armed deadline, or HUGE_VAL. */
double piapi_ev_next_deadline(const struct piapi_ev *ev);

void piapi_ev_hook_add(struct piapi_ev *ev, struct piapi_ev_hook *h);

/* From any thread: p->fn(p) runs on the loop's thread in a later round
 * (this one's end, when posted from the loop's thread), posts in the
 * order they were made. The loop is woken only when it may be sleeping.
 * Another thread that might post after the loop is gone goes through a
 * gate instead. */
void piapi_ev_post(struct piapi_ev *ev, struct piapi_ev_post *p);
/* A post is queued and has not run yet. */
int piapi_ev_posts_pending(const struct piapi_ev *ev);

/* Posts from other threads while a loop lives, refused before and after,
 * without ever touching a loop that is gone: the gate is the client's
 * (a static that outlives the loop), zeroed = closed. */
struct piapi_ev_gate {
    struct piapi_ev *ev;
    atomic_int open;
    atomic_int inside;   /* posts half made */
};

void piapi_ev_gate_open(struct piapi_ev_gate *g, struct piapi_ev *ev);
/* Refuses other threads from now on; returns once no post is half made,
 * so the loop's queue then holds every post that will ever come. */
void piapi_ev_gate_close(struct piapi_ev_gate *g);
/* 0, or -1 when closed and not on the loop's thread: p will not run. */
int piapi_ev_gate_post(struct piapi_ev_gate *g, struct piapi_ev_post *p);

/* Ends the current or next sleep early (any thread). */
void piapi_ev_wake(struct piapi_ev *ev);

/* One round: sleep until an event, a post, the earliest timer or
 * max_wait_ms (-1: no bound), whichever comes first; then dispatch the
 * events, run the posts, the due timers and the hooks. */
void piapi_ev_run_once(struct piapi_ev *ev, int max_wait_ms);
/* Whether the caller runs on ev's thread (the last to run a round). */
int piapi_ev_on_thread(const struct piapi_ev *ev);

#endif
