/* Fault: the peer resets (SO_LINGER {1,0} then close) while knet is sending a
 * large queue to it. Promise: exactly one connect(false) for that connection,
 * close reason -ECONNRESET or -EPIPE, later sends return KNET_ECLOSED, nothing
 * crashes, and every other connection of the same server keeps working. */
#include "faultutil.h"

enum { MSG = 64 * 1024 };

/* True for the two ways a reset shows up on a socket knet writes to. */
static bool is_reset(int reason)
{
    return reason == -ECONNRESET || reason == -EPIPE;
}

/* Sends 4 KiB through fd and reads the same 4 KiB back (the server echoes). */
static void echo_roundtrip(int fd, uint32_t seed)
{
    uint8_t out[4096], in[4096];
    tu_pattern_fill(out, sizeof out, 0, seed);
    tu_write_all(fd, out, sizeof out);
    READ_EXACT(fd, in, sizeof in);
    CHECK_EQ(memcmp(in, out, sizeof in), 0);
}

/* Sends MSG-byte messages to conn until knet refuses with KNET_ECLOSED; counts
 * the ones accepted. Runs on its own thread, racing the reset. */
typedef struct flood {
    knet_conn *conn;
    atomic_long accepted, full;
    int last;
} flood;

static void *flood_main(void *arg)
{
    flood *f = (flood *)arg;
    uint8_t *buf = malloc(MSG);
    CHECK(buf != NULL);
    memset(buf, 'r', MSG);
    int64_t end = tu_now_ms() + TU_DEADLINE_MS;
    for (;;) {
        int rc = knet_conn_send(f->conn, buf, MSG);
        if (rc == 0) {
            f->accepted++;
        } else if (rc == KNET_EPENDINGFULL) {
            f->full++;
            tu_sleep_ms(1); /* the queue is at its bound: poll until the close lands */
        } else {
            f->last = rc;
            break;
        }
        CHECK_LT(tu_now_ms(), end);
    }
    free(buf);
    return NULL;
}

/* 32 MiB queued to a peer that reads 64 KiB and then resets; a sender thread keeps
 * sending throughout. Exactly one connect(false) with a reset reason; the sender
 * ends with KNET_ECLOSED; a second connection echoes before and after. */
static void test_reset_while_sending_large_queue(void)
{
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    knet_handler h = tu_tracker_handler(t);
    fu_limits lim = {0, 0, 8 * FU_MIB}; /* so the racing sender meets the bound too */
    tu_server ts;
    int port = fu_server_start(&ts, &h, NULL, &lim);
    CHECK_GT(port, 0);

    int victim = tu_connect_ex(port, 4096);
    knet_conn *vconn = tu_tracker_rec(t, 0)->conn;
    int other = tu_connect(port);
    (void)tu_tracker_rec(t, 1);
    echo_roundtrip(other, 1);

    /* Fill the queue first, from this thread. */
    uint8_t *buf = malloc(MSG);
    CHECK(buf != NULL);
    memset(buf, 'q', MSG);
    int queued = 0;
    while (queued < 512 && knet_conn_send(vconn, buf, MSG) == 0)
        queued++;
    CHECK_GT(queued, 16);
    free(buf);

    flood f;
    memset(&f, 0, sizeof f);
    f.conn = vconn;
    pthread_t th;
    CHECK_EQ(pthread_create(&th, NULL, flood_main, &f), 0);

    /* The sender is running (it meets the bound), the peer takes a little, proving
     * the stream flows, then resets. */
    WAIT_UNTIL(atomic_load(&f.accepted) + atomic_load(&f.full) >= 5);
    uint8_t got[MSG];
    READ_EXACT(victim, got, sizeof got);
    tu_set_linger0(victim);
    close(victim);

    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(pthread_join(th, NULL), 0);
    CHECK_EQ(f.last, KNET_ECLOSED);
    tu_rec *vr = &t->recs[0];
    CHECK_EQ(atomic_load(&vr->disconnected), 1);
    int reason = atomic_load(&vr->reason);
    if (!is_reset(reason))
        tu_fail_op(__FILE__, __LINE__, "reason", "is", "-ECONNRESET or -EPIPE", reason, -ECONNRESET);
    CHECK_EQ(knet_conn_close_reason(vconn), reason);
    CHECK_EQ(knet_conn_send(vconn, "x", 1), KNET_ECLOSED);

    /* The other connection is untouched. */
    CHECK_EQ(atomic_load(&t->recs[1].disconnected), 0);
    for (uint32_t i = 0; i < 8; i++)
        echo_roundtrip(other, 10 + i);
    CHECK_EQ(tu_counter_get(&t->disconnects), 1);
    printf("  queued %d messages, racing sender: %ld accepted, %ld full; reason %s\n", queued,
           atomic_load(&f.accepted), atomic_load(&f.full), knet_strerror(reason));

    close(other);
    WAIT_GE(&t->disconnects, 2);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    CHECK_EQ(tu_counter_get(&t->connects), 2);
    tu_tracker_free(t);
}

/* Eight peers with queued data reset at once while one keeps echoing: eight
 * connect(false), all with reset reasons, the survivor unaffected. */
static void test_many_resets_at_once(void)
{
    enum { N = 8 };
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, NULL);
    CHECK_GT(port, 0);

    int survivor = tu_connect(port);
    (void)tu_tracker_rec(t, 0);
    int fds[N];
    for (int i = 0; i < N; i++) {
        fds[i] = tu_connect_ex(port, 4096);
        knet_conn *c = tu_tracker_rec(t, i + 1)->conn;
        uint8_t *buf = calloc(1, MSG);
        CHECK(buf != NULL);
        for (int k = 0; k < 64; k++)
            CHECK_EQ(knet_conn_send(c, buf, MSG), 0);
        free(buf);
    }
    for (int i = 0; i < N; i++) {
        tu_set_linger0(fds[i]);
        close(fds[i]);
    }
    WAIT_GE(&t->disconnects, N);
    for (int i = 1; i <= N; i++) {
        int reason = atomic_load(&t->recs[i].reason);
        if (!is_reset(reason))
            tu_fail_op(__FILE__, __LINE__, "reason", "is", "a reset", reason, -ECONNRESET);
    }
    CHECK_EQ(atomic_load(&t->recs[0].disconnected), 0);
    echo_roundtrip(survivor, 99);
    close(survivor);
    WAIT_GE(&t->disconnects, N + 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* A peer that resets in the middle of a frame (std codec): reset reason, the
 * partial frame is dropped, no receive for it. */
static void test_reset_mid_frame(void)
{
    tu_tracker *t = tu_tracker_new();
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, &knet_std_codec);
    CHECK_GT(port, 0);
    int fd = tu_connect(port);
    (void)tu_tracker_rec(t, 0);
    uint8_t frame[2 + 1000];
    tu_put_len(frame, 1000, 2, false);
    memset(frame + 2, 'm', 1000);
    tu_write_all(fd, frame, 2 + 500); /* half a frame */
    WAIT_STATS(&ts, st.bytes_in >= 502);
    tu_set_linger0(fd);
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&t->recs[0].reason), -ECONNRESET);
    CHECK_EQ(atomic_load(&t->recs[0].rx_msgs), 0);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* A plain listener that accepts, reads a little, then resets each connection. */
typedef struct resetter {
    int lfd;
    int resets; /* how many connections to reset before serving normally */
    int kept;   /* the connection after the resets, left open for the test */
    tu_counter accepted;
} resetter;

static void *resetter_main(void *arg)
{
    resetter *r = (resetter *)arg;
    for (int i = 0; i <= r->resets; i++) {
        int fd = accept4(r->lfd, NULL, NULL, SOCK_CLOEXEC);
        CHECK_GE(fd, 0);
        tu_set_timeouts(fd);
        if (i == r->resets) {
            r->kept = fd;
            tu_counter_add(&r->accepted, 1);
            break;
        }
        uint8_t b[4096];
        CHECK_GT(tu_read_some(fd, b, sizeof b), 0); /* the client's queue is flowing */
        tu_set_linger0(fd);
        close(fd);
        tu_counter_add(&r->accepted, 1);
    }
    return NULL;
}

/* On the client side: the server resets while the knet client sends a large queue.
 * One connect(false) per connection with a reset reason; the persistent client
 * dials again (retry on) and the new connection works. */
static void test_client_side_reset_redials(void)
{
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK_GE(lfd, 0);
    struct sockaddr_in a = tu_loopback(0);
    CHECK_EQ(bind(lfd, (struct sockaddr *)&a, sizeof a), 0);
    CHECK_EQ(listen(lfd, 16), 0);
    int port = tu_sock_port(lfd);

    resetter r;
    memset(&r, 0, sizeof r);
    r.lfd = lfd;
    r.resets = 2;
    r.kept = -1;
    tu_counter_init(&r.accepted);
    pthread_t th;
    CHECK_EQ(pthread_create(&th, NULL, resetter_main, &r), 0);

    tu_tracker *t = tu_tracker_new();
    knet_handler h = tu_tracker_handler(t);
    knet_client *cli = tu_client_for_port(port);
    knet_client_enable_retry(cli);
    knet_client_set_retry_backoff(cli, 5, 50);
    tu_client tc;
    tu_client_start(&tc, cli, &h, NULL);

    uint8_t *buf = calloc(1, MSG);
    CHECK(buf != NULL);
    for (int i = 0; i < 2; i++) {
        knet_conn *c = tu_tracker_rec(t, i)->conn;
        for (int k = 0; k < 128; k++) {
            int rc = knet_conn_send(c, buf, MSG);
            if (rc != 0) { /* the reset may land while this loop still sends */
                CHECK_EQ(rc, KNET_ECLOSED);
                break;
            }
        }
        WAIT_GE(&t->disconnects, i + 1);
        int reason = atomic_load(&t->recs[i].reason);
        if (!is_reset(reason))
            tu_fail_op(__FILE__, __LINE__, "reason", "is", "a reset", reason, -ECONNRESET);
    }
    free(buf);
    /* Third connection: kept open by the plain server; it carries bytes. */
    knet_conn *c3 = tu_tracker_rec(t, 2)->conn;
    WAIT_GE(&r.accepted, 3);
    CHECK_EQ(pthread_join(th, NULL), 0);
    CHECK_EQ(knet_conn_send(c3, "hello", 5), 0);
    char got[5];
    READ_EXACT(r.kept, got, 5);
    CHECK_EQ(memcmp(got, "hello", 5), 0);
    CHECK_EQ(tu_counter_get(&t->disconnects), 2);

    CHECK_EQ(knet_client_close(cli), 0);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    knet_client_free(cli);
    CHECK_EQ(tu_counter_get(&t->disconnects), 3);
    close(r.kept);
    close(lfd);
    tu_counter_destroy(&r.accepted);
    tu_tracker_free(t);
}

int main(void)
{
    tu_begin();
    RUN(test_reset_while_sending_large_queue);
    RUN(test_many_resets_at_once);
    RUN(test_reset_mid_frame);
    RUN(test_client_side_reset_redials);
    return tu_end();
}
