/* Graceful shutdown and hard close of a connection with a multi-megabyte queue:
 * shutdown delivers every queued byte (checksum) then EOF, and connect(false) only
 * after the peer closes; close_with_timeout keeps delivering receives until the peer
 * closes; close drops the queue; sends after close or shutdown return KNET_ECLOSED. */
#include "testutil.h"

enum { MSG = 64 * 1024 };

/* The peer's receive buffer: small, so most of the data waits in knet's queue. */
#define PEER_RCVBUF 16384

/* Sends total bytes of stream `seed` in MSG-byte messages from its own thread. */
typedef struct bulk {
    knet_conn *conn;
    size_t total;
    uint32_t seed;
    uint64_t fnv;
} bulk;

static void *bulk_main(void *arg)
{
    bulk *b = (bulk *)arg;
    uint8_t *buf = malloc(MSG);
    CHECK(buf != NULL);
    b->fnv = TU_FNV_INIT;
    for (size_t off = 0; off < b->total; off += MSG) {
        tu_pattern_fill(buf, MSG, off, b->seed);
        b->fnv = tu_fnv(b->fnv, buf, MSG);
        CHECK_EQ(knet_conn_send(b->conn, buf, MSG), 0);
    }
    free(buf);
    return NULL;
}

/* Sends the stream from another thread and waits until every send returned. */
static uint64_t send_bulk(knet_conn *conn, size_t total, uint32_t seed)
{
    bulk b = {conn, total, seed, 0};
    pthread_t th;
    CHECK_EQ(pthread_create(&th, NULL, bulk_main, &b), 0);
    CHECK_EQ(pthread_join(th, NULL), 0);
    return b.fnv;
}

/* Reads until EOF (fails on reset): returns the byte count, checks the stream. */
static size_t read_to_eof(int fd, uint32_t seed, uint64_t *fnv)
{
    uint8_t *buf = malloc(MSG);
    CHECK(buf != NULL);
    size_t got = 0;
    *fnv = TU_FNV_INIT;
    for (;;) {
        ssize_t r = tu_read_some(fd, buf, MSG);
        CHECK_GE(r, 0);
        if (r == 0)
            break;
        CHECK_EQ(tu_pattern_mismatch(buf, (size_t)r, got, seed), r);
        *fnv = tu_fnv(*fnv, buf, (size_t)r);
        got += (size_t)r;
    }
    free(buf);
    return got;
}

/* 8 MiB queued while the peer does not read; a graceful close; the peer then reads
 * all of it, checksum equal, then EOF; connect(false) comes after the peer closes.
 * Not knet_conn_shutdown: its 3 s would be a speed assertion (a loaded machine took
 * longer under TSan, and the force close cut the stream); the deadline here is only
 * a safety bound. Its 3 s: test_close_paths. */
static void test_shutdown_delivers_queue(void)
{
    tu_tracker *t = tu_tracker_new();
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, NULL);
    CHECK_GT(port, 0);
    int fd = tu_connect_ex(port, PEER_RCVBUF);
    knet_conn *conn = tu_tracker_rec(t, 0)->conn;

    const size_t total = (size_t)8 << 20;
    uint64_t sent_fnv = send_bulk(conn, total, 21);
    knet_conn_close_with_timeout(conn, TU_DEADLINE_MS);
    CHECK_EQ(knet_conn_send(conn, "x", 1), KNET_ECLOSED);

    int64_t t0 = tu_now_ms();
    uint64_t got_fnv;
    CHECK_EQ(read_to_eof(fd, 21, &got_fnv), total);
    CHECK_EQ(got_fnv, sent_fnv);
    printf("  peer read 8 MiB in %lld ms\n", (long long)(tu_now_ms() - t0));
    CHECK_EQ(tu_counter_get(&t->disconnects), 0); /* waiting for the peer to close */
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&t->recs[0].reason), 0);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* close_with_timeout: queued bytes go out, then EOF; receives from the peer keep being
 * delivered until the peer closes; reason 0 (the peer closed before the timeout). */
static void test_close_with_timeout_keeps_receiving(void)
{
    tu_tracker *t = tu_tracker_new();
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, NULL);
    CHECK_GT(port, 0);
    int fd = tu_connect_ex(port, PEER_RCVBUF);
    knet_conn *conn = tu_tracker_rec(t, 0)->conn;

    const size_t total = (size_t)1 << 20;
    uint64_t sent_fnv = send_bulk(conn, total, 22);
    knet_conn_close_with_timeout(conn, TU_DEADLINE_MS);
    CHECK_EQ(knet_conn_send(conn, "x", 1), KNET_ECLOSED);
    uint64_t got_fnv;
    CHECK_EQ(read_to_eof(fd, 22, &got_fnv), total);
    CHECK_EQ(got_fnv, sent_fnv);
    for (int i = 1; i <= 3; i++) {
        char msg[4096];
        memset(msg, 'a' + i, sizeof msg);
        tu_write_all(fd, msg, sizeof msg);
        WAIT_GE(&t->bytes, (long)sizeof msg * i); /* still delivered */
    }
    CHECK_EQ(tu_counter_get(&t->disconnects), 0);
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&t->recs[0].rx_bytes), 3 * 4096);
    CHECK_EQ(atomic_load(&t->recs[0].reason), 0);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* Shutdown from inside receive: sends from the callback are refused afterwards, and
 * the message the peer sends after seeing EOF is still delivered. */
static void shutdown_on_receive(tu_rec *r, const void *buf, size_t len)
{
    if (len == 4 && memcmp(buf, "quit", 4) == 0) {
        CHECK_EQ(knet_conn_send(r->conn, "ok", 2), 0);
        knet_conn_shutdown(r->conn);
        CHECK_EQ(knet_conn_send(r->conn, "no", 2), KNET_ECLOSED);
    }
}

static void test_shutdown_inside_receive(void)
{
    tu_tracker *t = tu_tracker_new();
    t->on_receive = shutdown_on_receive;
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, &knet_std_codec);
    CHECK_GT(port, 0);
    int fd = tu_connect(port);
    tu_write_frame(fd, 2, false, "quit", 4);
    char b[8];
    CHECK_EQ(tu_read_frame(fd, 2, false, b, sizeof b), 2);
    CHECK(memcmp(b, "ok", 2) == 0);
    CHECK_EQ(tu_read_some(fd, b, sizeof b), 0);
    tu_write_frame(fd, 2, false, "last", 4);
    WAIT_GE(&t->msgs, 2);
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&t->recs[0].reason), 0);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* close drops the queue: of 16 MiB queued (more than both kernel buffers can hold)
 * the peer gets a clean prefix and then EOF or a reset; sends fail with KNET_ECLOSED. */
static void test_close_drops_queue(void)
{
    tu_tracker *t = tu_tracker_new();
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, NULL);
    CHECK_GT(port, 0);
    int fd = tu_connect_ex(port, PEER_RCVBUF);
    knet_conn *conn = tu_tracker_rec(t, 0)->conn;

    const size_t total = (size_t)16 << 20;
    send_bulk(conn, total, 23);
    knet_conn_close(conn);
    CHECK_EQ(knet_conn_send(conn, "x", 1), KNET_ECLOSED);
    knet_conn_shutdown(conn); /* no-op after close */
    CHECK_EQ(knet_conn_send(conn, "x", 1), KNET_ECLOSED);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&t->recs[0].reason), 0);

    uint8_t *buf = malloc(MSG);
    CHECK(buf != NULL);
    size_t got = 0;
    ssize_t r;
    while ((r = tu_read_some(fd, buf, MSG)) > 0) {
        CHECK_EQ(tu_pattern_mismatch(buf, (size_t)r, got, 23), r);
        got += (size_t)r;
    }
    CHECK(r == 0 || r == -ECONNRESET);
    printf("  peer got %zu of %zu bytes after close\n", got, total);
    CHECK_LT(got, total);
    free(buf);
    close(fd);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* A server shutdown force-closes, at its own deadline, a connection already
 * closing gracefully with a later one: listen_and_serve returns in time. */
static void test_shutdown_brings_graceful_deadline_forward(void)
{
    tu_tracker *t = tu_tracker_new();
    tu_server ts;
    int fd = tu_connect(tu_tracked_server_start(&ts, t, NULL));
    knet_conn *c = tu_tracker_rec(t, 0)->conn;
    knet_conn_close_with_timeout(c, 600000); /* ten minutes; this peer never closes */
    char b;
    CHECK_EQ(tu_read_full(fd, &b, 1), 0); /* the server's FIN: the close is under way */
    CHECK_EQ(knet_server_shutdown(ts.srv, 200), 0);
    CHECK_EQ(tu_server_join(&ts), KNET_ESERVERCLOSED); /* waits at most 20 s */
    CHECK_EQ(atomic_load(&t->recs[0].reason), -ETIMEDOUT);
    close(fd);
    tu_tracker_free(t);
}

/* Asked again while under way, a graceful close keeps the earlier deadline:
 * 10 min then 200 ms ends at 200 ms; 200 ms then 10 min, too. */
static void test_second_graceful_close_keeps_earlier_deadline(void)
{
    tu_tracker *t = tu_tracker_new();
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int fds[2] = {tu_connect(port), tu_connect(port)};
    const uint32_t first[2] = {600000, 200}, second[2] = {200, 600000};
    for (int i = 0; i < 2; i++) {
        knet_conn *c = tu_tracker_rec(t, i)->conn;
        char a[KNET_ADDRSTRLEN];
        CHECK_GT(knet_conn_remote_addr(c, a, sizeof a), 0);
        int k = tu_sock_port(fds[0]) == atoi(strrchr(a, ':') + 1) ? 0 : 1; /* its peer */
        knet_conn_close_with_timeout(c, first[k]);
        char b;
        CHECK_EQ(tu_read_full(fds[k], &b, 1), 0); /* the server's FIN: under way */
        knet_conn_close_with_timeout(c, second[k]);
    }
    WAIT_GE(&t->disconnects, 2); /* waits at most 20 s */
    for (int i = 0; i < 2; i++)
        CHECK_EQ(atomic_load(&t->recs[i].reason), -ETIMEDOUT);
    close(fds[0]);
    close(fds[1]);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

int main(void)
{
    tu_begin();
    RUN(test_shutdown_delivers_queue);
    RUN(test_close_with_timeout_keeps_receiving);
    RUN(test_shutdown_inside_receive);
    RUN(test_close_drops_queue);
    RUN(test_shutdown_brings_graceful_deadline_forward);
    RUN(test_second_graceful_close_keeps_earlier_deadline);
    return tu_end();
}
