/* Codecs and the writer they frame messages into. The writer gathers a
 * message as pieces: bytes of the message being sent are referenced (no
 * copy), anything else lands in a small scratch buffer. The send path then
 * writes the pieces directly or copies them into the queue once. */
#include "internal.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

void knet__writer_init(knet_writer *w, const void *msg, size_t len) {
    w->msg = msg;
    w->msg_len = len;
    w->pieces = w->inline_pieces;
    w->npieces = 0;
    w->cap_pieces = sizeof w->inline_pieces / sizeof w->inline_pieces[0];
    w->scratch = w->inline_scratch;
    w->scratch_len = 0;
    w->scratch_cap = sizeof w->inline_scratch;
    w->total = 0;
}

void knet__writer_free(knet_writer *w) {
    if (w->pieces != w->inline_pieces) free(w->pieces);
    if (w->scratch != w->inline_scratch) free(w->scratch);
    w->pieces = w->inline_pieces;
    w->scratch = w->inline_scratch;
}

static kn_piece *writer_piece(knet_writer *w) {
    if (w->npieces == w->cap_pieces) {
        size_t cap = w->cap_pieces * 2;
        kn_piece *p = w->pieces == w->inline_pieces ? malloc(cap * sizeof *p)
                                                    : realloc(w->pieces, cap * sizeof *p);
        if (!p) return NULL;
        if (w->pieces == w->inline_pieces) memcpy(p, w->inline_pieces, sizeof w->inline_pieces);
        w->pieces = p;
        w->cap_pieces = cap;
    }
    return &w->pieces[w->npieces++];
}

void *knet_writer_reserve(knet_writer *w, size_t len) {
    if (!w) return NULL;
    if (w->scratch_cap - w->scratch_len < len) {
        if (len > SIZE_MAX / 2 - w->scratch_len) return NULL; /* no such allocation */
        size_t cap = w->scratch_cap * 2;
        if (cap < w->scratch_len + len) cap = w->scratch_len + len;
        char *p = w->scratch == w->inline_scratch ? malloc(cap) : realloc(w->scratch, cap);
        if (!p) return NULL;
        if (w->scratch == w->inline_scratch) memcpy(p, w->inline_scratch, w->scratch_len);
        w->scratch = p;
        w->scratch_cap = cap;
    }
    kn_piece *last = w->npieces ? &w->pieces[w->npieces - 1] : NULL;
    if (last && !last->base && last->off + last->len == w->scratch_len) {
        last->len += len;
    } else {
        kn_piece *p = writer_piece(w);
        if (!p) return NULL;
        p->base = NULL;
        p->off = w->scratch_len;
        p->len = len;
    }
    char *out = w->scratch + w->scratch_len;
    w->scratch_len += len;
    w->total += len;
    return out;
}

int knet_writer_write(knet_writer *w, const void *buf, size_t len) {
    if (!w || (!buf && len)) return -EINVAL;
    if (len == 0) return 0;
    uintptr_t p = (uintptr_t)buf, m = (uintptr_t)w->msg;
    if (w->msg && p >= m && p + len <= m + w->msg_len) {
        /* Part of the message being sent: it outlives the send call, reference it. */
        kn_piece *last = w->npieces ? &w->pieces[w->npieces - 1] : NULL;
        if (last && last->base && (uintptr_t)last->base + last->len == p) {
            last->len += len;
        } else {
            kn_piece *pc = writer_piece(w);
            if (!pc) return -ENOMEM;
            pc->base = buf;
            pc->off = 0;
            pc->len = len;
        }
        w->total += len;
        return 0;
    }
    void *d = knet_writer_reserve(w, len);
    if (!d) return -ENOMEM;
    memcpy(d, buf, len);
    return 0;
}

struct iovec *knet__writer_iov(knet_writer *w, struct iovec *stack, size_t cap, size_t *n) {
    struct iovec *iov = stack;
    if (w->npieces > cap && !(iov = malloc(w->npieces * sizeof *iov))) return NULL;
    for (size_t i = 0; i < w->npieces; i++) {
        const kn_piece *p = &w->pieces[i];
        iov[i].iov_base = (void *)(p->base ? p->base : w->scratch + p->off);
        iov[i].iov_len = p->len;
    }
    *n = w->npieces;
    return iov;
}

/* ------------------------------------------------------------ raw stream */

/* No callbacks: the core treats a missing read as "everything buffered is one
 * message" and a missing write as "the message is its own frame", and then
 * skips the writer altogether. */
const knet_codec knet_default_codec = {NULL, NULL, NULL, 0};

/* ------------------------------------------------------------ length prefixes */

static uint64_t load_len(const unsigned char *p, unsigned n, bool little) {
    uint64_t v = 0;
    for (unsigned i = 0; i < n; i++) v = (v << 8) | p[little ? n - 1 - i : i];
    return v;
}

static void store_len(unsigned char *p, unsigned n, bool little, uint64_t v) {
    for (unsigned i = 0; i < n; i++) p[little ? i : n - 1 - i] = (unsigned char)(v >> (8 * i));
}

static ptrdiff_t length_read(const knet_length_field *lf, const void *in, size_t in_len,
                             const void **msg, size_t *msg_len) {
    unsigned n = lf->length_bytes;
    if (in_len < n) return 0;
    uint64_t body = load_len(in, n, lf->little_endian);
    uint64_t max = lf->max_frame ? lf->max_frame : KNET_DEFAULT_MAX_FRAME;
    if (body > max) return KNET_ECODEC;
    if (in_len - n < body) return 0;
    *msg = (const unsigned char *)in + n;
    *msg_len = (size_t)body;
    return (ptrdiff_t)(n + body);
}

static int length_write(const knet_length_field *lf, knet_writer *w, const void *msg,
                        size_t len) {
    unsigned n = lf->length_bytes;
    uint64_t max = lf->max_frame ? lf->max_frame : KNET_DEFAULT_MAX_FRAME;
    if (len > max || (n < 8 && (uint64_t)len >> (8 * n))) return KNET_ECODEC;
    unsigned char *h = knet_writer_reserve(w, n);
    if (!h) return -ENOMEM;
    store_len(h, n, lf->little_endian, len);
    return knet_writer_write(w, msg, len);
}

static ptrdiff_t lf_read(const void *in, size_t in_len, const void **msg, size_t *msg_len,
                         void *ud) {
    return length_read(ud, in, in_len, msg, msg_len);
}

static int lf_write(knet_writer *w, const void *msg, size_t len, void *ud) {
    return length_write(ud, w, msg, len);
}

static const knet_length_field std_field = {2, false, 65535};

const knet_codec knet_std_codec = {lf_read, lf_write, (void *)&std_field, 65535 + 2};

int knet_length_codec(knet_codec *codec, const knet_length_field *lf) {
    if (!codec || !lf) return -EINVAL;
    unsigned n = lf->length_bytes;
    if (n != 1 && n != 2 && n != 4 && n != 8) return -EINVAL;
    uint64_t max = lf->max_frame ? lf->max_frame : KNET_DEFAULT_MAX_FRAME;
    uint64_t limit = n < 8 ? (UINT64_C(1) << (8 * n)) - 1 : UINT64_MAX;
    if (max > limit) max = limit;
    codec->read = lf_read;
    codec->write = lf_write;
    codec->ud = (void *)lf;
    codec->max_frame = max > SIZE_MAX - n ? SIZE_MAX : (size_t)max + n;
    return 0;
}
