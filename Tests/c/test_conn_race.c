/* White-box (it includes csrc/internal.h to know a connection's lock): calls from
 * another thread in the windows where the loop has let go of a connection's lock
 * but not yet finished it. pthread_mutex_lock is wrapped at link time; the loop
 * thread is held on its lock of the connection's mutex once the connection is
 * closing, while the test thread calls into the connection:
 *  - the peer's FIN with nothing queued: the loop marked the connection closing
 *    and is about to finish it (KNET_EOF): close, close_with_timeout, send,
 *    set_nodelay and local_addr from another thread then, each as documented;
 *    connect(false) once, with KNET_EOF;
 *  - a close asked for from another thread, the loop about to take it: a send,
 *    a second close and a release of that thread's own reference then; the loop's
 *    ready-list reference keeps the connection until it is done.
 * An argument runs only the tests whose name contains it. */
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

static void hold_loop_at(knet_conn *c)
{
    atomic_store(&held, false);
    atomic_store(&go, false);
    atomic_store(&target, c);
    atomic_store(&armed, true);
}

static void wait_held(void) { WAIT_UNTIL(atomic_load(&held)); }
static void release_loop(void) { atomic_store(&go, true); }

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

static const char *only;
#define RUN_IF(fn)                                                                                 \
    do {                                                                                           \
        if (!only || strstr(#fn, only))                                                            \
            RUN(fn);                                                                               \
    } while (0)

int main(int argc, char **argv)
{
    only = argc > 1 ? argv[1] : NULL;
    tls_tester = true;
    CHECK_EQ(knet_set_loop_threads(1), 0);
    tu_begin();
    for (int i = 0; i < 20; i++) {
        RUN_IF(test_calls_between_eof_and_finish);
        RUN_IF(test_release_while_close_taken);
    }
    return tu_end();
}
