/* EPOLLOUT is armed only while a connection's queue waits and disarmed once it
 * drained (white-box: epoll_ctl is wrapped and its EPOLL_CTL_MODs counted):
 *  - echoes of small messages to a reading peer (direct writes): no MOD at all;
 *  - sends from another thread to a reading peer: the queue drains from the
 *    ready list, EPOLLOUT ends disarmed;
 *  - an 8 MiB answer from one receive to a peer that reads it in small pieces:
 *    armed once, disarmed once (no flip-flop per EPOLLOUT event). */
#include "testutil.h"

#include <sys/epoll.h>

int __real_epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev);
static atomic_int watch_fd = -1;
static atomic_int mods_out, mods_noout;
static atomic_uint last_events;
int __wrap_epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev)
{
    if (op == EPOLL_CTL_MOD && fd == atomic_load(&watch_fd)) {
        if (ev->events & EPOLLOUT) atomic_fetch_add(&mods_out, 1);
        else atomic_fetch_add(&mods_noout, 1);
        atomic_store(&last_events, ev->events);
    }
    return __real_epoll_ctl(epfd, op, fd, ev);
}

static char big[8 << 20];
static void on_receive(tu_rec *r, const void *buf, size_t len)
{
    if (len && ((const char *)buf)[0] == 'B') CHECK_EQ(knet_conn_send(r->conn, big, sizeof big), 0);
    else if (len && ((const char *)buf)[0] == 'e') CHECK_EQ(knet_conn_send(r->conn, buf, len), 0);
}

static int server_fd_of(int peer)
{
    /* The connection's fd: the newest socket of this process (1 loop, 1 conn). */
    (void)peer;
    int best = -1;
    for (int fd = 3; fd < 1024; fd++) {
        struct sockaddr_in a;
        socklen_t sl = sizeof a;
        if (getsockname(fd, (struct sockaddr *)&a, &sl) == 0 && a.sin_family == AF_INET) {
            struct sockaddr_in b;
            socklen_t bl = sizeof b;
            struct sockaddr_in me;
            socklen_t ml = sizeof me;
            CHECK_EQ(getpeername(peer, (struct sockaddr *)&b, &bl), 0);
            CHECK_EQ(getsockname(peer, (struct sockaddr *)&me, &ml), 0);
            struct sockaddr_in p;
            socklen_t pl = sizeof p;
            if (getpeername(fd, (struct sockaddr *)&p, &pl) == 0 && p.sin_port == me.sin_port &&
                a.sin_port == b.sin_port)
                best = fd;
        }
    }
    CHECK_GE(best, 0);
    return best;
}

static void test_epollout_transitions(void)
{
    tu_tracker *t = tu_tracker_new();
    t->on_receive = on_receive;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int p = tu_connect_ex(port, 64 * 1024); /* the 8 MiB cannot fit in the socket buffers */
    tu_rec *r = tu_tracker_rec(t, 0);
    atomic_store(&watch_fd, server_fd_of(p));

    /* 1: echoes (direct writes) */
    for (int i = 0; i < 500; i++) {
        char b[8] = "echo123", d[8];
        tu_write_all(p, b, 7);
        CHECK_EQ(tu_read_full(p, d, 7), 7);
    }
    printf("  echoes: %d arming, %d disarming MODs\n", atomic_load(&mods_out), atomic_load(&mods_noout));
    CHECK_EQ(atomic_load(&mods_out) + atomic_load(&mods_noout), 0);

    /* 2: off-loop sends */
    static char rb[1 << 16];
    size_t want = 0;
    for (int i = 0; i < 2000; i++) {
        CHECK_EQ(knet_conn_send(r->conn, rb, 1000), 0);
        want += 1000;
    }
    CHECK_EQ(tu_read_full(p, big, want), (ssize_t)want);
    WAIT_UNTIL(!(atomic_load(&last_events) & EPOLLOUT));
    printf("  off-loop: %d arming, %d disarming MODs\n", atomic_load(&mods_out), atomic_load(&mods_noout));
    CHECK_EQ(atomic_load(&mods_out), atomic_load(&mods_noout));

    /* 3: one 8 MiB answer read in 4 KiB pieces */
    atomic_store(&mods_out, 0);
    atomic_store(&mods_noout, 0);
    tu_write_all(p, "B", 1);
    size_t got = 0;
    while (got < sizeof big) {
        ssize_t n = tu_read_some(p, rb, 4096);
        CHECK_GT(n, 0);
        got += (size_t)n;
    }
    WAIT_UNTIL(!(atomic_load(&last_events) & EPOLLOUT));
    printf("  8 MiB: %d arming, %d disarming MODs\n", atomic_load(&mods_out), atomic_load(&mods_noout));
    CHECK_EQ(atomic_load(&mods_out), 1);
    CHECK_EQ(atomic_load(&mods_noout), 1);
    close(p);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

int main(void)
{
    CHECK_EQ(knet_set_loop_threads(1), 0);
    tu_begin();
    RUN(test_epollout_transitions);
    return tu_end();
}
