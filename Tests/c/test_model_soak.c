/* Model-based randomized concurrency: per seed, one knet server and NCLIENTS
 * persistent knet clients (retry on, 1-8 ms backoff) talk messages (std, raw or
 * 4-byte length codec; some connections read into memory of their own through
 * knet_conn_set_alloc; in some seeds idle timeouts and byte bounds) while
 * NWORKERS threads make random public calls on their connections, their
 * clients and the server: sends of random sizes (empty, small, large, one over
 * the codec's limit; bursts into a pending-send or queued-bytes limit), the
 * limits themselves, close, shutdown, close_with_timeout (0-30 ms),
 * userdata set/get, nodelay, addresses, knet_client_conn, knet_client_close /
 * _shutdown (also while dialing), and, in some seeds, a server close or short
 * shutdown in the middle of it all. Loop threads greet in connect(true),
 * answer some messages, sometimes close their own connection in receive or
 * take a little longer (a slow handler).
 *
 * Every message is [magic u16][slot u8][0][uid u32][seq u32][len u32][pattern]
 * (uid: the sending connection; slot: the sending thread, or the loop). After
 * the round (every serve call returned) the model checks what users rely on:
 *  - connect(true) once, before any receive; connect(false) once, after them;
 *    all on one thread that is not one of the test's; never nested;
 *  - a connection only ever receives its own peer's messages (the peer paired
 *    by address), each whole and intact;
 *  - per sending thread, the messages received are exactly a prefix of the
 *    sends that returned 0, in order, none twice, no refused one;
 *  - the prefix is all of them when neither side was closed hard and both
 *    ended with 0 or KNET_EOF (a graceful close or the peer's FIN);
 *  - every call returns 0 or a code knet.h documents for it; a send after a
 *    stop of its server or client returned is KNET_ECLOSED; a full queue
 *    drains (the peer reads);
 *  - the server's byte counters lie between what was delivered and accepted;
 *  - no descriptor or thread left (LSan checks memory).
 *
 * Interleavings are the scheduler's; the kinds and sizes of the operations
 * each thread makes are the seed's (which connection one hits depends on
 * timing). Seeds: KNET_MODEL_SEEDS="first-last" or "n" (default 1-24); every
 * round prints its seed, and a failure names it. KNET_LOOP_THREADS sets the
 * loops (default 3). */
#include "testutil.h"

#include <sched.h>
#include <stdarg.h>

#define NWORKERS 3
#define SLOT_LOOP NWORKERS
#define NSLOTS (NWORKERS + 1)
#define NCLIENTS 6
#define OPS_PER_WORKER 600
#define MAX_RECS 4096
#define HDR 16
#define MAGIC 0x4b6eu
#define LEN4_MAX (256u * 1024u)

static unsigned g_seed; /* the round's seed, printed by every failure */
static _Thread_local bool tl_test_thread;

_Noreturn __attribute__((format(printf, 3, 4))) static void mfail(const char *file, int line,
                                                                  const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "%s:%d: FAILED (seed %u; rerun with KNET_MODEL_SEEDS=%u): %s\n", file, line,
            g_seed, g_seed, msg);
    fflush(stderr);
    abort();
}
#define MCHECK(cond, ...)                                                                          \
    do {                                                                                           \
        if (!(cond))                                                                               \
            mfail(__FILE__, __LINE__, __VA_ARGS__);                                                \
    } while (0)

static uint64_t rng_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static uint32_t rng_below(uint64_t *s, uint32_t n) { return (uint32_t)(rng_next(s) % n); }

/* ------------------------------------------------------------------ model state */

typedef struct u8log { uint8_t *v; size_t n, cap; } u8log;    /* per seq: 1 accepted, 2 refused */
typedef struct u32log { uint32_t *v; size_t n, cap; } u32log; /* seqs in arrival order */

enum { SIDE_SERVER = 0, SIDE_CLIENT = 1 };

typedef struct rec {
    knet_conn *conn; /* retained in connect(true), released after the round */
    uint32_t uid;
    int side, client;
    pthread_t thread;
    atomic_int in_cb, connected, disconnected, reason;
    atomic_int hard;      /* knet_conn_close was called on it */
    bool hard_at_end;     /* some close of it (or its client / server) was hard */
    char addr[KNET_ADDRSTRLEN]; /* server: remote; client: local ("" unknown) */
    uint32_t next_seq[NSLOTS];
    u8log tx[NSLOTS];     /* slot w written by worker w only; SLOT_LOOP by the loop */
    u32log rx[NSLOTS];    /* written by this connection's loop only */
    int64_t peer_uid;     /* first sender seen, -1 none */
    uint64_t loop_rng;
    long rx_msgs, rx_empty;
    atomic_long tx_wire;  /* framed bytes of the sends that returned 0 */
    long rx_wire;         /* framed bytes of the messages received */
    uint8_t *asm_buf;     /* raw codec: bytes of a message not yet whole */
    size_t asm_len, asm_cap;
    uint8_t *abuf;        /* knet_conn_set_alloc's memory, or NULL */
    size_t abuf_cap;
} rec;

typedef struct client_m {
    knet_client *cli;
    pthread_t thread;
    atomic_int done, rc;
    atomic_int hard;                 /* knet_client_close was called */
    _Atomic(knet_conn *) pre_closed; /* closed hard before its connect(true) */
    atomic_int close0, shutdown0; /* calls that returned 0 */
    atomic_int closed;            /* a close returned (0 or ECLIENTCLOSED) */
    atomic_int stopped;           /* a close or shutdown returned */
} client_m;

static struct {
    knet_server *srv;
    pthread_t srv_thread;
    atomic_int srv_done, srv_rc;
    atomic_int srv_hard; /* knet_server_close was called */
    atomic_int srv_close0, srv_shutdown0; /* calls that returned 0 */
    atomic_int srv_stopped;
    knet_codec codec;
    knet_length_field lf;
    size_t max_msg;
    size_t prefix;        /* the codec's length prefix (0 raw) */
    bool raw;             /* raw stream: messages are reassembled from reads */
    client_m clients[NCLIENTS];
    _Atomic(rec *) recs[MAX_RECS];
    atomic_uint nrecs;
    atomic_long ops, sends_ok, sends_full, sends_closed, loop_sends_ok;
} M;

static void u8_set(u8log *l, uint32_t seq, uint8_t v)
{
    if (seq >= l->cap) {
        size_t nc = l->cap ? l->cap * 2 : 64;
        while (nc <= seq)
            nc *= 2;
        l->v = realloc(l->v, nc);
        CHECK(l->v != NULL);
        memset(l->v + l->cap, 0, nc - l->cap);
        l->cap = nc;
    }
    l->v[seq] = v;
    if (seq >= l->n)
        l->n = seq + 1;
}

static void u32_push(u32log *l, uint32_t v)
{
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 64;
        l->v = realloc(l->v, l->cap * sizeof *l->v);
        CHECK(l->v != NULL);
    }
    l->v[l->n++] = v;
}

static rec *rec_at(uint32_t i) { return atomic_load_explicit(&M.recs[i], memory_order_acquire); }

/* ------------------------------------------------------------------ messages */

/* The 8 pattern bytes of block blk of message uid/slot/seq. */
static uint64_t pat_block(uint32_t uid, uint32_t slot, uint32_t seq, size_t blk)
{
    uint64_t x = ((uint64_t)uid << 40) ^ ((uint64_t)slot << 32) ^ seq ^ ((uint64_t)blk << 48);
    return rng_next(&x);
}

/* Fills (or, when check, compares) bytes HDR..len of message uid/slot/seq;
 * returns the offset of the first differing byte, or len. */
static size_t pat_fill(uint8_t *buf, size_t len, uint32_t uid, uint32_t slot, uint32_t seq,
                       bool check)
{
    for (size_t off = HDR; off < len; off += 8) {
        uint64_t h = pat_block(uid, slot, seq, off / 8);
        size_t n = len - off < 8 ? len - off : 8;
        if (!check)
            memcpy(buf + off, &h, n);
        else if (memcmp(buf + off, &h, n) != 0)
            return off;
    }
    return len;
}

static void msg_make(uint8_t *buf, size_t len, uint32_t uid, uint32_t slot, uint32_t seq)
{
    uint16_t m = MAGIC;
    uint8_t s8 = (uint8_t)slot, z = 0;
    uint32_t l32 = (uint32_t)len;
    memcpy(buf, &m, 2);
    memcpy(buf + 2, &s8, 1);
    memcpy(buf + 3, &z, 1);
    memcpy(buf + 4, &uid, 4);
    memcpy(buf + 8, &seq, 4);
    memcpy(buf + 12, &l32, 4);
    pat_fill(buf, len, uid, slot, seq, false);
}

/* A random message size: mostly small, some medium and large, rarely the codec's
 * largest or one over it (KNET_ECODEC), rarely empty (untracked). */
static size_t pick_size(uint64_t *r)
{
    uint32_t k = rng_below(r, 100);
    if (k < 2)
        return 0;
    if (k < 4)
        return M.max_msg + 1;
    if (k < 6)
        return M.max_msg;
    if (k < 70)
        return HDR + rng_below(r, 200);
    if (k < 92)
        return HDR + rng_below(r, 8192);
    return HDR + rng_below(r, (uint32_t)(M.max_msg - HDR));
}

static bool on_loop_codes(int rc) { return rc == -EPIPE || rc == -ECONNRESET; }

/* Sends one tracked message of len bytes on r from slot; returns knet's code. */
static int model_send(rec *r, uint32_t slot, uint8_t *buf, size_t len, bool on_loop)
{
    if (len == 0) {
        int rc = knet_conn_send(r->conn, buf, 0);
        MCHECK(rc == 0 || rc == KNET_ECLOSED || rc == KNET_EPENDINGFULL ||
                   (on_loop && on_loop_codes(rc)),
               "empty send returned %d (%s)", rc, knet_strerror(rc));
        if (rc == 0)
            atomic_fetch_add(&r->tx_wire, (long)M.prefix);
        return rc;
    }
    uint32_t seq = r->next_seq[slot]++;
    msg_make(buf, len, r->uid, slot, seq);
    /* Once a stop of its server or client returned, a connection refuses sends. */
    bool stopped = r->side == SIDE_SERVER ? atomic_load(&M.srv_stopped)
                                          : atomic_load(&M.clients[r->client].stopped);
    int rc = knet_conn_send(r->conn, buf, len);
    MCHECK(!stopped || rc == KNET_ECLOSED,
           "conn %u (%s side): a send after its %s stopped returned %d (%s)", r->uid,
           r->side == SIDE_SERVER ? "server" : "client", r->side == SIDE_SERVER ? "server" : "client",
           rc, knet_strerror(rc));
    if (len > M.max_msg && !M.raw)
        MCHECK(rc == KNET_ECODEC || rc == KNET_ECLOSED, "send of %zu (> max %zu) returned %d (%s)", len, M.max_msg, rc,
               knet_strerror(rc));
    else
        MCHECK(rc == 0 || rc == KNET_ECLOSED || rc == KNET_EPENDINGFULL ||
                   (on_loop && on_loop_codes(rc)),
               "send of %zu returned %d (%s)%s", len, rc, knet_strerror(rc),
               on_loop ? " on the loop" : "");
    u8_set(&r->tx[slot], seq, rc == 0 ? 1 : 2);
    if (rc == 0)
        atomic_fetch_add(&r->tx_wire, (long)(M.prefix + len));
    atomic_fetch_add(rc == 0                       ? (on_loop ? &M.loop_sends_ok : &M.sends_ok)
                     : rc == KNET_EPENDINGFULL ? &M.sends_full
                                               : &M.sends_closed,
                     1);
    return rc;
}

/* ------------------------------------------------------------------ handler */

static void cb_enter(rec *r)
{
    MCHECK(!tl_test_thread, "a callback ran on a thread of the test");
    MCHECK(atomic_exchange(&r->in_cb, 1) == 0, "callbacks of conn %u nested or concurrent",
           r->uid);
    MCHECK(pthread_equal(r->thread, pthread_self()), "conn %u: callback on another thread",
           r->uid);
}
static void cb_leave(rec *r) { atomic_store(&r->in_cb, 0); }

static _Thread_local uint8_t *tl_loop_buf; /* a loop thread's send buffer (freed at exit) */
static uint8_t *loop_buf(void)
{
    if (!tl_loop_buf) {
        tl_loop_buf = malloc(LEN4_MAX + 64);
        CHECK(tl_loop_buf != NULL);
    }
    return tl_loop_buf;
}

static size_t loop_size(rec *r)
{
    uint32_t k = rng_below(&r->loop_rng, 100);
    return k < 80 ? HDR + rng_below(&r->loop_rng, 100)
                  : HDR + rng_below(&r->loop_rng, (uint32_t)(M.max_msg - HDR));
}

static void *rec_alloc(knet_conn *c, size_t suggested, size_t *cap, void *ud);

static void on_connect(knet_conn *c, bool connected, void *ud)
{
    int side = (int)(intptr_t)ud >> 8, client = (int)(intptr_t)ud & 0xff;
    if (connected) {
        MCHECK(!tl_test_thread, "connect(true) ran on a thread of the test");
        MCHECK(knet_conn_userdata(c) == NULL, "userdata set before connect(true)");
        MCHECK(knet_conn_close_reason(c) == 1, "close reason %d in connect(true)",
               knet_conn_close_reason(c));
        uint32_t uid = atomic_fetch_add(&M.nrecs, 1);
        MCHECK(uid < MAX_RECS, "more than %d connections in one round", MAX_RECS);
        rec *r = calloc(1, sizeof *r);
        CHECK(r != NULL);
        r->conn = c;
        r->uid = uid;
        r->side = side;
        r->client = client;
        r->thread = pthread_self();
        r->peer_uid = -1;
        r->loop_rng = ((uint64_t)g_seed << 32) ^ uid ^ 0x5eedull;
        int n = side == SIDE_CLIENT ? knet_conn_local_addr(c, r->addr, sizeof r->addr)
                                    : knet_conn_remote_addr(c, r->addr, sizeof r->addr);
        MCHECK(n > 0, "address in connect(true) returned %d (%s)", n, knet_strerror(n));
        knet_conn_retain(c);
        knet_conn_set_userdata(c, r);
        cb_enter(r);
        atomic_store(&r->connected, 1);
        if (rng_below(&r->loop_rng, 4) == 0)
            knet_conn_set_pending_send(c, 1 + rng_below(&r->loop_rng, 8));
        if (rng_below(&r->loop_rng, 3) == 0) {
            /* Reads into memory of its own (1 byte to more than the loop's buffer). */
            r->abuf_cap = 1 + rng_below(&r->loop_rng, 70000);
            r->abuf = malloc(r->abuf_cap);
            CHECK(r->abuf != NULL);
            int rc = knet_conn_set_alloc(c, rec_alloc, r);
            MCHECK(rc == 0, "set_alloc in connect(true) returned %d", rc);
        }
        if (rng_below(&r->loop_rng, 2) == 0)
            model_send(r, SLOT_LOOP, loop_buf(), loop_size(r), true);
        atomic_store_explicit(&M.recs[uid], r, memory_order_release);
        cb_leave(r);
    } else {
        rec *r = knet_conn_userdata(c);
        MCHECK(r != NULL, "connect(false) without connect(true)");
        MCHECK(r->conn == c, "userdata of another conn");
        cb_enter(r);
        MCHECK(atomic_load(&r->connected) == 1 && atomic_load(&r->disconnected) == 0,
               "conn %u: connect(false) twice or before connect(true)", r->uid);
        int reason = knet_conn_close_reason(c);
        MCHECK(reason != 1, "conn %u: close reason 1 in connect(false)", r->uid);
        atomic_store(&r->reason, reason);
        /* Hard closes are flagged before they are called, so one that ended this
         * connection is seen here (one that came later only makes the check laxer). */
        if (r->side == SIDE_CLIENT)
            r->hard_at_end = atomic_load(&r->hard) || atomic_load(&M.clients[r->client].hard) ||
                             atomic_load(&M.clients[r->client].pre_closed) == c;
        else
            r->hard_at_end = atomic_load(&r->hard) || atomic_load(&M.srv_hard);
        uint8_t b[HDR];
        int rc = model_send(r, SLOT_LOOP, b, HDR, true);
        MCHECK(rc == KNET_ECLOSED, "conn %u: send in connect(false) returned %d", r->uid, rc);
        atomic_store(&r->disconnected, 1);
        cb_leave(r);
    }
}

/* Checks one whole message that r received and records it. */
static void take_message(rec *r, const uint8_t *b, size_t len)
{
    MCHECK(len >= HDR, "conn %u: message of %zu bytes (shorter than a header)", r->uid, len);
    uint16_t m;
    uint32_t uid, seq, l32;
    memcpy(&m, b, 2);
    memcpy(&uid, b + 4, 4);
    memcpy(&seq, b + 8, 4);
    memcpy(&l32, b + 12, 4);
    uint32_t slot = b[2];
    MCHECK(m == MAGIC && b[3] == 0 && slot < NSLOTS && l32 == len && uid < MAX_RECS,
           "conn %u: bad header (magic %x slot %u len %u of %zu uid %u)", r->uid, m, slot, l32,
           len, uid);
    size_t bad = pat_fill((uint8_t *)b, len, uid, slot, seq, true);
    MCHECK(bad == len, "conn %u: bytes from %zu of message %u/%u/%u (%zu bytes) corrupt", r->uid,
           bad, uid, slot, seq, len);
    if (r->peer_uid < 0)
        r->peer_uid = uid;
    MCHECK(r->peer_uid == (int64_t)uid, "conn %u received from conn %u after conn %lld: cross-talk",
           r->uid, uid, (long long)r->peer_uid);
    u32_push(&r->rx[slot], seq);
}

/* Raw stream: appends the read and takes every message it completes (each
 * header says its length). */
static void take_raw(rec *r, const uint8_t *buf, size_t len)
{
    if (r->asm_len + len > r->asm_cap) {
        size_t nc = r->asm_cap ? r->asm_cap : 4096;
        while (nc < r->asm_len + len)
            nc *= 2;
        r->asm_buf = realloc(r->asm_buf, nc);
        CHECK(r->asm_buf != NULL);
        r->asm_cap = nc;
    }
    memcpy(r->asm_buf + r->asm_len, buf, len);
    r->asm_len += len;
    size_t off = 0;
    while (r->asm_len - off >= HDR) {
        uint32_t l32;
        memcpy(&l32, r->asm_buf + off + 12, 4);
        MCHECK(l32 >= HDR && l32 <= M.max_msg + 1, "conn %u: raw stream out of step (length %u)",
               r->uid, l32);
        if (r->asm_len - off < l32)
            break;
        take_message(r, r->asm_buf + off, l32);
        off += l32;
    }
    memmove(r->asm_buf, r->asm_buf + off, r->asm_len - off);
    r->asm_len -= off;
}

static void on_receive(knet_conn *c, const void *buf, size_t len, void *ud)
{
    (void)ud;
    rec *r = knet_conn_userdata(c);
    MCHECK(r != NULL && r->conn == c, "receive before connect(true) or with foreign userdata");
    cb_enter(r);
    MCHECK(atomic_load(&r->connected) == 1 && atomic_load(&r->disconnected) == 0,
           "conn %u: receive outside connect(true)..connect(false)", r->uid);
    MCHECK(!M.raw || len > 0, "conn %u: empty raw receive", r->uid);
    r->rx_msgs++;
    r->rx_wire += (long)(M.prefix + len);
    if (M.raw)
        take_raw(r, buf, len);
    else if (len == 0)
        r->rx_empty++;
    else
        take_message(r, buf, len);
    uint32_t k = rng_below(&r->loop_rng, 1000);
    if (k < 250)
        model_send(r, SLOT_LOOP, loop_buf(), loop_size(r), true);
    else if (k < 253) {
        atomic_store(&r->hard, 1);
        knet_conn_close(c);
    } else if (k < 256) {
        knet_conn_close_with_timeout(c, rng_below(&r->loop_rng, 30));
    } else if (k < 266) {
        /* A slow handler (workload, not synchronisation): its loop's peers queue up. */
        struct timespec ts = {0, (long)rng_below(&r->loop_rng, 2000) * 1000L};
        nanosleep(&ts, NULL);
    }
    cb_leave(r);
}

/* knet_conn_set_alloc's function: the connection's own read memory. */
static void *rec_alloc(knet_conn *c, size_t suggested, size_t *cap, void *ud)
{
    (void)suggested;
    rec *r = ud;
    MCHECK(knet_conn_userdata(c) == r, "alloc of conn %u called for another conn", r->uid);
    MCHECK(pthread_equal(r->thread, pthread_self()), "alloc of conn %u off its loop", r->uid);
    *cap = r->abuf_cap;
    return r->abuf;
}

/* ------------------------------------------------------------------ serve threads */

static void *server_main(void *arg)
{
    (void)arg;
    knet_handler h = {on_connect, on_receive, (void *)(intptr_t)(SIDE_SERVER << 8)};
    int rc = knet_server_listen_and_serve(M.srv, &h, &M.codec);
    atomic_store(&M.srv_rc, rc);
    atomic_store(&M.srv_done, 1);
    return NULL;
}

static void *client_main(void *arg)
{
    client_m *cm = arg;
    int idx = (int)(cm - M.clients);
    knet_handler h = {on_connect, on_receive, (void *)(intptr_t)((SIDE_CLIENT << 8) | idx)};
    int rc = knet_client_dial_and_serve(cm->cli, &h, &M.codec);
    atomic_store(&cm->rc, rc);
    atomic_store(&cm->done, 1);
    return NULL;
}

/* ------------------------------------------------------------------ stops (codes checked) */

/* Server codes: a shutdown after any stop, a close after a close, are
 * KNET_ESERVERCLOSED; a close after a shutdown force-closes (0, as the
 * client's does; knet.h's "already closed" means by a close). */
static void server_stop(uint64_t *rr)
{
    bool graceful = rng_below(rr, 2);
    bool was_stopped = atomic_load(&M.srv_stopped), was_closed = atomic_load(&M.srv_hard);
    int rc;
    if (graceful) {
        rc = knet_server_shutdown(M.srv, 1 + rng_below(rr, 100));
        MCHECK(rc == 0 || rc == KNET_ESERVERCLOSED, "server shutdown returned %d", rc);
        MCHECK(!was_stopped || rc == KNET_ESERVERCLOSED, "server shutdown after a stop: 0");
        if (rc == 0)
            MCHECK(atomic_fetch_add(&M.srv_shutdown0, 1) == 0, "two server shutdowns: 0");
    } else {
        atomic_store(&M.srv_hard, 1);
        rc = knet_server_close(M.srv);
        MCHECK(rc == 0 || rc == KNET_ESERVERCLOSED, "server close returned %d", rc);
        MCHECK(!was_closed || rc == KNET_ESERVERCLOSED, "server close after a close: 0");
        if (rc == 0)
            MCHECK(atomic_fetch_add(&M.srv_close0, 1) == 0, "two server closes: 0");
    }
    atomic_store(&M.srv_stopped, 1);
}

static void client_stop(client_m *cm, uint64_t *rr)
{
    bool graceful = rng_below(rr, 2);
    bool was_closed = atomic_load(&cm->closed);
    int rc;
    if (graceful) {
        rc = knet_client_shutdown(cm->cli, rng_below(rr, 60));
        MCHECK(rc == 0 || rc == KNET_ECLIENTCLOSED, "client shutdown returned %d", rc);
        MCHECK(!was_closed || rc == KNET_ECLIENTCLOSED, "client shutdown after close returned 0");
        if (rc == 0)
            MCHECK(atomic_fetch_add(&cm->shutdown0, 1) == 0, "two client shutdowns returned 0");
    } else {
        atomic_store(&cm->hard, 1);
        rc = knet_client_close(cm->cli);
        MCHECK(rc == 0 || rc == KNET_ECLIENTCLOSED, "client close returned %d", rc);
        if (rc == 0)
            MCHECK(atomic_fetch_add(&cm->close0, 1) == 0, "two client closes returned 0");
        atomic_store(&cm->closed, 1);
    }
    atomic_store(&cm->stopped, 1);
}

/* ------------------------------------------------------------------ workers */

typedef struct worker {
    int w;
    uint64_t rng;
    int stop_server_at; /* op index of a server stop, -1 none */
    uint8_t *buf;
} worker;

/* A random connection of the round, mostly a live one; NULL when none yet. */
static rec *pick_rec(worker *wk)
{
    uint32_t n = atomic_load(&M.nrecs);
    if (n == 0)
        return NULL;
    rec *r = NULL;
    for (int tries = 0; tries < 4; tries++) {
        r = rec_at(rng_below(&wk->rng, n));
        if (r && !atomic_load(&r->disconnected))
            return r;
    }
    return r;
}

static void check_addr_rc(int rc, bool local)
{
    MCHECK(rc > 0 || rc == -ENOSPC || (local && rc == KNET_ECLOSED), "%s address returned %d",
           local ? "local" : "remote", rc);
}

static void conn_op(worker *wk, rec *r)
{
    knet_conn *c = r->conn;
    uint32_t k = rng_below(&wk->rng, 100);
    if (k < 50) {
        model_send(r, (uint32_t)wk->w, wk->buf, pick_size(&wk->rng), false);
    } else if (k < 60) {
        /* A burst into a limit: large messages until the queue says full. */
        if (rng_below(&wk->rng, 2))
            knet_conn_set_pending_send(c, 1 + rng_below(&wk->rng, 6));
        else
            knet_conn_set_max_queued_bytes(c, 1024 + rng_below(&wk->rng, 64 * 1024));
        for (int i = 0; i < 24; i++) {
            size_t len = HDR + rng_below(&wk->rng, (uint32_t)(M.max_msg - HDR));
            int rc = model_send(r, (uint32_t)wk->w, wk->buf, len, false);
            if (rc == KNET_EPENDINGFULL && rng_below(&wk->rng, 4) == 0) {
                /* The peer (knet) keeps reading: the queue drains, and a send is
                 * taken again, or the connection ends. */
                int64_t end = tu_now_ms() + TU_DEADLINE_MS;
                while ((rc = model_send(r, (uint32_t)wk->w, wk->buf, HDR, false)) ==
                       KNET_EPENDINGFULL) {
                    MCHECK(tu_now_ms() < end, "conn %u: still full after %d ms", r->uid,
                           TU_DEADLINE_MS);
                    tu_sleep_ms(1);
                }
            }
            if (rc != 0)
                break;
        }
        if (rng_below(&wk->rng, 2)) {
            knet_conn_set_pending_send(c, 0);
            knet_conn_set_max_queued_bytes(c, KNET_DEFAULT_MAX_QUEUED);
        }
    } else if (k < 62) {
        atomic_store(&r->hard, 1);
        knet_conn_close(c);
    } else if (k < 63) {
        knet_conn_shutdown(c);
    } else if (k < 65) {
        knet_conn_close_with_timeout(c, rng_below(&wk->rng, 31));
    } else if (k < 80) {
        MCHECK(knet_conn_userdata(c) == r, "userdata of conn %u changed", r->uid);
        knet_conn_set_userdata(c, r);
        MCHECK(knet_conn_userdata(c) == r, "userdata of conn %u not kept", r->uid);
    } else if (k < 85) {
        int rc = knet_conn_set_nodelay(c, rng_below(&wk->rng, 2));
        MCHECK(rc == 0 || rc == KNET_ECLOSED, "set_nodelay returned %d (%s)", rc,
               knet_strerror(rc));
    } else if (k < 90) {
        char a[KNET_ADDRSTRLEN];
        size_t cap = rng_below(&wk->rng, 4) ? sizeof a : 1 + rng_below(&wk->rng, 8);
        check_addr_rc(knet_conn_local_addr(c, a, cap), true);
        check_addr_rc(knet_conn_remote_addr(c, a, cap), false);
        int reason = knet_conn_close_reason(c);
        MCHECK(reason <= 1, "close reason %d", reason);
        int rc = knet_conn_set_alloc(c, NULL, NULL);
        MCHECK(rc == -EINVAL, "set_alloc off the loop returned %d", rc);
    } else {
        model_send(r, (uint32_t)wk->w, wk->buf, HDR + rng_below(&wk->rng, 64), false);
    }
}

static void client_op(worker *wk)
{
    client_m *cm = &M.clients[rng_below(&wk->rng, NCLIENTS)];
    uint32_t k = rng_below(&wk->rng, 100);
    if (k < 1) {
        client_stop(cm, &wk->rng);
        return;
    }
    knet_conn *c = knet_client_conn(cm->cli);
    if (!c)
        return;
    rec *r = knet_conn_userdata(c);
    if (r) {
        MCHECK(r->conn == c, "knet_client_conn: userdata of another conn");
        MCHECK(r->side == SIDE_CLIENT, "knet_client_conn gave a server conn");
        conn_op(wk, r);
    } else if (k < 50) {
        /* Not attached yet (no connect(true)): flag it by its handle (a later
         * conn at the same address would only be checked more laxly). */
        atomic_store(&cm->pre_closed, c);
        knet_conn_close(c);
    } else {
        knet_conn_close_with_timeout(c, rng_below(&wk->rng, 20));
    }
    knet_conn_release(c);
}

static void worker_op(worker *wk, int op)
{
    if (op == wk->stop_server_at) {
        server_stop(&wk->rng);
        return;
    }
    uint32_t k = rng_below(&wk->rng, 100);
    if (k < 80) {
        rec *r = pick_rec(wk);
        if (r)
            conn_op(wk, r);
    } else if (k < 95) {
        client_op(wk);
    } else {
        sched_yield();
    }
}

static void *worker_main(void *arg)
{
    worker *wk = arg;
    tl_test_thread = true;
    uint64_t ops_rng = wk->rng;
    for (int op = 0; op < OPS_PER_WORKER; op++) {
        atomic_fetch_add(&M.ops, 1);
        /* Each op draws from its own stream, so what one op finds (no
         * connection yet, a closed client) does not shift the next ops. */
        wk->rng = rng_next(&ops_rng);
        worker_op(wk, op);
    }
    return NULL;
}

/* ------------------------------------------------------------------ the round */

static int thread_count(void) { return tu_dir_count("/proc/self/task"); }

/* Checks the messages from sender a received by b (a's peer, or NULL when unpaired). */
static void check_stream(rec *a, rec *b, long *complete, long *checked_msgs)
{
    bool must_all = b && !a->hard_at_end && !b->hard_at_end &&
                    (a->reason == 0 || a->reason == KNET_EOF) &&
                    (b->reason == 0 || b->reason == KNET_EOF);
    if (must_all)
        (*complete)++;
    for (int s = 0; s < NSLOTS; s++) {
        const u8log *tx = &a->tx[s];
        const u32log *rx = b ? &b->rx[s] : NULL;
        size_t got = rx ? rx->n : 0;
        /* What b received of slot s: strictly increasing accepted seqs with no
         * accepted seq skipped. */
        size_t j = 0;
        for (size_t i = 0; i < got; i++) {
            uint32_t seq = rx->v[i];
            MCHECK(seq < tx->n && tx->v[seq] == 1,
                   "conn %u got message %u/%d/%u that the send %s", b->uid, a->uid, s, seq,
                   seq < tx->n && tx->v[seq] == 2 ? "refused" : "never made");
            MCHECK(i == 0 || seq > rx->v[i - 1], "conn %u got %u/%d/%u after seq %u", b->uid,
                   a->uid, s, seq, rx->v[i - 1]);
            for (; j < seq; j++)
                MCHECK(tx->v[j] != 1,
                       "conn %u: accepted message %u/%d/%u lost before %u arrived", b->uid,
                       a->uid, s, (unsigned)j, seq);
            j = seq + 1;
        }
        *checked_msgs += (long)got;
        if (must_all)
            for (; j < tx->n; j++)
                MCHECK(tx->v[j] != 1,
                       "accepted message %u/%d/%u never reached conn %u (reasons %d/%d: %s / %s)",
                       a->uid, s, (unsigned)j, b->uid, a->reason, b->reason,
                       knet_strerror(a->reason), knet_strerror(b->reason));
    }
}

static void run_round(unsigned seed, int fd_base, int thr_base)
{
    g_seed = seed;
    uint64_t rr = ((uint64_t)seed << 20) ^ 0xabcdefull;
    memset(&M, 0, sizeof M);
    int64_t t0 = tu_now_ms();

    /* The codec: std (65535), raw (messages reassembled from reads) or a 4-byte
     * length codec (256 KiB, either order). */
    uint32_t kind = rng_below(&rr, 3);
    if (kind == 0) {
        M.codec = knet_std_codec;
        M.max_msg = 65535;
        M.prefix = 2;
    } else if (kind == 1) {
        M.codec = knet_default_codec;
        M.max_msg = LEN4_MAX;
        M.raw = true;
    } else {
        M.lf = (knet_length_field){4, rng_below(&rr, 2) == 1, LEN4_MAX};
        CHECK_EQ(knet_length_codec(&M.codec, &M.lf), 0);
        M.max_msg = LEN4_MAX;
        M.prefix = 4;
    }

    M.srv = knet_server_new("127.0.0.1:0");
    CHECK(M.srv != NULL);
    if (rng_below(&rr, 3) == 0)
        knet_server_set_max_queued_bytes(M.srv, 16 * 1024 + rng_below(&rr, 256 * 1024));
    if (rng_below(&rr, 4) == 0)
        knet_server_set_idle_timeout(M.srv, 40 + rng_below(&rr, 200));
    CHECK_EQ(pthread_create(&M.srv_thread, NULL, server_main, NULL), 0);
    int port = knet_server_wait_listening(M.srv, TU_DEADLINE_MS);
    MCHECK(port > 0, "listen: %d", port);

    for (int i = 0; i < NCLIENTS; i++) {
        client_m *cm = &M.clients[i];
        cm->cli = tu_client_for_port(port);
        knet_client_enable_retry(cm->cli);
        knet_client_set_retry_backoff(cm->cli, 1, 8);
        if (rng_below(&rr, 3) == 0)
            knet_client_set_max_queued_bytes(cm->cli, 16 * 1024 + rng_below(&rr, 256 * 1024));
        if (rng_below(&rr, 6) == 0)
            knet_client_set_idle_timeout(cm->cli, 40 + rng_below(&rr, 200));
        CHECK_EQ(pthread_create(&cm->thread, NULL, client_main, cm), 0);
    }
    /* Start the workers once every client connected at least once. */
    WAIT_UNTIL(atomic_load(&M.nrecs) >= 2 * NCLIENTS);

    worker wk[NWORKERS];
    pthread_t wt[NWORKERS];
    int stopper = rng_below(&rr, 2) ? (int)rng_below(&rr, NWORKERS) : -1;
    for (int w = 0; w < NWORKERS; w++) {
        wk[w].w = w;
        wk[w].rng = rng_next(&rr);
        wk[w].stop_server_at =
            w == stopper ? OPS_PER_WORKER / 2 + (int)rng_below(&rr, OPS_PER_WORKER / 2) : -1;
        wk[w].buf = malloc(LEN4_MAX + 64);
        CHECK(wk[w].buf != NULL);
        CHECK_EQ(pthread_create(&wt[w], NULL, worker_main, &wk[w]), 0);
    }
    for (int w = 0; w < NWORKERS; w++) {
        CHECK_EQ(pthread_join(wt[w], NULL), 0);
        free(wk[w].buf);
    }

    /* The end: every client and the server stop (closed or shut down), every
     * serve call returns (after every connect(false)). */
    for (int i = 0; i < NCLIENTS; i++)
        client_stop(&M.clients[i], &rr);
    server_stop(&rr);
    for (int i = 0; i < NCLIENTS; i++) {
        client_m *cm = &M.clients[i];
        WAIT_UNTIL(atomic_load(&cm->done));
        CHECK_EQ(pthread_join(cm->thread, NULL), 0);
        MCHECK(atomic_load(&cm->rc) == KNET_ECLIENTCLOSED, "dial_and_serve returned %d",
               atomic_load(&cm->rc));
        MCHECK(atomic_load(&cm->close0) + atomic_load(&cm->shutdown0) >= 1,
               "client %d: no stop call returned 0", i);
    }
    WAIT_UNTIL(atomic_load(&M.srv_done));
    CHECK_EQ(pthread_join(M.srv_thread, NULL), 0);
    MCHECK(atomic_load(&M.srv_rc) == KNET_ESERVERCLOSED, "listen_and_serve returned %d",
           atomic_load(&M.srv_rc));
    MCHECK(atomic_load(&M.srv_close0) + atomic_load(&M.srv_shutdown0) >= 1,
           "no server stop returned 0");
    knet_stats st;
    knet_server_stats(M.srv, &st);

    /* The model's checks. */
    uint32_t n = atomic_load(&M.nrecs);
    long nserver = 0, complete = 0, msgs = 0, paired = 0;
    long reasons[7] = {0}; /* 0, EOF, ETIMEDOUT, server closed, client closed, reset, other */
    for (uint32_t i = 0; i < n; i++) {
        rec *r = rec_at(i);
        MCHECK(r != NULL, "record %u never published", i);
        MCHECK(atomic_load(&r->connected) == 1 && atomic_load(&r->disconnected) == 1,
               "conn %u: connected %d disconnected %d after serve returned", r->uid,
               atomic_load(&r->connected), atomic_load(&r->disconnected));
        MCHECK(atomic_load(&r->in_cb) == 0, "conn %u still in a callback", r->uid);
        nserver += r->side == SIDE_SERVER;
    }
    MCHECK(st.live == 0, "stats.live %llu after serve returned", (unsigned long long)st.live);
    MCHECK((long)st.accepted >= nserver, "stats.accepted %llu < %ld connect(true)s",
           (unsigned long long)st.accepted, nserver);
    /* The server's byte counters lie between what its side delivered and what
     * the other side's sends accepted. */
    long wire[2][2] = {{0}}; /* [side][0 received, 1 accepted] */
    for (uint32_t i = 0; i < n; i++) {
        rec *r = rec_at(i);
        wire[r->side][0] += r->rx_wire;
        wire[r->side][1] += atomic_load(&r->tx_wire);
    }
    MCHECK((long)st.bytes_in >= wire[SIDE_SERVER][0] && (long)st.bytes_in <= wire[SIDE_CLIENT][1],
           "stats.bytes_in %llu outside [%ld received, %ld sent]", (unsigned long long)st.bytes_in,
           wire[SIDE_SERVER][0], wire[SIDE_CLIENT][1]);
    MCHECK((long)st.bytes_out >= wire[SIDE_CLIENT][0] && (long)st.bytes_out <= wire[SIDE_SERVER][1],
           "stats.bytes_out %llu outside [%ld received, %ld sent]",
           (unsigned long long)st.bytes_out, wire[SIDE_CLIENT][0], wire[SIDE_SERVER][1]);
    for (uint32_t i = 0; i < n; i++) {
        rec *a = rec_at(i), *peer = NULL;
        int same = 0;
        for (uint32_t j = 0; j < n; j++) {
            rec *b = rec_at(j);
            if (b->side != a->side && strcmp(a->addr, b->addr) == 0) {
                peer = b;
                same++;
            }
        }
        if (same != 1)
            peer = NULL; /* a port used twice in the round: leave the pair unchecked */
        if (a->peer_uid >= 0) {
            rec *src = rec_at((uint32_t)a->peer_uid);
            MCHECK(src->side != a->side && strcmp(src->addr, a->addr) == 0,
                   "conn %u (%s) received conn %u's (%s) messages", a->uid, a->addr, src->uid,
                   src->addr);
        }
        paired += peer != NULL;
        check_stream(a, peer, &complete, &msgs);
        int rs = a->reason;
        reasons[rs == 0 ? 0 : rs == KNET_EOF ? 1 : rs == -ETIMEDOUT ? 2 : rs == KNET_ESERVERCLOSED ? 3
                : rs == KNET_ECLIENTCLOSED ? 4 : rs == -ECONNRESET || rs == -EPIPE ? 5 : 6]++;
    }
    printf("seed %u: %s codec, %u conns (%ld paired, %ld streams complete), %ld ops, sends "
           "%ld ok + %ld on loops, %ld full, %ld closed; %ld messages checked; reasons "
           "0:%ld eof:%ld timedout:%ld srvclosed:%ld cliclosed:%ld reset:%ld other:%ld; %lld ms\n",
           seed, M.raw ? "raw" : M.max_msg == 65535 ? "std" : "len4", n, paired / 2, complete,
           atomic_load(&M.ops), atomic_load(&M.sends_ok), atomic_load(&M.loop_sends_ok),
           atomic_load(&M.sends_full), atomic_load(&M.sends_closed), msgs, reasons[0], reasons[1],
           reasons[2], reasons[3], reasons[4], reasons[5], reasons[6],
           (long long)(tu_now_ms() - t0));

    for (uint32_t i = 0; i < n; i++) {
        rec *r = rec_at(i);
        knet_conn_release(r->conn);
        for (int s = 0; s < NSLOTS; s++) {
            free(r->tx[s].v);
            free(r->rx[s].v);
        }
        free(r->asm_buf);
        free(r->abuf);
        free(r);
    }
    for (int i = 0; i < NCLIENTS; i++)
        knet_client_free(M.clients[i].cli);
    knet_server_free(M.srv);
    CHECK_FDS(fd_base);
    WAIT_UNTIL(thread_count() == thr_base);
}

/* Drops knet's warnings (refused re-dials after the server stopped). */
static void quiet_log(int level, const char *msg, void *ud)
{
    (void)ud;
    if (level >= KNET_LOG_ERROR)
        fprintf(stderr, "knet: %s\n", msg);
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    knet_set_log(quiet_log, KNET_LOG_ERROR, NULL);
    tl_test_thread = true;
    /* More loops than cores (cross-loop pairs), unless KNET_LOOP_THREADS says otherwise. */
    const char *loops = getenv("KNET_LOOP_THREADS");
    if (!loops || !*loops)
        CHECK_EQ(knet_set_loop_threads(3), 0);
    tu_warmup();
    int fd_base = tu_fd_count(), thr_base = thread_count();
    unsigned first = 1, last = 24;
    const char *env = getenv("KNET_MODEL_SEEDS");
    if (env && *env) {
        if (sscanf(env, "%u-%u", &first, &last) != 2) {
            CHECK_EQ(sscanf(env, "%u", &first), 1);
            last = first;
        }
    }
    for (unsigned s = first; s <= last; s++) {
        printf("[ RUN  ] seed %u\n", s);
        run_round(s, fd_base, thr_base);
        tu_passed_count++;
    }
    return tu_end();
}
