/* connect(false) exactly once on every path, with the close reason the header
 * documents: peer close (KNET_EOF), local close inside receive / from another thread
 * (0), shutdown (0, only after the peer closes; also when the peer's FIN came before
 * the loop began it), graceful timeout (-ETIMEDOUT), server close (KNET_ESERVERCLOSED),
 * codec errors (KNET_ECODEC or the codec's own code, other connections unaffected),
 * peer reset (-ECONNRESET or KNET_EOF).
 * The tracker in testutil.h fails on a second connect(false). */
#include "testutil.h"

#include <sched.h>
#include <sys/wait.h>

static void test_peer_close(void)
{
    tu_tracker *t = tu_tracker_new();
    tu_server ts;
    int fd = tu_connect(tu_tracked_server_start(&ts, t, NULL));
    tu_write_str(fd, "hi");
    WAIT_GE(&t->bytes, 2);
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&t->recs[0].reason), KNET_EOF);
    CHECK_EQ(knet_conn_close_reason(t->recs[0].conn), KNET_EOF); /* still readable: retained */
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    CHECK_EQ(tu_counter_get(&t->disconnects), 1);
    tu_tracker_free(t);
}

/* A peer that half-closes (FIN after its request) still gets the answer, then the
 * connection ends with KNET_EOF. */
static void test_peer_half_close_gets_answer(void)
{
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    tu_server ts;
    int fd = tu_connect(tu_tracked_server_start(&ts, t, NULL));
    tu_write_str(fd, "request");
    CHECK_EQ(shutdown(fd, SHUT_WR), 0);
    char b[16];
    READ_EXACT(fd, b, 7);
    CHECK(memcmp(b, "request", 7) == 0);
    CHECK_EQ(tu_read_some(fd, b, sizeof b), 0);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&t->recs[0].reason), KNET_EOF);
    close(fd);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* A graceful close requested from another thread, with the peer's FIN seen by the
 * loop before it serviced the request: the close keeps its own terms (it completes as
 * a local close, reason 0), not a peer close's (KNET_EOF and the default timeout).
 * Another connection of the same loop holds the loop in its connect(false) while the
 * request and the FIN arrive, so the loop's next round sees the FIN first. */
static tu_counter hold_in, hold_go;

static void hold_loop_on_disconnect(tu_rec *r, bool connected)
{
    if (connected || atomic_load(&r->flag) != 1)
        return;
    tu_counter_add(&hold_in, 1);
    CHECK(tu_counter_wait_ge(&hold_go, 1, TU_DEADLINE_MS));
}

static void test_graceful_request_then_peer_fin(void)
{
    tu_counter_init(&hold_in);
    tu_counter_init(&hold_go);
    tu_tracker *t = tu_tracker_new();
    t->on_connect = hold_loop_on_disconnect;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int fds[9];
    unsigned n = knet_loop_threads() + 1; /* two of them share a loop */
    CHECK_LT(n, 10u);
    for (unsigned i = 0; i < n; i++) {
        fds[i] = tu_connect(port);
        WAIT_GE(&t->connects, (long)i + 1); /* recs[i] is fds[i] */
    }
    int hold = -1, target = -1;
    for (unsigned i = 0; i < n && hold < 0; i++)
        for (unsigned j = i + 1; j < n && hold < 0; j++)
            if (pthread_equal(t->recs[i].thread, t->recs[j].thread)) {
                hold = (int)i;
                target = (int)j;
            }
    CHECK_GE(hold, 0);
    atomic_store(&t->recs[hold].flag, 1);
    knet_conn_close(t->recs[hold].conn);
    WAIT_GE(&hold_in, 1); /* the loop is in hold's connect(false) */
    knet_conn_close_with_timeout(t->recs[target].conn, 60000);
    CHECK_EQ(shutdown(fds[target], SHUT_WR), 0);
    tu_counter_add(&hold_go, 1);
    EXPECT_PEER_CLOSED(fds[target]);
    WAIT_GE(&t->disconnects, 2);
    CHECK_EQ(atomic_load(&t->recs[target].reason), 0);
    for (unsigned i = 0; i < n; i++)
        close(fds[i]);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
    tu_counter_destroy(&hold_in);
    tu_counter_destroy(&hold_go);
}

static void close_on_receive(tu_rec *r, const void *buf, size_t len)
{
    (void)buf;
    (void)len;
    knet_conn_close(r->conn);
    knet_conn_close(r->conn); /* twice: still one connect(false) */
}

static void test_close_inside_receive(void)
{
    tu_tracker *t = tu_tracker_new();
    t->on_receive = close_on_receive;
    tu_server ts;
    int fd = tu_connect(tu_tracked_server_start(&ts, t, NULL));
    tu_write_str(fd, "x");
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&t->recs[0].reason), 0);
    EXPECT_PEER_CLOSED(fd);
    close(fd);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    CHECK_EQ(tu_counter_get(&t->disconnects), 1);
    tu_tracker_free(t);
}

static void test_close_from_other_thread(void)
{
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    tu_server ts;
    int fd = tu_connect(tu_tracked_server_start(&ts, t, NULL));
    knet_conn *conn = tu_tracker_rec(t, 0)->conn;
    char b[4];
    tu_write_str(fd, "ping");
    READ_EXACT(fd, b, 4);
    knet_conn_close(conn);
    CHECK_EQ(knet_conn_send(conn, "x", 1), KNET_ECLOSED); /* at once, not after the loop ran */
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&t->recs[0].reason), 0);
    CHECK_EQ(knet_conn_close_reason(conn), 0);
    EXPECT_PEER_CLOSED(fd);
    close(fd);
    /* Every further close call is a no-op. */
    knet_conn_close(conn);
    knet_conn_shutdown(conn);
    knet_conn_close_with_timeout(conn, 10);
    CHECK_EQ(knet_conn_send(conn, "x", 1), KNET_ECLOSED);
    CHECK_EQ(knet_conn_set_nodelay(conn, true), KNET_ECLOSED);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    CHECK_EQ(tu_counter_get(&t->disconnects), 1);
    tu_tracker_free(t);
}

/* ------------------------------------------------------------------ close while sending */

typedef struct spam {
    knet_conn *conn;
    tu_counter sent;
    int last_rc;
} spam;

/* Sends 1 KiB messages until a send fails; records why. */
static void *spam_main(void *arg)
{
    spam *s = (spam *)arg;
    uint8_t buf[1024];
    memset(buf, 'z', sizeof buf);
    int rc;
    /* At the queue's byte bound (the reader fell behind) wait for it, until the close. */
    while ((rc = knet_conn_send(s->conn, buf, sizeof buf)) == 0 || rc == KNET_EPENDINGFULL) {
        if (rc == 0)
            tu_counter_add(&s->sent, 1);
        else
            sched_yield();
    }
    s->last_rc = rc;
    return NULL;
}

typedef struct drain {
    int fd;
    long bytes;
} drain;

/* Reads until EOF or reset. */
static void *drain_main(void *arg)
{
    drain *d = (drain *)arg;
    uint8_t buf[65536];
    ssize_t r;
    while ((r = tu_read_some(d->fd, buf, sizeof buf)) > 0)
        d->bytes += r;
    CHECK(r == 0 || r == -ECONNRESET);
    return NULL;
}

/* Close from another thread while a third thread keeps sending and the peer reads:
 * the sender sees KNET_ECLOSED, connect(false) runs once, nothing crashes. */
static void test_close_while_sending(void)
{
    tu_tracker *t = tu_tracker_new();
    tu_server ts;
    int fd = tu_connect(tu_tracked_server_start(&ts, t, NULL));
    spam s;
    memset(&s, 0, sizeof s);
    s.conn = tu_tracker_rec(t, 0)->conn;
    tu_counter_init(&s.sent);
    drain d = {fd, 0};
    pthread_t sth, dth;
    CHECK_EQ(pthread_create(&dth, NULL, drain_main, &d), 0);
    CHECK_EQ(pthread_create(&sth, NULL, spam_main, &s), 0);
    WAIT_GE(&s.sent, 2000);
    knet_conn_close(s.conn);
    CHECK_EQ(pthread_join(sth, NULL), 0);
    CHECK_EQ(s.last_rc, KNET_ECLOSED);
    CHECK_EQ(pthread_join(dth, NULL), 0);
    CHECK_LE(d.bytes, tu_counter_get(&s.sent) * 1024);
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&t->recs[0].reason), 0);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_counter_destroy(&s.sent);
    tu_tracker_free(t);
}

/* ------------------------------------------------------------------ graceful */

/* shutdown: the peer sees EOF, can still send (delivered), and connect(false) comes
 * only once the peer closes, with reason 0. */
static void test_shutdown_waits_for_peer(void)
{
    tu_tracker *t = tu_tracker_new();
    tu_server ts;
    int fd = tu_connect(tu_tracked_server_start(&ts, t, NULL));
    knet_conn *conn = tu_tracker_rec(t, 0)->conn;
    CHECK_EQ(knet_conn_send(conn, "bye", 3), 0);
    knet_conn_shutdown(conn);
    CHECK_EQ(knet_conn_send(conn, "x", 1), KNET_ECLOSED);
    char b[8];
    READ_EXACT(fd, b, 3);
    CHECK(memcmp(b, "bye", 3) == 0);
    CHECK_EQ(tu_read_some(fd, b, sizeof b), 0); /* EOF: SHUT_WR after the queue */
    tu_write_str(fd, "late");
    WAIT_GE(&t->bytes, 4);
    CHECK_EQ(tu_counter_get(&t->disconnects), 0); /* the peer has not closed yet */
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&t->recs[0].reason), 0);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* A peer that never closes: force-close after the timeout with reason -ETIMEDOUT. */
static void graceful_timeout(uint32_t ms, bool use_shutdown)
{
    tu_tracker *t = tu_tracker_new();
    tu_server ts;
    int fd = tu_connect(tu_tracked_server_start(&ts, t, NULL));
    knet_conn *conn = tu_tracker_rec(t, 0)->conn;
    int64_t t0 = tu_now_ms();
    if (use_shutdown)
        knet_conn_shutdown(conn);
    else
        knet_conn_close_with_timeout(conn, ms);
    char b[8];
    CHECK_EQ(tu_read_some(fd, b, sizeof b), 0); /* EOF, but we keep our side open */
    WAIT_GE(&t->disconnects, 1);
    int64_t elapsed = tu_now_ms() - t0;
    CHECK_GE(elapsed, (int64_t)ms * 8 / 10); /* not before the timeout */
    CHECK_LT(elapsed, (int64_t)ms * 2 + 5000); /* nor long after (a loose bound: load) */
    CHECK_EQ(atomic_load(&t->recs[0].reason), -ETIMEDOUT);
    /* The socket is gone: writing to it eventually fails, reading gives EOF/reset. */
    EXPECT_PEER_CLOSED(fd);
    close(fd);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

static void test_close_with_timeout_expires(void)
{
    graceful_timeout(300, false);
}

static void test_shutdown_default_timeout_is_3s(void)
{
    graceful_timeout(3000, true);
}

/* ------------------------------------------------------------------ server close */

static void test_server_close_closes_all(void)
{
    tu_tracker *t = tu_tracker_new();
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int fds[3];
    for (int i = 0; i < 3; i++)
        fds[i] = tu_connect(port);
    WAIT_GE(&t->connects, 3);
    CHECK_EQ(knet_conn_send(t->recs[0].conn, "queued", 6), 0);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    /* listen_and_serve returns only after every connect(false). */
    CHECK_EQ(tu_counter_get(&t->disconnects), 3);
    for (int i = 0; i < 3; i++)
        CHECK_EQ(atomic_load(&t->recs[i].reason), KNET_ESERVERCLOSED);
    for (int i = 0; i < 3; i++) {
        /* The queued message may or may not have gone out before the close. */
        char b[8];
        ssize_t r = tu_read_some(fds[i], b, sizeof b);
        if (r > 0)
            r = tu_read_some(fds[i], b, sizeof b);
        CHECK(r == 0 || r == -ECONNRESET);
        close(fds[i]);
    }
    CHECK_EQ(tu_try_connect_ex(port, 0), -ECONNREFUSED); /* no longer listening */
    tu_tracker_free(t);
}

/* The server the callback closes (atomic: written by the test, read on a loop thread). */
static _Atomic(knet_server *) server_to_close;

static void close_server_on_receive(tu_rec *r, const void *buf, size_t len)
{
    (void)r;
    (void)buf;
    (void)len;
    knet_server *s = atomic_load(&server_to_close);
    CHECK(s != NULL);
    CHECK_EQ(knet_server_close(s), 0);
    CHECK_EQ(knet_server_close(s), KNET_ESERVERCLOSED);
}

/* knet_server_close from inside a callback of one of its connections. */
static void test_server_close_from_callback(void)
{
    tu_tracker *t = tu_tracker_new();
    t->on_receive = close_server_on_receive;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    atomic_store(&server_to_close, ts.srv);
    int a = tu_connect(port), b = tu_connect(port);
    WAIT_GE(&t->connects, 2);
    tu_write_str(a, "stop");
    CHECK_EQ(tu_server_join(&ts), KNET_ESERVERCLOSED);
    CHECK_EQ(tu_counter_get(&t->disconnects), 2);
    CHECK_EQ(atomic_load(&t->recs[0].reason), KNET_ESERVERCLOSED);
    CHECK_EQ(atomic_load(&t->recs[1].reason), KNET_ESERVERCLOSED);
    EXPECT_PEER_CLOSED(a);
    EXPECT_PEER_CLOSED(b);
    close(a);
    close(b);
    tu_tracker_free(t);
}

/* ------------------------------------------------------------------ codec errors */

/* An oversized length closes that connection with KNET_ECODEC; another connection of
 * the same server keeps working, including a frame of exactly max_frame. */
static void test_codec_oversized_length(void)
{
    knet_length_field lf = {4, false, 1024};
    knet_codec codec;
    CHECK_EQ(knet_length_codec(&codec, &lf), 0);
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, &codec);
    int bad = tu_connect(port);
    WAIT_GE(&t->connects, 1);
    int good = tu_connect(port);
    WAIT_GE(&t->connects, 2);
    uint8_t body[1024], got[1024];
    tu_pattern_fill(body, sizeof body, 0, 3);
    tu_write_frame(good, 4, false, body, 10);
    CHECK_EQ(tu_read_frame(good, 4, false, got, sizeof got), 10);

    uint8_t hdr[4];
    tu_put_len(hdr, 1000000, 4, false);
    tu_write_all(bad, hdr, 4);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&t->recs[0].reason), KNET_ECODEC);
    EXPECT_PEER_CLOSED(bad);
    close(bad);

    tu_write_frame(good, 4, false, body, sizeof body); /* exactly max_frame */
    CHECK_EQ(tu_read_frame(good, 4, false, got, sizeof got), sizeof body);
    CHECK(memcmp(got, body, sizeof body) == 0);
    tu_put_len(hdr, 1025, 4, false); /* one above: closes this one too */
    tu_write_all(good, hdr, 4);
    WAIT_GE(&t->disconnects, 2);
    CHECK_EQ(atomic_load(&t->recs[1].reason), KNET_ECODEC);
    EXPECT_PEER_CLOSED(good);
    close(good);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* Raw-ish codec that rejects any '!' with -EPROTO. */
static ptrdiff_t bang_read(const void *in, size_t in_len, const void **msg, size_t *msg_len, void *ud)
{
    (void)ud;
    if (memchr(in, '!', in_len))
        return -EPROTO;
    *msg = in;
    *msg_len = in_len;
    return (ptrdiff_t)in_len;
}

/* A codec's own negative code closes the connection with that code as the reason. */
static void test_codec_read_error_code(void)
{
    knet_codec codec = {bang_read, NULL, NULL, 0};
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    tu_server ts;
    int fd = tu_connect(tu_tracked_server_start(&ts, t, &codec));
    char b[8];
    tu_write_str(fd, "ok");
    READ_EXACT(fd, b, 2); /* NULL write = raw bytes */
    CHECK(memcmp(b, "ok", 2) == 0);
    tu_write_str(fd, "no!");
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&t->recs[0].reason), -EPROTO);
    CHECK_EQ(atomic_load(&t->recs[0].rx_msgs), 1);
    EXPECT_PEER_CLOSED(fd);
    close(fd);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* ------------------------------------------------------------------ reset */

static void test_peer_reset(void)
{
    tu_tracker *t = tu_tracker_new();
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    for (int i = 0; i < 4; i++) {
        int fd = tu_connect(port);
        WAIT_GE(&t->connects, i + 1);
        if (i % 2)
            tu_write_str(fd, "some bytes first");
        tu_set_linger0(fd);
        close(fd); /* RST */
        WAIT_GE(&t->disconnects, i + 1);
        CHECK_EQ(atomic_load(&t->recs[i].reason), -ECONNRESET);
    }
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    CHECK_EQ(tu_counter_get(&t->disconnects), 4);
    tu_tracker_free(t);
}

/* A forked child keeps the process's sockets open, so closing a connection's fd
 * alone does not take it out of epoll; the core removes it first. Else the peer's
 * later bytes raise an event for the connection, freed at the end of the loop
 * iteration that closed it (ASan: heap-use-after-free). */
static tu_counter fk_connects, fk_disconnects;
static knet_conn *_Atomic fk_conn;

static void fk_connect(knet_conn *c, bool connected, void *ud)
{
    (void)ud;
    if (connected) {
        atomic_store(&fk_conn, c); /* not retained: the core frees it after close */
        tu_counter_add(&fk_connects, 1);
    } else {
        tu_counter_add(&fk_disconnects, 1);
    }
}

static void fk_receive(knet_conn *c, const void *buf, size_t len, void *ud)
{
    (void)ud;
    CHECK_EQ(knet_conn_send(c, buf, len), 0);
}

static void test_close_with_forked_child(void)
{
    tu_counter_init(&fk_connects);
    tu_counter_init(&fk_disconnects);
    knet_handler h = {fk_connect, fk_receive, NULL};
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, NULL);
    CHECK_GT(port, 0);
    int peer = tu_connect(port);
    WAIT_GE(&fk_connects, 1);

    int p[2];
    CHECK_EQ(pipe(p), 0);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) { /* holds every descriptor until the parent closes the pipe */
        close(p[1]);
        char b;
        while (read(p[0], &b, 1) < 0 && errno == EINTR) {
        }
        _exit(0);
    }
    close(p[0]);
    knet_conn_close(atomic_load(&fk_conn));
    WAIT_GE(&fk_disconnects, 1);
    tu_write_str(peer, "late"); /* the child's copy keeps the socket: accepted */
    /* One connection per loop (accepts go round-robin): each loop runs again, and
     * echoes. */
    for (unsigned i = 0; i < knet_loop_threads(); i++) {
        int fd = tu_connect(port);
        tu_write_str(fd, "ok");
        char b[2];
        READ_EXACT(fd, b, 2);
        CHECK(memcmp(b, "ok", 2) == 0);
        close(fd);
        WAIT_GE(&fk_disconnects, i + 2);
    }
    close(p[1]);
    int status;
    CHECK_EQ(waitpid(pid, &status, 0), pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    close(peer);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_counter_destroy(&fk_connects);
    tu_counter_destroy(&fk_disconnects);
}

int main(void)
{
    tu_begin();
    RUN(test_peer_close);
    RUN(test_peer_half_close_gets_answer);
    RUN(test_close_inside_receive);
    RUN(test_close_from_other_thread);
    RUN(test_close_while_sending);
    RUN(test_shutdown_waits_for_peer);
    RUN(test_graceful_request_then_peer_fin);
    RUN(test_close_with_timeout_expires);
    RUN(test_shutdown_default_timeout_is_3s);
    RUN(test_server_close_closes_all);
    RUN(test_server_close_from_callback);
    RUN(test_codec_oversized_length);
    RUN(test_codec_read_error_code);
    RUN(test_peer_reset);
    RUN(test_close_with_forked_child);
    return tu_end();
}
