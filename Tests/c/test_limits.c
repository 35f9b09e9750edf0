/* Server and client limits and graceful stops: knet_server_shutdown (drains, waits
 * for peers, force-closes after its timeout), max_conns, idle timeouts, stats,
 * max_queued_bytes, knet_client_shutdown. */
#include "testutil.h"

enum { MSG = 64 * 1024 };

static knet_stats stats_of(knet_server *s)
{
    knet_stats st;
    memset(&st, 0xff, sizeof st);
    knet_server_stats(s, &st);
    return st;
}

/* Reads until EOF; returns the byte count (fails on reset). */
static size_t read_all(int fd)
{
    static uint8_t buf[MSG];
    size_t got = 0;
    ssize_t r;
    while ((r = tu_read_some(fd, buf, sizeof buf)) > 0)
        got += (size_t)r;
    CHECK_EQ(r, 0);
    return got;
}

/* Server shutdown: queued bytes still go out, every peer gets EOF, and
 * listen_and_serve returns only once the peers closed. */
static void test_server_shutdown_graceful(void)
{
    tu_tracker *t = tu_tracker_new();
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, NULL);
    CHECK_GT(port, 0);
    int a = tu_connect_ex(port, 16384);
    knet_conn *ca = tu_tracker_rec(t, 0)->conn; /* a's, before b exists */
    int b = tu_connect(port);
    WAIT_GE(&t->connects, 2);
    static uint8_t buf[MSG];
    memset(buf, 'q', sizeof buf);
    for (int i = 0; i < 16; i++) /* 1 MiB the peer is not reading yet */
        CHECK_EQ(knet_conn_send(ca, buf, sizeof buf), 0);
    CHECK_EQ(knet_server_shutdown(ts.srv, TU_DEADLINE_MS), 0);
    CHECK_EQ(knet_server_shutdown(ts.srv, TU_DEADLINE_MS), KNET_ESERVERCLOSED);
    CHECK_EQ(read_all(a), 16 * MSG);
    CHECK_EQ(read_all(b), 0);
    CHECK_EQ(tu_counter_get(&ts.done), 0); /* still waiting for the peers */
    CHECK_EQ(tu_counter_get(&t->disconnects), 0);
    close(a);
    close(b);
    CHECK_EQ(tu_server_join(&ts), KNET_ESERVERCLOSED);
    CHECK_EQ(tu_counter_get(&t->disconnects), 2);
    for (int i = 0; i < 2; i++) /* each graceful close completed: the peer closed in time */
        CHECK_EQ(atomic_load(&t->recs[i].reason), 0);
    CHECK_EQ(tu_try_connect_ex(port, 0), -ECONNREFUSED);
    tu_tracker_free(t);
}

/* A peer that never closes is force-closed when the shutdown timeout runs out. */
static void test_server_shutdown_timeout(void)
{
    tu_tracker *t = tu_tracker_new();
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, NULL);
    CHECK_GT(port, 0);
    int fd = tu_connect(port);
    WAIT_GE(&t->connects, 1);
    int64_t t0 = tu_now_ms();
    CHECK_EQ(knet_server_shutdown(ts.srv, 300), 0);
    CHECK_EQ(tu_read_some(fd, (char[8]){0}, 8), 0); /* EOF; we keep our side open */
    CHECK_EQ(tu_server_join(&ts), KNET_ESERVERCLOSED);
    CHECK_GE(tu_now_ms() - t0, 240);
    CHECK_EQ(atomic_load(&t->recs[0].reason), -ETIMEDOUT);
    close(fd);
    tu_tracker_free(t);
}

/* knet_server_close after a long shutdown force-closes at once. */
static void test_server_close_after_shutdown(void)
{
    tu_tracker *t = tu_tracker_new();
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, NULL);
    CHECK_GT(port, 0);
    int fd = tu_connect(port);
    WAIT_GE(&t->connects, 1);
    CHECK_EQ(knet_server_shutdown(ts.srv, 60000), 0);
    CHECK_EQ(tu_read_some(fd, (char[8]){0}, 8), 0);
    int64_t t0 = tu_now_ms();
    CHECK_EQ(knet_server_close(ts.srv), 0);
    CHECK_EQ(knet_server_close(ts.srv), KNET_ESERVERCLOSED);
    CHECK_EQ(tu_server_join(&ts), KNET_ESERVERCLOSED);
    CHECK_LT(tu_now_ms() - t0, 5000);
    CHECK_EQ(tu_counter_get(&t->disconnects), 1);
    close(fd);
    tu_tracker_free(t);
}

/* max_conns: a connection beyond the limit is closed at once without callbacks and
 * counted as refused; once one closes, a new one is accepted. */
static void test_max_conns(void)
{
    tu_tracker *t = tu_tracker_new();
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    tu_server_init(&ts, "127.0.0.1:0", &h, NULL);
    knet_server_set_max_conns(ts.srv, 2);
    int port = tu_server_run(&ts);
    CHECK_GT(port, 0);
    int a = tu_connect(port), b = tu_connect(port);
    WAIT_GE(&t->connects, 2);
    int c = tu_connect(port); /* the handshake completes in the kernel backlog */
    EXPECT_PEER_CLOSED(c);
    close(c);
    WAIT_UNTIL(stats_of(ts.srv).refused == 1);
    CHECK_EQ(tu_counter_get(&t->connects), 2);
    close(a);
    WAIT_GE(&t->disconnects, 1);
    WAIT_UNTIL(stats_of(ts.srv).live == 1);
    int d = tu_connect(port);
    WAIT_GE(&t->connects, 3);
    knet_stats st = stats_of(ts.srv);
    CHECK_EQ(st.accepted, 3);
    CHECK_EQ(st.refused, 1);
    CHECK_EQ(st.live, 2);
    close(b);
    close(d);
    WAIT_GE(&t->disconnects, 3);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* stats: accepted/live and the bytes both ways of an echo. */
static void test_stats(void)
{
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, NULL);
    CHECK_GT(port, 0);
    knet_stats st = stats_of(ts.srv);
    CHECK_EQ(st.accepted, 0);
    CHECK_EQ(st.live, 0);
    int fd = tu_connect(port);
    static uint8_t buf[10000];
    memset(buf, 's', sizeof buf);
    tu_write_all(fd, buf, sizeof buf);
    READ_EXACT(fd, buf, sizeof buf);
    WAIT_UNTIL(stats_of(ts.srv).bytes_out == sizeof buf);
    st = stats_of(ts.srv);
    CHECK_EQ(st.bytes_in, sizeof buf);
    CHECK_EQ(st.accepted, 1);
    CHECK_EQ(st.live, 1);
    CHECK_EQ(st.refused, 0);
    CHECK_EQ(st.idle_closed, 0);
    close(fd);
    WAIT_UNTIL(stats_of(ts.srv).live == 0);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* When the tracker of test_idle_timeout saw its second (quiet) connection close. */
static tu_tracker *idle_tracker;
static _Atomic int64_t idle_quiet_closed_at;

static void idle_note_close(tu_rec *r, bool connected)
{
    if (!connected && r == &idle_tracker->recs[1])
        atomic_store(&idle_quiet_closed_at, tu_now_ms());
}

/* Idle timeout: a silent connection closes with -ETIMEDOUT (not before the
 * timeout); one with steady traffic stays open. */
static void test_idle_timeout(void)
{
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    idle_tracker = t;
    t->on_connect = idle_note_close;
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    tu_server_init(&ts, "127.0.0.1:0", &h, NULL);
    knet_server_set_idle_timeout(ts.srv, 1000);
    int port = tu_server_run(&ts);
    CHECK_GT(port, 0);

    int busy = tu_connect(port);
    WAIT_GE(&t->connects, 1);
    int64_t t0 = tu_now_ms();
    int quiet = tu_connect(port);
    WAIT_GE(&t->connects, 2);
    /* busy talks every 20 ms for 1.5 s; quiet says nothing. */
    char b;
    while (tu_now_ms() - t0 < 1500) {
        tu_write_all(busy, "x", 1);
        READ_EXACT(busy, &b, 1);
        tu_sleep_ms(20);
    }
    WAIT_GE(&t->disconnects, 1);
    /* Closed no sooner than the timeout after it connected (t0 came before that). */
    CHECK_GE(atomic_load(&idle_quiet_closed_at) - t0, 950); /* ms rounding aside */
    tu_rec *rq = &t->recs[1];
    CHECK_EQ(atomic_load(&rq->disconnected), 1);
    CHECK_EQ(atomic_load(&rq->reason), -ETIMEDOUT);
    CHECK_EQ(atomic_load(&t->recs[0].disconnected), 0);
    EXPECT_PEER_CLOSED(quiet);
    close(quiet);
    WAIT_UNTIL(stats_of(ts.srv).idle_closed == 1);
    /* Once busy falls silent it goes the same way. */
    WAIT_GE(&t->disconnects, 2);
    CHECK_EQ(atomic_load(&t->recs[0].reason), -ETIMEDOUT);
    close(busy);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* Queues MSG-byte sends on conn until one fails or limit bytes went; returns the
 * bytes queued, the failing send's result in *rc (0 when none failed). */
static size_t send_until(knet_conn *conn, size_t limit, int *rc)
{
    static uint8_t buf[MSG];
    memset(buf, 'n', sizeof buf);
    size_t sent = 0;
    *rc = 0;
    while (sent < limit && (*rc = knet_conn_send(conn, buf, sizeof buf)) == 0)
        sent += sizeof buf;
    return sent;
}

/* max_queued_bytes: one message always fits an empty queue; with the peer not
 * reading, sends stop with KNET_EPENDINGFULL; the server-wide default applies. */
static void test_max_queued_bytes(void)
{
    tu_tracker *t = tu_tracker_new();
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    tu_server_init(&ts, "127.0.0.1:0", &h, NULL);
    knet_server_set_max_queued_bytes(ts.srv, (size_t)1 << 20);
    int port = tu_server_run(&ts);
    CHECK_GT(port, 0);
    int fd = tu_connect_ex(port, 16384);
    knet_conn *conn = tu_tracker_rec(t, 0)->conn;
    int rc;
    size_t sent = send_until(conn, (size_t)256 << 20, &rc);
    CHECK_EQ(rc, KNET_EPENDINGFULL);
    static uint8_t buf[MSG];
    memset(buf, 'm', sizeof buf);
    printf("  EPENDINGFULL after %zu KiB\n", sent / 1024);
    knet_conn_set_max_queued_bytes(conn, 0); /* unlimited */
    CHECK_EQ(knet_conn_send(conn, buf, sizeof buf), 0);
    sent += sizeof buf;
    knet_conn_close_with_timeout(conn, TU_DEADLINE_MS);
    CHECK_EQ(read_all(fd), sent);
    close(fd);

    /* A fresh connection with a tiny bound still takes one big message. */
    int fd2 = tu_connect(port);
    knet_conn *c2 = tu_tracker_rec(t, 1)->conn;
    knet_conn_set_max_queued_bytes(c2, 10);
    CHECK_EQ(knet_conn_send(c2, buf, sizeof buf), 0);
    READ_EXACT(fd2, buf, sizeof buf);
    close(fd2);
    WAIT_GE(&t->disconnects, 2);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* Client shutdown: everything the client queued reaches the server, then the client
 * connection ends and dial_and_serve returns KNET_ECLIENTCLOSED. */
static void test_client_shutdown(void)
{
    tu_tracker *st = tu_tracker_new();
    knet_handler sh = tu_tracker_handler(st);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &sh, NULL);
    CHECK_GT(port, 0);
    tu_tracker *ct = tu_tracker_new();
    knet_handler ch = tu_tracker_handler(ct);
    knet_client *c = tu_client_for_port(port);
    tu_client tc;
    tu_client_start(&tc, c, &ch, NULL);
    knet_conn *conn = tu_tracker_rec(ct, 0)->conn;
    static uint8_t buf[MSG];
    memset(buf, 'c', sizeof buf);
    for (int i = 0; i < 64; i++)
        CHECK_EQ(knet_conn_send(conn, buf, sizeof buf), 0);
    CHECK_EQ(knet_client_shutdown(c, TU_DEADLINE_MS), 0);
    CHECK_EQ(knet_client_shutdown(c, TU_DEADLINE_MS), KNET_ECLIENTCLOSED);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    knet_client_free(c);
    CHECK_EQ(tu_counter_get(&ct->disconnects), 1);
    CHECK_EQ(tu_counter_get(&ct->connects), 1); /* no re-dial after shutdown */
    CHECK_EQ(atomic_load(&ct->recs[0].reason), 0);
    WAIT_GE(&st->disconnects, 1);
    CHECK_EQ(atomic_load(&st->recs[0].rx_bytes), 64 * MSG);
    CHECK_EQ(atomic_load(&st->recs[0].reason), KNET_EOF);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(st);
    tu_tracker_free(ct);
}

/* knet_client_shutdown's adjustments (knet.h): a later knet_client_close returns 0 and
 * force-closes the connection still shutting down; a timeout of 0 counts as 1 ms (a
 * graceful close that times out, not a close). The peer never closes. */
static void client_shutdown_silent_peer(uint32_t timeout_ms, bool then_close, int want_reason)
{
    tu_tracker *ct = tu_tracker_new();
    tu_client tc;
    int lfd, peer;
    knet_client *c = tu_client_to_plain(&tc, ct, 0, &lfd, &peer);
    CHECK_EQ(knet_client_shutdown(c, timeout_ms), 0);
    if (then_close)
        CHECK_EQ(knet_client_close(c), 0);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    CHECK_EQ(tu_counter_get(&ct->disconnects), 1);
    CHECK_EQ(atomic_load(&ct->recs[0].reason), want_reason);
    knet_client_free(c);
    close(peer);
    close(lfd);
    tu_tracker_free(ct);
}

static void test_client_shutdown_adjustments(void)
{
    client_shutdown_silent_peer(600000, true, KNET_ECLIENTCLOSED); /* not 10 min */
    client_shutdown_silent_peer(0, false, -ETIMEDOUT);
}

/* A client's idle timeout ends a silent connection; the persistent client re-dials. */
static void test_client_idle_timeout(void)
{
    tu_tracker *st = tu_tracker_new();
    knet_handler sh = tu_tracker_handler(st);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &sh, NULL);
    CHECK_GT(port, 0);
    tu_tracker *ct = tu_tracker_new();
    knet_handler ch = tu_tracker_handler(ct);
    knet_client *c = tu_client_for_port(port);
    knet_client_set_idle_timeout(c, 200);
    tu_client tc;
    tu_client_start(&tc, c, &ch, NULL);
    WAIT_GE(&ct->disconnects, 1);
    CHECK_EQ(atomic_load(&ct->recs[0].reason), -ETIMEDOUT);
    WAIT_GE(&ct->connects, 2);
    CHECK_EQ(knet_client_close(c), 0);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    knet_client_free(c);
    WAIT_UNTIL(tu_counter_get(&st->disconnects) == tu_counter_get(&st->connects));
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(st);
    tu_tracker_free(ct);
}

/* The client's idle timeout and queue bound apply to the connections it dials after
 * they are set: the current one keeps the defaults (no idle close, a 64 MiB bound),
 * the next one gets both. The peer is a plain socket that never reads. */
static void test_client_limits_from_next_dial(void)
{
    enum { IDLE_MS = 800 };
    tu_tracker *ct = tu_tracker_new();
    tu_client tc;
    int lfd, fd1;
    knet_client *c = tu_client_to_plain(&tc, ct, 16384, &lfd, &fd1);
    knet_conn *c1 = tu_tracker_rec(ct, 0)->conn;
    knet_client_set_idle_timeout(c, IDLE_MS);
    knet_client_set_max_queued_bytes(c, (size_t)1 << 20);

    /* The current connection: 24 MiB queue (far past 1 MiB plus the kernel's
     * buffers), and it outlives the idle timeout with nothing moving. */
    int rc;
    CHECK_EQ(send_until(c1, (size_t)24 << 20, &rc), (size_t)24 << 20);
    CHECK_EQ(rc, 0);
    tu_sleep_ms(2 * IDLE_MS + 400); /* observing that nothing happens */
    CHECK_EQ(tu_counter_get(&ct->disconnects), 0);
    tu_set_linger0(fd1);
    close(fd1);

    /* The re-dialed connection: the send stops at the new bound, then the idle
     * timeout ends it. */
    int fd2 = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    CHECK_GE(fd2, 0);
    knet_conn *c2 = tu_tracker_rec(ct, 1)->conn;
    size_t sent = send_until(c2, (size_t)16 << 20, &rc);
    CHECK_EQ(rc, KNET_EPENDINGFULL);
    printf("  next connection: KNET_EPENDINGFULL after %zu KiB\n", sent / 1024);
    WAIT_GE(&ct->disconnects, 2);
    CHECK_NE(atomic_load(&ct->recs[0].reason), -ETIMEDOUT);
    CHECK_EQ(atomic_load(&ct->recs[1].reason), -ETIMEDOUT);
    CHECK_EQ(knet_client_close(c), 0);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    knet_client_free(c);
    close(fd2);
    close(lfd);
    tu_tracker_free(ct);
}

int main(void)
{
    tu_begin();
    RUN(test_server_shutdown_graceful);
    RUN(test_server_shutdown_timeout);
    RUN(test_server_close_after_shutdown);
    RUN(test_max_conns);
    RUN(test_stats);
    RUN(test_idle_timeout);
    RUN(test_max_queued_bytes);
    RUN(test_client_shutdown);
    RUN(test_client_shutdown_adjustments);
    RUN(test_client_idle_timeout);
    RUN(test_client_limits_from_next_dial);
    return tu_end();
}
