/* A client's connection is visible through knet_client_conn a moment before its
 * loop attaches it. A close or a send made in that moment must still take effect.
 * The test holds the dialing thread right there — in its first allocation after
 * publishing the connection, the attach task's (malloc is wrapped at link time) —
 * until the loop has serviced the request, then lets the attach go ahead. */
#include "testutil.h"

void *__real_malloc(size_t n);
void *__wrap_malloc(size_t n);

static _Thread_local bool tls_dialer;  /* set on the thread in dial_and_serve */
static knet_client *_Atomic race_cli;  /* the client whose dialer to hold */
static tu_counter race_held, race_go;

void *__wrap_malloc(size_t n)
{
    knet_client *cli = tls_dialer ? atomic_load(&race_cli) : NULL;
    knet_conn *c = cli ? knet_client_conn(cli) : NULL;
    if (c) {
        knet_conn_release(c);
        atomic_store(&race_cli, NULL); /* hold once */
        tu_counter_add(&race_held, 1);
        CHECK(tu_counter_wait_ge(&race_go, 1, TU_DEADLINE_MS));
    }
    return __real_malloc(n);
}

static void *dialer_main(void *arg)
{
    tls_dialer = true;
    return tu_client_main(arg);
}

/* One round trip through the echo server on the same (only) loop thread. Two of
 * them after a request guarantee the loop finished the iteration that serviced it. */
static void probe_round_trip(int probe)
{
    char b;
    tu_write_str(probe, "p");
    READ_EXACT(probe, &b, 1);
    CHECK_EQ(b, 'p');
}

/* Dials an echo server with the dialer held after publishing its connection, closes
 * it or sends on it while it is visible and not yet attached, then lets it attach. */
static void race(bool use_close)
{
    tu_tracker *st = tu_tracker_new();
    st->echo = true;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, st, NULL);
    int probe = tu_connect(port);

    tu_counter_init(&race_held);
    tu_counter_init(&race_go);
    tu_tracker *t = tu_tracker_new();
    knet_client *cli = tu_client_for_port(port);
    atomic_store(&race_cli, cli);
    tu_client tc;
    memset(&tc, 0, sizeof tc);
    tc.cli = cli;
    tc.handler = tu_tracker_handler(t);
    tu_counter_init(&tc.done);
    CHECK_EQ(pthread_create(&tc.thread, NULL, dialer_main, &tc), 0);

    WAIT_GE(&race_held, 1);
    knet_conn *conn = knet_client_conn(cli);
    CHECK(conn != NULL);
    CHECK_EQ(tu_counter_get(&t->connects), 0); /* not attached yet */
    if (use_close)
        knet_conn_close(conn);
    else
        CHECK_EQ(knet_conn_send(conn, "hello", 5), 0);
    probe_round_trip(probe);
    probe_round_trip(probe); /* the loop has serviced the request, before the attach */
    tu_counter_add(&race_go, 1);

    if (use_close) {
        WAIT_GE(&t->disconnects, 1);
        CHECK_EQ(atomic_load(&t->recs[0].reason), 0);
    } else {
        WAIT_GE(&t->bytes, 5); /* it went out, and the server echoed it */
        CHECK_EQ(knet_conn_close_reason(conn), 1);
    }
    knet_conn_release(conn);
    CHECK_EQ(knet_client_close(cli), 0);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    knet_client_free(cli);
    tu_tracker_free(t);
    tu_counter_destroy(&race_held);
    tu_counter_destroy(&race_go);

    close(probe);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(st);
}

static void test_close_before_attach(void) { race(true); }

static void test_send_before_attach(void) { race(false); }

int main(void)
{
    CHECK_EQ(knet_set_loop_threads(1), 0); /* the probe shares the client's loop */
    tu_begin();
    RUN(test_close_before_attach);
    RUN(test_send_before_attach);
    return tu_end();
}
