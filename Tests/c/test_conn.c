/* Connection accessors: userdata, local/remote "ip:port" strings matching the sockets,
 * set_nodelay, retain/release keeping a handle valid after connect(false), close
 * reasons, knet_strerror for every code, and the loop-thread setting. */
#include "testutil.h"

#include <signal.h>

/* Loop threads can be set before the first server/client starts, not after. */
static void check_loop_threads_before_start(void)
{
    CHECK_GE(knet_loop_threads(), 1);
    CHECK_EQ(knet_set_loop_threads(2), 0);
    CHECK_EQ(knet_loop_threads(), 2);
}

static void test_loop_threads_busy_after_start(void)
{
    CHECK_EQ(knet_set_loop_threads(3), KNET_EBUSY);
    CHECK_EQ(knet_loop_threads(), 2);
}

/* ------------------------------------------------------------------ userdata */

static int ud_token_a, ud_token_b;

/* Hook: userdata set in connect(true) is what receive and connect(false) see. The
 * tracker itself stores its record as userdata, so swap and restore around checks. */
static void ud_receive(tu_rec *r, const void *buf, size_t len)
{
    (void)buf;
    (void)len;
    knet_conn_set_userdata(r->conn, &ud_token_a);
    CHECK(knet_conn_userdata(r->conn) == &ud_token_a);
    knet_conn_set_userdata(r->conn, NULL);
    CHECK(knet_conn_userdata(r->conn) == NULL);
    knet_conn_set_userdata(r->conn, r);
}

static void test_userdata(void)
{
    tu_tracker *t = tu_tracker_new(); /* checks userdata is NULL at connect(true) */
    t->on_receive = ud_receive;
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, NULL);
    CHECK_GT(port, 0);
    int fd = tu_connect(port);
    tu_write_str(fd, "x");
    WAIT_GE(&t->msgs, 1);
    knet_conn *conn = t->recs[0].conn;
    CHECK(knet_conn_userdata(conn) == &t->recs[0]); /* from another thread too */
    close(fd);
    WAIT_GE(&t->disconnects, 1); /* connect(false) found the record through userdata */
    /* Still readable and settable on a retained, closed conn. */
    knet_conn_set_userdata(conn, &ud_token_b);
    CHECK(knet_conn_userdata(conn) == &ud_token_b);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* ------------------------------------------------------------------ addresses */

/* Hook: asks for both addresses while open (so they stay available after close). */
static void ask_addrs(tu_rec *r, bool connected)
{
    if (!connected)
        return;
    char b[KNET_ADDRSTRLEN];
    CHECK_GT(knet_conn_local_addr(r->conn, b, sizeof b), 0);
    CHECK_GT(knet_conn_remote_addr(r->conn, b, sizeof b), 0);
}

static void expect_addr(int rc, const char *got, const char *want)
{
    if (rc != (int)strlen(want) || strcmp(got, want) != 0) {
        fprintf(stderr, "address: got %d \"%s\", want \"%s\"\n", rc, rc >= 0 ? got : "", want);
        CHECK(0);
    }
}

static void test_addresses(void)
{
    tu_tracker *st = tu_tracker_new();
    st->on_connect = ask_addrs;
    knet_handler sh = tu_tracker_handler(st);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &sh, NULL);
    CHECK_GT(port, 0);
    int fd = tu_connect(port);
    knet_conn *conn = tu_tracker_rec(st, 0)->conn;
    char got[KNET_ADDRSTRLEN], want[KNET_ADDRSTRLEN];

    snprintf(want, sizeof want, "127.0.0.1:%d", port);
    expect_addr(knet_conn_local_addr(conn, got, sizeof got), got, want);
    char server_side_remote[KNET_ADDRSTRLEN];
    snprintf(server_side_remote, sizeof server_side_remote, "127.0.0.1:%d", tu_sock_port(fd));
    expect_addr(knet_conn_remote_addr(conn, got, sizeof got), got, server_side_remote);

    /* Too small a buffer: -ENOSPC (exactly strlen bytes leaves no room for the NUL). */
    CHECK_EQ(knet_conn_remote_addr(conn, got, 5), -ENOSPC);
    CHECK_EQ(knet_conn_local_addr(conn, got, strlen(want)), -ENOSPC);
    expect_addr(knet_conn_local_addr(conn, got, strlen(want) + 1), got, want);

    /* A knet client's view is the mirror image. */
    tu_tracker *ct = tu_tracker_new();
    ct->on_connect = ask_addrs;
    knet_handler ch = tu_tracker_handler(ct);
    knet_client *c = knet_client_new(want);
    CHECK(c != NULL);
    tu_client tc;
    tu_client_start(&tc, c, &ch, NULL);
    knet_conn *cconn = tu_tracker_rec(ct, 0)->conn;
    knet_conn *sconn = tu_tracker_rec(st, 1)->conn;
    char cl[KNET_ADDRSTRLEN], cr[KNET_ADDRSTRLEN], sl[KNET_ADDRSTRLEN], sr[KNET_ADDRSTRLEN];
    CHECK_GT(knet_conn_local_addr(cconn, cl, sizeof cl), 0);
    CHECK_GT(knet_conn_remote_addr(cconn, cr, sizeof cr), 0);
    CHECK_GT(knet_conn_local_addr(sconn, sl, sizeof sl), 0);
    CHECK_GT(knet_conn_remote_addr(sconn, sr, sizeof sr), 0);
    CHECK(strcmp(cr, want) == 0);
    CHECK(strcmp(sl, want) == 0);
    CHECK(strcmp(cl, sr) == 0);
    CHECK(strncmp(cl, "127.0.0.1:", 10) == 0);

    /* After close: the strings asked for while open are still there. */
    close(fd);
    WAIT_GE(&st->disconnects, 1);
    snprintf(want, sizeof want, "127.0.0.1:%d", port);
    expect_addr(knet_conn_local_addr(conn, got, sizeof got), got, want);
    expect_addr(knet_conn_remote_addr(conn, got, sizeof got), got, server_side_remote);

    CHECK_EQ(knet_client_close(c), 0);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    knet_client_free(c);
    WAIT_GE(&st->disconnects, 2);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(st);
    tu_tracker_free(ct);
}

/* Never asked while open: after close the local address is KNET_ECLOSED (or, if the
 * core kept it anyway, the right string); the remote one is always known. */
static void test_addresses_never_asked(void)
{
    tu_tracker *t = tu_tracker_new();
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, NULL);
    CHECK_GT(port, 0);
    int fd = tu_connect(port);
    char remote[KNET_ADDRSTRLEN], want[KNET_ADDRSTRLEN], got[KNET_ADDRSTRLEN];
    snprintf(remote, sizeof remote, "127.0.0.1:%d", tu_sock_port(fd));
    knet_conn *conn = tu_tracker_rec(t, 0)->conn;
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    int rc = knet_conn_local_addr(conn, got, sizeof got);
    snprintf(want, sizeof want, "127.0.0.1:%d", port);
    if (rc != KNET_ECLOSED)
        expect_addr(rc, got, want);
    expect_addr(knet_conn_remote_addr(conn, got, sizeof got), got, remote);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* ------------------------------------------------------------------ nodelay, retain */

static void test_nodelay_and_retain(void)
{
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, NULL);
    CHECK_GT(port, 0);
    int fd = tu_connect(port);
    knet_conn *conn = tu_tracker_rec(t, 0)->conn;
    CHECK_EQ(knet_conn_close_reason(conn), 1); /* open */
    CHECK_EQ(knet_conn_set_nodelay(conn, false), 0);
    CHECK_EQ(knet_conn_set_nodelay(conn, true), 0);
    char b[4];
    tu_write_str(fd, "abcd");
    READ_EXACT(fd, b, 4);

    /* An extra reference (besides the tracker's) keeps the handle valid after
     * connect(false) and after the server is gone. */
    knet_conn_retain(conn);
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t); /* drops the tracker's reference */
    CHECK_EQ(knet_conn_send(conn, "x", 1), KNET_ECLOSED);
    CHECK_EQ(knet_conn_set_nodelay(conn, true), KNET_ECLOSED);
    CHECK_EQ(knet_conn_close_reason(conn), KNET_EOF);
    knet_conn_set_pending_send(conn, 3);
    knet_conn_shutdown(conn);
    knet_conn_close(conn);
    CHECK_EQ(knet_conn_close_reason(conn), KNET_EOF); /* a late close does not rewrite it */
    knet_conn_release(conn); /* last reference: ASan/LSan check it is freed exactly once */

    /* A NULL handle is refused, not dereferenced. */
    CHECK_EQ(knet_conn_send(NULL, "x", 1), -EINVAL);
    CHECK_EQ(knet_conn_set_nodelay(NULL, true), -EINVAL);
    CHECK_EQ(knet_server_close(NULL), -EINVAL);
    CHECK_EQ(knet_server_shutdown(NULL, 0), -EINVAL);
    CHECK_EQ(knet_client_dial_and_serve(NULL, NULL, NULL), -EINVAL);
    CHECK_EQ(knet_client_close(NULL), -EINVAL);
    CHECK_EQ(knet_client_shutdown(NULL, 0), -EINVAL);
    CHECK_EQ(knet_writer_write(NULL, "x", 1), -EINVAL);
}

/* ------------------------------------------------------------------ strerror */

/* ------------------------------------------------------------------ loop threads */

static atomic_int sig_blocked = -1;

/* Hook: what the loop thread's signal mask holds while it runs a callback. */
static void sig_receive(tu_rec *r, const void *buf, size_t len)
{
    (void)r;
    (void)buf;
    (void)len;
    sigset_t set;
    pthread_sigmask(SIG_BLOCK, NULL, &set);
    atomic_store(&sig_blocked, sigismember(&set, SIGINT) == 1 && sigismember(&set, SIGTERM) == 1 &&
                                   sigismember(&set, SIGUSR1) == 1);
}

/* Loop threads take no asynchronous signals (the README promises it): they
 * belong to the application's own threads. */
static void test_loop_threads_block_signals(void)
{
    tu_tracker *t = tu_tracker_new();
    t->on_receive = sig_receive;
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, NULL);
    CHECK_GT(port, 0);
    int fd = tu_connect(port);
    tu_write_str(fd, "s");
    WAIT_GE(&t->msgs, 1);
    CHECK_EQ(atomic_load(&sig_blocked), 1);
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* A host name listens on its first IPv4 address, as Go does: "localhost:0"
 * is reachable at 127.0.0.1. */
static void test_localhost_listens_on_ipv4(void)
{
    tu_tracker *t = tu_tracker_new();
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "localhost:0", &h, NULL);
    CHECK_GT(port, 0);
    int fd = tu_connect(port); /* 127.0.0.1 */
    knet_conn *conn = tu_tracker_rec(t, 0)->conn;
    char got[KNET_ADDRSTRLEN], want[KNET_ADDRSTRLEN];
    snprintf(want, sizeof want, "127.0.0.1:%d", port);
    expect_addr(knet_conn_local_addr(conn, got, sizeof got), got, want);
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

static void test_strerror(void)
{
    static const int codes[] = {KNET_ESERVERCLOSED, KNET_ECLIENTCLOSED, KNET_EPENDINGFULL,
                                KNET_ECLOSED,       KNET_EADDR,         KNET_ECODEC,
                                KNET_ERESOLVE,      KNET_EOF,           KNET_EBUSY};
    enum { N = sizeof codes / sizeof codes[0] };
    for (int i = 0; i < N; i++) {
        const char *s = knet_strerror(codes[i]);
        CHECK(s != NULL);
        CHECK_GT(strlen(s), 0);
        for (int j = 0; j < i; j++)
            CHECK(strcmp(s, knet_strerror(codes[j])) != 0); /* each code its own text */
    }
    static const int sys[] = {-ECONNREFUSED, -EADDRINUSE, -ETIMEDOUT, -ECONNRESET, -EINVAL,
                              -ENOSPC,       -EPROTO,     -ENOMEM};
    for (size_t i = 0; i < sizeof sys / sizeof sys[0]; i++) {
        const char *s = knet_strerror(sys[i]);
        CHECK(s != NULL);
        CHECK_GT(strlen(s), 0);
    }
    static const int odd[] = {0, 1, -99999, -20000, -20010, INT_MIN, INT_MAX};
    for (size_t i = 0; i < sizeof odd / sizeof odd[0]; i++) {
        const char *s = knet_strerror(odd[i]);
        CHECK(s != NULL);
        CHECK_GT(strlen(s), 0);
    }
    CHECK(strcmp(knet_strerror(-ECONNREFUSED), knet_strerror(-EADDRINUSE)) != 0);
}

/* The default handler ignores everything; a server using it still serves. */
static void test_default_handler(void)
{
    CHECK(knet_default_handler.connect == NULL);
    CHECK(knet_default_handler.receive == NULL);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &knet_default_handler, NULL);
    CHECK_GT(port, 0);
    int fd = tu_connect(port);
    tu_write_str(fd, "ignored");
    close(fd);
    /* Served: accepted, its 7 bytes read (and dropped), closed on the peer's FIN. */
    knet_stats st;
    WAIT_UNTIL((knet_server_stats(ts.srv, &st), st.accepted == 1 && st.bytes_in == 7 && st.live == 0));
    CHECK_EQ(st.bytes_out, 0);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
}

/* A length no object can have ((size_t)-1: what a failed read returned, passed on)
 * is refused with -EINVAL, the connection left open (before: sizeof(chunk) + len
 * wrapped in malloc and SIZE_MAX bytes were copied into a 39-byte chunk). From
 * another thread into an empty queue, which the byte bound admits any message to;
 * and on the loop, where the direct write would read past buf. */
static atomic_int size_max_on_loop_rc = 1;
static void size_max_on_connect(tu_rec *r, bool connected)
{
    static uint8_t b[64];
    if (connected)
        atomic_store(&size_max_on_loop_rc, knet_conn_send(r->conn, b, (size_t)-1));
}

static void test_send_size_max_refused(void)
{
    tu_tracker *t = tu_tracker_new();
    t->on_connect = size_max_on_connect;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int fd = tu_connect(port);
    knet_conn *conn = tu_tracker_rec(t, 0)->conn;
    WAIT_UNTIL(atomic_load(&size_max_on_loop_rc) != 1);
    CHECK_EQ(atomic_load(&size_max_on_loop_rc), -EINVAL);
    static uint8_t buf[64];
    ssize_t n = -1;
    CHECK_EQ(knet_conn_send(conn, buf, (size_t)n), -EINVAL);
    CHECK_EQ(knet_conn_send(conn, buf, (size_t)PTRDIFF_MAX + 1), -EINVAL);
    CHECK_EQ(knet_conn_close_reason(conn), 1); /* still open */
    CHECK_EQ(knet_conn_send(conn, "ok", 2), 0);
    char got[2];
    READ_EXACT(fd, got, 2);
    CHECK_EQ(memcmp(got, "ok", 2), 0);
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* Connections kept past connect(true) by a user thread that calls every knet_conn_*
 * on them and drops its reference while the peer closes them, racing the loop's own
 * last reference (checked by ASan / TSan, no expected values beyond the error codes). */
enum { RACE_CONNS = 64 };

typedef struct race {
    pthread_mutex_t mu;
    knet_conn *conns[RACE_CONNS];
    int n;
    tu_counter connects, disconnects;
} race;

static void race_connect(knet_conn *c, bool connected, void *ud)
{
    race *r = (race *)ud;
    if (!connected) {
        tu_counter_add(&r->disconnects, 1);
        return;
    }
    knet_conn_retain(c);
    pthread_mutex_lock(&r->mu);
    CHECK_LT(r->n, RACE_CONNS);
    r->conns[r->n++] = c;
    pthread_mutex_unlock(&r->mu);
    tu_counter_add(&r->connects, 1);
}

static void *race_user(void *arg)
{
    race *r = (race *)arg;
    int done = 0;
    while (done < RACE_CONNS) {
        knet_conn *c = NULL;
        pthread_mutex_lock(&r->mu);
        if (done < r->n)
            c = r->conns[done];
        pthread_mutex_unlock(&r->mu);
        if (!c) {
            CHECK(tu_counter_wait_ge(&r->connects, done + 1, TU_DEADLINE_MS));
            continue;
        }
        char b[KNET_ADDRSTRLEN];
        int rc = knet_conn_send(c, "hi", 2);
        CHECK(rc == 0 || rc == KNET_ECLOSED || rc == KNET_EPENDINGFULL);
        rc = knet_conn_set_nodelay(c, done & 1);
        CHECK(rc == 0 || rc == KNET_ECLOSED);
        knet_conn_set_userdata(c, &r->n);
        CHECK(knet_conn_userdata(c) == &r->n);
        rc = knet_conn_local_addr(c, b, sizeof b);
        CHECK(rc > 0 || rc == KNET_ECLOSED);
        CHECK_GT(knet_conn_remote_addr(c, b, sizeof b), 0);
        knet_conn_set_pending_send(c, 1);
        knet_conn_set_max_queued_bytes(c, 1);
        CHECK_EQ(knet_conn_set_alloc(c, NULL, NULL), -EINVAL); /* not its loop thread */
        if (done % 3 == 0)
            knet_conn_close(c);
        else if (done % 3 == 1)
            knet_conn_close_with_timeout(c, 0);
        else
            knet_conn_shutdown(c);
        rc = knet_conn_close_reason(c);
        (void)rc;
        knet_conn_release(c);
        done++;
    }
    return NULL;
}

static void test_release_races_loop(void)
{
    race r;
    memset(&r, 0, sizeof r);
    pthread_mutex_init(&r.mu, NULL);
    tu_counter_init(&r.connects);
    tu_counter_init(&r.disconnects);
    knet_handler h = {race_connect, NULL, &r};
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, NULL);
    CHECK_GT(port, 0);
    pthread_t th;
    CHECK_EQ(pthread_create(&th, NULL, race_user, &r), 0);
    for (int i = 0; i < RACE_CONNS; i++) {
        int fd = tu_connect(port);
        if (i & 1)
            tu_set_linger0(fd);
        close(fd); /* the loop finishes it while the user thread works on it */
    }
    CHECK_EQ(pthread_join(th, NULL), 0);
    WAIT_GE(&r.disconnects, RACE_CONNS);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_counter_destroy(&r.connects);
    tu_counter_destroy(&r.disconnects);
    pthread_mutex_destroy(&r.mu);
}

int main(void)
{
    check_loop_threads_before_start(); /* before tu_begin starts the loops */
    tu_begin();
    RUN(test_loop_threads_busy_after_start);
    RUN(test_userdata);
    RUN(test_addresses);
    RUN(test_addresses_never_asked);
    RUN(test_nodelay_and_retain);
    RUN(test_loop_threads_block_signals);
    RUN(test_localhost_listens_on_ipv4);
    RUN(test_strerror);
    RUN(test_default_handler);
    RUN(test_send_size_max_refused);
    RUN(test_release_races_loop);
    return tu_end();
}
