/* White-box (it includes csrc/internal.h to know a connection's lock): of two
 * requests on one connection, the first one stands even when the second comes
 * while the loop is taking the first. The loop thread is held on its first lock of
 * the connection's mutex once the connection is closing (pthread_mutex_lock is
 * wrapped at link time), and the second request is made right then. Before the
 * fixes the loop had cleared the request flag by that point, so the second call
 * wrote over the first: a 600 s deadline over 200 ms (the connection, its peer
 * never closing, stayed open), KNET_ECLIENTCLOSED over a local close's 0.
 *
 * The same hold also opens the windows where the loop has let go of a connection's
 * lock but not yet finished it (each case 20 times):
 *  - the peer's FIN with nothing queued: the loop marked the connection closing
 *    and is about to finish it (KNET_EOF): close, close_with_timeout, send,
 *    set_nodelay and local_addr from another thread then, each as documented;
 *    connect(false) once, with KNET_EOF;
 *  - a close asked for from another thread, the loop about to take it: a send,
 *    a second close and a release of that thread's own reference then; the loop's
 *    ready-list reference keeps the connection until it is done. */
#include "testutil.h"

#include "../../csrc/internal.h"

int __real_pthread_mutex_lock(pthread_mutex_t *m);
int __wrap_pthread_mutex_lock(pthread_mutex_t *m);

static knet_conn *_Atomic target; /* the connection whose lock to watch */
static _Thread_local bool tls_tester;
static atomic_bool armed, held, go;

int __wrap_pthread_mutex_lock(pthread_mutex_t *m)
{
    knet_conn *c = atomic_load(&target);
    /* The loop's first lock of the connection once it is closing, before a graceful
     * close began: where it services the request. */
    if (!tls_tester && c && m == &c->mu && atomic_load(&armed) &&
        atomic_load(&c->state) == KN_CLOSING && !c->graceful) {
        atomic_store(&armed, false);
        atomic_store(&held, true);
        int64_t until = tu_now_ms() + TU_DEADLINE_MS;
        while (!atomic_load(&go) && tu_now_ms() < until)
            tu_sleep_ms(1); /* held: the tester acts meanwhile */
    }
    return __real_pthread_mutex_lock(m);
}

/* Holds the loop at its next take of c's request (made by the caller next). */
static void hold_loop_at(knet_conn *c)
{
    atomic_store(&held, false);
    atomic_store(&go, false);
    atomic_store(&target, c);
    atomic_store(&armed, true);
}

/* Waits until the loop is held there; the caller then makes the second request. */
static void wait_held(void) { WAIT_UNTIL(atomic_load(&held)); }

/* Lets the held loop go on. */
static void release_loop(void) { atomic_store(&go, true); }

static void test_earlier_deadline_wins(void)
{
    tu_tracker *t = tu_tracker_new();
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int peer = tu_connect(port); /* never reads, never closes */
    knet_conn *c = tu_tracker_rec(t, 0)->conn;
    hold_loop_at(c);
    int64_t t0 = tu_now_ms();
    knet_conn_close_with_timeout(c, 200);
    wait_held();
    knet_conn_close_with_timeout(c, 600000); /* later: must not replace the 200 ms */
    release_loop();
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&t->recs[0].reason), -ETIMEDOUT);
    CHECK_LT(tu_now_ms() - t0, 10000); /* the 200 ms deadline, not the 600 s one */
    atomic_store(&target, NULL);
    close(peer);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

static void test_first_close_reason_wins(void)
{
    tu_tracker *t = tu_tracker_new();
    tu_client tc;
    int lfd, peer;
    knet_client *cli = tu_client_to_plain(&tc, t, 0, &lfd, &peer);
    knet_conn *c = tu_tracker_rec(t, 0)->conn;

    hold_loop_at(c);
    knet_conn_close(c); /* first: a local close, reason 0 */
    wait_held();
    CHECK_EQ(knet_client_close(cli), 0); /* second: KNET_ECLIENTCLOSED */
    release_loop();
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&t->recs[0].reason), 0);

    atomic_store(&target, NULL);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    knet_client_free(cli);
    close(peer);
    close(lfd);
    tu_tracker_free(t);
}

static void test_calls_between_eof_and_finish(void)
{
    tu_tracker *t = tu_tracker_new();
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int peer = tu_connect(port);
    knet_conn *c = tu_tracker_rec(t, 0)->conn;
    hold_loop_at(c);
    CHECK_EQ(shutdown(peer, SHUT_WR), 0); /* FIN, nothing queued: closes at once */
    wait_held();
    CHECK_EQ(tu_counter_get(&t->disconnects), 0);
    knet_conn_close(c);
    knet_conn_close_with_timeout(c, 100);
    knet_conn_shutdown(c);
    CHECK_EQ(knet_conn_send(c, "x", 1), KNET_ECLOSED);
    CHECK_EQ(knet_conn_set_nodelay(c, true), 0); /* its descriptor is still open */
    char buf[KNET_ADDRSTRLEN];
    CHECK_GT(knet_conn_local_addr(c, buf, sizeof buf), 0);
    CHECK_EQ(knet_conn_close_reason(c), 1);
    release_loop();
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&t->recs[0].reason), KNET_EOF);
    char b;
    CHECK_EQ(tu_read_some(peer, &b, 1), 0); /* nothing but the FIN */
    CHECK_EQ(knet_conn_set_nodelay(c, true), KNET_ECLOSED);
    atomic_store(&target, NULL);
    close(peer);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    CHECK_EQ(tu_counter_get(&t->disconnects), 1);
    tu_tracker_free(t);
}

static void test_release_while_close_taken(void)
{
    tu_tracker *t = tu_tracker_new();
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int peer = tu_connect(port);
    tu_rec *r = tu_tracker_rec(t, 0);
    knet_conn *c = r->conn;
    hold_loop_at(c);
    knet_conn_close(c); /* the loop is held on its take of the close */
    wait_held();
    CHECK_EQ(knet_conn_send(c, "x", 1), KNET_ECLOSED);
    knet_conn_close(c);
    knet_conn_release(c); /* the tracker's reference: dropped now, the loop still at work */
    release_loop();
    WAIT_GE(&t->disconnects, 1);
    r->conn = NULL; /* released already (connect(false) ran with it) */
    CHECK_EQ(atomic_load(&r->reason), 0);
    atomic_store(&target, NULL);
    char b;
    CHECK_LE(tu_read_some(peer, &b, 1), 0);
    close(peer);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

int main(void)
{
    tls_tester = true;
    CHECK_EQ(knet_set_loop_threads(1), 0);
    tu_begin();
    RUN(test_earlier_deadline_wins);
    RUN(test_first_close_reason_wins);
    for (int i = 0; i < 20; i++) {
        RUN(test_calls_between_eof_and_finish);
        RUN(test_release_while_close_taken);
    }
    return tu_end();
}
