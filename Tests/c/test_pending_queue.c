/* The pending-send limit and the send queue, against what knet.h promises:
 *  - the limits count what the socket did not take: a receive that answers each
 *    of a burst of frames (later sends of a read pass are batched) is not refused,
 *    by the message limit or the byte bound, while the peer reads everything;
 *  - many threads at the limit while the loop is held (nothing is written): exactly
 *    the limit is accepted from other threads, at most one more with the loop's own
 *    sends racing them; every refusal is KNET_EPENDINGFULL; the accepted messages
 *    arrive, each thread's in order, nothing refused; once drained the count is 0
 *    again (the limit's worth is accepted again); a graceful close at the limit turns
 *    sends into KNET_ECLOSED and still delivers the queue;
 *  - four threads and the loop under a limit of 6 to a slow reader: each source's
 *    messages whole and in order, no sender left refused;
 *  - one huge send (256 MiB; 80 MiB under a sanitizer: over the 64 MiB default byte
 *    bound) is accepted into an empty queue from either thread, the next one is
 *    refused, and the close frees it. */
#include "testutil.h"

/* ------------------------------------------------------------------ read-pass batching */

enum { BURST = 200, BURST_LIMIT = 8, BURST_BODY = 100 };

static bool burst_bytes; /* bound the bytes (4 KiB) instead of the messages */

static void limit_on_connect(tu_rec *r, bool connected)
{
    if (!connected)
        return;
    if (burst_bytes)
        knet_conn_set_max_queued_bytes(r->conn, 4096);
    else
        knet_conn_set_pending_send(r->conn, BURST_LIMIT);
}

/* A peer sends BURST std-codec frames in one write and reads every answer: the echo
 * handler (on the loop, inside receive) must get no KNET_EPENDINGFULL, since the
 * socket could take every answer at once. */
static void burst_echo(bool bytes)
{
    burst_bytes = bytes;
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    t->on_connect = limit_on_connect;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, &knet_std_codec);
    CHECK_GT(port, 0);
    int fd = tu_connect(port);
    (void)tu_tracker_rec(t, 0);

    enum { FRAME = 2 + BURST_BODY };
    static uint8_t out[BURST * FRAME], in[BURST * FRAME];
    for (int i = 0; i < BURST; i++) {
        out[FRAME * i] = 0;
        out[FRAME * i + 1] = BURST_BODY;
        tu_pattern_fill(out + FRAME * i + 2, BURST_BODY, 0, (uint32_t)i);
    }
    tu_write_all(fd, out, sizeof out);
    WAIT_GE(&t->msgs, BURST);
    long refused = atomic_load(&t->send_errors);
    printf("  %s bound: %ld of %d answers refused\n", bytes ? "byte" : "message", refused, BURST);
    CHECK_EQ(refused, 0);
    READ_EXACT(fd, in, sizeof in);
    CHECK(memcmp(in, out, sizeof out) == 0);

    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

static void test_limit_in_read_pass(void)
{
    burst_echo(false);
    burst_echo(true);
}

/* ------------------------------------------------------------------ many threads, loop held */

enum { LIMIT = 40, THREADS = 8, TRIES = 50, SRC_LOOP = THREADS, SRC_MAIN = THREADS + 1, SRCS = THREADS + 2 };
enum { MAX_ACCEPTED = 4 * TRIES };

static tu_counter h_connects, h_holding, h_go, h_start, h_closed, h_loop_done;
static knet_length_field h_lf = {4, false, 0};
static knet_conn *_Atomic h_target;                       /* the first connection */
static _Atomic bool h_loop_sends;                         /* the holder's receive sends too */
static uint32_t h_seq[SRCS];                              /* next seq per source (its own) */
static uint32_t h_acc[SRCS][MAX_ACCEPTED];                /* accepted seqs per source */
static _Atomic int h_nacc[SRCS];
static _Atomic int h_bad_rc;                              /* a refusal that is not EPENDINGFULL */
static _Atomic int h_reason;

/* Sends the next message of source src; records it when accepted. */
static int h_send(int src)
{
    uint32_t body[2] = {(uint32_t)src, h_seq[src]++};
    int rc = knet_conn_send(atomic_load(&h_target), body, sizeof body);
    if (rc == 0) {
        int i = atomic_load(&h_nacc[src]);
        CHECK_LT(i, MAX_ACCEPTED);
        h_acc[src][i] = body[1];
        atomic_store(&h_nacc[src], i + 1);
    } else if (rc != KNET_EPENDINGFULL) {
        atomic_store(&h_bad_rc, rc);
    }
    return rc;
}

static void h_on_connect(knet_conn *c, bool connected, void *ud)
{
    (void)ud;
    if (connected) {
        knet_conn *none = NULL;
        atomic_compare_exchange_strong(&h_target, &none, c);
        tu_counter_add(&h_connects, 1);
    } else if (c == atomic_load(&h_target)) {
        atomic_store(&h_reason, knet_conn_close_reason(c));
        tu_counter_add(&h_closed, 1);
    }
}

/* The holder keeps the one loop thread until released; while it does, nothing of the
 * target's queue is written. With h_loop_sends it races the other threads' sends with
 * its own, on the loop. */
static void h_on_receive(knet_conn *c, const void *buf, size_t len, void *ud)
{
    (void)buf, (void)len, (void)ud;
    if (c == atomic_load(&h_target))
        return;
    long phase = tu_counter_get(&h_holding) + 1;
    tu_counter_add(&h_holding, 1);
    if (atomic_load(&h_loop_sends)) {
        CHECK(tu_counter_wait_ge(&h_start, phase, TU_DEADLINE_MS));
        for (int i = 0; i < TRIES; i++)
            h_send(SRC_LOOP);
        tu_counter_add(&h_loop_done, 1);
    } else {
        tu_counter_add(&h_loop_done, 1);
    }
    CHECK(tu_counter_wait_ge(&h_go, phase, TU_DEADLINE_MS));
}

static void *h_sender(void *arg)
{
    int src = (int)(intptr_t)arg;
    CHECK(tu_counter_wait_ge(&h_start, tu_counter_get(&h_holding), TU_DEADLINE_MS)); /* this phase */
    for (int i = 0; i < TRIES; i++)
        h_send(src);
    return NULL;
}

/* Holds the loop (the next phase), starts the senders together, joins them; returns
 * the messages accepted in this phase. */
static int h_phase(int holder, bool loop_sends)
{
    int before = 0;
    for (int s = 0; s < SRCS; s++)
        before += atomic_load(&h_nacc[s]);
    atomic_store(&h_loop_sends, loop_sends);
    long phase = tu_counter_get(&h_holding) + 1;
    uint8_t f[5] = {0, 0, 0, 1, 'h'}; /* one length-codec frame */
    tu_write_all(holder, f, sizeof f);
    WAIT_GE(&h_holding, phase);
    if (loop_sends) /* one from this thread too */
        CHECK_EQ(h_send(SRC_MAIN), 0);
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++)
        CHECK_EQ(pthread_create(&th[i], NULL, h_sender, (void *)(intptr_t)i), 0);
    tu_counter_add(&h_start, 1);
    for (int i = 0; i < THREADS; i++)
        CHECK_EQ(pthread_join(th[i], NULL), 0);
    if (loop_sends)
        WAIT_GE(&h_loop_done, phase);
    int after = 0;
    for (int s = 0; s < SRCS; s++)
        after += atomic_load(&h_nacc[s]);
    CHECK_EQ(atomic_load(&h_bad_rc), 0);
    return after - before;
}

/* Reads count frames and checks each against the next accepted message of its source. */
static void h_read(int peer, int count, int *next)
{
    for (int i = 0; i < count; i++) {
        uint8_t f[12];
        READ_EXACT(peer, f, sizeof f);
        CHECK_EQ(tu_get_len(f, 4, false), 8u);
        uint32_t body[2];
        memcpy(body, f + 4, sizeof body);
        CHECK_LT(body[0], (uint32_t)SRCS);
        int src = (int)body[0];
        CHECK_LT(next[src], atomic_load(&h_nacc[src])); /* nothing refused arrives */
        CHECK_EQ(body[1], h_acc[src][next[src]]);       /* each source in its order */
        next[src]++;
    }
}

static void test_threads_at_limit_loop_held(void)
{
    tu_counter_init(&h_connects);
    tu_counter_init(&h_holding);
    tu_counter_init(&h_go);
    tu_counter_init(&h_start);
    tu_counter_init(&h_closed);
    tu_counter_init(&h_loop_done);
    knet_codec codec;
    CHECK_EQ(knet_length_codec(&codec, &h_lf), 0);
    knet_handler h = {h_on_connect, h_on_receive, NULL};
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, &codec);
    CHECK_GT(port, 0);
    int peer = tu_connect_ex(port, 16384);
    WAIT_GE(&h_connects, 1);
    knet_conn *c = atomic_load(&h_target);
    knet_conn_set_pending_send(c, LIMIT);
    int holder = tu_connect(port);
    WAIT_GE(&h_connects, 2);
    int next[SRCS] = {0};

    /* More than the socket takes (the peer does not read yet): the rest stays queued
     * and counts one; the loop's flush that found the socket full ends before it runs
     * the holder's receive, so the loop's own sends below cannot write either. */
    size_t big = (size_t)8 << 20;
    char *bigbuf = malloc(big);
    CHECK(bigbuf != NULL);
    tu_pattern_fill(bigbuf, big, 0, 77);
    CHECK_EQ(knet_conn_send(c, bigbuf, big), 0);
    knet_stats st;
    WAIT_UNTIL((knet_server_stats(ts.srv, &st), st.bytes_out > 0));

    /* 1: eight threads and the loop itself race at the limit: one message past it at most. */
    int n = h_phase(holder, true);
    printf("  phase 1: %d accepted (loop thread %d)\n", n, atomic_load(&h_nacc[SRC_LOOP]));
    CHECK_GE(n, LIMIT - 1);
    CHECK_LE(n, LIMIT);
    tu_counter_add(&h_go, 1);
    uint8_t hdr[4];
    READ_EXACT(peer, hdr, 4);
    CHECK_EQ(tu_get_len(hdr, 4, false), big);
    for (size_t got = 0; got < big;) {
        size_t want = big - got < 65536 ? big - got : 65536;
        READ_EXACT(peer, bigbuf, want);
        CHECK_EQ(tu_pattern_mismatch(bigbuf, want, got, 77), want);
        got += want;
    }
    free(bigbuf);
    h_read(peer, n, next);

    /* 2: drained, the count is 0 again: exactly the limit is accepted from other threads. */
    n = h_phase(holder, false);
    CHECK_EQ(n, LIMIT);
    /* A lower limit refuses; a higher one takes exactly the difference. */
    knet_conn_set_pending_send(c, 5);
    CHECK_EQ(h_send(SRC_MAIN), KNET_EPENDINGFULL);
    knet_conn_set_pending_send(c, LIMIT + 3);
    for (int i = 0; i < 3; i++)
        CHECK_EQ(h_send(SRC_MAIN), 0);
    CHECK_EQ(h_send(SRC_MAIN), KNET_EPENDINGFULL);
    /* 3: a graceful close at the limit: sends are closed, not full, also unlimited; the
     * queue is still written, then FIN. */
    knet_conn_shutdown(c);
    CHECK_EQ(h_send(SRC_MAIN), KNET_ECLOSED);
    knet_conn_set_pending_send(c, 0);
    CHECK_EQ(h_send(SRC_MAIN), KNET_ECLOSED);
    atomic_store(&h_bad_rc, 0);
    tu_counter_add(&h_go, 1);
    h_read(peer, LIMIT + 3, next);
    char b;
    CHECK_EQ(tu_read_full(peer, &b, 1), 0); /* FIN after the last accepted message */
    for (int s = 0; s < SRCS; s++)
        CHECK_EQ(next[s], atomic_load(&h_nacc[s]));
    close(peer);
    WAIT_GE(&h_closed, 1);
    CHECK_EQ(atomic_load(&h_reason), 0);
    close(holder);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_counter_destroy(&h_connects);
    tu_counter_destroy(&h_holding);
    tu_counter_destroy(&h_go);
    tu_counter_destroy(&h_start);
    tu_counter_destroy(&h_closed);
    tu_counter_destroy(&h_loop_done);
}

/* ------------------------------------------------------------------ one huge send */

#ifdef TU_SANITIZED
/* Over the bound by more than the loop's direct write puts in the socket's buffers
 * (tcp_wmem's default max is 4 MiB): the RSS checks are off, and each 256 MiB copy
 * under TSan took seconds (the test 21 s alone, over ctest's 60 s when loaded). */
#define HUGE_SEND (KNET_DEFAULT_MAX_QUEUED + ((size_t)16 << 20))
#else
#define HUGE_SEND ((size_t)256 << 20) /* four times KNET_DEFAULT_MAX_QUEUED */
#endif

static char *huge_buf;
static _Atomic int huge_rc1 = 1, huge_rc2 = 1, huge_rc3 = 1;

/* On the loop: the huge send into the empty queue, then one byte more, then one byte
 * with the bound lifted. */
static void huge_on_connect(tu_rec *r, bool connected)
{
    if (!connected || r->index != 1)
        return;
    atomic_store(&huge_rc1, knet_conn_send(r->conn, huge_buf, HUGE_SEND));
    atomic_store(&huge_rc2, knet_conn_send(r->conn, "x", 1));
    knet_conn_set_max_queued_bytes(r->conn, 0);
    atomic_store(&huge_rc3, knet_conn_send(r->conn, "y", 1));
}

/* A send larger than the default byte bound is accepted into an empty queue (from
 * another thread, then on the loop), the next is refused until the bound is lifted;
 * a close frees the queue (RSS back down, and no leak under LSan). */
static void test_huge_send(void)
{
    huge_buf = malloc(HUGE_SEND);
    CHECK(huge_buf != NULL);
    memset(huge_buf, 'h', HUGE_SEND);
    tu_tracker *t = tu_tracker_new();
    t->on_connect = huge_on_connect;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int fd = tu_connect_ex(port, 16384); /* never reads */
    knet_conn *c = tu_tracker_rec(t, 0)->conn;
    size_t rss0 = tu_rss();

    CHECK_EQ(knet_conn_send(c, huge_buf, HUGE_SEND), 0);
    CHECK_EQ(knet_conn_send(c, "x", 1), KNET_EPENDINGFULL);
    size_t rss1 = tu_rss();
    knet_conn_close(c);
    WAIT_GE(&t->disconnects, 1);
    size_t rss2 = tu_rss();
    printf("  off the loop: RSS +%zu MiB queued, +%zd MiB after close\n", (rss1 - rss0) >> 20,
           ((ssize_t)rss2 - (ssize_t)rss0) / (1 << 20));
#ifndef TU_SANITIZED
    CHECK_GE(rss1 - rss0, HUGE_SEND / 2); /* the queue's copy */
    CHECK_LT(rss2, rss0 + ((size_t)32 << 20));
#endif
    close(fd);

    /* On the loop, from connect(true). */
    int fd2 = tu_connect_ex(port, 16384);
    (void)tu_tracker_rec(t, 1);
    CHECK_EQ(atomic_load(&huge_rc1), 0);
    CHECK_EQ(atomic_load(&huge_rc2), KNET_EPENDINGFULL);
    CHECK_EQ(atomic_load(&huge_rc3), 0);
    knet_conn_close(t->recs[1].conn);
    WAIT_GE(&t->disconnects, 2);
    free(huge_buf);
    huge_buf = NULL;
    size_t rss3 = tu_rss();
    printf("  on the loop: RSS %+zd MiB after close and free\n",
           ((ssize_t)rss3 - (ssize_t)rss0) / (1 << 20));
#ifndef TU_SANITIZED
    CHECK_LT(rss3, rss0); /* the test's own buffer is gone too */
#endif
    close(fd2);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* ------------------------------------------------------------------ slow reader, many senders */

enum { S_THREADS = 4, S_MSGS = 400, S_LIMIT = 6, S_SRCS = S_THREADS + 1 };

static knet_conn *_Atomic s_conn;
static _Atomic bool s_stop;
static _Atomic uint32_t s_loop_seq;
static _Atomic long s_loop_full;

static uint32_t s_rnd(uint32_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 17;
    *x ^= *x << 5;
    return *x;
}

/* [u32 body length + 4][u32 source << 24 | seq][pattern of that id]. */
static size_t s_make(uint8_t *buf, uint32_t id, size_t body)
{
    uint32_t len = (uint32_t)body + 4;
    memcpy(buf, &len, 4);
    memcpy(buf + 4, &id, 4);
    tu_pattern_fill(buf + 8, body, 0, id);
    return body + 8;
}

/* The target's own receive (its peer writes a byte now and then) sends on the loop. */
static void s_on_receive(tu_rec *r, const void *buf, size_t len)
{
    (void)buf;
    static uint8_t out[20000];
    static uint32_t x = 4242;
    if (atomic_load(&s_stop) || r->conn != atomic_load(&s_conn))
        return;
    for (size_t i = 0; i < len; i++) {
        uint32_t seq = atomic_load(&s_loop_seq);
        size_t n = s_make(out, (uint32_t)S_THREADS << 24 | seq, s_rnd(&x) % 3 ? s_rnd(&x) % 64 : s_rnd(&x) % 12000);
        int rc = knet_conn_send(r->conn, out, n);
        if (rc == 0)
            atomic_store(&s_loop_seq, seq + 1);
        else if (rc == KNET_EPENDINGFULL)
            atomic_fetch_add(&s_loop_full, 1);
        else
            CHECK_EQ(rc, 0);
    }
}

static void *s_sender(void *arg)
{
    uint32_t src = (uint32_t)(intptr_t)arg, x = 777 + src;
    uint8_t *buf = malloc(200000);
    CHECK(buf != NULL);
    for (uint32_t seq = 0; seq < S_MSGS; seq++) {
        uint32_t k = s_rnd(&x) % 16;
        size_t body = k == 0 ? s_rnd(&x) % 150000 : k < 5 ? s_rnd(&x) % 5000 : s_rnd(&x) % 40;
        size_t n = s_make(buf, src << 24 | seq, body);
        int64_t end = tu_now_ms() + TU_DEADLINE_MS;
        int rc;
        while ((rc = knet_conn_send(atomic_load(&s_conn), buf, n)) == KNET_EPENDINGFULL) {
            CHECK_LT(tu_now_ms(), end); /* the count comes back as the peer reads */
            sched_yield();
        }
        CHECK_EQ(rc, 0);
    }
    free(buf);
    return NULL;
}

/* Four threads and the loop (in the target's receive) send under a limit of 6 to a
 * peer that reads in small random pieces: each source's messages arrive whole and in
 * order, none lost, and no thread stays refused. */
static void test_slow_reader_many_senders(void)
{
    tu_tracker *t = tu_tracker_new();
    t->on_receive = s_on_receive;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int fd = tu_connect_ex(port, 8192);
    knet_conn *c = tu_tracker_rec(t, 0)->conn;
    knet_conn_set_pending_send(c, S_LIMIT);
    knet_conn_set_max_queued_bytes(c, 0);
    atomic_store(&s_conn, c);
    pthread_t th[S_THREADS];
    for (int i = 0; i < S_THREADS; i++)
        CHECK_EQ(pthread_create(&th[i], NULL, s_sender, (void *)(intptr_t)i), 0);

    uint32_t next[S_SRCS] = {0}, x = 99;
    uint8_t *body = malloc(200000);
    CHECK(body != NULL);
    long done = 0, rounds = 0;
    while (done < (long)S_THREADS * S_MSGS) {
        if (rounds++ % 8 == 0)
            tu_write_all(fd, "p", 1); /* the loop sends from receive too */
        uint32_t len, id;
        CHECK_EQ(tu_read_full(fd, &len, 4), 4);
        CHECK_EQ(tu_read_full(fd, &id, 4), 4);
        CHECK_GE(len, 4);
        size_t blen = len - 4, got = 0;
        CHECK_LE(blen, 200000);
        while (got < blen) {
            size_t want = blen - got, cap = 1 + s_rnd(&x) % 3000;
            ssize_t n = tu_read_some(fd, body + got, want < cap ? want : cap);
            CHECK_GT(n, 0);
            got += (size_t)n;
        }
        uint32_t src = id >> 24;
        CHECK_LT(src, (uint32_t)S_SRCS);
        CHECK_EQ(id & 0xffffff, next[src]);
        CHECK_EQ(tu_pattern_mismatch(body, blen, 0, id), blen);
        next[src]++;
        if (src < S_THREADS)
            done++;
    }
    for (int i = 0; i < S_THREADS; i++)
        CHECK_EQ(pthread_join(th[i], NULL), 0);
    atomic_store(&s_stop, true);
    printf("  %u sent on the loop (%ld refused)\n", next[S_THREADS], atomic_load(&s_loop_full));
    free(body);
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

int main(void)
{
    CHECK_EQ(knet_set_loop_threads(1), 0); /* the holder shares the target's loop */
    tu_begin();
    RUN(test_limit_in_read_pass);
    RUN(test_threads_at_limit_loop_held);
    RUN(test_slow_reader_many_senders);
    RUN(test_huge_send);
    return tu_end();
}
