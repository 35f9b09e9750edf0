/*
 * test_flow.c — flow control: knet_conn_pause_read / knet_conn_resume_read (reading
 * stops, TCP holds the peer back, nothing read is lost) and knet_conn_notify_drained
 * (once, on the loop thread, when the socket took the last queued byte), and the relay
 * they make possible: a source faster than its reader, relayed whole through a small
 * queue bound.
 */
#include "testutil.h"

#include <fcntl.h>

/* A drain notification's record: how often it ran, on which thread, with what. */
typedef struct drained {
    tu_counter runs;
    pthread_t thread;
    knet_conn *conn;
    void *ud;
    knet_server *srv;
    uint64_t bytes_out; /* the server's bytes_out when it ran */
} drained;

static void drained_init(drained *d, knet_server *srv)
{
    memset(d, 0, sizeof *d);
    tu_counter_init(&d->runs);
    d->srv = srv;
}

static void on_drained(knet_conn *c, void *ud)
{
    drained *d = (drained *)ud;
    d->thread = pthread_self();
    d->conn = c;
    d->ud = ud;
    if (d->srv) {
        knet_stats st;
        knet_server_stats(d->srv, &st);
        d->bytes_out = st.bytes_out;
    }
    tu_counter_add(&d->runs, 1);
}

/* Waits until the loop of c has taken a turn after this call: a drain notification on
 * an empty queue runs at its next turn. */
static void loop_turn(knet_conn *c)
{
    drained d;
    drained_init(&d, NULL);
    CHECK_EQ(knet_conn_notify_drained(c, on_drained, &d), 0);
    WAIT_GE(&d.runs, 1);
    tu_counter_destroy(&d.runs);
}

static void pause_first_message(tu_rec *r, const void *buf, size_t len)
{
    (void)buf;
    (void)len;
    if (atomic_load(&r->rx_msgs) == 0)
        CHECK_EQ(knet_conn_pause_read(r->conn), 0);
}

/* A pause in receive: no later message of that read is delivered, and none is lost —
 * after the resume every one arrives, in order, exactly once (also more than max_frame
 * of whole messages kept back: StdCodec's is 65,535 bytes). */
static void test_pause_in_receive_keeps_the_rest(void)
{
    tu_tracker *t = tu_tracker_new();
    t->capture = true;
    t->on_receive = pause_first_message;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, &knet_std_codec);
    enum { N = 20000 }; /* 120 KB of frames: more than one read, more than max_frame */
    static uint8_t out[N * 6];
    for (uint32_t i = 0; i < N; i++) {
        uint8_t *p = out + 6 * i;
        p[0] = 0, p[1] = 4;
        uint32_t be = htonl(i);
        memcpy(p + 2, &be, 4);
    }
    int fd = tu_connect(port);
    tu_write_all(fd, out, sizeof out);
    WAIT_GE(&t->msgs, 1);
    tu_rec *r = &t->recs[0];
    loop_turn(r->conn);
    CHECK_EQ(atomic_load(&r->rx_msgs), 1);
    CHECK_EQ(knet_conn_resume_read(r->conn), 0);
    WAIT_GE(&t->msgs, N);
    size_t off = 0, len;
    const uint8_t *msg;
    uint32_t want = 0;
    while (tu_rec_next_msg(r, &off, &msg, &len)) {
        CHECK_EQ(len, 4);
        uint32_t be;
        memcpy(&be, msg, 4);
        CHECK_EQ(ntohl(be), want);
        want++;
    }
    CHECK_EQ(want, N);
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&r->reason), KNET_EOF);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

static void pause_at_connect(tu_rec *r, bool connected)
{
    if (connected)
        CHECK_EQ(knet_conn_pause_read(r->conn), 0);
}

/* Writes the pattern to non-blocking fd until the kernel takes no more; returns the bytes. */
static size_t write_until_full(int fd, uint32_t seed)
{
    int fl = fcntl(fd, F_GETFL);
    CHECK_EQ(fcntl(fd, F_SETFL, fl | O_NONBLOCK), 0);
    static uint8_t chunk[16384];
    size_t total = 0;
    for (;;) {
        tu_pattern_fill(chunk, sizeof chunk, total, seed);
        ssize_t w = write(fd, chunk, sizeof chunk);
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        CHECK_GT(w, 0);
        total += (size_t)w;
        CHECK_LT(total, (size_t)256 << 20); /* the kernel's buffers are far smaller */
    }
    CHECK_EQ(fcntl(fd, F_SETFL, fl), 0);
    return total;
}

/* Paused from connect(true): knet reads nothing, so the peer's writes fill the kernel's
 * buffers and block (TCP holds it back); the resume delivers every byte, in order. */
static void test_pause_holds_the_peer_back(void)
{
    tu_tracker *t = tu_tracker_new();
    t->capture = true;
    t->on_connect = pause_at_connect;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int fd = tu_connect_ex(port, 0);
    int sndbuf = 64 << 10;
    CHECK_EQ(setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf), 0);
    WAIT_GE(&t->connects, 1);
    tu_rec *r = &t->recs[0];
    size_t total = write_until_full(fd, 7);
    loop_turn(r->conn);
    CHECK_EQ(atomic_load(&r->rx_bytes), 0);
    CHECK_EQ(knet_conn_resume_read(r->conn), 0);
    CHECK_EQ(knet_conn_resume_read(r->conn), 0); /* not paused: nothing to do */
    WAIT_UNTIL(atomic_load(&r->rx_bytes) == (long)total);
    size_t off = 0, len, at = 0;
    const uint8_t *msg;
    while (tu_rec_next_msg(r, &off, &msg, &len)) {
        CHECK_EQ(tu_pattern_mismatch(msg, len, at, 7), len);
        at += len;
    }
    CHECK_EQ(at, total);
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&r->reason), KNET_EOF);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* The peer's FIN while paused is seen after the resume, behind the bytes before it:
 * connect(false) with KNET_EOF only then. */
static void test_fin_while_paused_seen_on_resume(void)
{
    tu_tracker *t = tu_tracker_new();
    t->on_connect = pause_at_connect;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int fd = tu_connect(port);
    WAIT_GE(&t->connects, 1);
    tu_rec *r = &t->recs[0];
    static char data[100];
    memset(data, 'x', sizeof data);
    tu_write_all(fd, data, sizeof data);
    CHECK_EQ(shutdown(fd, SHUT_WR), 0);
    WAIT_UNTIL(tu_tcp_sockets(port, tu_sock_port(fd), 8 /* CLOSE_WAIT */) == 1);
    loop_turn(r->conn);
    CHECK_EQ(atomic_load(&r->disconnected), 0);
    CHECK_EQ(atomic_load(&r->rx_bytes), 0);
    CHECK_EQ(knet_conn_resume_read(r->conn), 0);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&r->rx_bytes), 100);
    CHECK_EQ(atomic_load(&r->reason), KNET_EOF);
    EXPECT_PEER_CLOSED(fd);
    close(fd);
    CHECK_EQ(knet_conn_pause_read(r->conn), KNET_ECLOSED);
    CHECK_EQ(knet_conn_resume_read(r->conn), KNET_ECLOSED);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* A graceful close of a paused connection reads on at once: what the peer sent is
 * delivered while 16 MiB still wait for it (not only after our FIN), every byte goes
 * out, and the peer's FIN ends the close with 0 (not -ETIMEDOUT at its deadline). */
static void test_graceful_close_reads_while_paused(void)
{
    tu_tracker *t = tu_tracker_new();
    t->on_connect = pause_at_connect;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int fd = tu_connect_ex(port, 16 << 10);
    WAIT_GE(&t->connects, 1);
    tu_rec *r = &t->recs[0];
    tu_write_str(fd, "0123456789");
    enum { TOTAL = 16 << 20, CHUNK = 64 << 10 }; /* far more than the kernel's buffers */
    static uint8_t chunk[CHUNK];
    for (size_t at = 0; at < TOTAL; at += CHUNK) {
        tu_pattern_fill(chunk, CHUNK, at, 5);
        CHECK_EQ(knet_conn_send(r->conn, chunk, CHUNK), 0);
    }
    knet_conn_close_with_timeout(r->conn, TU_DEADLINE_MS * 4);
    WAIT_UNTIL(atomic_load(&r->rx_bytes) == 10); /* before we read a byte */
    static uint8_t in[CHUNK];
    size_t at = 0;
    for (ssize_t n; (n = tu_read_some(fd, in, sizeof in)) > 0; at += (size_t)n)
        CHECK_EQ(tu_pattern_mismatch(in, (size_t)n, at, 5), (size_t)n);
    CHECK_EQ(at, TOTAL); /* then our FIN */
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&r->reason), 0);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

enum { FLOW_TOTAL = 16 << 20, FLOW_CHUNK = 64 << 10 }; /* far more than the kernel's buffers */

/* Queues FLOW_TOTAL bytes of the pattern on c (from this thread: through its inbox). */
static void queue_pattern(knet_conn *c)
{
    static uint8_t chunk[FLOW_CHUNK];
    for (size_t at = 0; at < FLOW_TOTAL; at += FLOW_CHUNK) {
        tu_pattern_fill(chunk, FLOW_CHUNK, at, 3);
        CHECK_EQ(knet_conn_send(c, chunk, FLOW_CHUNK), 0);
    }
}

/* Reads FLOW_TOTAL bytes of the pattern from fd. */
static void read_pattern(int fd)
{
    static uint8_t in[FLOW_CHUNK];
    for (size_t at = 0; at < FLOW_TOTAL;) {
        ssize_t n = tu_read_some(fd, in, sizeof in);
        CHECK_GT(n, 0);
        CHECK_EQ(tu_pattern_mismatch(in, (size_t)n, at, 3), (size_t)n);
        at += (size_t)n;
    }
}

static void never_drained(knet_conn *c, void *ud)
{
    (void)c;
    tu_counter_add((tu_counter *)ud, 1);
}

/* knet_conn_notify_drained: on an empty queue at the loop's next turn; with 16 MiB queued
 * to a peer that does not read yet, only once the socket took the last byte (the server's
 * bytes_out counts all of it then); once, on the loop thread, with its conn and ud; a
 * later request replaces an earlier, NULL cancels; KNET_ECLOSED once a close began. */
static void test_notify_drained(void)
{
    tu_tracker *t = tu_tracker_new();
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int fd = tu_connect_ex(port, 16 << 10);
    WAIT_GE(&t->connects, 1);
    tu_rec *r = &t->recs[0];

    drained d;
    drained_init(&d, ts.srv);
    CHECK_EQ(knet_conn_notify_drained(r->conn, on_drained, &d), 0);
    WAIT_GE(&d.runs, 1);
    CHECK(pthread_equal(d.thread, r->thread));
    CHECK(d.conn == r->conn);
    CHECK(d.ud == &d);

    tu_counter replaced, cancelled;
    tu_counter_init(&replaced);
    tu_counter_init(&cancelled);
    /* With the queue far over what the kernel's buffers take (the peer reads nothing yet),
     * no request can run before the next call: NULL cancels, a later one replaces. */
    queue_pattern(r->conn);
    CHECK_EQ(knet_conn_notify_drained(r->conn, never_drained, &cancelled), 0);
    CHECK_EQ(knet_conn_notify_drained(r->conn, NULL, NULL), 0);
    read_pattern(fd);
    loop_turn(r->conn); /* the flush that emptied the queue came before our last read */
    CHECK_EQ(tu_counter_get(&cancelled), 0);
    CHECK_EQ(tu_counter_get(&d.runs), 1);

    queue_pattern(r->conn);
    CHECK_EQ(knet_conn_notify_drained(r->conn, never_drained, &replaced), 0);
    CHECK_EQ(knet_conn_notify_drained(r->conn, on_drained, &d), 0);
    read_pattern(fd);
    WAIT_GE(&d.runs, 2);
    CHECK_EQ(d.bytes_out, 2 * (uint64_t)FLOW_TOTAL); /* all of it in the socket by then */
    CHECK(pthread_equal(d.thread, r->thread));
    loop_turn(r->conn);
    CHECK_EQ(tu_counter_get(&d.runs), 2);
    CHECK_EQ(tu_counter_get(&replaced), 0);

    /* A request waiting when a graceful close begins never runs: connect(false) comes. */
    queue_pattern(r->conn);
    CHECK_EQ(knet_conn_notify_drained(r->conn, never_drained, &cancelled), 0);
    knet_conn_close_with_timeout(r->conn, TU_DEADLINE_MS * 4);
    CHECK_EQ(knet_conn_notify_drained(r->conn, never_drained, &cancelled), KNET_ECLOSED);
    read_pattern(fd);
    EXPECT_PEER_CLOSED(fd);
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&r->reason), 0);
    CHECK_EQ(tu_counter_get(&cancelled), 0);
    CHECK_EQ(knet_conn_notify_drained(r->conn, never_drained, &cancelled), KNET_ECLOSED);
    CHECK_EQ(knet_conn_notify_drained(NULL, never_drained, &cancelled), -EINVAL);
    CHECK_EQ(knet_conn_pause_read(NULL), -EINVAL);
    CHECK_EQ(knet_conn_resume_read(NULL), -EINVAL);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_counter_destroy(&d.runs);
    tu_counter_destroy(&replaced);
    tu_counter_destroy(&cancelled);
    tu_tracker_free(t);
}

/* ------------------------------------------------------------------ a relay */

/* The first connection is the sink (a slow reader, a 64 KiB queue bound), the second
 * the source; the server relays what the source sends to the sink. A send the sink's
 * bound refuses is kept, the source paused, and the drain notification sends it and
 * resumes the source: the source goes at the reader's pace, nothing is dropped. */
typedef struct relay {
    knet_conn *sink, *source; /* retained */
    uint8_t *kept;            /* the refused message, until the sink drained */
    size_t kept_len;
    atomic_long pauses, errors;
    tu_counter ready;
} relay;

static void relay_drained(knet_conn *sink, void *ud)
{
    relay *rl = (relay *)ud;
    if (knet_conn_send(sink, rl->kept, rl->kept_len) != 0) /* an empty queue takes one */
        atomic_fetch_add(&rl->errors, 1);
    free(rl->kept);
    rl->kept = NULL;
    if (knet_conn_resume_read(rl->source) != 0)
        atomic_fetch_add(&rl->errors, 1);
}

static void relay_connect(tu_rec *r, bool connected)
{
    relay *rl = (relay *)r->tr->ud;
    if (!connected) {
        if (r->index == 1) /* the source finished: the sink gets the rest, then EOF */
            knet_conn_shutdown(rl->sink);
        return;
    }
    if (r->index == 0) {
        knet_conn_set_max_queued_bytes(r->conn, 64 << 10);
        rl->sink = r->conn;
    } else {
        rl->source = r->conn;
    }
    tu_counter_add(&rl->ready, 1);
}

static void relay_receive(tu_rec *r, const void *buf, size_t len)
{
    relay *rl = (relay *)r->tr->ud;
    CHECK_EQ(r->index, 1);
    int rc = knet_conn_send(rl->sink, buf, len);
    if (rc == 0)
        return;
    if (rc != KNET_EPENDINGFULL) {
        atomic_fetch_add(&rl->errors, 1);
        return;
    }
    CHECK(rl->kept == NULL); /* paused until the last one went out */
    rl->kept = (uint8_t *)malloc(len);
    CHECK(rl->kept != NULL);
    memcpy(rl->kept, buf, len);
    rl->kept_len = len;
    atomic_fetch_add(&rl->pauses, 1);
    CHECK_EQ(knet_conn_pause_read(r->conn), 0);
    CHECK_EQ(knet_conn_notify_drained(rl->sink, relay_drained, rl), 0);
}

typedef struct {
    int fd;
    size_t total;
} source_job;

static void *source_main(void *arg)
{
    source_job *j = (source_job *)arg;
    static uint8_t chunk[32768];
    for (size_t at = 0; at < j->total; at += sizeof chunk) {
        tu_pattern_fill(chunk, sizeof chunk, at, 11);
        tu_write_all(j->fd, chunk, sizeof chunk);
    }
    CHECK_EQ(shutdown(j->fd, SHUT_WR), 0);
    return NULL;
}

/* 32 MiB (8 under sanitizers) relayed through a 64 KiB queue bound to a reader that
 * starts late: every byte arrives in order, then EOF; the source was paused and resumed
 * (a relay without it could only drop or close, as test_proxy's backpressure tests do). */
static void test_relay_paces_source_to_reader(void)
{
#ifdef TU_SANITIZED
    const size_t total = 8u << 20;
#else
    const size_t total = 32u << 20;
#endif
    relay rl;
    memset(&rl, 0, sizeof rl);
    tu_counter_init(&rl.ready);
    tu_tracker *t = tu_tracker_new();
    t->ud = &rl;
    t->on_connect = relay_connect;
    t->on_receive = relay_receive;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int sink = tu_connect_ex(port, 32 << 10);
    WAIT_GE(&rl.ready, 1);
    int src = tu_connect(port);
    WAIT_GE(&rl.ready, 2);
    source_job job = {src, total};
    pthread_t th;
    CHECK_EQ(pthread_create(&th, NULL, source_main, &job), 0);
    WAIT_UNTIL(atomic_load(&rl.pauses) >= 1); /* the reader starts late */
    static uint8_t in[65536];
    size_t at = 0;
    for (;;) {
        ssize_t n = tu_read_some(sink, in, sizeof in);
        CHECK_GE(n, 0);
        if (n == 0)
            break;
        size_t bad = tu_pattern_mismatch(in, (size_t)n, at, 11);
        if (bad != (size_t)n)
            fprintf(stderr, "mismatch at byte %zu\n", at + bad);
        CHECK_EQ(bad, (size_t)n);
        at += (size_t)n;
    }
    CHECK_EQ(at, total);
    CHECK_EQ(pthread_join(th, NULL), 0);
    CHECK_EQ(atomic_load(&rl.errors), 0);
    CHECK_GE(atomic_load(&rl.pauses), 1);
    close(sink);
    close(src);
    WAIT_GE(&t->disconnects, 2);
    CHECK_EQ(atomic_load(&t->recs[0].reason), 0);
    CHECK_EQ(atomic_load(&t->recs[1].reason), KNET_EOF);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    free(rl.kept);
    tu_counter_destroy(&rl.ready);
    tu_tracker_free(t);
}

/* ------------------------------------------------------------------ requests meeting a close */

static void drain_after_close(knet_conn *c, void *ud)
{
    (void)c;
    tu_counter_add((tu_counter *)ud, 1);
}

typedef struct close_case {
    int graceful;
    tu_counter runs; /* of the drain request */
} close_case;

/* receive: two sends (the second waits for the read pass's end), a drain request, then a
 * close or a graceful close: the close began, so the request never runs, even though the
 * pass's end writes the queue out before the close is taken. */
static void send_two_then_close(tu_rec *r, const void *buf, size_t len)
{
    (void)buf;
    (void)len;
    close_case *cc = (close_case *)r->tr->ud;
    if (atomic_load(&r->rx_msgs) != 0)
        return;
    CHECK_EQ(knet_conn_send(r->conn, "a", 1), 0);
    CHECK_EQ(knet_conn_send(r->conn, "b", 1), 0);
    CHECK_EQ(knet_conn_notify_drained(r->conn, drain_after_close, &cc->runs), 0);
    if (cc->graceful)
        knet_conn_shutdown(r->conn);
    else
        knet_conn_close(r->conn);
}

static void test_no_drain_after_close_in_receive(void)
{
    for (int graceful = 0; graceful < 2; graceful++) {
        close_case cc;
        memset(&cc, 0, sizeof cc);
        cc.graceful = graceful;
        tu_counter_init(&cc.runs);
        tu_tracker *t = tu_tracker_new();
        t->ud = &cc;
        t->on_receive = send_two_then_close;
        tu_server ts;
        int port = tu_tracked_server_start(&ts, t, NULL);
        int fd = tu_connect(port);
        tu_write_str(fd, "x");
        WAIT_GE(&t->msgs, 1);
        if (graceful)
            CHECK_EQ(shutdown(fd, SHUT_WR), 0); /* ends the graceful close (the peer's FIN) */
        WAIT_GE(&t->disconnects, 1);
        CHECK_EQ(tu_counter_get(&cc.runs), 0);
        CHECK_EQ(atomic_load(&t->recs[0].reason), 0);
        close(fd);
        CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
        tu_tracker_free(t);
        tu_counter_destroy(&cc.runs);
    }
}

/* ------------------------------------------------------------------ held frames, own reads */

enum { BIG_ALLOC = 1 << 20 };

static void *big_alloc(knet_conn *c, size_t suggested, size_t *cap, void *ud)
{
    (void)c;
    (void)suggested;
    *cap = BIG_ALLOC;
    return ud;
}

static void alloc_and_pause(tu_rec *r, bool connected)
{
    if (!connected)
        return;
    CHECK_EQ(knet_conn_set_alloc(r->conn, big_alloc, r->tr->ud), 0);
    CHECK_EQ(knet_conn_pause_read(r->conn), 0);
}

/* Frames are [1][i & 0xff]; the first one pauses. */
static void check_tiny_frame(tu_rec *r, const void *buf, size_t len)
{
    CHECK_EQ(len, 1);
    CHECK_EQ(*(const uint8_t *)buf, (uint8_t)atomic_load(&r->rx_msgs));
    if (atomic_load(&r->rx_msgs) == 0)
        CHECK_EQ(knet_conn_pause_read(r->conn), 0);
}

/* The receive queue (/proc/net/tcp rx_queue) of this host's socket local_port -> remote_port. */
static long rx_queue(int local_port, int remote_port)
{
    FILE *f = fopen("/proc/net/tcp", "r");
    CHECK(f != NULL);
    char line[512];
    long q = -1;
    CHECK(fgets(line, sizeof line, f) != NULL); /* header */
    while (fgets(line, sizeof line, f)) {
        unsigned lp, rp;
        unsigned long tx, rx;
        if (sscanf(line, " %*d: %*x:%x %*x:%x %*x %lx:%lx", &lp, &rp, &tx, &rx) == 4 &&
            (int)lp == local_port && (int)rp == remote_port)
            q = (long)rx;
    }
    fclose(f);
    return q;
}

/* A read into handler memory (knet_conn_set_alloc, 1 MiB) holds more than max_frame plus
 * knet's buffer of whole frames (a 1-byte length codec: max_frame 255): a pause after its
 * first frame keeps the rest, and the resume delivers each, in order, once. */
static void test_pause_keeps_a_large_handler_read(void)
{
    knet_length_field lf = {1, false, 255};
    knet_codec codec;
    CHECK_EQ(knet_length_codec(&codec, &lf), 0);
    uint8_t *mem = (uint8_t *)malloc(BIG_ALLOC);
    CHECK(mem != NULL);
    tu_tracker *t = tu_tracker_new();
    t->ud = mem;
    t->on_connect = alloc_and_pause;
    t->on_receive = check_tiny_frame;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, &codec);
    int fd = tu_connect(port);
    tu_rec *r = tu_tracker_rec(t, 0);
    enum { FRAMES = 200000 };
    static uint8_t out[2 * FRAMES];
    for (size_t i = 0; i < FRAMES; i++) {
        out[2 * i] = 1;
        out[2 * i + 1] = (uint8_t)i;
    }
    int fl = fcntl(fd, F_GETFL);
    CHECK_EQ(fcntl(fd, F_SETFL, fl | O_NONBLOCK), 0);
    ssize_t w = write(fd, out, sizeof out);
    CHECK_GT(w, 0);
    CHECK_EQ(fcntl(fd, F_SETFL, fl), 0);
    /* More than 65,536 + 256 bytes wait in knet's socket: its first read takes them. */
    WAIT_UNTIL(rx_queue(port, tu_sock_port(fd)) >= 80000);
    CHECK_EQ(knet_conn_resume_read(r->conn), 0);
    WAIT_GE(&t->msgs, 1);
    loop_turn(r->conn);
    CHECK_EQ(atomic_load(&r->rx_msgs), 1);
    CHECK_EQ(knet_conn_resume_read(r->conn), 0);
    tu_write_all(fd, out + w, sizeof out - (size_t)w);
    WAIT_GE(&t->msgs, FRAMES);
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&r->rx_msgs), FRAMES);
    CHECK_EQ(atomic_load(&r->reason), KNET_EOF);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
    free(mem);
}

/* ------------------------------------------------------------------ pauses from another thread */

typedef struct toggler {
    knet_conn *conn;
    tu_tracker *t;
    long want;
    atomic_long toggles;
} toggler;

static void *toggle_main(void *arg)
{
    toggler *tg = (toggler *)arg;
    int64_t end = tu_now_ms() + TU_DEADLINE_MS;
    while (tu_counter_get(&tg->t->msgs) < tg->want && tu_now_ms() < end) {
        CHECK_EQ(knet_conn_pause_read(tg->conn), 0);
        sched_yield();
        CHECK_EQ(knet_conn_resume_read(tg->conn), 0);
        atomic_fetch_add(&tg->toggles, 1);
    }
    return NULL;
}

/* Pauses and resumes from another thread, racing the loop's reads and decodes of a stream
 * of small frames and its FIN: every frame arrives once, in order, then KNET_EOF. */
static void test_pause_resume_race_the_read_pass(void)
{
    tu_tracker *t = tu_tracker_new();
    t->capture = true;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, &knet_std_codec);
    int fd = tu_connect(port);
    tu_rec *r = tu_tracker_rec(t, 0);
    enum { N = 100000 };
    static uint8_t out[N * 6];
    for (uint32_t i = 0; i < N; i++) {
        uint8_t *p = out + 6 * i;
        p[0] = 0, p[1] = 4;
        uint32_t be = htonl(i);
        memcpy(p + 2, &be, 4);
    }
    toggler tg = {r->conn, t, N, 0};
    pthread_t th;
    CHECK_EQ(pthread_create(&th, NULL, toggle_main, &tg), 0);
    for (size_t at = 0; at < sizeof out; at += 6 * 1000) /* many reads, each split by pauses */
        tu_write_all(fd, out + at, 6 * 1000);
    CHECK_EQ(shutdown(fd, SHUT_WR), 0);
    WAIT_GE(&t->msgs, N);
    CHECK_EQ(pthread_join(th, NULL), 0);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&r->reason), KNET_EOF);
    size_t off = 0, len;
    const uint8_t *msg;
    uint32_t want = 0;
    while (tu_rec_next_msg(r, &off, &msg, &len)) {
        CHECK_EQ(len, 4);
        uint32_t be;
        memcpy(&be, msg, 4);
        CHECK_EQ(ntohl(be), want);
        want++;
    }
    CHECK_EQ(want, N);
    CHECK_GT(atomic_load(&tg.toggles), 0);
    close(fd);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* ------------------------------------------------------------------ what follows held frames */

/* Frames [1][i] kept back by a pause in the first receive, behind them a frame the codec
 * rejects (bad = true) or not, then the peer's FIN: nothing is delivered, nor the close
 * seen, before the resume; then every frame in order, then connect(false) with
 * KNET_ECODEC or KNET_EOF. */
static void test_held_frames_then_error_or_eof(void)
{
    knet_length_field lf = {1, false, 100};
    knet_codec codec;
    CHECK_EQ(knet_length_codec(&codec, &lf), 0);
    for (int bad = 0; bad < 2; bad++) {
        tu_tracker *t = tu_tracker_new();
        t->on_receive = check_tiny_frame;
        tu_server ts;
        int port = tu_tracked_server_start(&ts, t, &codec);
        int fd = tu_connect(port);
        tu_rec *r = tu_tracker_rec(t, 0);
        enum { FRAMES = 200 };
        uint8_t out[2 * FRAMES + 2];
        for (size_t i = 0; i < FRAMES; i++) {
            out[2 * i] = 1;
            out[2 * i + 1] = (uint8_t)i;
        }
        out[2 * FRAMES] = 200; /* over max_frame */
        out[2 * FRAMES + 1] = 0;
        tu_write_all(fd, out, bad ? sizeof out : 2 * FRAMES);
        CHECK_EQ(shutdown(fd, SHUT_WR), 0);
        WAIT_UNTIL(tu_tcp_sockets(port, tu_sock_port(fd), 8 /* CLOSE_WAIT */) == 1);
        WAIT_GE(&t->msgs, 1);
        loop_turn(r->conn);
        CHECK_EQ(atomic_load(&r->rx_msgs), 1);
        CHECK_EQ(atomic_load(&r->disconnected), 0);
        CHECK_EQ(knet_conn_resume_read(r->conn), 0);
        WAIT_GE(&t->disconnects, 1);
        CHECK_EQ(atomic_load(&r->rx_msgs), FRAMES);
        CHECK_EQ(atomic_load(&r->reason), bad ? KNET_ECODEC : KNET_EOF);
        close(fd);
        CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
        tu_tracker_free(t);
    }
}

int main(void)
{
    tu_begin();
    RUN(test_pause_in_receive_keeps_the_rest);
    RUN(test_pause_holds_the_peer_back);
    RUN(test_fin_while_paused_seen_on_resume);
    RUN(test_graceful_close_reads_while_paused);
    RUN(test_notify_drained);
    RUN(test_relay_paces_source_to_reader);
    RUN(test_pause_keeps_a_large_handler_read);
    RUN(test_no_drain_after_close_in_receive);
    RUN(test_pause_resume_race_the_read_pass);
    RUN(test_held_frames_then_error_or_eof);
    return tu_end();
}
