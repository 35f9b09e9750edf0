/* A request made while the one loop thread is busy must win over what the loop
 * finds after it in the same iteration: a connection's idle deadline that passed
 * meanwhile, or a server close asked for later.
 *
 * The loop is held in a callback that runs while the loop drains its task queue
 * (a knet client's connect(true): its attach is a posted task), so what another
 * thread asks for meanwhile lands on the ready list of the *next* iteration. The
 * connection under test (server 1, idle timeout IDLE_MS, silent peer) gets, before
 * its idle deadline:
 *  - knet_conn_send("bye") + knet_conn_shutdown: the peer must read "bye", then EOF;
 *  - knet_conn_send("bye") + knet_server_shutdown: the same;
 *  - knet_conn_close: a local close, reason 0, not counted as idle-closed.
 * The loop is let go only after the idle deadline has passed. And:
 *  - knet_conn_close, then knet_server_close (loop held, no deadline passed): the
 *    local close came first, so the reason is 0, not KNET_ESERVERCLOSED (as a
 *    knet_client_close after a knet_conn_close leaves 0). */
#include "testutil.h"

#define IDLE_MS 1500

typedef enum { MODE_CONN_SHUTDOWN, MODE_SERVER_SHUTDOWN, MODE_CLOSE, MODE_CLOSE_THEN_SERVER_CLOSE } test_mode;

static tu_counter connects, closed, holding, go;
static knet_conn *_Atomic target;
static _Atomic int target_reason;

static void on_connect(knet_conn *c, bool connected, void *ud)
{
    (void)ud;
    if (connected) {
        knet_conn *none = NULL;
        if (atomic_compare_exchange_strong(&target, &none, c))
            knet_conn_retain(c);
        tu_counter_add(&connects, 1);
    } else if (c == atomic_load(&target)) {
        atomic_store(&target_reason, knet_conn_close_reason(c));
        tu_counter_add(&closed, 1);
    }
}

/* The holder: a client connection whose connect(true) keeps the loop until go. */
static void holder_connect(knet_conn *c, bool connected, void *ud)
{
    (void)c, (void)ud;
    if (!connected)
        return;
    tu_counter_add(&holding, 1);
    CHECK(tu_counter_wait_ge(&go, 1, TU_DEADLINE_MS));
}

static void run(test_mode mode)
{
    tu_counter_init(&connects);
    tu_counter_init(&closed);
    tu_counter_init(&holding);
    tu_counter_init(&go);
    atomic_store(&target, NULL);
    atomic_store(&target_reason, 1);

    knet_handler h = {on_connect, NULL, NULL};
    tu_server s1, s2;
    tu_server_init(&s1, "127.0.0.1:0", &h, NULL);
    knet_server_set_idle_timeout(s1.srv, IDLE_MS);
    CHECK_GT(tu_server_run(&s1), 0);
    int port2 = tu_server_start(&s2, "127.0.0.1:0", NULL, NULL); /* the holder's, no idle */
    CHECK_GT(port2, 0);

    int peer = tu_connect(s1.port);
    WAIT_GE(&connects, 1);
    int64_t attached_by = tu_now_ms(); /* the idle deadline is at most IDLE_MS after this */
    knet_conn *c = atomic_load(&target);

    knet_client *cli = tu_client_for_port(port2);
    tu_client tc;
    knet_handler hh = {holder_connect, NULL, NULL};
    tu_client_start(&tc, cli, &hh, NULL);
    WAIT_GE(&holding, 1);
    CHECK_LT(tu_now_ms() - attached_by, IDLE_MS / 2); /* held well before the deadline */

    /* Asked for before the idle deadline, while the loop is held. */
    if (mode == MODE_CONN_SHUTDOWN) {
        CHECK_EQ(knet_conn_send(c, "bye", 3), 0);
        knet_conn_shutdown(c);
    } else if (mode == MODE_SERVER_SHUTDOWN) {
        CHECK_EQ(knet_conn_send(c, "bye", 3), 0);
        CHECK_EQ(knet_server_shutdown(s1.srv, TU_DEADLINE_MS), 0);
    } else {
        knet_conn_close(c);
        if (mode == MODE_CLOSE_THEN_SERVER_CLOSE)
            CHECK_EQ(knet_server_close(s1.srv), 0);
    }
    CHECK_LT(tu_now_ms() - attached_by, IDLE_MS / 2);
    /* Let the loop go only once the idle deadline has passed (a wait on time). */
    if (mode != MODE_CLOSE_THEN_SERVER_CLOSE)
        WAIT_UNTIL(tu_now_ms() > attached_by + IDLE_MS + 200);
    tu_counter_add(&go, 1);

    if (mode == MODE_CONN_SHUTDOWN || mode == MODE_SERVER_SHUTDOWN) {
        char b[8];
        ssize_t n = tu_read_full(peer, b, sizeof b); /* everything up to the FIN */
        CHECK_EQ(n, 3);
        CHECK_EQ(memcmp(b, "bye", 3), 0);
    }
    close(peer); /* a graceful close ends when the peer closes */
    WAIT_GE(&closed, 1);
    CHECK_EQ(atomic_load(&target_reason), 0);
    knet_stats st;
    knet_server_stats(s1.srv, &st);
    CHECK_EQ(st.idle_closed, 0);

    CHECK_EQ(knet_client_close(cli), 0);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    knet_client_free(cli);
    knet_conn_release(c);
    if (mode == MODE_SERVER_SHUTDOWN || mode == MODE_CLOSE_THEN_SERVER_CLOSE)
        CHECK_EQ(tu_server_join(&s1), KNET_ESERVERCLOSED);
    else
        CHECK_EQ(tu_server_stop(&s1), KNET_ESERVERCLOSED);
    CHECK_EQ(tu_server_stop(&s2), KNET_ESERVERCLOSED);
    tu_counter_destroy(&connects);
    tu_counter_destroy(&closed);
    tu_counter_destroy(&holding);
    tu_counter_destroy(&go);
}

static void test_conn_shutdown_before_idle_deadline(void) { run(MODE_CONN_SHUTDOWN); }
static void test_server_shutdown_before_idle_deadline(void) { run(MODE_SERVER_SHUTDOWN); }
static void test_close_before_idle_deadline(void) { run(MODE_CLOSE); }
static void test_close_then_server_close(void) { run(MODE_CLOSE_THEN_SERVER_CLOSE); }

/* No argument: every test; else only the one named (e.g. "close"). */
int main(int argc, char **argv)
{
    const char *only = argc > 1 ? argv[1] : "";
    CHECK_EQ(knet_set_loop_threads(1), 0); /* the holder shares the connection's loop */
    tu_begin();
    if (!*only || strcmp(only, "conn_shutdown") == 0)
        RUN(test_conn_shutdown_before_idle_deadline);
    if (!*only || strcmp(only, "server_shutdown") == 0)
        RUN(test_server_shutdown_before_idle_deadline);
    if (!*only || strcmp(only, "close") == 0)
        RUN(test_close_before_idle_deadline);
    if (!*only || strcmp(only, "server_close") == 0)
        RUN(test_close_then_server_close);
    return tu_end();
}
