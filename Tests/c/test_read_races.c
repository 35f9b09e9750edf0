/* What a callback asks for while its read loop runs must hold when that same
 * loop then reads the peer's FIN. The test holds the one loop thread in another
 * connection's receive while the peer writes exactly one read's worth of bytes
 * (the handler's read buffer, knet_conn_set_alloc) and its FIN, so one pass of
 * the read loop reads both. */
#include "testutil.h"

#define READ_CAP 1024

static tu_counter connects, holding, go, closed;
static knet_conn *_Atomic target; /* the first connection: the one under test */
static _Atomic int target_reason = 1, receives;
static char rbuf[READ_CAP];

static void *small_alloc(knet_conn *c, size_t suggested, size_t *cap, void *ud)
{
    (void)c, (void)suggested, (void)ud;
    *cap = READ_CAP;
    return rbuf;
}

static void on_connect(knet_conn *c, bool connected, void *ud)
{
    (void)ud;
    if (connected) {
        knet_conn *none = NULL;
        if (atomic_compare_exchange_strong(&target, &none, c))
            CHECK_EQ(knet_conn_set_alloc(c, small_alloc, NULL), 0);
        tu_counter_add(&connects, 1);
    } else if (c == atomic_load(&target)) {
        atomic_store(&target_reason, knet_conn_close_reason(c));
        tu_counter_add(&closed, 1);
    }
}

static void on_receive(knet_conn *c, const void *buf, size_t len, void *ud)
{
    (void)buf, (void)ud;
    if (c != atomic_load(&target)) { /* the holder: keep the loop until released */
        tu_counter_add(&holding, 1);
        CHECK(tu_counter_wait_ge(&go, 1, TU_DEADLINE_MS));
        return;
    }
    CHECK_EQ(len, (size_t)READ_CAP); /* one full read, so the loop reads again: the FIN */
    if (atomic_fetch_add(&receives, 1) == 0)
        knet_conn_close_with_timeout(c, 30000);
}

static void test_graceful_close_in_receive_then_fin(void)
{
    tu_counter_init(&connects);
    tu_counter_init(&holding);
    tu_counter_init(&go);
    tu_counter_init(&closed);
    knet_handler h = {on_connect, on_receive, NULL};
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, NULL);
    int peer = tu_connect(port);
    WAIT_GE(&connects, 1);
    int holder = tu_connect(port);
    WAIT_GE(&connects, 2);
    tu_write_str(holder, "h");
    WAIT_GE(&holding, 1); /* the loop thread is held */

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

    close(peer);
    close(holder);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_counter_destroy(&connects);
    tu_counter_destroy(&holding);
    tu_counter_destroy(&go);
    tu_counter_destroy(&closed);
}

int main(void)
{
    CHECK_EQ(knet_set_loop_threads(1), 0); /* the holder shares the peer's loop */
    tu_begin();
    RUN(test_graceful_close_in_receive_then_fin);
    return tu_end();
}
