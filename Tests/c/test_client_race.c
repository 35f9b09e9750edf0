/* A client's connection is visible through knet_client_conn a moment before its
 * loop attaches it. A close, a send or a client shutdown made in that moment must
 * still take effect (a shutdown: the bytes sent go out before the FIN).
 * And a close racing with the client's own end, or with a serve call that finds the
 * client closed, must finish before knet_client_dial_and_serve returns.
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

/* The wake-up write of knet_client_close, held on the closer thread (write is
 * wrapped too): the close has marked the client closed and has yet to finish. */
ssize_t __real_write(int fd, const void *buf, size_t n);
ssize_t __wrap_write(int fd, const void *buf, size_t n);

static _Thread_local bool tls_closer;
static _Atomic bool hold_dialer_write; /* hold the dialer's next write (a loop wake-up) too */
static tu_counter close_held, close_go;

ssize_t __wrap_write(int fd, const void *buf, size_t n)
{
    if (tls_closer || (tls_dialer && atomic_exchange(&hold_dialer_write, false))) {
        tls_closer = false;
        tu_counter_add(&close_held, 1);
        CHECK(tu_counter_wait_ge(&close_go, 1, TU_DEADLINE_MS));
    }
    return __real_write(fd, buf, n);
}

static void *closer_main(void *arg)
{
    tls_closer = true;
    CHECK_EQ(knet_client_close(arg), 0);
    return NULL;
}

/* Starts knet_client_close(cli) on a thread and waits until it is held in its wake-up
 * write: the client is marked closed, the close has yet to return. */
static pthread_t close_held_start(knet_client *cli)
{
    tu_counter_init(&close_held);
    tu_counter_init(&close_go);
    pthread_t closer;
    CHECK_EQ(pthread_create(&closer, NULL, closer_main, cli), 0);
    WAIT_GE(&close_held, 1);
    return closer;
}

/* Lets the held close finish and joins its thread. */
static void close_held_finish(pthread_t closer)
{
    tu_counter_add(&close_go, 1);
    CHECK_EQ(pthread_join(closer, NULL), 0);
    tu_counter_destroy(&close_held);
    tu_counter_destroy(&close_go);
}

static void *dialer_main(void *arg)
{
    tls_dialer = true;
    return tu_client_main(arg);
}

/* tu_client_start on a thread the wraps know as the dialer, with tracker t as handler. */
static void dialer_start(tu_client *tc, knet_client *cli, tu_tracker *t)
{
    memset(tc, 0, sizeof *tc);
    tc->cli = cli;
    tc->handler = tu_tracker_handler(t);
    tu_counter_init(&tc->done);
    CHECK_EQ(pthread_create(&tc->thread, NULL, dialer_main, tc), 0);
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

/* The relay: a server whose receive (on the one loop thread) sends RELAY_BYTES
 * on the held client connection, more than a fresh socket takes at once. */
#define RELAY_BYTES ((size_t)8 << 20)
static knet_conn *_Atomic relay_target;
static _Atomic int relay_rc;
static tu_counter relay_sent;

static void relay_receive(knet_conn *c, const void *buf, size_t len, void *ud)
{
    (void)c, (void)buf, (void)len, (void)ud;
    knet_conn *target = atomic_exchange(&relay_target, NULL);
    if (!target)
        return;
    char *big = malloc(RELAY_BYTES);
    CHECK(big != NULL);
    tu_pattern_fill(big, RELAY_BYTES, 0, 7);
    atomic_store(&relay_rc, knet_conn_send(target, big, RELAY_BYTES));
    free(big);
    tu_counter_add(&relay_sent, 1);
}

typedef enum { RACE_CLOSE, RACE_SEND, RACE_SEND_ON_LOOP, RACE_SHUTDOWN, RACE_PAUSE } race_kind;

/* A drain request made before the attach: runs after connect(true), outside callbacks. */
static tu_counter race_drained;

static void race_on_drained(knet_conn *c, void *ud)
{
    (void)ud;
    tu_rec *r = (tu_rec *)knet_conn_userdata(c);
    CHECK(r != NULL); /* connect(true) came first */
    CHECK_EQ(atomic_load(&r->connected), 1);
    CHECK_EQ(atomic_load(&r->in_cb), 0); /* never nested */
    CHECK(pthread_equal(r->thread, pthread_self()));
    tu_counter_add(&race_drained, 1);
}

/* Dials an echo server with the dialer held after publishing its connection, closes
 * it or sends on it (from a user thread, or from a callback on its loop: written in
 * part at once, the rest queued), or sends on it and shuts the client down, while it
 * is visible and not yet attached, then lets it attach. */
static void race(race_kind kind)
{
    bool use_close = kind == RACE_CLOSE;
    tu_tracker *st = tu_tracker_new();
    st->echo = true;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, st, NULL);
    int probe = tu_connect(port);

    tu_counter_init(&race_held);
    tu_counter_init(&race_go);
    tu_tracker *t = tu_tracker_new();
    t->capture = kind == RACE_SEND_ON_LOOP;
    knet_client *cli = tu_client_for_port(port);
    atomic_store(&race_cli, cli);
    tu_client tc;
    dialer_start(&tc, cli, t);

    WAIT_GE(&race_held, 1);
    knet_conn *conn = knet_client_conn(cli);
    CHECK(conn != NULL);
    CHECK_EQ(tu_counter_get(&t->connects), 0); /* not attached yet */
    tu_server relay;
    int relay_sock = -1;
    if (kind == RACE_SEND_ON_LOOP) {
        knet_handler rh = {NULL, relay_receive, NULL};
        tu_counter_init(&relay_sent);
        atomic_store(&relay_rc, 1);
        atomic_store(&relay_target, conn);
        relay_sock = tu_connect(tu_server_start(&relay, "127.0.0.1:0", &rh, NULL));
        tu_write_str(relay_sock, "x");
        WAIT_GE(&relay_sent, 1);
        CHECK_EQ(atomic_load(&relay_rc), 0);
    } else if (use_close) {
        knet_conn_close(conn);
    } else if (kind == RACE_SHUTDOWN) {
        CHECK_EQ(knet_conn_send(conn, "hello", 5), 0);
        CHECK_EQ(knet_client_shutdown(cli, TU_DEADLINE_MS), 0);
    } else if (kind == RACE_PAUSE) {
        tu_counter_init(&race_drained);
        CHECK_EQ(knet_conn_pause_read(conn), 0);
        CHECK_EQ(knet_conn_send(conn, "hello", 5), 0);
        CHECK_EQ(knet_conn_notify_drained(conn, race_on_drained, NULL), 0);
    } else {
        CHECK_EQ(knet_conn_send(conn, "hello", 5), 0);
    }
    probe_round_trip(probe);
    probe_round_trip(probe); /* the loop has serviced the request, before the attach */
    tu_counter_add(&race_go, 1);

    if (use_close) {
        WAIT_GE(&t->disconnects, 1);
        CHECK_EQ(atomic_load(&t->recs[0].reason), 0);
    } else if (kind == RACE_PAUSE) {
        /* Attached paused: "hello" went out and came back, unread until the resume. */
        WAIT_GE(&race_drained, 1);
        WAIT_GE(&st->bytes, 7); /* the probe's 2, then the 5 echoed */
        CHECK_EQ(knet_conn_notify_drained(conn, race_on_drained, NULL), 0);
        WAIT_GE(&race_drained, 2);
        probe_round_trip(probe);
        CHECK_EQ(tu_counter_get(&t->bytes), 0);
        CHECK_EQ(knet_conn_resume_read(conn), 0);
        WAIT_GE(&t->bytes, 5);
        CHECK_EQ(tu_counter_get(&t->bytes), 5);
        tu_counter_destroy(&race_drained);
    } else if (kind == RACE_SHUTDOWN) {
        /* Attached and shut down gracefully: the bytes went out before the FIN,
         * came back, and the close completed when the server closed in turn. */
        CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
        CHECK_EQ(tu_counter_get(&t->connects), 1);
        CHECK_EQ(tu_counter_get(&t->disconnects), 1);
        CHECK_EQ(atomic_load(&t->recs[0].reason), 0);
        CHECK_EQ(tu_counter_get(&t->bytes), 5);
        WAIT_GE(&st->disconnects, 1); /* the probe (record 0) stays */
        CHECK_EQ(atomic_load(&st->recs[1].rx_bytes), 5);
        CHECK_EQ(atomic_load(&st->recs[1].reason), KNET_EOF);
    } else {
        /* It went out, all of it, and the server echoed it. */
        long want = kind == RACE_SEND ? 5 : (long)RELAY_BYTES;
        WAIT_GE(&t->bytes, want);
        CHECK_EQ(tu_counter_get(&t->bytes), want);
        size_t off = 0, at = 0, len;
        const uint8_t *msg;
        while (t->capture && tu_rec_next_msg(tu_tracker_rec(t, 0), &off, &msg, &len)) {
            CHECK_EQ(tu_pattern_mismatch(msg, len, at, 7), len); /* intact, in order */
            at += len;
        }
        CHECK_EQ(knet_conn_close_reason(conn), 1);
    }
    if (relay_sock >= 0) {
        close(relay_sock);
        CHECK_EQ(tu_server_stop(&relay), KNET_ESERVERCLOSED);
        tu_counter_destroy(&relay_sent);
    }
    knet_conn_release(conn);
    if (kind != RACE_SHUTDOWN) {
        CHECK_EQ(knet_client_close(cli), 0);
        CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    }
    knet_client_free(cli);
    tu_tracker_free(t);
    tu_counter_destroy(&race_held);
    tu_counter_destroy(&race_go);

    close(probe);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(st);
}

/* dial_and_serve must not return while a knet_client_close still runs: the caller
 * may free the client as soon as it returns. Here the connection ends by itself
 * (the server closes it) while the close is held inside. */
static void test_serve_outlasts_close(void)
{
    tu_tracker *st = tu_tracker_new();
    tu_server ts;
    int port = tu_tracked_server_start(&ts, st, NULL);
    tu_tracker *t = tu_tracker_new();
    knet_client *cli = tu_client_for_port(port);
    knet_handler h = tu_tracker_handler(t);
    tu_client tc;
    tu_client_start(&tc, cli, &h, NULL);
    WAIT_GE(&t->connects, 1);
    WAIT_GE(&st->connects, 1);

    pthread_t closer = close_held_start(cli);
    knet_conn_close(tu_tracker_rec(st, 0)->conn);
    WAIT_GE(&t->disconnects, 1); /* the dialer sees its connection end, and the close */
    CHECK(!tu_counter_wait_ge(&tc.done, 1, 300)); /* ...and waits for the close */
    close_held_finish(closer);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    knet_client_free(cli);
    tu_tracker_free(t);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(st);
}

/* A serve call of an already closed client that starts while that close still runs
 * (held in its wake-up write) returns KNET_ECLIENTCLOSED only once the close is done,
 * as above, so the client may be freed right after. Before, it returned at once and
 * the close went on with the freed client (its wake-up fd, its lock). */
static void test_closed_serve_outlasts_close(void)
{
    int hold;
    knet_client *cli = tu_client_for_port(tu_reserve_port(&hold));
    /* A refused dial (retry off): the client now has its wake-up fd and may serve again. */
    CHECK_EQ(knet_client_dial_and_serve(cli, NULL, NULL), -ECONNREFUSED);
    pthread_t closer = close_held_start(cli);
    tu_client tc;
    tu_client_start(&tc, cli, NULL, NULL);
    CHECK(!tu_counter_wait_ge(&tc.done, 1, 300)); /* waits for the close */
    close_held_finish(closer);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    knet_client_free(cli);
    close(hold);
}

/* The dialer held in its setsockopt(TCP_NODELAY) (wrapped): its dial has connected,
 * its connection is not made yet. */
int __real_setsockopt(int fd, int level, int name, const void *val, socklen_t len);
int __wrap_setsockopt(int fd, int level, int name, const void *val, socklen_t len);

static _Atomic bool hold_nodelay;
static tu_counter nodelay_held, nodelay_go;

int __wrap_setsockopt(int fd, int level, int name, const void *val, socklen_t len)
{
    if (tls_dialer && level == IPPROTO_TCP && name == TCP_NODELAY && atomic_exchange(&hold_nodelay, false)) {
        tu_counter_add(&nodelay_held, 1);
        CHECK(tu_counter_wait_ge(&nodelay_go, 1, TU_DEADLINE_MS));
    }
    return __real_setsockopt(fd, level, name, val, len);
}

/* A close (or shutdown) made once a dial has connected, before its connection exists:
 * the connection it then makes and knet_client_conn returns is closing already — a
 * send on it is KNET_ECLOSED, as on any connection after its close or shutdown began
 * (before: it was open until the dialer asked it a moment later, and a send made
 * after knet_client_close had returned was accepted, then dropped). connect(true) and
 * connect(false) still pair, and dial_and_serve returns KNET_ECLIENTCLOSED. */
static void stop_after_dial(bool graceful)
{
    tu_tracker *st = tu_tracker_new();
    tu_server ts;
    int port = tu_tracked_server_start(&ts, st, NULL);
    tu_counter_init(&race_held);
    tu_counter_init(&race_go);
    tu_counter_init(&nodelay_held);
    tu_counter_init(&nodelay_go);
    tu_tracker *t = tu_tracker_new();
    knet_client *cli = tu_client_for_port(port);
    atomic_store(&hold_nodelay, true);
    tu_client tc;
    dialer_start(&tc, cli, t);

    WAIT_GE(&nodelay_held, 1); /* connected, no connection yet */
    CHECK_EQ(graceful ? knet_client_shutdown(cli, TU_DEADLINE_MS) : knet_client_close(cli), 0);
    atomic_store(&race_cli, cli); /* hold it again once its connection is visible */
    tu_counter_add(&nodelay_go, 1);
    WAIT_GE(&race_held, 1);
    knet_conn *conn = knet_client_conn(cli);
    CHECK(conn != NULL);
    int rc = knet_conn_send(conn, "late", 4);
    if (rc != KNET_ECLOSED)
        fprintf(stderr, "send on the connection made after the %s returned %d (%s)\n",
                graceful ? "shutdown" : "close", rc, knet_strerror(rc));
    tu_counter_add(&race_go, 1);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    CHECK_EQ(tu_counter_get(&t->connects), tu_counter_get(&t->disconnects));
    knet_conn_release(conn);
    CHECK_EQ(rc, KNET_ECLOSED);
    knet_client_free(cli);
    tu_tracker_free(t);
    tu_counter_destroy(&race_held);
    tu_counter_destroy(&race_go);
    tu_counter_destroy(&nodelay_held);
    tu_counter_destroy(&nodelay_go);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(st);
}

static void test_close_after_dial_connected(void) { stop_after_dial(false); }

static void test_shutdown_after_dial_connected(void) { stop_after_dial(true); }

/* A close after a shutdown, landing while the dialer asks the shutdown of the connection
 * it just made (held in that request's loop wake-up) and before it is visible: the close
 * does not find it, and the dialer force-closes it in its stead: reason
 * KNET_ECLIENTCLOSED, not the graceful close's 0 (the server answers its FIN). */
static void test_close_after_shutdown_before_visible(void)
{
    tu_tracker *st = tu_tracker_new();
    tu_server ts;
    int port = tu_tracked_server_start(&ts, st, NULL);
    tu_counter_init(&nodelay_held);
    tu_counter_init(&nodelay_go);
    tu_counter_init(&close_held);
    tu_counter_init(&close_go);
    tu_tracker *t = tu_tracker_new();
    knet_client *cli = tu_client_for_port(port);
    atomic_store(&hold_nodelay, true);
    tu_client tc;
    dialer_start(&tc, cli, t);
    WAIT_GE(&nodelay_held, 1);
    CHECK_EQ(knet_client_shutdown(cli, 600000), 0);
    atomic_store(&hold_dialer_write, true);
    tu_counter_add(&nodelay_go, 1);
    WAIT_GE(&close_held, 1); /* the dialer, in its shutdown request's wake-up */
    knet_conn *none = knet_client_conn(cli);
    CHECK(none == NULL);
    CHECK_EQ(knet_client_close(cli), 0);
    tu_counter_add(&close_go, 1);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&t->recs[0].reason), KNET_ECLIENTCLOSED);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    CHECK_EQ(tu_counter_get(&t->connects), 1);
    knet_client_free(cli);
    tu_tracker_free(t);
    tu_counter_destroy(&nodelay_held);
    tu_counter_destroy(&nodelay_go);
    tu_counter_destroy(&close_held);
    tu_counter_destroy(&close_go);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(st);
}

static void test_close_before_attach(void) { race(RACE_CLOSE); }

static void test_send_before_attach(void) { race(RACE_SEND); }

static void test_send_on_loop_before_attach(void) { race(RACE_SEND_ON_LOOP); }

static void test_shutdown_before_attach(void) { race(RACE_SHUTDOWN); }

static void test_pause_and_drain_before_attach(void) { race(RACE_PAUSE); }

int main(void)
{
    CHECK_EQ(knet_set_loop_threads(1), 0); /* the probe shares the client's loop */
    tu_begin();
    RUN(test_close_before_attach);
    RUN(test_send_before_attach);
    RUN(test_send_on_loop_before_attach);
    RUN(test_shutdown_before_attach);
    RUN(test_pause_and_drain_before_attach);
    RUN(test_serve_outlasts_close);
    RUN(test_closed_serve_outlasts_close);
    RUN(test_close_after_dial_connected);
    RUN(test_shutdown_after_dial_connected);
    RUN(test_close_after_shutdown_before_visible);
    return tu_end();
}
