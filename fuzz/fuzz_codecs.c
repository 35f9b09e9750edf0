/*
 * libFuzzer harness for knet's codecs: the std codec and the length codec for
 * every prefix size (1, 2, 4, 8 bytes) and byte order, with a max_frame taken
 * from the input.
 *
 * The first input byte picks the codec, the second its max_frame.
 *
 * 1. Decoding: the input is decoded as a byte stream the way the core does
 *    (call read, advance by what it consumed, until it needs more or fails),
 *    checking every promise of the read contract: consumed <= available,
 *    the message lies inside the consumed bytes, its length is the prefix's
 *    value, 0 only when the frame is really incomplete, KNET_ECODEC exactly
 *    when the prefix is above max_frame; the same stream decoded from every
 *    prefix of the input yields a prefix of the same messages.
 * 2. Round trip: the input is cut into messages, framed through the codec's
 *    write callback and the core's writer (kn_writer_*), concatenated, decoded
 *    again and compared message by message; write refuses (KNET_ECODEC)
 *    exactly the messages above max_frame or the prefix's range.
 *
 * Built with the core's sources (see fuzz/run.sh); a failed check aborts.
 */
#include "internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Aborts with the line of the failed check (libFuzzer reports it as a crash). */
#define FZ_CHECK(cond)                                                                             \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_codecs.c:%d: check failed: %s\n", __LINE__, #cond);              \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

/* Reads an n-byte prefix in the given byte order. */
static uint64_t get_len(const uint8_t *p, unsigned n, bool le)
{
    uint64_t v = 0;
    for (unsigned i = 0; i < n; i++)
        v |= (uint64_t)p[i] << (8 * (le ? i : n - 1 - i));
    return v;
}

/* One decoded message: where it starts and how long it is. */
typedef struct fz_msg {
    const uint8_t *p;
    size_t len;
} fz_msg;

#define FZ_MAX_MSGS 4096

/* Decodes in[0..len) with k (a length codec with prefix n, order le, limit
 * max) into out; returns the message count, *end the bytes consumed, *err the
 * final negative result or 0. Checks the read contract on every call. */
static size_t decode(const knet_codec *k, unsigned n, bool le, uint64_t max, const uint8_t *in,
                     size_t len, fz_msg *out, size_t *end, int *err)
{
    size_t off = 0, count = 0;
    *err = 0;
    while (off < len && count < FZ_MAX_MSGS) {
        const void *msg = (const void *)0x1; /* must be overwritten on success */
        size_t mlen = (size_t)-1;
        ptrdiff_t r = k->read(in + off, len - off, &msg, &mlen, k->ud);
        size_t avail = len - off;
        if (r == 0) {
            /* Only when the frame is incomplete. */
            if (avail >= n) {
                uint64_t l = get_len(in + off, n, le);
                FZ_CHECK(l <= max);
                FZ_CHECK(avail - n < l);
            }
            break;
        }
        if (r < 0) {
            FZ_CHECK(r == KNET_ECODEC);
            FZ_CHECK(avail >= n);
            FZ_CHECK(get_len(in + off, n, le) > max);
            *err = (int)r;
            break;
        }
        FZ_CHECK((size_t)r <= avail);
        const uint8_t *m = (const uint8_t *)msg;
        FZ_CHECK(m >= in + off && m <= in + off + (size_t)r);
        FZ_CHECK(mlen <= (size_t)r && m + mlen <= in + off + (size_t)r);
        FZ_CHECK(m == in + off + n);
        FZ_CHECK((size_t)r == n + mlen);
        FZ_CHECK(get_len(in + off, n, le) == mlen);
        FZ_CHECK(mlen <= max);
        out[count].p = m;
        out[count].len = mlen;
        count++;
        off += (size_t)r;
    }
    *end = off;
    return count;
}

/* Frames msg through the codec's write callback into buf (appending at *pos).
 * Returns what write returned. */
static int frame(const knet_codec *k, const uint8_t *msg, size_t len, uint8_t *buf, size_t cap,
                 size_t *pos)
{
    knet_writer w;
    knet__writer_init(&w, msg, len);
    int rc = k->write(&w, msg, len, k->ud);
    if (rc == 0) {
        struct iovec stack[4];
        size_t niov = 0;
        struct iovec *iov = knet__writer_iov(&w, stack, 4, &niov);
        FZ_CHECK(iov != NULL);
        size_t total = 0;
        for (size_t i = 0; i < niov; i++) {
            FZ_CHECK(*pos + total + iov[i].iov_len <= cap);
            memcpy(buf + *pos + total, iov[i].iov_base, iov[i].iov_len);
            total += iov[i].iov_len;
        }
        FZ_CHECK(total == w.total);
        *pos += total;
        if (iov != stack)
            free(iov);
    }
    knet__writer_free(&w);
    return rc;
}

/* Runs both parts for one codec configuration. */
static void run(const knet_codec *k, unsigned n, bool le, uint64_t max, const uint8_t *data,
                size_t size)
{
    static fz_msg full[FZ_MAX_MSGS], part[FZ_MAX_MSGS];

    /* 1. Decode the input as a stream, then every prefix of it. */
    size_t end;
    int err;
    size_t count = decode(k, n, le, max, data, size, full, &end, &err);
    size_t step = size / 16 + 1; /* prefixes: a bounded number per input */
    for (size_t p = 0; p <= size; p += step) {
        size_t pend;
        int perr;
        size_t pc = decode(k, n, le, max, data, p, part, &pend, &perr);
        FZ_CHECK(pc <= count);
        for (size_t i = 0; i < pc; i++)
            FZ_CHECK(part[i].p == full[i].p && part[i].len == full[i].len);
        if (perr)
            FZ_CHECK(err == perr && pc == count);
    }

    /* 2. Round trip: the input cut into messages, the cut lengths from its bytes. */
    uint64_t limit = n < 8 ? (UINT64_C(1) << (8 * n)) - 1 : UINT64_MAX;
    size_t cap = size * 2 + 8 * (size + 1) + 64;
    uint8_t *buf = malloc(cap);
    FZ_CHECK(buf != NULL);
    static fz_msg sent[FZ_MAX_MSGS];
    size_t nsent = 0, pos = 0, off = 0;
    while (off < size && nsent < FZ_MAX_MSGS) {
        size_t want = data[off] % 64 == 63 ? size - off : data[off] % 64;
        if (want > size - off)
            want = size - off;
        const uint8_t *m = data + off;
        off += want ? want : 1;
        int rc = frame(k, m, want, buf, cap, &pos);
        bool too_big = (uint64_t)want > max || (uint64_t)want > limit;
        if (too_big) {
            FZ_CHECK(rc == KNET_ECODEC);
            continue;
        }
        FZ_CHECK(rc == 0);
        sent[nsent].p = m;
        sent[nsent].len = want;
        nsent++;
    }
    size_t got = decode(k, n, le, max, buf, pos, full, &end, &err);
    FZ_CHECK(err == 0 && end == pos && got == nsent);
    for (size_t i = 0; i < got; i++) {
        FZ_CHECK(full[i].len == sent[i].len);
        FZ_CHECK(full[i].len == 0 || memcmp(full[i].p, sent[i].p, full[i].len) == 0);
    }
    free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2 || size > 65536)
        return 0;
    /* data[0] picks the codec: the std codec, or a length codec (prefix size and
     * byte order); data[1] picks max_frame: small limits (so inputs can exceed
     * them), one above the 2-byte range, or the default. The rest is the stream. */
    unsigned pick = data[0] % 9, msel = data[1];
    uint64_t maxes[4] = {0, 1, 200, 70000};
    uint64_t max_sel = (msel & 4) ? (uint64_t)(msel >> 3) : maxes[msel & 3];
    data += 2;
    size -= 2;

    if (pick == 0) { /* knet_std_codec: 2-byte big-endian prefix, limit 65535 */
        FZ_CHECK(knet_std_codec.max_frame >= 65535 + 2);
        run(&knet_std_codec, 2, false, 65535, data, size);
    } else {
        static const unsigned sizes[4] = {1, 2, 4, 8};
        unsigned n = sizes[(pick - 1) / 2];
        bool le = (pick - 1) % 2 != 0;
        knet_length_field lf = {n, le, max_sel};
        knet_codec k;
        FZ_CHECK(knet_length_codec(&k, &lf) == 0);
        uint64_t limit = n < 8 ? (UINT64_C(1) << (8 * n)) - 1 : UINT64_MAX;
        uint64_t max = max_sel ? max_sel : KNET_DEFAULT_MAX_FRAME;
        /* The codec's buffer bound covers one whole frame (prefix included). */
        FZ_CHECK(k.max_frame >= (max < limit ? max : limit) + n);
        run(&k, n, le, max, data, size);
    }

    /* An unsupported prefix size is refused. */
    knet_length_field bad = {3, false, 0};
    knet_codec k;
    FZ_CHECK(knet_length_codec(&k, &bad) == -EINVAL);
    return 0;
}
