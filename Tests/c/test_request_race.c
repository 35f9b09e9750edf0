/* White-box (it includes csrc/internal.h to know a connection's lock): of two
 * requests on one connection, the first one stands even when the second comes
 * while the loop is taking the first. The loop thread is held on its first lock of
 * the connection's mutex once the connection is closing (pthread_mutex_lock is
 * wrapped at link time), and the second request is made right then. Before the
 * fixes the loop had cleared the request flag by that point, so the second call
 * wrote over the first: a 600 s deadline over 200 ms (the connection, its peer
 * never closing, stayed open), KNET_ECLIENTCLOSED over a local close's 0. */
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

int main(void)
{
    tls_tester = true;
    CHECK_EQ(knet_set_loop_threads(1), 0);
    tu_begin();
    RUN(test_earlier_deadline_wins);
    RUN(test_first_close_reason_wins);
    return tu_end();
}
