/* The pending-send limit and the send queue, against what knet.h promises:
 *  - the limit counts messages the socket did not take: a receive that answers
 *    each of a burst of frames (later sends of a read pass are batched) is not
 *    refused while the peer reads everything;
 *  - many threads at the limit while the loop is held (nothing is written): exactly
 *    the limit is accepted from other threads, at most one more with the loop's own
 *    sends racing them; every refusal is KNET_EPENDINGFULL; the accepted messages
 *    arrive, each thread's in order, nothing refused; once drained the count is 0
 *    again (the limit's worth is accepted again); a graceful close at the limit turns
 *    sends into KNET_ECLOSED and still delivers the queue;
 *  - one huge send (256 MiB, over the 64 MiB default byte bound) is accepted into an
 *    empty queue from either thread, the next one is refused, and the close frees it. */
#include "testutil.h"

/* ------------------------------------------------------------------ read-pass batching */

enum { BURST = 200, BURST_LIMIT = 8 };

static void limit_on_connect(tu_rec *r, bool connected)
{
    if (connected)
        knet_conn_set_pending_send(r->conn, BURST_LIMIT);
}

/* A peer sends BURST std-codec frames in one write and reads every answer: the echo
 * handler (on the loop, inside receive) must get no KNET_EPENDINGFULL, since the
 * socket could take every answer at once. */
static void test_limit_in_read_pass(void)
{
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    t->on_connect = limit_on_connect;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, &knet_std_codec);
    CHECK_GT(port, 0);
    int fd = tu_connect(port);
    (void)tu_tracker_rec(t, 0);

    uint8_t out[BURST * 4], in[BURST * 4];
    for (int i = 0; i < BURST; i++) {
        out[4 * i] = 0;
        out[4 * i + 1] = 2;
        out[4 * i + 2] = (uint8_t)i;
        out[4 * i + 3] = (uint8_t)(i >> 8);
    }
    tu_write_all(fd, out, sizeof out);
    WAIT_GE(&t->msgs, BURST);
    long refused = atomic_load(&t->send_errors);
    printf("  %ld of %d answers refused\n", refused, BURST);
    CHECK_EQ(refused, 0);
    READ_EXACT(fd, in, sizeof in);
    CHECK(memcmp(in, out, sizeof out) == 0);

    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

int main(void)
{
    tu_begin();
    RUN(test_limit_in_read_pass);
    return tu_end();
}
