/* Echo round trips with every codec: raw (default), std (2-byte BE length), the
 * length codec with 1/2/4/8-byte prefixes in both byte orders, and a custom codec
 * written against the writer API. Peers are plain sockets (checking the exact
 * wire format) and knet clients (checking both directions through knet). Edge
 * cases: a frame in more pieces than one sendmsg takes, a length codec without a
 * practical limit, a codec write with a return it may not give. */
#include "testutil.h"

#include <ctype.h>

enum codec_kind { RAW_NULL, RAW_DEFAULT, STD, LEN };

/* One codec configuration under test. */
typedef struct codec_cfg {
    const char *name;
    enum codec_kind kind;
    unsigned nbytes; /* length prefix size (STD: 2) */
    bool le;
} codec_cfg;

static const codec_cfg cfgs[] = {
    {"raw (NULL codec)", RAW_NULL, 0, false},
    {"raw (knet_default_codec)", RAW_DEFAULT, 0, false},
    {"std", STD, 2, false},
    {"length 1 BE", LEN, 1, false},
    {"length 1 LE", LEN, 1, true},
    {"length 2 BE", LEN, 2, false},
    {"length 2 LE", LEN, 2, true},
    {"length 4 BE", LEN, 4, false},
    {"length 4 LE", LEN, 4, true},
    {"length 8 BE", LEN, 8, false},
    {"length 8 LE", LEN, 8, true},
};
#define NCFGS (sizeof cfgs / sizeof cfgs[0])

/* Length fields must outlive the codecs built from them: one per configuration. */
static knet_length_field lfs[NCFGS];

/* Builds the codec for cfgs[i] into *storage; returns what to pass to knet (NULL = default). */
static const knet_codec *make_codec(size_t i, knet_codec *storage)
{
    switch (cfgs[i].kind) {
    case RAW_NULL:
        return NULL;
    case RAW_DEFAULT:
        *storage = knet_default_codec;
        return storage;
    case STD:
        *storage = knet_std_codec;
        return storage;
    case LEN:
        lfs[i].length_bytes = cfgs[i].nbytes;
        lfs[i].little_endian = cfgs[i].le;
        lfs[i].max_frame = 0; /* default bound */
        CHECK_EQ(knet_length_codec(storage, &lfs[i]), 0);
        return storage;
    }
    return NULL;
}

/* Largest body a configuration can carry. */
static size_t max_body(size_t i)
{
    switch (cfgs[i].nbytes) {
    case 1:
        return 255;
    case 2:
        return 65535;
    default:
        return 300000;
    }
}

static bool is_framed(size_t i)
{
    return cfgs[i].kind == STD || cfgs[i].kind == LEN;
}

/* ------------------------------------------------------------------ raw */

/* Raw echo: bytes come back intact whatever the chunking, also one byte at a time. */
static void raw_echo(const knet_codec *codec)
{
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, codec);
    CHECK_GT(port, 0);
    int fd = tu_connect(port);

    enum { TOTAL = 256 * 1024 };
    uint8_t *out = malloc(8192), *in = malloc(8192);
    CHECK(out && in);
    size_t off = 0;
    for (int i = 0; off < TOTAL; i++) {
        size_t n = 1 + ((size_t)i * 7919) % 8192;
        if (n > TOTAL - off)
            n = TOTAL - off;
        tu_pattern_fill(out, n, off, 1);
        tu_write_all(fd, out, n);
        READ_EXACT(fd, in, n);
        CHECK_EQ(tu_pattern_mismatch(in, n, off, 1), n);
        off += n;
    }
    /* One byte per write: each echoes back unchanged. */
    for (int i = 0; i < 300; i++) {
        uint8_t b = (uint8_t)i, r = 0;
        tu_write_all(fd, &b, 1);
        READ_EXACT(fd, &r, 1);
        CHECK_EQ(r, b);
    }
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&t->recs[0].rx_bytes), TOTAL + 300);
    CHECK_EQ(atomic_load(&t->recs[0].reason), KNET_EOF);
    CHECK_EQ(atomic_load(&t->send_errors), 0);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
    free(out);
    free(in);
}

static void test_raw_echo_null_codec(void)
{
    raw_echo(NULL);
}

static void test_raw_echo_default_codec(void)
{
    raw_echo(&knet_default_codec);
}

/* ------------------------------------------------------------------ framed, plain peer */

/* Framed echo against a plain-socket peer that frames by hand: checks the exact wire
 * format both ways, split and coalesced frames, and frames written byte by byte. */
static void framed_plain_peer(size_t ci)
{
    const codec_cfg *cfg = &cfgs[ci];
    printf("  codec %s\n", cfg->name);
    knet_codec storage;
    const knet_codec *codec = make_codec(ci, &storage);
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, codec);
    CHECK_GT(port, 0);
    int fd = tu_connect(port);

    const unsigned nb = cfg->nbytes;
    const bool le = cfg->le;
    const size_t maxb = max_body(ci);
    enum { BIG = 200000 };
    uint8_t *body = malloc(BIG), *got = malloc(BIG);
    CHECK(body && got);
    long frames = 0;

    static const size_t sizes[] = {1, 2, 7, 100, 254, 255, 256, 1000, 4096, 65535, 65536, 100000, BIG};
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        size_t s = sizes[k];
        if (s > maxb)
            continue;
        tu_pattern_fill(body, s, 0, (uint32_t)s);
        tu_write_frame(fd, nb, le, body, s); /* header and body in separate writes */
        CHECK_EQ(tu_read_frame(fd, nb, le, got, BIG), s);
        CHECK_EQ(tu_pattern_mismatch(got, s, 0, (uint32_t)s), s);
        frames++;
    }

    /* Three frames in one write come back as three frames (decoded separately). */
    {
        uint8_t wire[64];
        size_t w = 0;
        static const size_t three[] = {3, 1, 5};
        for (int k = 0; k < 3; k++) {
            tu_put_len(wire + w, three[k], nb, le);
            w += nb;
            memset(wire + w, 'a' + k, three[k]);
            w += three[k];
        }
        tu_write_all(fd, wire, w);
        for (int k = 0; k < 3; k++) {
            CHECK_EQ(tu_read_frame(fd, nb, le, got, BIG), three[k]);
            for (size_t j = 0; j < three[k]; j++)
                CHECK_EQ(got[j], 'a' + k);
        }
        frames += 3;
    }

    /* A frame written one byte per send still arrives as one whole message. */
    {
        size_t s = maxb < 300 ? maxb : 300;
        uint8_t wire[8 + 300];
        tu_put_len(wire, s, nb, le);
        tu_pattern_fill(wire + nb, s, 0, 77);
        for (size_t j = 0; j < nb + s; j++)
            tu_write_all(fd, wire + j, 1);
        CHECK_EQ(tu_read_frame(fd, nb, le, got, BIG), s);
        CHECK_EQ(tu_pattern_mismatch(got, s, 0, 77), s);
        frames++;
    }

    WAIT_GE(&t->msgs, frames);
    CHECK_EQ(atomic_load(&t->recs[0].rx_msgs), frames); /* no partial or merged frames */
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&t->recs[0].reason), KNET_EOF);
    CHECK_EQ(atomic_load(&t->send_errors), 0);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
    free(body);
    free(got);
}

static void test_framed_plain_peer(void)
{
    for (size_t i = 0; i < NCFGS; i++)
        if (is_framed(i))
            framed_plain_peer(i);
}

/* ------------------------------------------------------------------ knet client <-> knet server */

/* A knet client and a knet echo server with the same codec: every message the client
 * sends comes back intact, as one message (framed) or as the same byte stream (raw). */
static void knet_to_knet(size_t ci)
{
    printf("  codec %s\n", cfgs[ci].name);
    knet_codec storage;
    const knet_codec *codec = make_codec(ci, &storage);
    tu_tracker *st = tu_tracker_new();
    st->echo = true;
    knet_handler sh = tu_tracker_handler(st);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &sh, codec);
    CHECK_GT(port, 0);

    tu_tracker *ct = tu_tracker_new();
    ct->capture = true;
    knet_handler ch = tu_tracker_handler(ct);
    knet_client *cli = tu_client_for_port(port);
    tu_client tc;
    tu_client_start(&tc, cli, &ch, codec);
    knet_conn *conn = tu_tracker_rec(ct, 0)->conn;

    enum { N = 40 };
    size_t maxb = max_body(ci) < 70000 ? max_body(ci) : 70000;
    size_t sizes[N], total = 0;
    uint8_t *buf = malloc(maxb);
    CHECK(buf != NULL);
    for (int i = 0; i < N; i++) {
        sizes[i] = i == N - 1 ? maxb : 1 + ((size_t)i * 4099) % maxb;
        tu_pattern_fill(buf, sizes[i], total, 9);
        CHECK_EQ(knet_conn_send(conn, buf, sizes[i]), 0);
        total += sizes[i];
    }
    WAIT_GE(&ct->bytes, (long)total);
    tu_rec *cr = &ct->recs[0];
    if (is_framed(ci)) {
        WAIT_GE(&ct->msgs, N);
        WAIT_GE(&st->msgs, N); /* the server counts a message after echoing it */
        CHECK_EQ(atomic_load(&cr->rx_msgs), N);
        CHECK_EQ(atomic_load(&st->recs[0].rx_msgs), N);
        size_t off = 0, pos = 0;
        const uint8_t *m;
        size_t len;
        for (int i = 0; i < N; i++) {
            CHECK(tu_rec_next_msg(cr, &off, &m, &len));
            CHECK_EQ(len, sizes[i]);
            CHECK_EQ(tu_pattern_mismatch(m, len, pos, 9), len);
            pos += len;
        }
        CHECK(!tu_rec_next_msg(cr, &off, &m, &len));
    } else {
        size_t off = 0, pos = 0;
        const uint8_t *m;
        size_t len;
        while (tu_rec_next_msg(cr, &off, &m, &len)) {
            CHECK_GT(len, 0);
            CHECK_EQ(tu_pattern_mismatch(m, len, pos, 9), len);
            pos += len;
        }
        CHECK_EQ(pos, total);
    }
    CHECK_EQ(knet_client_close(cli), 0);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    knet_client_free(cli);
    CHECK_EQ(atomic_load(&ct->recs[0].reason), KNET_ECLIENTCLOSED);
    WAIT_GE(&st->disconnects, 1);
    CHECK_EQ(atomic_load(&st->recs[0].reason), KNET_EOF);
    CHECK_EQ(atomic_load(&st->send_errors), 0);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(st);
    tu_tracker_free(ct);
    free(buf);
}

static void test_knet_to_knet(void)
{
    for (size_t i = 0; i < NCFGS; i++)
        knet_to_knet(i);
}

/* ------------------------------------------------------------------ limits */

/* A message larger than the codec can frame is refused with KNET_ECODEC and nothing of
 * it reaches the wire; the largest allowed one goes through. */
static void send_limit(const knet_codec *codec, unsigned nb, size_t maxb)
{
    tu_tracker *t = tu_tracker_new();
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, codec);
    CHECK_GT(port, 0);
    int fd = tu_connect(port);
    knet_conn *conn = tu_tracker_rec(t, 0)->conn;
    uint8_t *buf = malloc(maxb + 1), *got = malloc(maxb + 1);
    CHECK(buf && got);
    tu_pattern_fill(buf, maxb + 1, 0, 5);
    CHECK_EQ(knet_conn_send(conn, buf, maxb + 1), KNET_ECODEC);
    CHECK_EQ(knet_conn_send(conn, buf, maxb), 0);
    CHECK_EQ(tu_read_frame(fd, nb, false, got, maxb + 1), maxb);
    CHECK_EQ(tu_pattern_mismatch(got, maxb, 0, 5), maxb);
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
    free(buf);
    free(got);
}

static void test_send_too_large(void)
{
    send_limit(&knet_std_codec, 2, 65535);

    knet_length_field lf1 = {1, false, 0};
    knet_codec c1;
    CHECK_EQ(knet_length_codec(&c1, &lf1), 0);
    send_limit(&c1, 1, 255);

    knet_length_field lf4 = {4, false, 100};
    knet_codec c4;
    CHECK_EQ(knet_length_codec(&c4, &lf4), 0);
    send_limit(&c4, 4, 100);
}

static void test_length_codec_invalid(void)
{
    static const unsigned bad[] = {0, 3, 5, 7, 16};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        knet_length_field lf = {bad[i], false, 0};
        knet_codec c;
        CHECK_EQ(knet_length_codec(&c, &lf), -EINVAL);
    }
    static const unsigned good[] = {1, 2, 4, 8};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        knet_length_field lf = {good[i], true, 0};
        knet_codec c;
        memset(&c, 0, sizeof c);
        CHECK_EQ(knet_length_codec(&c, &lf), 0);
        CHECK(c.read != NULL);
        CHECK(c.write != NULL);
    }
}

/* ------------------------------------------------------------------ custom codec */

/* State of the line codec; ud of the codec. */
typedef struct line_state {
    atomic_int reads, writes;
} line_state;

/* Codec-owned message storage: per loop thread, valid until the next read call there. */
static _Thread_local uint8_t line_buf[256];

/* Newline-delimited frames, delivered upper-cased from codec-owned storage. */
static ptrdiff_t line_read(const void *in, size_t in_len, const void **msg, size_t *msg_len, void *ud)
{
    line_state *st = (line_state *)ud;
    atomic_fetch_add(&st->reads, 1);
    CHECK_GT(in_len, 0);
    const uint8_t *nl = memchr(in, '\n', in_len);
    if (!nl)
        return 0;
    size_t n = (size_t)(nl - (const uint8_t *)in);
    if (n > sizeof line_buf)
        return -EMSGSIZE;
    for (size_t i = 0; i < n; i++)
        line_buf[i] = (uint8_t)toupper(((const uint8_t *)in)[i]);
    *msg = line_buf;
    *msg_len = n;
    return (ptrdiff_t)n + 1;
}

/* Writes msg then a newline, through both writer calls. */
static int line_write(knet_writer *w, const void *msg, size_t len, void *ud)
{
    line_state *st = (line_state *)ud;
    atomic_fetch_add(&st->writes, 1);
    if (knet_writer_write(w, msg, len) != 0)
        return -ENOMEM;
    char *nl = knet_writer_reserve(w, 1);
    if (!nl)
        return -ENOMEM;
    *nl = '\n';
    return 0;
}

/* A custom codec: its ud reaches both functions, messages come from codec-owned
 * storage, the writer API frames replies, and max_frame bounds the partial frame. */
static void test_custom_codec(void)
{
    line_state st;
    atomic_init(&st.reads, 0);
    atomic_init(&st.writes, 0);
    knet_codec codec = {line_read, line_write, &st, 64};
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    t->capture = true;
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, &codec);
    CHECK_GT(port, 0);
    int fd = tu_connect(port);
    tu_write_str(fd, "hello\nworld\nab");
    char got[64];
    READ_EXACT(fd, got, 12);
    CHECK(memcmp(got, "HELLO\nWORLD\n", 12) == 0);
    tu_write_str(fd, "c\n");
    READ_EXACT(fd, got, 4);
    CHECK(memcmp(got, "ABC\n", 4) == 0);
    WAIT_GE(&t->msgs, 3);
    tu_rec *r = &t->recs[0];
    CHECK_EQ(atomic_load(&r->rx_msgs), 3);
    size_t off = 0, len;
    const uint8_t *m;
    static const char *const want[] = {"HELLO", "WORLD", "ABC"};
    for (int i = 0; i < 3; i++) {
        CHECK(tu_rec_next_msg(r, &off, &m, &len));
        CHECK_EQ(len, strlen(want[i]));
        CHECK(memcmp(m, want[i], len) == 0);
    }
    CHECK_GE(atomic_load(&st.reads), 3);
    CHECK_EQ(atomic_load(&st.writes), 3);

    /* 100 bytes without a newline exceed max_frame (64): this connection closes with
     * KNET_ECODEC. */
    char junk[100];
    memset(junk, 'x', sizeof junk);
    tu_write_all(fd, junk, sizeof junk);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&r->reason), KNET_ECODEC);
    EXPECT_PEER_CLOSED(fd);
    close(fd);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* ------------------------------------------------------------------ edge cases */

/* Byte-stuffing shape: every message byte referenced on its own, each followed by a
 * '#' in scratch, so a message of n bytes is 2n pieces — more than one sendmsg takes. */
static int stuff_write(knet_writer *w, const void *msg, size_t len, void *ud)
{
    (void)ud;
    const uint8_t *p = msg;
    for (size_t i = 0; i < len; i++) {
        if (knet_writer_write(w, p + i, 1) != 0)
            return -ENOMEM;
        char *h = knet_writer_reserve(w, 1);
        if (!h)
            return -ENOMEM;
        *h = '#';
    }
    return 0;
}

/* Echoed from receive (the loop thread, nothing queued: the direct write path), a
 * 3000-byte message framed as 6000 pieces arrives whole; the connection stays open. */
static void test_many_pieces_direct_send(void)
{
    knet_codec codec = {NULL, stuff_write, NULL, 0};
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    tu_server ts;
    int fd = tu_connect(tu_tracked_server_start(&ts, t, &codec));
    enum { N = 3000 };
    static uint8_t out[N], got[2 * N];
    tu_pattern_fill(out, N, 0, 11);
    tu_write_all(fd, out, N);
    READ_EXACT(fd, got, 2 * N);
    for (size_t i = 0; i < N; i++) {
        CHECK_EQ(got[2 * i], out[i]);
        CHECK_EQ(got[2 * i + 1], '#');
    }
    CHECK_EQ(atomic_load(&t->send_errors), 0);
    CHECK_EQ(tu_counter_get(&t->disconnects), 0);
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&t->recs[0].reason), KNET_EOF);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* Echoes n pattern bytes (seed) through a server with codec, as one 8-byte-prefix
 * frame (framed) or as a raw stream, checks them intact and that the connection
 * then ends with the peer's close. */
static void echo_large(const knet_codec *codec, size_t n, uint32_t seed, bool framed)
{
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    tu_server ts;
    int fd = tu_connect(tu_tracked_server_start(&ts, t, codec));
    uint8_t *body = malloc(n), *got = malloc(n);
    CHECK(body && got);
    tu_pattern_fill(body, n, 0, seed);
    if (framed) {
        tu_write_frame(fd, 8, false, body, n);
        CHECK_EQ(tu_read_frame(fd, 8, false, got, n), n);
    } else {
        tu_write_all(fd, body, n);
        CHECK_EQ(tu_read_full(fd, got, n), (ssize_t)n);
    }
    CHECK_EQ(tu_pattern_mismatch(got, n, 0, seed), n);
    if (!framed)
        CHECK_EQ(atomic_load(&t->recs[0].disconnected), 0);
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&t->recs[0].reason), KNET_EOF);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
    free(body);
    free(got);
}

/* An 8-byte length codec with no practical limit (max_frame UINT64_MAX, so the core's
 * frame bound is SIZE_MAX) still receives a frame far larger than one read. */
static void test_unbounded_length_codec(void)
{
    knet_length_field lf = {8, false, UINT64_MAX};
    knet_codec codec;
    CHECK_EQ(knet_length_codec(&codec, &lf), 0);
    CHECK_EQ(codec.max_frame, SIZE_MAX);
    echo_large(&codec, 300 * 1024, 12, true);
}

/* A raw stream has no frames for max_frame to bound: reads far larger than it are
 * delivered (and echoed) intact, and the connection stays open. */
static void test_raw_stream_ignores_max_frame(void)
{
    knet_codec codec = {NULL, NULL, NULL, 4096};
    echo_large(&codec, 256 * 1024, 13, false);
}

/* A codec write that returns a positive value (not a promised return) fails the send
 * with KNET_ECODEC and sends nothing of the half-made frame; one that passes
 * knet_writer_write a NULL buffer gets -EINVAL, which the send returns. */
static int bad_write(knet_writer *w, const void *msg, size_t len, void *ud)
{
    (void)ud;
    if (len == 4 && memcmp(msg, "null", 4) == 0)
        return knet_writer_write(w, NULL, 1);
    int rc = knet_writer_write(w, msg, len);
    return rc == 0 && len == 3 ? 7 : rc; /* "bad": framed, then a positive return */
}

static void test_codec_write_bad_returns(void)
{
    knet_codec codec = {NULL, bad_write, NULL, 0};
    tu_tracker *t = tu_tracker_new();
    tu_server ts;
    int fd = tu_connect(tu_tracked_server_start(&ts, t, &codec));
    knet_conn *conn = tu_tracker_rec(t, 0)->conn;
    CHECK_EQ(knet_conn_send(conn, "bad", 3), KNET_ECODEC);
    CHECK_EQ(knet_conn_send(conn, "null", 4), -EINVAL);
    CHECK_EQ(knet_conn_send(conn, "good", 4), 0);
    char got[4];
    READ_EXACT(fd, got, 4);
    CHECK(memcmp(got, "good", 4) == 0);
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

int main(void)
{
    tu_begin();
    RUN(test_length_codec_invalid);
    RUN(test_raw_echo_null_codec);
    RUN(test_raw_echo_default_codec);
    RUN(test_framed_plain_peer);
    RUN(test_knet_to_knet);
    RUN(test_send_too_large);
    RUN(test_custom_codec);
    RUN(test_many_pieces_direct_send);
    RUN(test_unbounded_length_codec);
    RUN(test_raw_stream_ignores_max_frame);
    RUN(test_codec_write_bad_returns);
    return tu_end();
}
