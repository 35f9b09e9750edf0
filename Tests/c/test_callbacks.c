/* Callback order and thread: connect(true) first, then receives, then exactly one
 * connect(false); all on one loop thread that is not the thread blocked in
 * listen_and_serve / dial_and_serve; never nested (a close inside a callback
 * delivers connect(false) after it returns), for many connections at once.
 * The tracker handler in testutil.h checks order, thread and nesting inline. */
#include "testutil.h"

enum { CONNS = 64, ROUNDS = 5 };

/* 64 plain peers at once: every connection's callbacks in order on one loop thread;
 * the loops share the connections; the serving thread runs none of them. */
static void test_many_connections(void)
{
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, NULL);
    CHECK_GT(port, 0);

    int fds[CONNS];
    for (int i = 0; i < CONNS; i++)
        fds[i] = tu_connect(port);
    WAIT_GE(&t->connects, CONNS);
    for (int round = 0; round < ROUNDS; round++) {
        for (int i = 0; i < CONNS; i++) {
            char msg[32];
            int n = snprintf(msg, sizeof msg, "c%d r%d", i, round);
            tu_write_all(fds[i], msg, (size_t)n);
        }
        for (int i = 0; i < CONNS; i++) {
            char want[32], got[32];
            int n = snprintf(want, sizeof want, "c%d r%d", i, round);
            READ_EXACT(fds[i], got, (size_t)n);
            CHECK(memcmp(got, want, (size_t)n) == 0);
        }
    }
    for (int i = 0; i < CONNS; i++)
        close(fds[i]);
    WAIT_GE(&t->disconnects, CONNS);

    pthread_t loops[CONNS];
    int nloops = 0;
    long bytes = 0;
    for (int i = 0; i < CONNS; i++) {
        tu_rec *r = &t->recs[i];
        CHECK_EQ(atomic_load(&r->connected), 1);
        CHECK_EQ(atomic_load(&r->disconnected), 1);
        CHECK_EQ(atomic_load(&r->reason), KNET_EOF);
        CHECK(!pthread_equal(r->thread, ts.thread));
        CHECK(!pthread_equal(r->thread, pthread_self()));
        bytes += atomic_load(&r->rx_bytes);
        int j = 0;
        while (j < nloops && !pthread_equal(loops[j], r->thread))
            j++;
        if (j == nloops)
            loops[nloops++] = r->thread;
    }
    CHECK_GT(bytes, 0);
    CHECK_EQ(bytes, tu_counter_get(&t->bytes));
    CHECK_LE(nloops, (int)knet_loop_threads());
    if (knet_loop_threads() > 1)
        CHECK_GT(nloops, 1); /* 64 connections are spread over the loops */
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    /* Closing the server delivers nothing more. */
    CHECK_EQ(tu_counter_get(&t->connects), CONNS);
    CHECK_EQ(tu_counter_get(&t->disconnects), CONNS);
    CHECK_EQ(atomic_load(&t->send_errors), 0);
    tu_tracker_free(t);
}

/* Client side: callbacks on a loop thread, not the dial_and_serve thread, in order. */
static void test_client_callbacks(void)
{
    tu_tracker *st = tu_tracker_new();
    st->echo = true;
    knet_handler sh = tu_tracker_handler(st);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &sh, NULL);
    CHECK_GT(port, 0);

    tu_tracker *ct = tu_tracker_new();
    knet_handler ch = tu_tracker_handler(ct);
    knet_client *cli = tu_client_for_port(port);
    tu_client tc;
    tu_client_start(&tc, cli, &ch, NULL);
    tu_rec *cr = tu_tracker_rec(ct, 0);
    CHECK_EQ(knet_conn_send(cr->conn, "ping", 4), 0);
    WAIT_GE(&ct->bytes, 4);
    CHECK_EQ(knet_client_close(cli), 0);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    knet_client_free(cli);
    /* dial_and_serve returned: connect(false) was already delivered. */
    CHECK_EQ(tu_counter_get(&ct->disconnects), 1);
    CHECK_EQ(atomic_load(&cr->reason), KNET_ECLIENTCLOSED);
    CHECK(!pthread_equal(cr->thread, tc.thread));
    CHECK(!pthread_equal(cr->thread, pthread_self()));
    WAIT_GE(&st->disconnects, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(st);
    tu_tracker_free(ct);
}

/* Hook: closes from inside connect(true) and marks that the close call returned. */
static void close_in_connect(tu_rec *r, bool connected)
{
    if (connected) {
        knet_conn_close(r->conn);
        /* connect(false) must not have run inside knet_conn_close. */
        CHECK_EQ(atomic_load(&r->disconnected), 0);
        atomic_store(&r->flag, 1);
    } else {
        CHECK_EQ(atomic_load(&r->flag), 1);
    }
}

/* close inside connect(true): connect(false) follows after it returns; no receive. */
static void test_close_inside_connect(void)
{
    tu_tracker *t = tu_tracker_new();
    t->on_connect = close_in_connect;
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, NULL);
    CHECK_GT(port, 0);
    for (int i = 0; i < 8; i++) {
        int fd = tu_connect(port);
        /* The close may already have reset the socket: a failed send is fine here. */
        static const char data[] = "data that must not be delivered";
        (void)send(fd, data, sizeof data - 1, MSG_NOSIGNAL);
        WAIT_GE(&t->disconnects, i + 1);
        EXPECT_PEER_CLOSED(fd);
        close(fd);
    }
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    for (int i = 0; i < 8; i++) {
        CHECK_EQ(atomic_load(&t->recs[i].reason), 0);
        CHECK_EQ(atomic_load(&t->recs[i].rx_msgs), 0);
    }
    tu_tracker_free(t);
}

/* Hook: closes on the first message and checks it was not nested. */
static void close_in_receive(tu_rec *r, const void *buf, size_t len)
{
    (void)buf;
    (void)len;
    knet_conn_close(r->conn);
    CHECK_EQ(atomic_load(&r->disconnected), 0);
    atomic_store(&r->flag, 1);
}

static void check_flag_on_disconnect(tu_rec *r, bool connected)
{
    if (!connected)
        CHECK_EQ(atomic_load(&r->flag), 1);
}

/* close inside receive: connect(false) after the callback returns; the frames that
 * were already read in the same batch are not delivered after the close. */
static void test_close_inside_receive(void)
{
    tu_tracker *t = tu_tracker_new();
    t->on_receive = close_in_receive;
    t->on_connect = check_flag_on_disconnect;
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, &knet_std_codec);
    CHECK_GT(port, 0);
    int fd = tu_connect(port);
    uint8_t wire[5 * 3];
    for (int i = 0; i < 5; i++) {
        tu_put_len(wire + 3 * i, 1, 2, false);
        wire[3 * i + 2] = (uint8_t)i;
    }
    tu_write_all(fd, wire, sizeof wire); /* five frames in one segment */
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&t->recs[0].rx_msgs), 1);
    CHECK_EQ(atomic_load(&t->recs[0].reason), 0);
    EXPECT_PEER_CLOSED(fd);
    close(fd);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    CHECK_EQ(tu_counter_get(&t->msgs), 1);
    tu_tracker_free(t);
}

int main(void)
{
    tu_begin();
    RUN(test_many_connections);
    RUN(test_client_callbacks);
    RUN(test_close_inside_connect);
    RUN(test_close_inside_receive);
    return tu_end();
}
