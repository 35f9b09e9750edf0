/* What a callback or another thread asks for while the one loop thread is busy
 * must hold when the loop gets to it. Each test holds the loop in a second
 * connection's receive (the holder) while it sets the scene for the connection
 * under test (the first one accepted), then lets the loop go:
 *  - a graceful close asked for in receive, when the same read loop then reads
 *    the peer's FIN (exactly one read's worth before it: the handler's 1 KiB read
 *    buffer, knet_conn_set_alloc);
 *  - a close asked for in receive, when the same event also made the socket
 *    writable: nothing more of the queue is written;
 *  - sends from another thread meet the queued-bytes bound with framed sizes;
 *  - urgent data (MSG_OOB) with bytes after it: the read that stops short at the
 *    mark does not end the edge-triggered event's reading;
 *  - a close, then a server shutdown, of a connection with bytes queued: the close
 *    wins, the queue is dropped. */
#include "testutil.h"

#define READ_CAP 1024

typedef enum {
    MODE_GRACEFUL_THEN_FIN,
    MODE_CLOSE_WITH_EPOLLOUT,
    MODE_FRAMED_BOUND,
    MODE_URGENT,
    MODE_CLOSE_THEN_SHUTDOWN
} test_mode;

static test_mode mode;
static tu_counter connects, holding, go, closed;
static knet_conn *_Atomic target; /* the first connection: the one under test */
static _Atomic int target_reason, receives;
static knet_server *_Atomic server;
static _Atomic uint64_t out_at_close; /* the server's bytes_out when receive closed */
static char rbuf[READ_CAP];
static tu_counter got; /* MODE_URGENT: bytes the target received, kept in gotbuf */
static char gotbuf[16];

static void *small_alloc(knet_conn *c, size_t suggested, size_t *cap, void *ud)
{
    (void)c, (void)suggested, (void)ud;
    *cap = READ_CAP;
    return rbuf;
}

static uint64_t bytes_out(void)
{
    knet_stats st;
    knet_server_stats(atomic_load(&server), &st);
    return st.bytes_out;
}

static void on_connect(knet_conn *c, bool connected, void *ud)
{
    (void)ud;
    if (connected) {
        knet_conn *none = NULL;
        if (atomic_compare_exchange_strong(&target, &none, c) && mode == MODE_GRACEFUL_THEN_FIN)
            CHECK_EQ(knet_conn_set_alloc(c, small_alloc, NULL), 0);
        tu_counter_add(&connects, 1);
    } else if (c == atomic_load(&target)) {
        atomic_store(&target_reason, knet_conn_close_reason(c));
        tu_counter_add(&closed, 1);
    }
}

static void on_receive(knet_conn *c, const void *buf, size_t len, void *ud)
{
    (void)ud;
    if (c != atomic_load(&target)) { /* the holder: keep the loop until released */
        tu_counter_add(&holding, 1);
        CHECK(tu_counter_wait_ge(&go, 1, TU_DEADLINE_MS));
        return;
    }
    if (mode == MODE_URGENT) {
        long at = tu_counter_get(&got);
        CHECK_LE((size_t)at + len, sizeof gotbuf);
        memcpy(gotbuf + at, buf, len);
        tu_counter_add(&got, (long)len);
        return;
    }
    if (atomic_fetch_add(&receives, 1) > 0)
        return;
    if (mode == MODE_GRACEFUL_THEN_FIN) {
        CHECK_EQ(len, (size_t)READ_CAP); /* one full read, so the loop reads again: the FIN */
        knet_conn_close_with_timeout(c, 30000);
    } else if (mode == MODE_CLOSE_WITH_EPOLLOUT) {
        atomic_store(&out_at_close, bytes_out());
        knet_conn_close(c);
    }
}

/* Starts the server (one loop) and connects the peer under test; returns it. */
static int setup(tu_server *ts, test_mode m, const knet_codec *codec)
{
    mode = m;
    tu_counter_init(&connects);
    tu_counter_init(&holding);
    tu_counter_init(&go);
    tu_counter_init(&closed);
    tu_counter_init(&got);
    atomic_store(&target, NULL);
    atomic_store(&target_reason, 1);
    atomic_store(&receives, 0);
    knet_handler h = {on_connect, on_receive, NULL};
    int port = tu_server_start(ts, "127.0.0.1:0", &h, codec);
    CHECK_GT(port, 0);
    atomic_store(&server, ts->srv);
    int peer = tu_connect(port);
    WAIT_GE(&connects, 1);
    return peer;
}

/* Connects the holder and waits until the loop thread is held in its receive. */
static int hold_loop(const tu_server *ts)
{
    int holder = tu_connect(ts->port);
    WAIT_GE(&connects, 2);
    if (mode == MODE_FRAMED_BOUND)
        tu_write_all(holder, "\0\1h", 3); /* one std-codec frame */
    else
        tu_write_str(holder, "h");
    WAIT_GE(&holding, 1);
    return holder;
}

static void teardown(tu_server *ts, int peer, int holder)
{
    close(peer);
    close(holder);
    CHECK_EQ(tu_server_stop(ts), KNET_ESERVERCLOSED);
    tu_counter_destroy(&connects);
    tu_counter_destroy(&holding);
    tu_counter_destroy(&go);
    tu_counter_destroy(&closed);
    tu_counter_destroy(&got);
}

static void test_graceful_close_in_receive_then_fin(void)
{
    tu_server ts;
    int peer = setup(&ts, MODE_GRACEFUL_THEN_FIN, NULL);
    int holder = hold_loop(&ts);
    char data[READ_CAP];
    tu_pattern_fill(data, sizeof data, 0, 3);
    tu_write_all(peer, data, sizeof data);
    CHECK_EQ(shutdown(peer, SHUT_WR), 0); /* on loopback both are queued at the server now */
    tu_counter_add(&go, 1);

    WAIT_GE(&closed, 1);
    /* The close asked for in receive, not the peer's FIN, ends the connection. */
    CHECK_EQ(atomic_load(&target_reason), 0);
    CHECK_EQ(atomic_load(&receives), 1);
    char b;
    CHECK_EQ(tu_read_full(peer, &b, 1), 0); /* the server's FIN, nothing else */
    teardown(&ts, peer, holder);
}

static void test_close_in_receive_writes_no_more(void)
{
    tu_server ts;
    int peer = setup(&ts, MODE_CLOSE_WITH_EPOLLOUT, NULL);
    /* More than the kernel holds: the rest stays queued, EPOLLOUT armed. */
    size_t n = (size_t)32 << 20;
    char *big = malloc(n);
    CHECK(big != NULL);
    memset(big, 'q', n);
    CHECK_EQ(knet_conn_send(atomic_load(&target), big, n), 0);
    free(big);
    WAIT_UNTIL(bytes_out() > 0);
    int holder = hold_loop(&ts); /* after the flush that filled the socket */
    /* Drain what the kernel holds, so the server's socket is writable again... */
    char buf[65536];
    ssize_t r;
    while ((r = recv(peer, buf, sizeof buf, MSG_DONTWAIT)) > 0) {
    }
    CHECK(r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK));
    tu_write_str(peer, "c"); /* ...and readable: one event with both */
    tu_counter_add(&go, 1);

    WAIT_GE(&closed, 1);
    CHECK_EQ(atomic_load(&target_reason), 0);
    /* Nothing was written after the close: it dropped the queue. */
    CHECK_EQ(bytes_out(), atomic_load(&out_at_close));
    teardown(&ts, peer, holder);
}

static void test_framed_bytes_meet_the_bound(void)
{
    tu_server ts;
    int peer = setup(&ts, MODE_FRAMED_BOUND, &knet_std_codec); /* a 2-byte prefix */
    knet_conn *c = atomic_load(&target);
    knet_conn_set_max_queued_bytes(c, 103);
    int holder = hold_loop(&ts); /* nothing is written meanwhile: all stays queued */
    char body[50];
    tu_pattern_fill(body, sizeof body, 0, 5);
    CHECK_EQ(knet_conn_send(c, body, sizeof body), 0);                /* 52 queued */
    CHECK_EQ(knet_conn_send(c, body, sizeof body), KNET_EPENDINGFULL); /* 104 > 103 */
    CHECK_EQ(knet_conn_send(c, body, 49), 0);                         /* 103 */
    tu_counter_add(&go, 1);
    uint8_t got[2 + 50 + 2 + 49];
    READ_EXACT(peer, got, sizeof got);
    CHECK_EQ(got[0], 0);
    CHECK_EQ(got[1], 50);
    CHECK_EQ(tu_pattern_mismatch(got + 2, 50, 0, 5), 50u);
    CHECK_EQ(got[52], 0);
    CHECK_EQ(got[53], 49);
    CHECK_EQ(tu_pattern_mismatch(got + 54, 49, 0, 5), 49u);
    teardown(&ts, peer, holder);
}

static void test_urgent_data_then_more(void)
{
    tu_server ts;
    int peer = setup(&ts, MODE_URGENT, NULL);
    int holder = hold_loop(&ts); /* both sends below wait for one event */
    int one = 1; /* no Nagle: "def" must not wait for the ACK of "abc" */
    CHECK_EQ(setsockopt(peer, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one), 0);
    CHECK_EQ(send(peer, "abc", 3, MSG_OOB), 3); /* 'c' is urgent: not inline */
    CHECK_EQ(send(peer, "def", 3, 0), 3);
    tu_counter_add(&go, 1);

    /* The first read stops at the mark with "ab"; the rest must follow with no
     * more input (the peer only waits). */
    WAIT_GE(&got, 5);
    CHECK_EQ(memcmp(gotbuf, "abdef", 5), 0);
    teardown(&ts, peer, holder);
}

/* knet_conn_close, then knet_server_shutdown, both taken in one loop iteration:
 * the shutdown's task runs before the connection's close request is serviced, and
 * must not flush the queue the close dropped. */
static void test_close_then_server_shutdown(void)
{
    tu_server ts;
    int peer = setup(&ts, MODE_CLOSE_THEN_SHUTDOWN, NULL);
    knet_conn *c = atomic_load(&target);
    int holder = hold_loop(&ts);
    CHECK_EQ(knet_conn_send(c, "secret", 6), 0); /* queued: the loop is held */
    knet_conn_close(c);
    CHECK_EQ(knet_server_shutdown(ts.srv, TU_DEADLINE_MS), 0);
    tu_counter_add(&go, 1);
    WAIT_GE(&closed, 1);
    CHECK_EQ(atomic_load(&target_reason), 0);
    char b[6];
    CHECK_EQ(tu_read_full(peer, b, sizeof b), 0); /* EOF, and none of the bytes */
    CHECK_EQ(bytes_out(), 0);
    teardown(&ts, peer, holder);
}

int main(void)
{
    CHECK_EQ(knet_set_loop_threads(1), 0); /* the holder shares the peer's loop */
    tu_begin();
    RUN(test_graceful_close_in_receive_then_fin);
    RUN(test_close_in_receive_writes_no_more);
    RUN(test_framed_bytes_meet_the_bound);
    RUN(test_urgent_data_then_more);
    RUN(test_close_then_server_shutdown);
    return tu_end();
}
