/* White-box (it includes csrc/internal.h to know a connection's lock): of two close
 * requests on one connection, the first one's reason is the one reported, even when
 * the second comes while the loop is taking the first. A knet client's connection is
 * closed with knet_conn_close (reason 0); the loop thread is held on its first lock
 * of the connection's mutex after it took the close request (pthread_mutex_lock is
 * wrapped at link time), and knet_client_close (KNET_ECLIENTCLOSED) is called right
 * then. kn_conn_close_reason keeps the first request's reason ("sched" only when no
 * close is pending), so the connection must report 0. */
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
    /* The loop's first lock of the connection once it is closing: where it services
     * the close request (before the fix: with the flag already cleared). */
    if (!tls_tester && c && m == &c->mu && atomic_load(&armed) &&
        atomic_load(&c->state) == KN_CLOSING) {
        atomic_store(&armed, false);
        atomic_store(&held, true);
        int64_t until = tu_now_ms() + TU_DEADLINE_MS;
        while (!atomic_load(&go) && tu_now_ms() < until)
            tu_sleep_ms(1); /* held: the tester acts meanwhile */
    }
    return __real_pthread_mutex_lock(m);
}

static void test_first_close_reason_wins(void)
{
    int port;
    int lfd = tu_listen(&port, 0);
    tu_tracker *t = tu_tracker_new();
    knet_handler h = tu_tracker_handler(t);
    knet_client *cli = tu_client_for_port(port);
    tu_client tc;
    tu_client_start(&tc, cli, &h, NULL);
    int peer = accept(lfd, NULL, NULL);
    CHECK_GE(peer, 0);
    WAIT_GE(&t->connects, 1);
    knet_conn *c = tu_tracker_rec(t, 0)->conn;

    atomic_store(&target, c);
    atomic_store(&armed, true);
    knet_conn_close(c); /* first: a local close, reason 0 */
    WAIT_UNTIL(atomic_load(&held));
    CHECK_EQ(knet_client_close(cli), 0); /* second: KNET_ECLIENTCLOSED */
    atomic_store(&go, true);
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
    RUN(test_first_close_reason_wins);
    return tu_end();
}
