/* The two timeouts of the drain knet starts on the peer's EOF (its graceful close's
 * deadline, c->grace_end, and the idle timeout) against everything else that may end
 * it: a later close_with_timeout (shorter, longer, 0, UINT32_MAX), knet_conn_shutdown,
 * a server's or a client's shutdown or close, a local close; an idle timeout longer than
 * the drain (UINT32_MAX too); a peer that stopped reading before its FIN. Each checks
 * the reason, that idle_closed counts idle closes only, and the deadline with generous
 * slack (times are upper bounds, lower bounds only where the docs say "not before"). */
#include "testutil.h"

#define SLACK 700 /* a loaded 2-core machine's delay, on top of any deadline */

/* connect(true) of the first connection queues 8 MiB for a peer that reads 16 KiB at
 * most (a client's re-dial is left alone: it may be closed as it connects). */
static void queue_8mib(tu_rec *r, bool connected)
{
    if (!connected || r->index > 0)
        return;
    static uint8_t chunk[64 * 1024];
    for (int i = 0; i < 128; i++)
        CHECK_EQ(knet_conn_send(r->conn, chunk, sizeof chunk), 0);
}

typedef struct drain {
    tu_tracker *t;
    tu_server ts;
    int peer;
    tu_rec *r;
} drain;

/* A server with idle timeout idle_ms and a peer that never reads with 8 MiB queued for
 * it; with fin, the peer half-closes and this returns once knet read the FIN. */
static void drain_start(drain *d, uint32_t idle_ms, bool fin)
{
    d->t = tu_tracker_new();
    d->t->on_connect = queue_8mib;
    knet_handler h = tu_tracker_handler(d->t);
    tu_server_init(&d->ts, "127.0.0.1:0", &h, NULL);
    knet_server_set_idle_timeout(d->ts.srv, idle_ms);
    CHECK_GT(tu_server_run(&d->ts), 0);
    d->peer = tu_connect_ex(d->ts.port, 16384);
    d->r = tu_tracker_rec(d->t, 0);
    if (fin) {
        CHECK_EQ(shutdown(d->peer, SHUT_WR), 0);
        WAIT_UNTIL(knet_conn_send(d->r->conn, "", 0) == KNET_ECLOSED); /* the EOF drain began */
    }
}

static uint64_t idle_closed(drain *d)
{
    knet_stats st;
    knet_server_stats(d->ts.srv, &st);
    return st.idle_closed;
}

/* Waits for connect(false); returns the ms since t0. */
static int64_t wait_closed(drain *d, int64_t t0)
{
    WAIT_UNTIL(atomic_load(&d->r->disconnected));
    return tu_now_ms() - t0;
}

static void drain_end(drain *d)
{
    close(d->peer);
    if (d->ts.srv)
        CHECK_EQ(tu_server_stop(&d->ts), KNET_ESERVERCLOSED);
    CHECK_EQ(tu_counter_get(&d->t->disconnects), 1); /* connect(false) once */
    tu_tracker_free(d->t);
}

/* ------------------------------------------------------------ the peer stops reading first */

/* A peer that stops reading is closed within 2 x idle_ms (knet.h), also when it sends
 * its FIN in the middle: the FIN is no byte, and the drain it starts must not put the
 * idle check it finds armed back by a whole idle_ms. The FIN comes after knet's first
 * idle check (which saw the kernel's buffer filled since the start: bytes moved), shortly
 * before the second, which closes a peer that sends no FIN. */
static void test_fin_after_reading_stopped(void)
{
    enum { IDLE = 1000 };
    drain d;
    int64_t t0 = tu_now_ms(); /* before the connect: the connection's clock starts later */
    drain_start(&d, IDLE, false);
    int64_t fin_at = t0 + IDLE * 19 / 10;
    if (tu_now_ms() < fin_at)
        tu_sleep_ms((int)(fin_at - tu_now_ms())); /* the peer's timing, not synchronisation */
    /* knet may have closed it already on a slow machine: the FIN then meets a closed socket */
    shutdown(d.peer, SHUT_WR);
    int64_t took = wait_closed(&d, t0);
    printf("  stopped reading at the start, FIN at %d ms: closed after %lld ms (idle %d ms)\n",
           IDLE * 19 / 10, (long long)took, IDLE);
    CHECK_EQ(atomic_load(&d.r->reason), -ETIMEDOUT);
    CHECK_EQ(idle_closed(&d), 1);
    CHECK_LT(took, 2 * IDLE + SLACK);
    drain_end(&d);
}

/* ------------------------------------------------------------ requests during an EOF drain */

/* A shorter close_with_timeout brings the drain's end forward: -ETIMEDOUT at its
 * deadline, not counted as idle. 0 ms too. */
static void test_eof_drain_then_shorter_close(void)
{
    enum { IDLE = 3000 };
    for (int i = 0; i < 2; i++) {
        uint32_t ms = i == 0 ? 100 : 0;
        drain d;
        drain_start(&d, IDLE, true);
        int64_t t0 = tu_now_ms();
        knet_conn_close_with_timeout(d.r->conn, ms);
        int64_t took = wait_closed(&d, t0);
        printf("  EOF drain, close_with_timeout(%u): closed after %lld ms\n", ms, (long long)took);
        CHECK_EQ(atomic_load(&d.r->reason), -ETIMEDOUT);
        CHECK_EQ(idle_closed(&d), 0);
        CHECK_LT(took, (int64_t)ms + SLACK);
        drain_end(&d);
    }
}

/* A longer close_with_timeout (knet_conn_shutdown's 3 s, UINT32_MAX) or a server shutdown
 * with a long deadline neither pushes the idle check back nor replaces it: the peer
 * that stops reading is closed as idle, within 2 x idle_ms of its FIN. */
static void test_eof_drain_then_longer_close(void)
{
    enum { IDLE = 300 };
    for (int i = 0; i < 4; i++) {
        drain d;
        drain_start(&d, IDLE, true);
        int64_t t0 = tu_now_ms();
        if (i == 0)
            knet_conn_close_with_timeout(d.r->conn, UINT32_MAX);
        else if (i == 1)
            knet_conn_shutdown(d.r->conn);
        else if (i == 2)
            CHECK_EQ(knet_server_shutdown(d.ts.srv, UINT32_MAX), 0);
        else
            CHECK_EQ(knet_server_shutdown(d.ts.srv, 10000), 0);
        int64_t took = wait_closed(&d, t0);
        printf("  EOF drain, longer request %d: closed after %lld ms\n", i, (long long)took);
        CHECK_EQ(atomic_load(&d.r->reason), -ETIMEDOUT);
        CHECK_EQ(idle_closed(&d), 1);
        CHECK_LT(took, 2 * IDLE + SLACK);
        if (i >= 2) {
            CHECK_EQ(tu_server_join(&d.ts), KNET_ESERVERCLOSED);
            d.ts.srv = NULL;
        }
        drain_end(&d);
    }
}

/* A server shutdown with a deadline shorter than the idle timeout ends the drain at
 * that deadline (-ETIMEDOUT, not idle); the serve call returns. */
static void test_eof_drain_then_short_server_shutdown(void)
{
    enum { IDLE = 3000 };
    drain d;
    drain_start(&d, IDLE, true);
    int64_t t0 = tu_now_ms();
    CHECK_EQ(knet_server_shutdown(d.ts.srv, 100), 0);
    int64_t took = wait_closed(&d, t0);
    CHECK_EQ(atomic_load(&d.r->reason), -ETIMEDOUT);
    CHECK_EQ(idle_closed(&d), 0);
    CHECK_LT(took, 100 + SLACK);
    CHECK_EQ(tu_server_join(&d.ts), KNET_ESERVERCLOSED);
    d.ts.srv = NULL;
    drain_end(&d);
}

/* A local close or a server close during the drain ends it at once with its own reason. */
static void test_eof_drain_then_close(void)
{
    enum { IDLE = 300 };
    for (int i = 0; i < 3; i++) {
        drain d;
        drain_start(&d, IDLE, true);
        int64_t t0 = tu_now_ms();
        if (i == 0) {
            knet_conn_close(d.r->conn);
        } else if (i == 1) {
            CHECK_EQ(knet_server_close(d.ts.srv), 0);
        } else {
            CHECK_EQ(knet_server_shutdown(d.ts.srv, 10000), 0);
            CHECK_EQ(knet_server_close(d.ts.srv), 0);
        }
        int64_t took = wait_closed(&d, t0);
        CHECK_EQ(atomic_load(&d.r->reason), i == 0 ? 0 : KNET_ESERVERCLOSED);
        CHECK_EQ(idle_closed(&d), 0);
        CHECK_LT(took, IDLE); /* at once: not the idle timeout's doing */
        if (i >= 1) {
            CHECK_EQ(tu_server_join(&d.ts), KNET_ESERVERCLOSED);
            d.ts.srv = NULL;
        }
        drain_end(&d);
    }
}

/* An idle timeout longer than the drain's 3 s (5 s, and UINT32_MAX ms: no overflow of
 * grace_end or of what is left of it) leaves the drain its 3 s: -ETIMEDOUT then, not
 * before, not counted as idle. */
static void test_idle_longer_than_drain(void)
{
    for (int i = 0; i < 2; i++) {
        uint32_t idle = i == 0 ? 5000 : UINT32_MAX;
        drain d;
        drain_start(&d, idle, false);
        CHECK_EQ(shutdown(d.peer, SHUT_WR), 0);
        int64_t t0 = tu_now_ms(); /* before knet reads the FIN */
        WAIT_UNTIL(knet_conn_send(d.r->conn, "", 0) == KNET_ECLOSED);
        int64_t took = wait_closed(&d, t0);
        printf("  idle %u ms, EOF drain: closed after %lld ms\n", idle, (long long)took);
        CHECK_EQ(atomic_load(&d.r->reason), -ETIMEDOUT);
        CHECK_EQ(idle_closed(&d), 0);
        CHECK_GE(took, 3000 - 20); /* ms clocks: a tick either way */
        CHECK_LT(took, 3000 + SLACK);
        drain_end(&d);
    }
}

/* ------------------------------------------------------------ a drain asked for */

/* A graceful close asked for is bounded by its own timeout, not the idle timeout (knet.h,
 * knet_server_set_idle_timeout; before, knet.h promised "a peer that stops reading with
 * bytes queued is closed within 2 x idle_ms" for every connection): knet_conn_shutdown's
 * 3 s with an idle timeout of 300 ms, the peer never reading and never sending its FIN. */
static void test_requested_drain_and_idle(void)
{
    enum { IDLE = 300 };
    drain d;
    drain_start(&d, IDLE, false);
    int64_t t0 = tu_now_ms();
    knet_conn_shutdown(d.r->conn);
    int64_t took = wait_closed(&d, t0);
    printf("  knet_conn_shutdown, peer never reads: closed after %lld ms (idle %d ms)\n",
           (long long)took, IDLE);
    CHECK_EQ(atomic_load(&d.r->reason), -ETIMEDOUT);
    CHECK_GE(took, 3000 - 20); /* ms clocks: a tick either way */
    CHECK_LT(took, 3000 + SLACK);
    CHECK_EQ(idle_closed(&d), 0);
    drain_end(&d);
}

/* ------------------------------------------------------------ a client's EOF drain */

/* A client's connection to a peer that half-closes and never reads is closed as idle
 * (-ETIMEDOUT within 2 x idle_ms); with a short knet_client_shutdown during the drain,
 * at the shutdown's deadline. dial_and_serve returns KNET_ECLIENTCLOSED. */
static void test_client_eof_drain(void)
{
    enum { IDLE = 300 };
    for (int i = 0; i < 2; i++) {
        tu_tracker *t = tu_tracker_new();
        t->on_connect = queue_8mib;
        knet_handler h = tu_tracker_handler(t);
        int port, lfd = tu_listen(&port, 16384);
        knet_client *c = tu_client_for_port(port);
        knet_client_set_idle_timeout(c, i == 0 ? IDLE : 10000);
        tu_client tc;
        tu_client_start(&tc, c, &h, NULL);
        int peer = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        CHECK_GE(peer, 0);
        tu_rec *r = tu_tracker_rec(t, 0);
        CHECK_EQ(shutdown(peer, SHUT_WR), 0);
        WAIT_UNTIL(knet_conn_send(r->conn, "", 0) == KNET_ECLOSED);
        int64_t t0 = tu_now_ms();
        if (i == 1)
            CHECK_EQ(knet_client_shutdown(c, 100), 0);
        WAIT_UNTIL(atomic_load(&r->disconnected));
        int64_t took = tu_now_ms() - t0;
        printf("  client EOF drain %d: closed after %lld ms\n", i, (long long)took);
        CHECK_EQ(atomic_load(&r->reason), -ETIMEDOUT);
        CHECK_LT(took, i == 0 ? 2 * IDLE + SLACK : 100 + SLACK);
        if (i == 0)
            CHECK_EQ(knet_client_close(c), 0);
        CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
        knet_client_free(c);
        close(peer);
        close(lfd);
        tu_tracker_free(t);
    }
}

int main(void)
{
    tu_begin();
    RUN(test_fin_after_reading_stopped);
    RUN(test_eof_drain_then_shorter_close);
    RUN(test_eof_drain_then_longer_close);
    RUN(test_eof_drain_then_short_server_shutdown);
    RUN(test_eof_drain_then_close);
    RUN(test_idle_longer_than_drain);
    RUN(test_requested_drain_and_idle);
    RUN(test_client_eof_drain);
    return tu_end();
}
