/* The send path of framed messages: a codec write that fails midway, one that writes
 * nothing, frames larger than the queue bound, frames of many pieces from many threads.
 * Peers are plain sockets, so the wire bytes are exact. */
#include "testutil.h"

/* ------------------------------------------------------------------ failing writes */

/* A 4-byte big-endian length, then the body; a body starting with '!' fails after the
 * header and half the body were appended; "skip" appends nothing (returns 0). */
static int picky_write(knet_writer *w, const void *msg, size_t len, void *ud)
{
    (void)ud;
    const char *m = msg;
    if (len == 4 && memcmp(m, "skip", 4) == 0)
        return 0;
    uint8_t *h = knet_writer_reserve(w, 4);
    if (!h)
        return -ENOMEM;
    tu_put_len(h, len, 4, false);
    if (len && m[0] == '!') {
        if (knet_writer_write(w, m, len / 2) != 0)
            return -ENOMEM;
        char *x = knet_writer_reserve(w, 3);
        if (!x)
            return -ENOMEM;
        memcpy(x, "BAD", 3);
        return -EPROTO;
    }
    return knet_writer_write(w, m, len);
}

typedef struct picky_ctx {
    atomic_int rc_bad, rc_skip, done;
} picky_ctx;

/* Sends from the loop (connect(true)): bad, skip and good interleaved. */
static void picky_on_connect(tu_rec *r, bool connected)
{
    if (!connected)
        return;
    picky_ctx *p = r->tr->ud;
    knet_conn_set_pending_send(r->conn, 1);
    for (int i = 0; i < 3; i++) {
        atomic_store(&p->rc_bad, knet_conn_send(r->conn, "!bad-one", 8));
        atomic_store(&p->rc_skip, knet_conn_send(r->conn, "skip", 4));
        CHECK_EQ(knet_conn_send(r->conn, "L", 1), 0);
    }
    atomic_store(&p->done, 1);
}

/* On the loop and from another thread: a failed write puts nothing on the wire, the
 * send returns the codec's error, a write of nothing is no message (the pending limit
 * of 1 is not held by it) and later frames go out whole. */
static void test_failed_and_empty_writes(void)
{
    knet_codec codec = {NULL, picky_write, NULL, 0};
    picky_ctx p;
    memset(&p, 0, sizeof p);
    tu_tracker *t = tu_tracker_new();
    t->ud = &p;
    t->on_connect = picky_on_connect;
    tu_server ts;
    int fd = tu_connect(tu_tracked_server_start(&ts, t, &codec));
    tu_rec *r = tu_tracker_rec(t, 0);
    WAIT_UNTIL(atomic_load(&p.done) == 1);
    CHECK_EQ(atomic_load(&p.rc_bad), -EPROTO);
    CHECK_EQ(atomic_load(&p.rc_skip), 0);
    uint8_t got[64];
    for (int i = 0; i < 3; i++) {
        CHECK_EQ(tu_read_frame(fd, 4, false, got, sizeof got), 1);
        CHECK_EQ(got[0], 'L');
    }
    for (int i = 0; i < 50; i++) {
        CHECK_EQ(knet_conn_send(r->conn, "!bad-two", 8), -EPROTO);
        int rc;
        /* Pending limit 1: the frame read last leaves the count once the loop saw it
         * written, maybe after the peer read it. Then a write of nothing, however
         * often, is no message: it never fills the limit. */
        while ((rc = knet_conn_send(r->conn, "skip", 4)) == KNET_EPENDINGFULL)
            tu_sleep_ms(1);
        CHECK_EQ(rc, 0);
        for (int j = 0; j < 10; j++)
            CHECK_EQ(knet_conn_send(r->conn, "skip", 4), 0);
        CHECK_EQ(knet_conn_send(r->conn, "!bad-two", 8), -EPROTO);
        CHECK_EQ(knet_conn_send(r->conn, "good", 4), 0);
        CHECK_EQ(tu_read_frame(fd, 4, false, got, sizeof got), 4);
        CHECK(memcmp(got, "good", 4) == 0);
    }
    CHECK_EQ(tu_counter_get(&t->disconnects), 0);
    CHECK_EQ(knet_conn_close_reason(r->conn), 1);
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&r->reason), KNET_EOF);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* ------------------------------------------------------------------ large frames */

/* With a byte bound far below one frame: the first frame (8 MiB) is accepted into the
 * empty queue, the next is refused while it waits, and once the peer read it all a
 * frame is accepted again; everything accepted arrives whole. */
static void test_frame_larger_than_bound(void)
{
    knet_length_field lf = {4, false, 0};
    knet_codec codec;
    CHECK_EQ(knet_length_codec(&codec, &lf), 0);
    tu_tracker *t = tu_tracker_new();
    tu_server ts;
    tu_server_init(&ts, "127.0.0.1:0", NULL, &codec);
    ts.handler = tu_tracker_handler(t);
    knet_server_set_max_queued_bytes(ts.srv, 10000);
    int port = tu_server_run(&ts);
    CHECK_GT(port, 0);
    int fd = tu_connect_ex(port, 4096);
    tu_rec *r = tu_tracker_rec(t, 0);
    enum { BIG = 8 << 20 };
    uint8_t *body = malloc(BIG), *got = malloc(BIG);
    CHECK(body && got);
    tu_pattern_fill(body, BIG, 0, 5);
    CHECK_EQ(knet_conn_send(r->conn, body, BIG), 0);
    CHECK_EQ(knet_conn_send(r->conn, "x", 1), KNET_EPENDINGFULL);
    CHECK_EQ(tu_read_frame(fd, 4, false, got, BIG), BIG);
    CHECK_EQ(tu_pattern_mismatch(got, BIG, 0, 5), BIG);
    int rc;
    int64_t end = tu_now_ms() + TU_DEADLINE_MS;
    while ((rc = knet_conn_send(r->conn, "x", 1)) == KNET_EPENDINGFULL && tu_now_ms() < end)
        tu_sleep_ms(1);
    CHECK_EQ(rc, 0);
    CHECK_EQ(tu_read_frame(fd, 4, false, got, BIG), 1);
    CHECK_EQ(got[0], 'x');
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
    free(body);
    free(got);
}

typedef struct big_ctx {
    uint8_t *body;
    size_t len;
    atomic_int step, rc_big, rc_small1, rc_small2;
} big_ctx;

/* Request 1: an 8 MiB frame, then a small one; request 2: a small one. */
static void big_on_receive(tu_rec *r, const void *buf, size_t len)
{
    (void)buf;
    (void)len;
    big_ctx *b = r->tr->ud;
    if (atomic_load(&b->step) == 0) {
        atomic_store(&b->rc_big, knet_conn_send(r->conn, b->body, b->len));
        atomic_store(&b->rc_small1, knet_conn_send(r->conn, "x", 1));
    } else {
        atomic_store(&b->rc_small2, knet_conn_send(r->conn, "y", 1));
    }
    atomic_fetch_add(&b->step, 1);
}

/* The same on the loop: the 8 MiB frame goes into the empty queue, a frame behind it is
 * refused while the socket is full, and accepted once the peer read everything. */
static void test_frame_larger_than_bound_on_loop(void)
{
    knet_length_field lf = {4, false, 0};
    knet_codec codec;
    CHECK_EQ(knet_length_codec(&codec, &lf), 0);
    big_ctx b;
    memset(&b, 0, sizeof b);
    b.len = 8 << 20;
    b.body = malloc(b.len);
    uint8_t *got = malloc(b.len);
    CHECK(b.body && got);
    tu_pattern_fill(b.body, b.len, 0, 9);
    tu_tracker *t = tu_tracker_new();
    t->ud = &b;
    t->on_receive = big_on_receive;
    tu_server ts;
    tu_server_init(&ts, "127.0.0.1:0", NULL, &codec);
    ts.handler = tu_tracker_handler(t);
    knet_server_set_max_queued_bytes(ts.srv, 10000);
    int port = tu_server_run(&ts);
    CHECK_GT(port, 0);
    int fd = tu_connect_ex(port, 4096);
    tu_write_frame(fd, 4, false, "1", 1);
    WAIT_UNTIL(atomic_load(&b.step) == 1);
    CHECK_EQ(atomic_load(&b.rc_big), 0);
    CHECK_EQ(atomic_load(&b.rc_small1), KNET_EPENDINGFULL);
    CHECK_EQ(tu_read_frame(fd, 4, false, got, b.len), b.len);
    CHECK_EQ(tu_pattern_mismatch(got, b.len, 0, 9), b.len);
    tu_write_frame(fd, 4, false, "2", 1);
    WAIT_UNTIL(atomic_load(&b.step) == 2);
    CHECK_EQ(atomic_load(&b.rc_small2), 0);
    CHECK_EQ(tu_read_frame(fd, 4, false, got, b.len), 1);
    CHECK_EQ(got[0], 'y');
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
    free(b.body);
    free(got);
}

/* ------------------------------------------------------------------ many threads */

/* A 4-byte length (of the body), then each body byte followed by '#': 2n+1 pieces. */
static int stuffed_write(knet_writer *w, const void *msg, size_t len, void *ud)
{
    (void)ud;
    uint8_t *h = knet_writer_reserve(w, 4);
    if (!h)
        return -ENOMEM;
    tu_put_len(h, len, 4, false);
    const uint8_t *p = msg;
    for (size_t i = 0; i < len; i++) {
        if (knet_writer_write(w, p + i, 1) != 0)
            return -ENOMEM;
        char *x = knet_writer_reserve(w, 1);
        if (!x)
            return -ENOMEM;
        *x = '#';
    }
    return 0;
}

enum { NTHREADS = 4, PER_THREAD = 400 };

typedef struct sender {
    pthread_t th;
    knet_conn *conn;
    int id;
} sender;

/* Body: [id][seq u32 LE][filler up to 40 + seq % 150 bytes]. */
static size_t make_body(uint8_t *b, int id, uint32_t seq)
{
    size_t n = 5 + 40 + seq % 150;
    b[0] = (uint8_t)id;
    memcpy(b + 1, &seq, 4);
    for (size_t i = 5; i < n; i++)
        b[i] = (uint8_t)(id * 31 + seq + i);
    return n;
}

static void *sender_main(void *arg)
{
    sender *s = arg;
    uint8_t b[256];
    for (uint32_t seq = 0; seq < PER_THREAD; seq++) {
        size_t n = make_body(b, s->id, seq);
        int rc;
        while ((rc = knet_conn_send(s->conn, b, n)) == KNET_EPENDINGFULL)
            tu_sleep_ms(1);
        CHECK_EQ(rc, 0);
    }
    return NULL;
}

/* Reads nframes piece-written frames (each body byte followed by '#') from fd and checks
 * each: whole, from sender min_id..NTHREADS, in its sender's order. */
static void read_piece_frames(int fd, int nframes, int min_id)
{
    uint32_t next[NTHREADS + 1] = {0};
    uint8_t want[256], got[512];
    for (int k = 0; k < nframes; k++) {
        uint8_t h[4];
        READ_EXACT(fd, h, 4);
        size_t n = (size_t)tu_get_len(h, 4, false);
        CHECK_LE(n, 256);
        READ_EXACT(fd, got, 2 * n);
        int id = got[0];
        CHECK(id >= min_id && id <= NTHREADS);
        uint32_t seq;
        uint8_t sb[4] = {got[2], got[4], got[6], got[8]};
        memcpy(&seq, sb, 4);
        CHECK_EQ(seq, next[id]);
        next[id]++;
        CHECK_EQ(make_body(want, id, seq), n);
        for (size_t i = 0; i < n; i++) {
            CHECK_EQ(got[2 * i], want[i]);
            CHECK_EQ(got[2 * i + 1], '#');
        }
    }
}

/* Frames of hundreds of pieces from 4 threads to a slow reader: each arrives whole and
 * contiguous, each thread's in its order. */
static void test_many_threads_many_pieces(void)
{
    knet_codec codec = {NULL, stuffed_write, NULL, 0};
    tu_tracker *t = tu_tracker_new();
    tu_server ts;
    int fd = tu_connect_ex(tu_tracked_server_start(&ts, t, &codec), 8192);
    tu_rec *r = tu_tracker_rec(t, 0);
    knet_conn_set_pending_send(r->conn, 16);
    sender s[NTHREADS];
    for (int i = 0; i < NTHREADS; i++) {
        s[i].conn = r->conn;
        s[i].id = i + 1;
        CHECK_EQ(pthread_create(&s[i].th, NULL, sender_main, &s[i]), 0);
    }
    read_piece_frames(fd, NTHREADS * PER_THREAD, 1);
    for (int i = 0; i < NTHREADS; i++)
        CHECK_EQ(pthread_join(s[i].th, NULL), 0);
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

typedef struct peer_writer {
    pthread_t th;
    int fd;
} peer_writer;

/* Writes PER_THREAD requests (4-byte length frames, id 0) for the server to echo. */
static void *peer_writer_main(void *arg)
{
    peer_writer *pw = arg;
    uint8_t b[256];
    for (uint32_t seq = 0; seq < PER_THREAD; seq++) {
        size_t n = make_body(b, 0, seq);
        tu_write_frame(pw->fd, 4, false, b, n);
    }
    return NULL;
}

/* As above, and the loop echoes the peer's requests through the same codec at once:
 * sends on the loop (direct, batched in a read pass, queued behind others) and from
 * 4 threads interleave frame by frame, each stream in order. */
static void test_threads_and_loop_many_pieces(void)
{
    knet_length_field lf = {4, false, 0};
    knet_codec codec;
    CHECK_EQ(knet_length_codec(&codec, &lf), 0);
    codec.write = stuffed_write;
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    tu_server ts;
    int fd = tu_connect_ex(tu_tracked_server_start(&ts, t, &codec), 8192);
    tu_rec *r = tu_tracker_rec(t, 0);
    sender s[NTHREADS];
    for (int i = 0; i < NTHREADS; i++) {
        s[i].conn = r->conn;
        s[i].id = i + 1;
        CHECK_EQ(pthread_create(&s[i].th, NULL, sender_main, &s[i]), 0);
    }
    peer_writer pw = {.fd = fd};
    CHECK_EQ(pthread_create(&pw.th, NULL, peer_writer_main, &pw), 0);
    read_piece_frames(fd, (NTHREADS + 1) * PER_THREAD, 0);
    for (int i = 0; i < NTHREADS; i++)
        CHECK_EQ(pthread_join(s[i].th, NULL), 0);
    CHECK_EQ(pthread_join(pw.th, NULL), 0);
    CHECK_EQ(atomic_load(&t->send_errors), 0);
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* ------------------------------------------------------------------ empty and oversized */

typedef struct edge_ctx {
    size_t over;       /* a body one over the codec's limit */
    uint8_t *big;      /* over bytes */
    atomic_int rc_over, rc_empty, rc_mark, done;
} edge_ctx;

/* On the loop (in receive): an empty message, one over the limit, then a marker. */
static void edge_on_receive(tu_rec *r, const void *buf, size_t len)
{
    (void)buf;
    (void)len;
    edge_ctx *e = r->tr->ud;
    atomic_store(&e->rc_empty, knet_conn_send(r->conn, NULL, 0));
    atomic_store(&e->rc_over, knet_conn_send(r->conn, e->big, e->over));
    atomic_store(&e->rc_mark, knet_conn_send(r->conn, "m", 1));
    atomic_store(&e->done, 1);
}

/* For a length codec of nb bytes with body limit maxb: an empty message is a header-only
 * frame and one over the limit is KNET_ECODEC with nothing on the wire, from another
 * thread and on the loop. */
static void empty_and_over(const knet_codec *codec, unsigned nb, size_t maxb)
{
    edge_ctx e;
    memset(&e, 0, sizeof e);
    e.over = maxb + 1;
    e.big = calloc(1, e.over);
    CHECK(e.big != NULL);
    tu_tracker *t = tu_tracker_new();
    t->ud = &e;
    t->on_receive = edge_on_receive;
    tu_server ts;
    int fd = tu_connect(tu_tracked_server_start(&ts, t, codec));
    tu_rec *r = tu_tracker_rec(t, 0);
    CHECK_EQ(knet_conn_send(r->conn, "", 0), 0);
    CHECK_EQ(knet_conn_send(r->conn, e.big, e.over), KNET_ECODEC);
    CHECK_EQ(knet_conn_send(r->conn, "a", 1), 0);
    uint8_t got[8];
    CHECK_EQ(tu_read_frame(fd, nb, false, got, sizeof got), 0);
    CHECK_EQ(tu_read_frame(fd, nb, false, got, sizeof got), 1);
    CHECK_EQ(got[0], 'a');
    tu_write_frame(fd, nb, false, "q", 1);
    WAIT_UNTIL(atomic_load(&e.done) == 1);
    CHECK_EQ(atomic_load(&e.rc_empty), 0);
    CHECK_EQ(atomic_load(&e.rc_over), KNET_ECODEC);
    CHECK_EQ(atomic_load(&e.rc_mark), 0);
    CHECK_EQ(tu_read_frame(fd, nb, false, got, sizeof got), 0);
    CHECK_EQ(tu_read_frame(fd, nb, false, got, sizeof got), 1);
    CHECK_EQ(got[0], 'm');
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&r->reason), KNET_EOF);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
    free(e.big);
}

static void test_empty_and_oversized_every_codec(void)
{
    empty_and_over(&knet_std_codec, 2, 65535);
    static const unsigned nbs[] = {1, 2, 4, 8};
    static knet_length_field lfs[8];
    for (int i = 0; i < 4; i++) {
        knet_codec c;
        lfs[i] = (knet_length_field){nbs[i], false, 0};
        CHECK_EQ(knet_length_codec(&c, &lfs[i]), 0);
        size_t maxb = nbs[i] == 1 ? 255 : nbs[i] == 2 ? 65535 : KNET_DEFAULT_MAX_FRAME;
        empty_and_over(&c, nbs[i], maxb);
        lfs[4 + i] = (knet_length_field){nbs[i], false, 100};
        CHECK_EQ(knet_length_codec(&c, &lfs[4 + i]), 0);
        empty_and_over(&c, nbs[i], 100);
    }
}

int main(void)
{
    tu_begin();
    RUN(test_failed_and_empty_writes);
    RUN(test_frame_larger_than_bound);
    RUN(test_frame_larger_than_bound_on_loop);
    RUN(test_many_threads_many_pieces);
    RUN(test_threads_and_loop_many_pieces);
    RUN(test_empty_and_oversized_every_codec);
    return tu_end();
}
