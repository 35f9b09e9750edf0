/* White-box (it includes csrc/internal.h to know a connection's lock): of two
 * knet_conn_close_with_timeout calls on one connection, the earlier deadline wins
 * even when the second comes while the loop is taking the first. The loop thread is
 * held on its first lock of the connection's mutex once the first request is
 * serviced (pthread_mutex_lock is wrapped at link time); the second request is made
 * right then. Before the fix the loop had cleared the request flag by that point,
 * so the second call wrote its 600 s over the 200 ms, and the connection (its peer
 * never closing) stayed open. */
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

static void test_earlier_deadline_wins(void)
{
    tu_tracker *t = tu_tracker_new();
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int peer = tu_connect(port); /* never reads, never closes */
    knet_conn *c = tu_tracker_rec(t, 0)->conn;
    atomic_store(&target, c);
    atomic_store(&armed, true);
    int64_t t0 = tu_now_ms();
    knet_conn_close_with_timeout(c, 200);
    WAIT_UNTIL(atomic_load(&held));
    knet_conn_close_with_timeout(c, 600000); /* later: must not replace the 200 ms */
    atomic_store(&go, true);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&t->recs[0].reason), -ETIMEDOUT);
    CHECK_LT(tu_now_ms() - t0, 10000); /* the 200 ms deadline, not the 600 s one */
    atomic_store(&target, NULL);
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
    return tu_end();
}
