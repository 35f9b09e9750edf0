/* White-box (it includes csrc/internal.h to know a loop's eventfd): the loop's
 * wake-up protocol at the exact moments a wake-up could be lost. One loop thread,
 * no timer anywhere, so the loop sleeps in epoll_wait with no timeout: a lost
 * wake-up leaves the bytes unwritten and the peer's read times out. epoll_wait,
 * read and write are wrapped at link time to hold the loop thread at one point
 * while the test thread acts:
 *  - going to sleep: after the iteration's last check for work, before
 *    epoll_wait; a send, close or shutdown from another thread then must wake it;
 *  - between the eventfd read and the clear of wake_pending: a send on another
 *    connection then writes no eventfd (the wake-up is coalesced) and must still
 *    be taken by the drain that follows;
 *  - inside a connection's connect(false) in the middle of a ready-list batch: a
 *    request that puts a later connection of that batch on the ready list again
 *    must not unlink the connections after it.
 * An argument runs only the tests whose name contains it. */
#include "testutil.h"

#include "../../csrc/internal.h"

#include <poll.h>
#include <sys/epoll.h>

int __real_knet__sys_epoll_wait(int epfd, struct epoll_event *evs, int max, int timeout);
ssize_t __real_read(int fd, void *buf, size_t n);
ssize_t __real_write(int fd, const void *buf, size_t n);

enum { HOLD_NONE, HOLD_SLEEP, HOLD_WAKE_READ, HOLD_DISCONNECT };
static atomic_int hold_at = HOLD_NONE; /* where the loop is held next (once per arming) */
static atomic_int held_at;               /* where it was held last */
static atomic_long holds, releases;      /* holds begun; holds the tester ended */
static atomic_int wake_fd = -1;
static atomic_long wake_writes; /* eventfd writes of the loop's wake-up */

/* Called at a hold point p on the loop thread: holds it there (once per arming)
 * until the test lets it go. */
static void hold_point(int p)
{
    int want = p;
    if (atomic_load(&hold_at) != p || !atomic_compare_exchange_strong(&hold_at, &want, HOLD_NONE))
        return;
    atomic_store(&held_at, p);
    long n = atomic_fetch_add(&holds, 1) + 1;
    int64_t until = tu_now_ms() + TU_DEADLINE_MS;
    while (atomic_load(&releases) < n && tu_now_ms() < until)
        tu_sleep_ms(1); /* held: the tester acts meanwhile */
}

int __wrap_knet__sys_epoll_wait(int epfd, struct epoll_event *evs, int max, int timeout)
{
    /* timeout -1: nothing left to do, no timer: the loop goes to sleep for good. */
    if (timeout < 0)
        hold_point(HOLD_SLEEP);
    return __real_knet__sys_epoll_wait(epfd, evs, max, timeout);
}

ssize_t __wrap_read(int fd, void *buf, size_t n)
{
    ssize_t r = __real_read(fd, buf, n);
    if (fd == atomic_load(&wake_fd) && r == 8)
        hold_point(HOLD_WAKE_READ); /* the eventfd is empty, wake_pending still set */
    return r;
}

ssize_t __wrap_write(int fd, const void *buf, size_t n)
{
    if (fd == atomic_load(&wake_fd))
        atomic_fetch_add(&wake_writes, 1);
    return __real_write(fd, buf, n);
}

/* Holds the loop at p next; the caller then makes it get there. */
static long arm(int p)
{
    long n = atomic_load(&holds);
    atomic_store(&held_at, HOLD_NONE);
    atomic_store(&hold_at, p);
    return n;
}

/* Waits until the loop is held at the point armed when holds was n. */
static void wait_held(long n) { WAIT_UNTIL(atomic_load(&holds) > n); }

/* Lets the held loop go on. */
static void release_loop(void) { atomic_store(&releases, atomic_load(&holds)); }

/* Reads exactly n bytes within the test deadline (a lost wake-up never ends: the
 * loop has no timer). */
static void read_within(int fd, void *buf, size_t n)
{
    size_t got = 0;
    int64_t until = tu_now_ms() + TU_DEADLINE_MS;
    while (got < n) {
        struct pollfd p = {fd, POLLIN, 0};
        int left = (int)(until - tu_now_ms());
        CHECK_GT(left, 0);
        if (poll(&p, 1, left) <= 0)
            tu_fail(__FILE__, __LINE__, "bytes not written: lost wake-up");
        ssize_t r = tu_read_some(fd, (char *)buf + got, n - got);
        CHECK_GT(r, 0);
        got += (size_t)r;
    }
}

/* Expects EOF within the test deadline. */
static void eof_within(int fd)
{
    struct pollfd p = {fd, POLLIN, 0};
    if (poll(&p, 1, TU_DEADLINE_MS) <= 0)
        tu_fail(__FILE__, __LINE__, "no FIN: lost wake-up");
    char b;
    CHECK_LE(tu_read_some(fd, &b, 1), 0);
}

#define ROUNDS 200

/* Holds the loop at its next sleep: a send on pc (peer pfd) wakes it, it writes
 * that byte and, with nothing left to do, is held before epoll_wait. */
static void hold_at_next_sleep(knet_conn *pc, int pfd)
{
    kn_loop *L = knet__loop_at(0);
    long n = arm(HOLD_SLEEP);
    CHECK_EQ(knet_conn_send(pc, "p", 1), 0);
    wait_held(n);
    /* Held at a sleep before it took the poke (the test armed while it was on its
     * way there): let it take the poke and hold it at the sleep after. */
    for (int i = 0; atomic_load(&L->wake_pending) || atomic_load(&L->has_work); i++) {
        CHECK_LT(i, 100);
        n = arm(HOLD_SLEEP);
        release_loop();
        wait_held(n);
    }
    char b;
    read_within(pfd, &b, 1);
    CHECK_EQ(b, 'p');
}

static void test_send_while_loop_goes_to_sleep(void)
{
    tu_tracker *t = tu_tracker_new();
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int peer = tu_connect(port);
    knet_conn *c = tu_tracker_rec(t, 0)->conn;
    for (int i = 0; i < ROUNDS; i++) {
        hold_at_next_sleep(c, peer);
        char out[16], in[16];
        int n = snprintf(out, sizeof out, "m%05d", i);
        CHECK_EQ(knet_conn_send(c, out, (size_t)n), 0);
        release_loop();
        read_within(peer, in, (size_t)n);
        CHECK(memcmp(in, out, (size_t)n) == 0);
    }
    /* A close and a shutdown asked for right then take effect as well. */
    int p2 = tu_connect(port), p3 = tu_connect(port);
    knet_conn *c2 = tu_tracker_rec(t, 1)->conn, *c3 = tu_tracker_rec(t, 2)->conn;
    hold_at_next_sleep(c, peer);
    knet_conn_close(c2);
    release_loop();
    eof_within(p2);
    hold_at_next_sleep(c, peer);
    CHECK_EQ(knet_conn_send(c3, "bye", 3), 0);
    knet_conn_shutdown(c3);
    release_loop();
    char in[3];
    read_within(p3, in, 3);
    CHECK(memcmp(in, "bye", 3) == 0);
    eof_within(p3);
    close(p2);
    close(p3);
    close(peer);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

static void test_send_between_wake_read_and_clear(void)
{
    tu_tracker *t = tu_tracker_new();
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int p1 = tu_connect(port), p2 = tu_connect(port);
    knet_conn *c1 = tu_tracker_rec(t, 0)->conn, *c2 = tu_tracker_rec(t, 1)->conn;
    int coalesced = 0;
    for (int i = 0; i < ROUNDS; i++) {
        char in[2];
        long n = arm(HOLD_WAKE_READ);
        CHECK_EQ(knet_conn_send(c1, "a", 1), 0); /* wakes the loop: held after its read */
        wait_held(n);
        long w0 = atomic_load(&wake_writes);
        CHECK_EQ(knet_conn_send(c2, "b", 1), 0); /* a new ready entry */
        if (atomic_load(&wake_writes) == w0)
            coalesced++; /* no eventfd write: the drain about to run must take it */
        release_loop();
        read_within(p1, in, 1);
        read_within(p2, in + 1, 1);
        CHECK(in[0] == 'a' && in[1] == 'b');
    }
    CHECK_EQ(coalesced, ROUNDS); /* the interleaving this test is about happened */
    close(p1);
    close(p2);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

static void hold_in_disconnect(tu_rec *r, bool connected)
{
    if (!connected && r->index == 0)
        hold_point(HOLD_DISCONNECT);
}

static void test_requeue_during_batch(void)
{
    tu_tracker *t = tu_tracker_new();
    t->on_connect = hold_in_disconnect;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int p[5];
    knet_conn *c[5];
    for (int i = 0; i < 5; i++) {
        p[i] = tu_connect(port);
        c[i] = tu_tracker_rec(t, i)->conn;
    }
    /* One batch: c0 (closed), c1, c2, c3 (sends), taken by one drain (c4 pokes). */
    hold_at_next_sleep(c[4], p[4]);
    knet_conn_close(c[0]);
    for (int i = 1; i < 4; i++)
        CHECK_EQ(knet_conn_send(c[i], "x", 1), 0);
    long n = arm(HOLD_DISCONNECT); /* then in c0's connect(false), first of the batch */
    release_loop();
    wait_held(n);
    CHECK_EQ(atomic_load(&held_at), HOLD_DISCONNECT);
    /* c1 and c2 are still to be serviced from the batch: put them on the new ready list. */
    knet_conn_close_with_timeout(c[1], 5000);
    knet_conn_close_with_timeout(c[2], 5000);
    release_loop();
    eof_within(p[0]);
    for (int i = 1; i < 4; i++) {
        char in;
        read_within(p[i], &in, 1);
        CHECK_EQ(in, 'x');
    }
    eof_within(p[1]);
    eof_within(p[2]);
    for (int i = 0; i < 5; i++)
        close(p[i]);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

static const char *only;
#define RUN_IF(fn)                                                                                 \
    do {                                                                                           \
        if (!only || strstr(#fn, only))                                                            \
            RUN(fn);                                                                               \
    } while (0)

int main(int argc, char **argv)
{
    only = argc > 1 ? argv[1] : NULL;
    CHECK_EQ(knet_set_loop_threads(1), 0);
    tu_begin();
    atomic_store(&wake_fd, knet__loop_at(0)->wake.fd);
    RUN_IF(test_send_while_loop_goes_to_sleep);
    RUN_IF(test_send_between_wake_read_and_clear);
    RUN_IF(test_requeue_during_batch);
    return tu_end();
}
