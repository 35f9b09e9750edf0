/* Pending-send limit: with the peer not reading, knet_conn_set_pending_send(conn, 10)
 * makes sends return KNET_EPENDINGFULL; 0 lifts the limit; once the peer reads, sends
 * succeed again; every accepted message arrives, in order, nothing else. */
#include "testutil.h"

enum { MSG = 64 * 1024 };

typedef struct reader {
    int fd;
    size_t got;
} reader;

/* Reads the pattern stream until EOF, checking every byte. */
static void *reader_main(void *arg)
{
    reader *rd = (reader *)arg;
    uint8_t *buf = malloc(MSG);
    CHECK(buf != NULL);
    ssize_t r;
    while ((r = tu_read_some(rd->fd, buf, MSG)) > 0) {
        CHECK_EQ(tu_pattern_mismatch(buf, (size_t)r, rd->got, 31), r);
        rd->got += (size_t)r;
    }
    CHECK_EQ(r, 0);
    free(buf);
    return NULL;
}

/* Sends the next message of the stream; on success advances *off. */
static int send_next(knet_conn *conn, uint8_t *buf, size_t *off)
{
    tu_pattern_fill(buf, MSG, *off, 31);
    int rc = knet_conn_send(conn, buf, MSG);
    if (rc == 0)
        *off += MSG;
    return rc;
}

static void test_pending_limit(void)
{
    tu_tracker *t = tu_tracker_new();
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, NULL);
    CHECK_GT(port, 0);
    int fd = tu_connect_ex(port, 16384);
    knet_conn *conn = tu_tracker_rec(t, 0)->conn;
    uint8_t *buf = malloc(MSG);
    CHECK(buf != NULL);
    size_t off = 0;

    knet_conn_set_pending_send(conn, 10);
    int rc;
    int64_t end = tu_now_ms() + TU_DEADLINE_MS;
    while ((rc = send_next(conn, buf, &off)) == 0) {
        /* The kernel buffers hold a few MiB at most; then the queue fills. */
        CHECK_LT(tu_now_ms(), end);
        CHECK_LT(off, (size_t)256 << 20);
    }
    CHECK_EQ(rc, KNET_EPENDINGFULL);
    printf("  EPENDINGFULL after %zu messages\n", off / MSG);

    knet_conn_set_pending_send(conn, 0); /* unlimited again */
    for (int i = 0; i < 5; i++)
        CHECK_EQ(send_next(conn, buf, &off), 0);
    knet_conn_set_pending_send(conn, 10);

    /* The peer starts reading: sends are accepted again (retrying while full). */
    reader rd = {fd, 0};
    pthread_t th;
    CHECK_EQ(pthread_create(&th, NULL, reader_main, &rd), 0);
    for (int i = 0; i < 100; i++) {
        end = tu_now_ms() + TU_DEADLINE_MS;
        while ((rc = send_next(conn, buf, &off)) == KNET_EPENDINGFULL) {
            CHECK_LT(tu_now_ms(), end);
            tu_sleep_ms(1);
        }
        CHECK_EQ(rc, 0);
    }
    knet_conn_close_with_timeout(conn, TU_DEADLINE_MS);
    CHECK_EQ(pthread_join(th, NULL), 0);
    CHECK_EQ(rd.got, off); /* every accepted message, nothing more */
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&t->recs[0].reason), 0);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
    free(buf);
}

/* Hook: sets a limit of 1 and queues from inside the callback, where the loop cannot
 * write in between: the second queued send is refused. */
static void limit_in_callback(tu_rec *r, const void *buf, size_t len)
{
    (void)buf;
    (void)len;
    if (atomic_load(&r->rx_msgs) > 0)
        return;
    knet_conn_set_pending_send(r->conn, 1);
    static uint8_t big[MSG];
    int accepted = 0, rc = 0;
    /* The first sends may be written straight to the socket; the peer does not read,
     * so the kernel buffers fill and the queue reaches its limit of one. */
    for (int i = 0; i < 256 && (rc = knet_conn_send(r->conn, big, sizeof big)) == 0; i++)
        accepted++;
    CHECK_EQ(rc, KNET_EPENDINGFULL);
    atomic_store(&r->flag, accepted);
}

static void test_pending_limit_inside_callback(void)
{
    tu_tracker *t = tu_tracker_new();
    t->on_receive = limit_in_callback;
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, NULL);
    CHECK_GT(port, 0);
    int fd = tu_connect_ex(port, 16384);
    tu_write_str(fd, "go");
    WAIT_GE(&t->msgs, 1);
    CHECK_GT(atomic_load(&t->recs[0].flag), 0);
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

int main(void)
{
    tu_begin();
    RUN(test_pending_limit);
    RUN(test_pending_limit_inside_callback);
    return tu_end();
}
