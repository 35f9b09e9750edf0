/* Re-entrancy from callbacks with more loop threads than cores (8): a callback that
 * closes another loop's connection, its own server or client, sets the loop count,
 * sends or sets userdata in connect(false); a server closed from a callback while
 * connections on every loop are mid-transfer (every connect(false) exactly once, no fd
 * or thread left behind); what a send right after knet_server_close or
 * knet_server_shutdown returns; and the blocking serve calls made from a callback. */
#include "testutil.h"

#include <fcntl.h>

#define LOOPS 8

/* Threads of this process. */
static int thread_count(void)
{
    return tu_dir_count("/proc/self/task");
}

/* Waits (bounded) until the thread count is back to baseline. */
static void check_threads(int baseline)
{
    int64_t end = tu_now_ms() + TU_DEADLINE_MS;
    int n;
    while ((n = thread_count()) != baseline) {
        if (tu_now_ms() > end) {
            fprintf(stderr, "FAILED: %d threads, baseline %d\n", n, baseline);
            abort();
        }
        tu_sleep_ms(2);
    }
}

/* ------------------------------------------------------------------ set_loop_threads, connect(false) */

static atomic_int in_cb_set_threads_rc = 1, in_cb_loop_threads;
static atomic_int disc_send_rc = 1;
static atomic_int disc_userdata_ok;

static void hook_misc(tu_rec *r, bool connected)
{
    if (connected) {
        atomic_store(&in_cb_set_threads_rc, knet_set_loop_threads(2));
        atomic_store(&in_cb_loop_threads, (int)knet_loop_threads());
        return;
    }
    /* connect(false): the connection is closed, a send says so; userdata still works. */
    atomic_store(&disc_send_rc, knet_conn_send(r->conn, "x", 1));
    int marker;
    knet_conn_set_userdata(r->conn, &marker);
    atomic_store(&disc_userdata_ok, knet_conn_userdata(r->conn) == &marker);
    knet_conn_set_userdata(r->conn, r); /* the tracker reads it back in connect(false) */
}

static void test_loop_threads_and_disconnect_calls(void)
{
    tu_tracker *t = tu_tracker_new();
    t->on_connect = hook_misc;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int fd = tu_connect(port);
    WAIT_GE(&t->connects, 1);
    CHECK_EQ(atomic_load(&in_cb_set_threads_rc), KNET_EBUSY);
    CHECK_EQ(atomic_load(&in_cb_loop_threads), LOOPS);
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&disc_send_rc), KNET_ECLOSED);
    CHECK_EQ(atomic_load(&disc_userdata_ok), 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* ------------------------------------------------------------------ close another loop's conn */

static atomic_int other_send_rc = 1, self_send_rc = 1;

/* On "x" from connection 0: close connection 1 (on another loop), send on it, then
 * shut down connection 0 and send on it. */
static void hook_close_other(tu_rec *r, const void *buf, size_t len)
{
    (void)buf;
    (void)len;
    if (r->index != 0)
        return;
    tu_rec *other = &r->tr->recs[1];
    knet_conn_close(other->conn);
    atomic_store(&other_send_rc, knet_conn_send(other->conn, "y", 1));
    knet_conn_shutdown(r->conn);
    atomic_store(&self_send_rc, knet_conn_send(r->conn, "z", 1));
}

static void test_close_other_loop_conn_from_callback(void)
{
    tu_tracker *t = tu_tracker_new();
    t->on_receive = hook_close_other;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int a = tu_connect(port);
    WAIT_GE(&t->connects, 1);
    int b = tu_connect(port);
    WAIT_GE(&t->connects, 2);
    /* Round robin over 8 loops: consecutive connections are on different loops. */
    CHECK(!pthread_equal(tu_tracker_rec(t, 0)->thread, tu_tracker_rec(t, 1)->thread));
    tu_write_str(a, "x");
    WAIT_UNTIL(atomic_load(&self_send_rc) != 1); /* the hook finished */
    WAIT_UNTIL(atomic_load(&t->recs[1].disconnected) == 1);
    CHECK_EQ(atomic_load(&other_send_rc), KNET_ECLOSED);
    CHECK_EQ(atomic_load(&self_send_rc), KNET_ECLOSED);
    CHECK_EQ(atomic_load(&t->recs[1].reason), 0);
    EXPECT_PEER_CLOSED(b); /* b was closed at once */
    EXPECT_PEER_CLOSED(a); /* a half-closed: FIN, no "z" */
    close(a);
    close(b);
    WAIT_UNTIL(atomic_load(&t->recs[0].disconnected) == 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* ------------------------------------------------------------------ close own client in a callback */

static _Atomic(knet_client *) client_to_close;
static atomic_int client_send_after_close_rc = 1;

static void hook_close_client(tu_rec *r, bool connected)
{
    if (!connected)
        return;
    CHECK_EQ(knet_client_close(atomic_load(&client_to_close)), 0);
    atomic_store(&client_send_after_close_rc, knet_conn_send(r->conn, "late", 4));
}

static void test_client_close_in_callback_then_send(void)
{
    tu_tracker *st = tu_tracker_new(), *ct = tu_tracker_new();
    ct->on_connect = hook_close_client;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, st, NULL);
    knet_client *cli = tu_client_for_port(port);
    atomic_store(&client_to_close, cli);
    knet_handler h = tu_tracker_handler(ct);
    tu_client tc;
    tu_client_start(&tc, cli, &h, NULL);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    CHECK_EQ(atomic_load(&client_send_after_close_rc), KNET_ECLOSED);
    CHECK_EQ(tu_counter_get(&ct->disconnects), 1);
    CHECK_EQ(atomic_load(&ct->recs[0].reason), KNET_ECLIENTCLOSED);
    knet_client_free(cli);
    WAIT_GE(&st->disconnects, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(st);
    tu_tracker_free(ct);
}

/* ------------------------------------------------------------------ server close mid-transfer */

#define PLAIN 48   /* plain peers that write and never read */
#define KCLIENTS 16 /* knet clients that flood the echo server */
#define CHUNK 16384

static _Atomic(knet_server *) midx_server;
static atomic_long midx_bytes;
static atomic_int midx_closes;

/* Server receive: after 8 MiB in total, close the server from this callback. */
static void hook_midx_server(tu_rec *r, const void *buf, size_t len)
{
    (void)r;
    (void)buf;
    if (atomic_fetch_add(&midx_bytes, (long)len) + (long)len >= (8L << 20) &&
        atomic_fetch_add(&midx_closes, 1) == 0)
        CHECK_EQ(knet_server_close(atomic_load(&midx_server)), 0);
}

static uint8_t flood[CHUNK];

/* Client: floods in connect(true) and on every echo. */
static void hook_midx_client_connect(tu_rec *r, bool connected)
{
    if (connected)
        for (int i = 0; i < 4; i++)
            knet_conn_send(r->conn, flood, sizeof flood);
}

static void hook_midx_client_receive(tu_rec *r, const void *buf, size_t len)
{
    (void)buf;
    (void)len;
    knet_conn_send(r->conn, flood, sizeof flood);
}

static void test_server_close_mid_transfer_every_loop(void)
{
    int threads0 = thread_count();
    atomic_store(&midx_bytes, 0);
    atomic_store(&midx_closes, 0);
    tu_tracker *st = tu_tracker_new(), *ct = tu_tracker_new();
    st->echo = true;
    st->on_receive = hook_midx_server;
    ct->on_connect = hook_midx_client_connect;
    ct->on_receive = hook_midx_client_receive;
    tu_server ts;
    tu_server_init(&ts, "127.0.0.1:0", NULL, NULL);
    ts.handler = tu_tracker_handler(st);
    atomic_store(&midx_server, ts.srv);
    int port = tu_server_run(&ts);
    CHECK_GT(port, 0);

    int peers[PLAIN];
    for (int i = 0; i < PLAIN; i++) {
        peers[i] = tu_connect_ex(port, 4096);
        CHECK_EQ(fcntl(peers[i], F_SETFL, O_NONBLOCK), 0);
    }
    WAIT_GE(&st->connects, PLAIN);
    tu_client tcs[KCLIENTS];
    knet_client *clis[KCLIENTS];
    knet_handler ch = tu_tracker_handler(ct);
    for (int i = 0; i < KCLIENTS; i++) {
        clis[i] = tu_client_for_port(port);
        tu_client_start(&tcs[i], clis[i], &ch, NULL);
    }
    /* Plain peers write until the server's echoes back up (they never read). */
    static uint8_t junk[CHUNK];
    int64_t end = tu_now_ms() + TU_DEADLINE_MS;
    while (atomic_load(&midx_closes) == 0) {
        CHECK(tu_now_ms() < end);
        for (int i = 0; i < PLAIN; i++) {
            ssize_t w = send(peers[i], junk, sizeof junk, MSG_NOSIGNAL);
            CHECK(w > 0 || errno == EAGAIN || errno == EPIPE || errno == ECONNRESET);
        }
    }
    CHECK_EQ(tu_server_join(&ts), KNET_ESERVERCLOSED);
    /* Every connection that got connect(true) got exactly one connect(false) (the
     * tracker aborts on a second one), all with the server's close reason. */
    long n = tu_counter_get(&st->connects);
    CHECK_EQ(tu_counter_get(&st->disconnects), n);
    for (long i = 0; i < n; i++) {
        int why = atomic_load(&st->recs[i].reason);
        CHECK(why == KNET_ESERVERCLOSED || why == KNET_EOF || why == -ECONNRESET);
    }
    /* The clients see the close, re-dial, are refused (retry off) and return. */
    for (int i = 0; i < KCLIENTS; i++) {
        int rc = tu_client_join(&tcs[i]);
        CHECK(rc == -ECONNREFUSED || rc == -ECONNRESET);
        knet_client_free(clis[i]);
    }
    CHECK_EQ(tu_counter_get(&ct->disconnects), tu_counter_get(&ct->connects));
    for (int i = 0; i < PLAIN; i++) { /* unread echoes first, then EOF or a reset */
        CHECK_EQ(fcntl(peers[i], F_SETFL, 0), 0);
        tu_set_timeouts(peers[i]);
        ssize_t r;
        while ((r = tu_read_some(peers[i], junk, sizeof junk)) > 0) {
        }
        CHECK(r == 0 || r == -ECONNRESET);
        close(peers[i]);
    }
    printf("  %ld server conns, %ld client conns, %ld bytes in before the close\n", n,
           tu_counter_get(&ct->connects), atomic_load(&midx_bytes));
    tu_tracker_free(st);
    tu_tracker_free(ct);
    check_threads(threads0);
}

/* ------------------------------------------------------------------ send after server close */

static _Atomic(knet_server *) close_then_send_server;
static atomic_int send_after_server_close_rc = 1;
static bool close_gracefully;

static void hook_close_server_then_send(tu_rec *r, const void *buf, size_t len)
{
    (void)buf;
    (void)len;
    knet_server *s = atomic_load(&close_then_send_server);
    CHECK_EQ(close_gracefully ? knet_server_shutdown(s, 5000) : knet_server_close(s), 0);
    /* The close reaches this connection after this callback; a send accepted now
     * would be dropped (before: 0, and 2.8 of these 16 MiB reached the peer). */
    static uint8_t big[16 << 20];
    atomic_store(&send_after_server_close_rc, knet_conn_send(r->conn, big, sizeof big));
}

/* A send right after knet_server_close (or _shutdown) returned, in a callback of
 * one of its connections, fails with KNET_ECLOSED and puts nothing on the wire. */
static void send_after_server_stop(bool graceful)
{
    close_gracefully = graceful;
    atomic_store(&send_after_server_close_rc, 1);
    tu_tracker *t = tu_tracker_new();
    t->on_receive = hook_close_server_then_send;
    tu_server ts;
    tu_server_init(&ts, "127.0.0.1:0", NULL, NULL);
    ts.handler = tu_tracker_handler(t);
    atomic_store(&close_then_send_server, ts.srv);
    int port = tu_server_run(&ts);
    CHECK_GT(port, 0);
    int fd = tu_connect_ex(port, 4096);
    WAIT_GE(&t->connects, 1);
    tu_write_str(fd, "go");
    /* Until the server's close (or FIN) ends the stream; then the peer closes, which
     * ends a graceful shutdown before its timeout. */
    static uint8_t b[1 << 16];
    long got = 0;
    ssize_t r;
    while ((r = tu_read_some(fd, b, sizeof b)) > 0)
        got += r;
    close(fd);
    CHECK_EQ(tu_server_join(&ts), KNET_ESERVERCLOSED);
    printf("  a 16 MiB send right after knet_server_%s (same callback) returned %d; the "
           "peer read %ld bytes, then %zd\n", graceful ? "shutdown" : "close",
           atomic_load(&send_after_server_close_rc), got, r);
    tu_tracker_free(t);
    CHECK_EQ(atomic_load(&send_after_server_close_rc), KNET_ECLOSED);
    CHECK_EQ(got, 0);
}

static void test_send_after_server_close_in_callback(void)
{
    send_after_server_stop(false);
    send_after_server_stop(true);
}

/* ------------------------------------------------------------------ blocking calls in a callback */

/* knet_client_dial_and_serve and knet_server_listen_and_serve wait for work a loop
 * does; on a loop thread that loop may be the caller's own (before: with 1 loop of 8
 * the dialed connection's connect(true) ran nested in the caller and the loop hung
 * for good; a listener on the caller's loop never listened, nor returned after a
 * close). Both are refused at once with -EDEADLK, and wait_listening reports it. */
static atomic_int dial_in_cb_rc = 1, listen_in_cb_rc = 1;
static _Atomic(knet_client *) cb_client;
static _Atomic(knet_server *) cb_server;

static void hook_blocking_calls(tu_rec *r, bool connected)
{
    (void)r;
    if (!connected)
        return;
    atomic_store(&dial_in_cb_rc, knet_client_dial_and_serve(atomic_load(&cb_client), NULL, NULL));
    atomic_store(&listen_in_cb_rc, knet_server_listen_and_serve(atomic_load(&cb_server), NULL, NULL));
}

static void test_blocking_calls_in_callback_refused(void)
{
    tu_tracker *t = tu_tracker_new();
    t->on_connect = hook_blocking_calls;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    knet_client *cli = tu_client_for_port(port);
    knet_server *srv = knet_server_new("127.0.0.1:0");
    CHECK(srv != NULL);
    atomic_store(&cb_client, cli);
    atomic_store(&cb_server, srv);
    /* Every loop in turn (round robin): each is refused, whichever loop it is. */
    for (int i = 0; i < LOOPS; i++) {
        atomic_store(&dial_in_cb_rc, 1);
        atomic_store(&listen_in_cb_rc, 1);
        int fd = tu_connect(port);
        WAIT_GE(&t->connects, i + 1);
        CHECK_EQ(atomic_load(&dial_in_cb_rc), -EDEADLK);
        CHECK_EQ(atomic_load(&listen_in_cb_rc), -EDEADLK);
        close(fd);
        WAIT_GE(&t->disconnects, i + 1);
    }
    CHECK_EQ(knet_server_wait_listening(srv, 1000), -EDEADLK);
    CHECK_EQ(knet_server_port(srv), -EDEADLK);
    /* Refused, not spent: both serve from a thread of their own afterwards (the
     * port is polled: a wait could see the refusal before the new call resets it). */
    tu_tracker *it = tu_tracker_new();
    it->echo = true;
    knet_handler ih = tu_tracker_handler(it);
    tu_server inner;
    tu_server_init(&inner, "127.0.0.1:0", &ih, NULL);
    knet_server_free(inner.srv);
    inner.srv = srv;
    CHECK_EQ(pthread_create(&inner.thread, NULL, tu_server_main, &inner), 0);
    WAIT_UNTIL(knet_server_port(srv) > 0);
    knet_client_free(cli);
    cli = tu_client_for_port(knet_server_port(srv));
    tu_tracker *ct = tu_tracker_new();
    knet_handler ch = tu_tracker_handler(ct);
    tu_client tc;
    tu_client_start(&tc, cli, &ch, NULL);
    CHECK_EQ(knet_conn_send(tu_tracker_rec(ct, 0)->conn, "ok", 2), 0);
    WAIT_GE(&ct->bytes, 2);
    CHECK_EQ(knet_client_close(cli), 0);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    knet_client_free(cli);
    WAIT_GE(&it->disconnects, 1);
    CHECK_EQ(tu_server_stop(&inner), KNET_ESERVERCLOSED);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
    tu_tracker_free(it);
    tu_tracker_free(ct);
}

int main(void)
{
    CHECK_EQ(knet_set_loop_threads(LOOPS), 0);
    tu_begin();
    RUN(test_loop_threads_and_disconnect_calls);
    RUN(test_close_other_loop_conn_from_callback);
    RUN(test_client_close_in_callback_then_send);
    RUN(test_server_close_mid_transfer_every_loop);
    RUN(test_send_after_server_close_in_callback);
    RUN(test_blocking_calls_in_callback_refused);
    return tu_end();
}
