/* knet_conn_set_alloc: reads go into the handler's memory (and receive points into it),
 * a NULL return falls back to the loop's buffer, a buffer too small for a partial frame
 * is passed over, every byte and frame arrives intact and in order (also when one
 * event's input outlasts the read budget), and the setting is refused off the loop
 * thread. */
#include "testutil.h"

#define STREAM_BYTES (1u << 20)

/* One connection's state, touched only on its loop thread (and read after it closed). */
typedef struct astate {
    size_t sizes[3];  /* capacities handed out in turn */
    size_t nsizes;
    bool null_every_other; /* return NULL on every second call */
    uint8_t *buf;     /* the buffer handed out last (NULL: the call returned NULL) */
    size_t cap;
    long calls, nulls;
    long in_buffer, outside; /* receives pointing into buf / elsewhere */
    uint64_t got;     /* raw: stream offset; framed: frames seen */
    size_t bad;       /* first corrupt offset + 1, or 0 */
    int set_rc;
    bool framed;
} astate;

static void *give(knet_conn *c, size_t suggested, size_t *cap, void *ud)
{
    (void)c;
    astate *s = ud;
    CHECK_GT(suggested, 0);
    s->calls++;
    free(s->buf);
    s->buf = NULL;
    if (s->null_every_other && s->calls % 2 == 0) {
        s->nulls++;
        *cap = 12345; /* ignored with a NULL buffer */
        return NULL;
    }
    s->cap = s->sizes[(size_t)s->calls % s->nsizes];
    s->buf = malloc(s->cap);
    CHECK(s->buf != NULL);
    memset(s->buf, 0xEE, s->cap); /* stale bytes must never be delivered */
    *cap = s->cap;
    return s->buf;
}

static tu_counter received, closed;

static void a_receive(knet_conn *c, const void *buf, size_t len, void *ud)
{
    (void)c;
    astate *s = ud;
    const uint8_t *p = buf;
    if (s->buf && p >= s->buf && p + len <= s->buf + s->cap)
        s->in_buffer++;
    else
        s->outside++;
    if (s->framed) {
        /* Frame k has k % 300 bytes of pattern seeded k. */
        size_t want = (size_t)(s->got % 300);
        if (!s->bad && (len != want || tu_pattern_mismatch(buf, len, 0, (uint32_t)s->got) != len))
            s->bad = (size_t)s->got + 1;
        s->got++;
        tu_counter_add(&received, 1);
    } else {
        size_t m = tu_pattern_mismatch(buf, len, s->got, 7);
        if (!s->bad && m != len) s->bad = (size_t)(s->got + m) + 1;
        s->got += len;
        tu_counter_add(&received, (long)len);
    }
}

static void a_connect(knet_conn *c, bool connected, void *ud)
{
    astate *s = ud;
    if (connected)
        s->set_rc = knet_conn_set_alloc(c, give, s); /* on the loop thread: accepted */
    else
        tu_counter_add(&closed, 1);
}

/* Serves one connection with state s and the given codec; the peer writes `wire`
 * in pieces of `piece` bytes; waits for `want` on the received counter. */
static void serve_one(astate *s, const knet_codec *codec, const uint8_t *wire, size_t n,
                      size_t piece, long want)
{
    tu_counter_init(&received);
    tu_counter_init(&closed);
    knet_handler h = {a_connect, a_receive, s};
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, codec);
    CHECK_GT(port, 0);
    int fd = tu_connect(port);
    for (size_t off = 0; off < n; off += piece)
        tu_write_all(fd, wire + off, n - off < piece ? n - off : piece);
    WAIT_GE(&received, want);
    close(fd);
    WAIT_GE(&closed, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    CHECK_EQ(s->set_rc, 0);
    CHECK_EQ(s->bad, 0);
    free(s->buf);
    s->buf = NULL;
    tu_counter_destroy(&received);
    tu_counter_destroy(&closed);
}

/* Raw codec: every read lands in the handed-out buffer, whatever its size. */
static void test_raw_reads_into_handler_memory(void)
{
    uint8_t *wire = malloc(STREAM_BYTES);
    CHECK(wire != NULL);
    tu_pattern_fill(wire, STREAM_BYTES, 0, 7);
    astate s = {.sizes = {4096, 7, 100000}, .nsizes = 3};
    serve_one(&s, NULL, wire, STREAM_BYTES, 50000, STREAM_BYTES);
    CHECK_EQ(s.got, STREAM_BYTES);
    CHECK_GT(s.in_buffer, 0);
    CHECK_EQ(s.outside, 0);
    CHECK_GE(s.calls, s.in_buffer); /* a call per read, also the final EOF/EAGAIN ones */
    free(wire);
}

/* A NULL return reads into the loop's buffer for that read only. */
static void test_null_falls_back_to_loop_buffer(void)
{
    uint8_t *wire = malloc(STREAM_BYTES);
    CHECK(wire != NULL);
    tu_pattern_fill(wire, STREAM_BYTES, 0, 7);
    astate s = {.sizes = {1000}, .nsizes = 1, .null_every_other = true};
    serve_one(&s, NULL, wire, STREAM_BYTES, 3000, STREAM_BYTES);
    CHECK_EQ(s.got, STREAM_BYTES);
    CHECK_GT(s.nulls, 0);
    CHECK_GT(s.in_buffer, 0);
    CHECK_GT(s.outside, 0); /* the reads after a NULL */
    free(wire);
}

/* A framed codec with buffers smaller than a frame: the partial frame is carried over,
 * a buffer with no room after it is passed over, and every frame arrives whole. */
static void test_partial_frames_with_small_buffers(void)
{
    enum { FRAMES = 2000 };
    size_t n = 0;
    for (uint32_t k = 0; k < FRAMES; k++) n += 2 + k % 300;
    uint8_t *wire = malloc(n), *p = wire;
    CHECK(wire != NULL);
    for (uint32_t k = 0; k < FRAMES; k++) {
        size_t len = k % 300;
        tu_put_len(p, len, 2, false);
        tu_pattern_fill(p + 2, len, 0, k);
        p += 2 + len;
    }
    astate s = {.sizes = {64, 256, 9}, .nsizes = 3, .framed = true};
    serve_one(&s, &knet_std_codec, wire, n, 777, FRAMES);
    CHECK_EQ(s.got, FRAMES);
    CHECK_GT(s.in_buffer, 0);
    free(wire);
}

/* Connections are edge-triggered: input that outlasts one event's read budget
 * (16-byte buffers: 256 bytes) is read to the end with no more bytes arriving to
 * raise another event. The peer writes all of it at once and then only waits. */
static void test_input_beyond_read_budget(void)
{
    enum { N = 64 * 1024 };
    uint8_t *wire = malloc(N);
    CHECK(wire != NULL);
    tu_pattern_fill(wire, N, 0, 7);
    astate s = {.sizes = {16}, .nsizes = 1};
    serve_one(&s, NULL, wire, N, N, N);
    CHECK_EQ(s.got, N);
    CHECK_EQ(s.outside, 0);
    free(wire);
}

/* Only the connection's own loop thread may set it. */
static void test_refused_off_loop(void)
{
    tu_tracker *t = tu_tracker_new();
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, NULL);
    CHECK_GT(port, 0);
    int fd = tu_connect(port);
    tu_rec *r = tu_tracker_rec(t, 0);
    CHECK_EQ(knet_conn_set_alloc(r->conn, give, NULL), -EINVAL);
    close(fd);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

int main(void)
{
    tu_begin();
    RUN(test_raw_reads_into_handler_memory);
    RUN(test_null_falls_back_to_loop_buffer);
    RUN(test_partial_frames_with_small_buffers);
    RUN(test_input_beyond_read_budget);
    RUN(test_refused_off_loop);
    return tu_end();
}
