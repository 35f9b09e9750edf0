/* Message order: 10,000 sends from 4 threads at once on one connection arrive in
 * each thread's order with nothing lost or corrupted — towards a plain peer and
 * towards a knet server — and sends from inside receive callbacks interleave with
 * sends from another thread without reordering either stream. */
#include "testutil.h"

enum { THREADS = 4, PER_THREAD = 2500, TOTAL = THREADS * PER_THREAD };

/* Body of message (tid, seq): [tid][seq BE32][pad]; pad length and bytes follow from both. */
static size_t make_msg(uint8_t *buf, unsigned tid, uint32_t seq)
{
    size_t pad = (seq * 7u + tid * 13u) % 300u;
    buf[0] = (uint8_t)tid;
    tu_put_len(buf + 1, seq, 4, false);
    for (size_t i = 0; i < pad; i++)
        buf[5 + i] = (uint8_t)(seq + tid + i);
    return 5 + pad;
}

/* Checks a message against make_msg and the expected next sequence of its thread. */
static void check_msg(const uint8_t *m, size_t len, uint32_t *next_seq)
{
    CHECK_GE(len, 5);
    unsigned tid = m[0];
    CHECK_LT(tid, THREADS);
    uint32_t seq = (uint32_t)tu_get_len(m + 1, 4, false);
    CHECK_EQ(seq, next_seq[tid]); /* in order, nothing lost */
    next_seq[tid]++;
    uint8_t want[5 + 300];
    size_t wl = make_msg(want, tid, seq);
    CHECK_EQ(len, wl);
    CHECK(memcmp(m, want, len) == 0);
}

/* Shared by the sender threads. */
typedef struct senders {
    knet_conn *conn;
    pthread_barrier_t start;
    unsigned next_tid;
    pthread_mutex_t mu;
} senders;

static void *sender_main(void *arg)
{
    senders *s = (senders *)arg;
    pthread_mutex_lock(&s->mu);
    unsigned tid = s->next_tid++;
    pthread_mutex_unlock(&s->mu);
    uint8_t buf[5 + 300];
    pthread_barrier_wait(&s->start); /* all four start sending together */
    for (uint32_t seq = 0; seq < PER_THREAD; seq++) {
        size_t n = make_msg(buf, tid, seq);
        CHECK_EQ(knet_conn_send(s->conn, buf, n), 0);
    }
    return NULL;
}

/* Starts THREADS sender threads on conn. */
static void start_senders(senders *s, knet_conn *conn, pthread_t *th)
{
    s->conn = conn;
    s->next_tid = 0;
    pthread_mutex_init(&s->mu, NULL);
    CHECK_EQ(pthread_barrier_init(&s->start, NULL, THREADS), 0);
    for (int i = 0; i < THREADS; i++)
        CHECK_EQ(pthread_create(&th[i], NULL, sender_main, s), 0);
}

static void join_senders(senders *s, pthread_t *th)
{
    for (int i = 0; i < THREADS; i++)
        CHECK_EQ(pthread_join(th[i], NULL), 0);
    pthread_barrier_destroy(&s->start);
    pthread_mutex_destroy(&s->mu);
}

/* 4 threads send on a server-side conn; a plain peer reads std frames concurrently. */
static void test_threads_to_plain_peer(void)
{
    tu_tracker *t = tu_tracker_new();
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, &knet_std_codec);
    CHECK_GT(port, 0);
    int fd = tu_connect(port);
    knet_conn *conn = tu_tracker_rec(t, 0)->conn;

    senders s;
    pthread_t th[THREADS];
    start_senders(&s, conn, th);
    uint32_t next[THREADS] = {0};
    uint8_t buf[65536];
    for (int i = 0; i < TOTAL; i++) {
        size_t n = tu_read_frame(fd, 2, false, buf, sizeof buf);
        check_msg(buf, n, next);
    }
    join_senders(&s, th);
    for (int i = 0; i < THREADS; i++)
        CHECK_EQ(next[i], PER_THREAD);

    /* Nothing beyond the 10,000 messages: after a graceful close the next read is EOF. */
    knet_conn_shutdown(conn);
    CHECK_EQ(tu_read_some(fd, buf, sizeof buf), 0);
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* Receive hook of the knet server: checks every message in order (loop thread only). */
static void order_receive(tu_rec *r, const void *buf, size_t len)
{
    if (!r->state) {
        r->state = calloc(THREADS, sizeof(uint32_t));
        CHECK(r->state != NULL);
    }
    check_msg(buf, len, (uint32_t *)r->state);
}

/* 4 threads send on a knet client's conn; the knet server decodes and checks order. */
static void test_threads_to_knet_server(void)
{
    tu_tracker *st = tu_tracker_new();
    st->on_receive = order_receive;
    knet_handler sh = tu_tracker_handler(st);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &sh, &knet_std_codec);
    CHECK_GT(port, 0);

    tu_tracker *ct = tu_tracker_new();
    knet_handler ch = tu_tracker_handler(ct);
    knet_client *cli = tu_client_for_port(port);
    tu_client tc;
    tu_client_start(&tc, cli, &ch, &knet_std_codec);
    knet_conn *conn = tu_tracker_rec(ct, 0)->conn;

    senders s;
    pthread_t th[THREADS];
    start_senders(&s, conn, th);
    join_senders(&s, th);
    WAIT_GE(&st->msgs, TOTAL);
    tu_rec *sr = &st->recs[0];
    CHECK_EQ(atomic_load(&sr->rx_msgs), TOTAL);
    const uint32_t *next = (const uint32_t *)sr->state;
    for (int i = 0; i < THREADS; i++)
        CHECK_EQ(next[i], PER_THREAD);

    CHECK_EQ(knet_client_close(cli), 0);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    knet_client_free(cli);
    WAIT_GE(&st->disconnects, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    free(sr->state);
    tu_tracker_free(st);
    tu_tracker_free(ct);
}

/* ------------------------------------------------------------------ sends from callbacks */

enum { REQUESTS = 2000, REPLIES_PER_REQUEST = 3, OUTSIDE = 3000 };

/* Receive hook: answers request seq with replies (seq, 0..2), sent from the callback. */
static void reply_receive(tu_rec *r, const void *buf, size_t len)
{
    CHECK_EQ(len, 4);
    uint32_t seq = (uint32_t)tu_get_len(buf, 4, false);
    for (uint8_t k = 0; k < REPLIES_PER_REQUEST; k++) {
        uint8_t m[6] = {'R', 0, 0, 0, 0, k};
        tu_put_len(m + 1, seq, 4, false);
        CHECK_EQ(knet_conn_send(r->conn, m, sizeof m), 0);
    }
}

typedef struct peer_writer {
    int fd;
} peer_writer;

/* Writes REQUESTS request frames (in bursts, so many arrive in one read). */
static void *request_writer(void *arg)
{
    peer_writer *pw = (peer_writer *)arg;
    uint8_t wire[100 * 6];
    for (uint32_t seq = 0; seq < REQUESTS;) {
        size_t w = 0;
        for (int k = 0; k < 100 && seq < REQUESTS; k++, seq++) {
            tu_put_len(wire + w, 4, 2, false);
            tu_put_len(wire + w + 2, seq, 4, false);
            w += 6;
        }
        tu_write_all(pw->fd, wire, w);
    }
    return NULL;
}

typedef struct outside_sender {
    knet_conn *conn;
} outside_sender;

/* Sends OUTSIDE tagged messages from a non-loop thread while callbacks reply. */
static void *outside_main(void *arg)
{
    outside_sender *os = (outside_sender *)arg;
    for (uint32_t seq = 0; seq < OUTSIDE; seq++) {
        uint8_t m[5] = {'T', 0, 0, 0, 0};
        tu_put_len(m + 1, seq, 4, false);
        CHECK_EQ(knet_conn_send(os->conn, m, sizeof m), 0);
    }
    return NULL;
}

static void test_sends_from_callbacks(void)
{
    tu_tracker *t = tu_tracker_new();
    t->on_receive = reply_receive;
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, &knet_std_codec);
    CHECK_GT(port, 0);
    int fd = tu_connect(port);
    knet_conn *conn = tu_tracker_rec(t, 0)->conn;

    peer_writer pw = {fd};
    outside_sender os = {conn};
    pthread_t wth, oth;
    CHECK_EQ(pthread_create(&oth, NULL, outside_main, &os), 0);
    CHECK_EQ(pthread_create(&wth, NULL, request_writer, &pw), 0);

    uint32_t next_r = 0, next_k = 0, next_t = 0;
    uint8_t buf[64];
    for (int i = 0; i < REQUESTS * REPLIES_PER_REQUEST + OUTSIDE; i++) {
        size_t n = tu_read_frame(fd, 2, false, buf, sizeof buf);
        CHECK_GE(n, 5);
        uint32_t seq = (uint32_t)tu_get_len(buf + 1, 4, false);
        if (buf[0] == 'R') {
            CHECK_EQ(n, 6);
            CHECK_EQ(seq, next_r);
            CHECK_EQ(buf[5], next_k);
            if (++next_k == REPLIES_PER_REQUEST) {
                next_k = 0;
                next_r++;
            }
        } else {
            CHECK_EQ(buf[0], 'T');
            CHECK_EQ(n, 5);
            CHECK_EQ(seq, next_t);
            next_t++;
        }
    }
    CHECK_EQ(next_r, REQUESTS);
    CHECK_EQ(next_t, OUTSIDE);
    CHECK_EQ(pthread_join(wth, NULL), 0);
    CHECK_EQ(pthread_join(oth, NULL), 0);
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&t->recs[0].rx_msgs), REQUESTS);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

int main(void)
{
    tu_begin();
    RUN(test_threads_to_plain_peer);
    RUN(test_threads_to_knet_server);
    RUN(test_sends_from_callbacks);
    return tu_end();
}
