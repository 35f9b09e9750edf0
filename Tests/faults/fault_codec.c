/* Fault: garbage and oversized frames. Promise: for every length codec (1, 2,
 * 4, 8-byte prefix, both byte orders) a length above max_frame closes that
 * connection with KNET_ECODEC after delivering exactly the frames before it;
 * the std codec's read buffer is bounded by codec.max_frame the same way; a
 * codec that rejects input (or claims more than it was given) closes with its
 * error / KNET_ECODEC. Other connections of the same server are unaffected,
 * and an oversized outgoing message is refused with KNET_ECODEC without
 * closing anything. */
#include "faultutil.h"

/* Sends one small frame through fd and expects the same frame echoed. */
static void frame_roundtrip(int fd, unsigned nb, bool le, uint32_t seed)
{
    uint8_t body[100], got[100];
    tu_pattern_fill(body, sizeof body, 0, seed);
    tu_write_frame(fd, nb, le, body, sizeof body);
    CHECK_EQ(tu_read_frame(fd, nb, le, got, sizeof got), sizeof body);
    CHECK_EQ(memcmp(got, body, sizeof body), 0);
}

/* How the decoder must treat buf: the number of whole frames before the first
 * oversized length (*bad = true), or before the data ran out (*bad = false). */
static int expected_frames(const uint8_t *buf, size_t len, unsigned nb, bool le, uint64_t max,
                           bool *bad)
{
    size_t off = 0;
    int frames = 0;
    *bad = false;
    while (len - off >= nb) {
        uint64_t l = tu_get_len(buf + off, nb, le);
        if (l > max) {
            *bad = true;
            return frames;
        }
        if (len - off - nb < l)
            break;
        off += nb + (size_t)l;
        frames++;
    }
    return frames;
}

/* Every way one peer can break one codec, while a good peer keeps echoing. */
static void run_length_codec(unsigned nb, bool le)
{
    static knet_length_field lf; /* must outlive the server (one server at a time) */
    lf.length_bytes = nb;
    lf.little_endian = le;
    lf.max_frame = nb == 1 ? 200 : 1000;
    knet_codec codec;
    CHECK_EQ(knet_length_codec(&codec, &lf), 0);

    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    t->capture = true;
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, &codec);
    CHECK_GT(port, 0);

    int good = tu_connect(port);
    (void)tu_tracker_rec(t, 0);
    frame_roundtrip(good, nb, le, 1);

    /* Each case: bytes a hostile peer sends, on a fresh connection. */
    enum { CASES = 5 };
    for (int k = 0; k < CASES; k++) {
        uint8_t buf[4096];
        size_t len = 0;
        switch (k) {
        case 0: /* one byte over the limit */
            tu_put_len(buf, lf.max_frame + 1, nb, le);
            len = nb;
            break;
        case 1: /* all ones: the largest length the prefix can say */
            memset(buf, 0xff, nb);
            len = nb;
            break;
        case 2: /* two valid frames, then an oversized one (its body never sent) */
            tu_put_len(buf, 3, nb, le);
            memcpy(buf + nb, "abc", 3);
            len = nb + 3;
            tu_put_len(buf + len, 0, nb, le); /* an empty frame is valid */
            len += nb;
            tu_put_len(buf + len, lf.max_frame + 7, nb, le);
            len += nb;
            break;
        case 3: /* pseudo-random garbage, made to contain an oversized length */
        case 4: {
            uint64_t s = 0x1234567ull * (uint64_t)(k + 1) + nb * 2 + le;
            len = 2048;
            for (size_t i = 0; i < len; i++)
                buf[i] = (uint8_t)fu_rand(&s);
            bool bad;
            (void)expected_frames(buf, len, nb, le, lf.max_frame, &bad);
            if (!bad) {
                memset(buf + len, 0xff, 8);
                len += 8;
            }
            break;
        }
        }
        bool bad;
        int frames = expected_frames(buf, len, nb, le, lf.max_frame, &bad);
        CHECK(bad);

        int fd = tu_connect(port);
        tu_rec *r = tu_tracker_rec(t, k + 1);
        tu_write_all(fd, buf, len);
        WAIT_GE(&t->disconnects, k + 1);
        CHECK_EQ(atomic_load(&r->reason), KNET_ECODEC);
        CHECK_EQ(atomic_load(&r->rx_msgs), frames); /* exactly the frames before the bad one */
        /* The peer sees the close (after reading the echoes of those frames). */
        uint8_t sink[8192];
        ssize_t n;
        while ((n = tu_read_some(fd, sink, sizeof sink)) > 0) {
        }
        CHECK(n == 0 || n == -ECONNRESET);
        close(fd);
        CHECK_EQ(atomic_load(&t->recs[0].disconnected), 0);
        frame_roundtrip(good, nb, le, 10 + (uint32_t)k);
    }

    /* Sending more than max_frame is refused and closes nothing. */
    knet_conn *gc = t->recs[0].conn;
    uint8_t big[1001];
    memset(big, 'b', sizeof big);
    CHECK_EQ(knet_conn_send(gc, big, (size_t)lf.max_frame + 1), KNET_ECODEC);
    frame_roundtrip(good, nb, le, 99);

    close(good);
    WAIT_GE(&t->disconnects, CASES + 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

static void test_length1_be(void) { run_length_codec(1, false); }
static void test_length1_le(void) { run_length_codec(1, true); }
static void test_length2_be(void) { run_length_codec(2, false); }
static void test_length2_le(void) { run_length_codec(2, true); }
static void test_length4_be(void) { run_length_codec(4, false); }
static void test_length4_le(void) { run_length_codec(4, true); }
static void test_length8_be(void) { run_length_codec(8, false); }
static void test_length8_le(void) { run_length_codec(8, true); }

/* The 8-byte codec with the default max_frame: lengths near 2^64 must not overflow. */
static void test_length8_huge_lengths(void)
{
    static knet_length_field lf = {8, false, 0};
    knet_codec codec;
    CHECK_EQ(knet_length_codec(&codec, &lf), 0);
    tu_tracker *t = tu_tracker_new();
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, &codec);
    CHECK_GT(port, 0);
    const uint64_t lens[] = {UINT64_MAX, UINT64_MAX - 7, (uint64_t)1 << 63, (uint64_t)SIZE_MAX / 2 + 1,
                             KNET_DEFAULT_MAX_FRAME + 1};
    for (int i = 0; i < 5; i++) {
        int fd = tu_connect(port);
        tu_rec *r = tu_tracker_rec(t, i);
        uint8_t hdr[8];
        tu_put_len(hdr, lens[i], 8, false);
        tu_write_all(fd, hdr, 8);
        WAIT_GE(&t->disconnects, i + 1);
        CHECK_EQ(atomic_load(&r->reason), KNET_ECODEC);
        EXPECT_PEER_CLOSED(fd);
        close(fd);
    }
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* knet_std_codec accepts every 2-byte length (its limit is 65535), so garbage is
 * frames to it; with codec.max_frame lowered, the buffered partial frame is
 * bounded: a partial frame that outgrows it closes the connection with KNET_ECODEC. */
static void test_std_codec_bounded(void)
{
    knet_codec codec = knet_std_codec;
    codec.max_frame = 1002; /* 1000-byte bodies plus the prefix */
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, &codec);
    CHECK_GT(port, 0);
    int good = tu_connect(port);
    (void)tu_tracker_rec(t, 0);
    frame_roundtrip(good, 2, false, 1);

    int fd = tu_connect(port);
    tu_rec *r = tu_tracker_rec(t, 1);
    /* A 4000-byte frame announced, 1500 bytes of it sent: the partial frame
     * outgrows max_frame and may not be buffered. */
    uint8_t buf[2 + 1500];
    tu_put_len(buf, 4000, 2, false);
    memset(buf + 2, 'g', 1500);
    tu_write_all(fd, buf, sizeof buf);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&r->reason), KNET_ECODEC);
    CHECK_EQ(atomic_load(&r->rx_msgs), 0);
    EXPECT_PEER_CLOSED(fd);
    close(fd);
    frame_roundtrip(good, 2, false, 2);

    /* The whole oversized frame in one write: refused the same way, so the
     * limit does not depend on how the bytes were split. */
    fd = tu_connect(port);
    r = tu_tracker_rec(t, 2);
    static uint8_t whole[2 + 4000];
    tu_put_len(whole, 4000, 2, false);
    memset(whole + 2, 'w', 4000);
    tu_write_all(fd, whole, sizeof whole);
    WAIT_GE(&t->disconnects, 2);
    CHECK_EQ(atomic_load(&r->reason), KNET_ECODEC);
    CHECK_EQ(atomic_load(&r->rx_msgs), 0);
    EXPECT_PEER_CLOSED(fd);
    close(fd);
    frame_roundtrip(good, 2, false, 3);

    close(good);
    WAIT_GE(&t->disconnects, 3);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* A codec that checks a magic byte: garbage makes read return KNET_ECODEC. */
static ptrdiff_t magic_read(const void *in, size_t len, const void **msg, size_t *mlen, void *ud)
{
    (void)ud;
    const uint8_t *p = (const uint8_t *)in;
    if (p[0] != 0xA5)
        return KNET_ECODEC;
    if (len < 2)
        return 0;
    *msg = p + 1;
    *mlen = 1;
    return 2;
}

/* A buggy codec that claims more bytes than it was given. */
static ptrdiff_t greedy_read(const void *in, size_t len, const void **msg, size_t *mlen, void *ud)
{
    (void)ud;
    *msg = in;
    *mlen = len;
    return (ptrdiff_t)len + 1;
}

static void run_custom_codec(knet_codec_read_fn fn, const uint8_t *bad, size_t badlen,
                             int expect_msgs)
{
    knet_codec codec = {fn, NULL, NULL, 0};
    tu_tracker *t = tu_tracker_new();
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, &codec);
    CHECK_GT(port, 0);
    int fd = tu_connect(port);
    tu_rec *r = tu_tracker_rec(t, 0);
    int other = tu_connect(port);
    (void)tu_tracker_rec(t, 1);
    tu_write_all(fd, bad, badlen);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&r->reason), KNET_ECODEC);
    CHECK_EQ(atomic_load(&r->rx_msgs), expect_msgs);
    EXPECT_PEER_CLOSED(fd);
    close(fd);
    CHECK_EQ(atomic_load(&t->recs[1].disconnected), 0);
    close(other);
    WAIT_GE(&t->disconnects, 2);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* The codec's own rejection closes with its code, after the valid messages. */
static void test_codec_rejects_garbage(void)
{
    const uint8_t bad[] = {0xA5, 'a', 0xA5, 'b', 0x00, 0x01, 0x02};
    run_custom_codec(magic_read, bad, sizeof bad, 2);
}

/* A codec claiming more than it was given cannot make knet read out of bounds. */
static void test_codec_overclaims(void)
{
    const uint8_t bad[] = {1, 2, 3};
    run_custom_codec(greedy_read, bad, sizeof bad, 0);
}

int main(void)
{
    tu_begin();
    RUN(test_length1_be);
    RUN(test_length1_le);
    RUN(test_length2_be);
    RUN(test_length2_le);
    RUN(test_length4_be);
    RUN(test_length4_le);
    RUN(test_length8_be);
    RUN(test_length8_le);
    RUN(test_length8_huge_lengths);
    RUN(test_std_codec_bounded);
    RUN(test_codec_rejects_garbage);
    RUN(test_codec_overclaims);
    return tu_end();
}
