/*
 * test_proxy.c — knet composed into a TCP relay, the classic program that combines a
 * server and clients: for every connection the proxy server accepts (raw codec) a
 * knet client dials the upstream from a thread of its own (README: "a proxy dials its
 * upstream from a thread of its own, not from connect(true)") and bytes are relayed
 * both ways, across loops. Checks what such a proxy relies on: bytes intact and in
 * order both ways on many connections, the byte bound as backpressure (this proxy
 * closes; test_flow.c paces a relay with pause/resume instead), how closes, resets and a server close propagate, and
 * that handles kept in the other side's session stay usable after connect(false).
 */
#include "testutil.h"

#include <poll.h>

#define PX_MAX_SESSIONS 128
/* How long the proxy lets a side drain what it queued for its peer: a slow peer on a
 * loaded machine (sanitizers) may take longer than knet_conn_shutdown's 3 s. */
#define PX_DRAIN_MS TU_DEADLINE_MS

typedef struct px_proxy px_proxy;

/* One relayed connection: the accepted (down) side and its upstream client. */
typedef struct px_session {
    px_proxy *px;
    int id;
    pthread_mutex_t mu;
    int refs;         /* the down connection (until its connect(false)) and the dial thread */
    knet_conn *down;  /* retained */
    knet_conn *up;    /* retained, from the upstream's connect(true) */
    knet_client *cli; /* NULL once the dial thread freed it */
    knet_handler up_handler;
    bool down_done;
    bool down_closing, up_closing; /* a relay send to it returned KNET_ECLOSED: it drains */
    int down_reason, up_reason, dial_rc, up_connects;
    size_t up_bytes, down_bytes; /* accepted by relay sends to each side */
    char *early; /* what down sent before the upstream was connected */
    size_t early_len;
} px_session;

/* What each session ended with, kept after the session is freed. */
typedef struct px_result {
    int down_reason, up_reason, dial_rc, up_connects;
    size_t up_bytes, down_bytes;
} px_result;

struct px_proxy {
    tu_server srv;
    int port, up_port;
    size_t up_max_queued; /* knet_client_set_max_queued_bytes, 0 = the default */
    size_t down_pending;  /* knet_conn_set_pending_send in connect(true), 0 = none */
    atomic_int next_id;
    tu_counter downs;     /* down connect(true)s */
    tu_counter ups;       /* upstream connect(true)s */
    tu_counter finished;  /* sessions freed (both sides ended, dial thread done) */
    atomic_long full;     /* relay sends refused with KNET_EPENDINGFULL */
    atomic_long closed;   /* relay sends refused with KNET_ECLOSED */
    atomic_long other;    /* relay sends that failed otherwise */
    atomic_long relayed_up, relayed_down; /* bytes accepted by relay sends */
    pthread_mutex_t mu;
    px_result res[PX_MAX_SESSIONS];
};

static void px_unref(px_session *s)
{
    pthread_mutex_lock(&s->mu);
    bool last = --s->refs == 0;
    pthread_mutex_unlock(&s->mu);
    if (!last)
        return;
    px_proxy *px = s->px;
    pthread_mutex_lock(&px->mu);
    px->res[s->id] = (px_result){s->down_reason, s->up_reason, s->dial_rc, s->up_connects,
                                  s->up_bytes, s->down_bytes};
    pthread_mutex_unlock(&px->mu);
    /* The handles outlive both connect(false)s and both owners' serve calls: every
     * call on them must still answer as documented (no use of a freed owner). */
    static const char b[1] = {'x'};
    CHECK_EQ(knet_conn_send(s->down, b, 1), KNET_ECLOSED);
    knet_conn_close(s->down);
    knet_conn_shutdown(s->down);
    knet_conn_release(s->down);
    if (s->up) {
        CHECK_EQ(knet_conn_send(s->up, b, 1), KNET_ECLOSED);
        knet_conn_close(s->up);
        knet_conn_release(s->up);
    }
    free(s->early);
    pthread_mutex_destroy(&s->mu);
    free(s);
    tu_counter_add(&px->finished, 1);
}

/* Whether a side that ended with reason r lets the other drain what it queued: it ended
 * in order (its peer's FIN, or a graceful close of ours), or the other is draining
 * already (a relay send to it was refused with KNET_ECLOSED). Else it closes at once. */
static bool px_drains(int r, bool other_closing)
{
    return r == 0 || r == KNET_EOF || other_closing;
}

/* Stops the upstream client (under s->mu, so the dial thread cannot free it meanwhile),
 * gracefully when the client's side ended in order: its bytes still go up, then FIN. A
 * shutdown would abort a dial under way, and the bytes the client sent before its FIN
 * with it: until the upstream's connect(true), which sees down_done, it waits. */
static void px_stop_upstream_locked(px_session *s)
{
    if (!s->cli)
        return;
    if (px_drains(s->down_reason, s->up_closing)) {
        if (s->up)
            knet_client_shutdown(s->cli, PX_DRAIN_MS);
    } else {
        knet_client_close(s->cli);
    }
}

/* Relays buf to `to`. This proxy does not pause its source (test_flow.c does), so a send
 * refused for backpressure (the pending-send limit or byte bound) ends the relay: both sides
 * close at once. One refused with KNET_ECLOSED finds `to` closing (draining what it
 * accepted, as after its peer's FIN): the source is shut down gracefully, so what it
 * accepted for its own peer still goes out. */
static void px_relay(px_session *s, knet_conn *to, const void *buf, size_t len, bool upward)
{
    int rc = knet_conn_send(to, buf, len);
    if (rc == 0) {
        atomic_fetch_add(upward ? &s->px->relayed_up : &s->px->relayed_down, (long)len);
        pthread_mutex_lock(&s->mu);
        *(upward ? &s->up_bytes : &s->down_bytes) += len;
        pthread_mutex_unlock(&s->mu);
        return;
    }
    atomic_fetch_add(rc == KNET_EPENDINGFULL ? &s->px->full
                     : rc == KNET_ECLOSED    ? &s->px->closed
                                             : &s->px->other,
                     1);
    bool draining = rc == KNET_ECLOSED;
    pthread_mutex_lock(&s->mu);
    if (draining && upward) {
        s->up_closing = true;
    } else if (draining) {
        s->down_closing = true;
        if (s->cli)
            knet_client_shutdown(s->cli, PX_DRAIN_MS);
    } else if (s->cli) {
        knet_client_close(s->cli);
    }
    pthread_mutex_unlock(&s->mu);
    if (!draining)
        knet_conn_close(s->down);
    else if (upward)
        knet_conn_close_with_timeout(s->down, PX_DRAIN_MS);
}

static void px_up_connect(knet_conn *c, bool connected, void *ud)
{
    px_session *s = (px_session *)ud;
    if (connected) {
        pthread_mutex_lock(&s->mu);
        if (s->up)
            knet_conn_release(s->up);
        knet_conn_retain(c);
        s->up = c;
        s->up_connects++;
        /* Bytes the client sent before the upstream was there go first, under s->mu,
         * so a receive on the down side that sees s->up sends after them. */
        if (s->early_len) {
            int rc = knet_conn_send(c, s->early, s->early_len);
            if (rc == 0) {
                atomic_fetch_add(&s->px->relayed_up, (long)s->early_len);
                s->up_bytes += s->early_len;
            } else
                atomic_fetch_add(&s->px->other, 1);
        }
        free(s->early);
        s->early = NULL;
        s->early_len = 0;
        if (s->down_done)
            px_stop_upstream_locked(s);
        pthread_mutex_unlock(&s->mu);
        tu_counter_add(&s->px->ups, 1);
        return;
    }
    int r = knet_conn_close_reason(c);
    pthread_mutex_lock(&s->mu);
    s->up_reason = r;
    if (s->cli)
        knet_client_close(s->cli); /* one upstream connection per session: no re-dial */
    bool drain = px_drains(r, s->down_closing);
    pthread_mutex_unlock(&s->mu);
    /* The upstream finished sending: what is queued for the client still goes, then FIN. */
    if (drain)
        knet_conn_close_with_timeout(s->down, PX_DRAIN_MS);
    else
        knet_conn_close(s->down);
}

static void px_up_receive(knet_conn *c, const void *buf, size_t len, void *ud)
{
    (void)c;
    px_session *s = (px_session *)ud;
    px_relay(s, s->down, buf, len, false);
}

static void *px_dial_main(void *arg)
{
    px_session *s = (px_session *)arg;
    pthread_mutex_lock(&s->mu);
    knet_client *cli = s->cli;
    pthread_mutex_unlock(&s->mu);
    int rc = knet_client_dial_and_serve(cli, &s->up_handler, NULL);
    pthread_mutex_lock(&s->mu);
    s->dial_rc = rc;
    s->cli = NULL;
    bool no_upstream = !s->down_done && s->up_connects == 0;
    pthread_mutex_unlock(&s->mu);
    knet_client_free(cli);
    /* The dial failed: end the client's side too (an upstream that connected ended it
     * in its connect(false), maybe gracefully: a close now would drop that drain). */
    if (no_upstream)
        knet_conn_close(s->down);
    px_unref(s);
    return NULL;
}

static void px_down_connect(knet_conn *c, bool connected, void *ud)
{
    px_proxy *px = (px_proxy *)ud;
    if (connected) {
        px_session *s = calloc(1, sizeof *s);
        CHECK(s != NULL);
        s->px = px;
        s->id = atomic_fetch_add(&px->next_id, 1);
        CHECK_LT(s->id, PX_MAX_SESSIONS);
        pthread_mutex_init(&s->mu, NULL);
        s->refs = 2;
        s->down_reason = s->up_reason = 1;
        knet_conn_retain(c);
        s->down = c;
        if (px->down_pending)
            knet_conn_set_pending_send(c, px->down_pending);
        s->cli = tu_client_for_port(px->up_port);
        if (px->up_max_queued)
            knet_client_set_max_queued_bytes(s->cli, px->up_max_queued);
        s->up_handler = (knet_handler){px_up_connect, px_up_receive, s};
        knet_conn_set_userdata(c, s);
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_t t;
        CHECK_EQ(pthread_create(&t, &attr, px_dial_main, s), 0);
        pthread_attr_destroy(&attr);
        tu_counter_add(&px->downs, 1);
        return;
    }
    px_session *s = (px_session *)knet_conn_userdata(c);
    pthread_mutex_lock(&s->mu);
    s->down_done = true;
    s->down_reason = knet_conn_close_reason(c);
    px_stop_upstream_locked(s);
    pthread_mutex_unlock(&s->mu);
    px_unref(s);
}

static void px_down_receive(knet_conn *c, const void *buf, size_t len, void *ud)
{
    (void)ud;
    px_session *s = (px_session *)knet_conn_userdata(c);
    pthread_mutex_lock(&s->mu);
    knet_conn *up = s->up;
    if (up) {
        knet_conn_retain(up);
    } else {
        char *p = realloc(s->early, s->early_len + len);
        CHECK(p != NULL);
        memcpy(p + s->early_len, buf, len);
        s->early = p;
        s->early_len += len;
    }
    pthread_mutex_unlock(&s->mu);
    if (up) {
        px_relay(s, up, buf, len, true);
        knet_conn_release(up);
    }
}

/* Starts the proxy in front of 127.0.0.1:up_port; max_queued bounds its accepted
 * connections' queues (0 = the default), down_pending is the pending-send limit set on
 * them in connect(true), up_max_queued bounds the upstream clients' queues (0: none,
 * the default). */
static void px_start_ex(px_proxy *px, int up_port, size_t max_queued, size_t down_pending,
                        size_t up_max_queued)
{
    memset(px, 0, sizeof *px);
    px->up_port = up_port;
    px->down_pending = down_pending;
    px->up_max_queued = up_max_queued;
    tu_counter_init(&px->downs);
    tu_counter_init(&px->ups);
    tu_counter_init(&px->finished);
    pthread_mutex_init(&px->mu, NULL);
    knet_handler h = {px_down_connect, px_down_receive, px};
    tu_server_init(&px->srv, "127.0.0.1:0", &h, NULL);
    if (max_queued)
        knet_server_set_max_queued_bytes(px->srv.srv, max_queued);
    px->port = tu_server_run(&px->srv);
    CHECK_GT(px->port, 0);
}

static void px_start(px_proxy *px, int up_port, size_t max_queued)
{
    px_start_ex(px, up_port, max_queued, 0, 0);
}

/* Waits for every session to end, closes the proxy server, frees it. */
static void px_stop(px_proxy *px)
{
    WAIT_GE(&px->finished, atomic_load(&px->next_id));
    int rc = knet_server_close(px->srv.srv);
    CHECK(rc == 0 || rc == KNET_ESERVERCLOSED);
    CHECK_EQ(tu_server_join(&px->srv), KNET_ESERVERCLOSED);
    WAIT_GE(&px->finished, atomic_load(&px->next_id)); /* sessions a close ended */
    tu_counter_destroy(&px->downs);
    tu_counter_destroy(&px->ups);
    tu_counter_destroy(&px->finished);
    pthread_mutex_destroy(&px->mu);
}

static px_result px_res(px_proxy *px, int id)
{
    pthread_mutex_lock(&px->mu);
    px_result r = px->res[id];
    pthread_mutex_unlock(&px->mu);
    return r;
}

/* ------------------------------------------------------------------ upstream: echo */

static void echo_receive(knet_conn *c, const void *buf, size_t len, void *ud)
{
    (void)ud;
    int rc = knet_conn_send(c, buf, len);
    CHECK(rc == 0 || rc == KNET_ECLOSED);
}

/* ------------------------------------------------------------------ 1: many streams */

#ifdef TU_SANITIZED
#define PX_STREAM_BYTES ((size_t)1 << 20)
#else
#define PX_STREAM_BYTES ((size_t)4 << 20)
#endif
#define PX_STREAMS 20

typedef struct px_stream {
    int port, fd;
    uint32_t seed;
    size_t bytes;
    pthread_t writer, reader;
} px_stream;

static void *px_stream_write(void *arg)
{
    px_stream *st = (px_stream *)arg;
    static _Thread_local uint8_t buf[48 * 1024];
    for (size_t off = 0; off < st->bytes;) {
        /* Odd sizes, so relayed reads never line up with the writes. */
        size_t n = 1 + (off * 7919 + st->seed) % sizeof buf;
        if (n > st->bytes - off)
            n = st->bytes - off;
        tu_pattern_fill(buf, n, off, st->seed);
        tu_write_all(st->fd, buf, n);
        off += n;
    }
    return NULL;
}

static void *px_stream_read(void *arg)
{
    px_stream *st = (px_stream *)arg;
    static _Thread_local uint8_t buf[64 * 1024];
    for (size_t off = 0; off < st->bytes;) {
        size_t want = st->bytes - off < sizeof buf ? st->bytes - off : sizeof buf;
        ssize_t r = tu_read_some(st->fd, buf, want);
        CHECK_GT(r, 0);
        size_t bad = tu_pattern_mismatch(buf, (size_t)r, off, st->seed);
        if (bad != (size_t)r) {
            fprintf(stderr, "stream %u: byte %zu differs\n", st->seed, off + bad);
            CHECK(bad == (size_t)r);
        }
        off += (size_t)r;
    }
    return NULL;
}

/* 20 clients through the proxy to a knet echo server, each writing and reading back
 * 4 MiB at once: every byte intact and in order both ways; the clients then close
 * (FIN), the proxy shuts each upstream down gracefully, every session ends. */
static void test_relay_many_streams(void)
{
    tu_server echo;
    knet_handler eh = {NULL, echo_receive, NULL};
    int up_port = tu_server_start(&echo, "127.0.0.1:0", &eh, NULL);
    CHECK_GT(up_port, 0);
    px_proxy px;
    px_start(&px, up_port, 0);

    px_stream st[PX_STREAMS];
    for (int i = 0; i < PX_STREAMS; i++) {
        st[i] = (px_stream){.port = px.port, .seed = 1000u + (uint32_t)i, .bytes = PX_STREAM_BYTES};
        st[i].fd = tu_connect(px.port);
        CHECK_EQ(pthread_create(&st[i].writer, NULL, px_stream_write, &st[i]), 0);
        CHECK_EQ(pthread_create(&st[i].reader, NULL, px_stream_read, &st[i]), 0);
    }
    for (int i = 0; i < PX_STREAMS; i++) {
        CHECK_EQ(pthread_join(st[i].writer, NULL), 0);
        CHECK_EQ(pthread_join(st[i].reader, NULL), 0);
        close(st[i].fd);
    }
    WAIT_GE(&px.finished, PX_STREAMS);
    CHECK_EQ(atomic_load(&px.full), 0);
    CHECK_EQ(atomic_load(&px.closed), 0);
    CHECK_EQ(atomic_load(&px.other), 0);
    CHECK_EQ(atomic_load(&px.relayed_up), (long)(PX_STREAMS * PX_STREAM_BYTES));
    CHECK_EQ(atomic_load(&px.relayed_down), (long)(PX_STREAMS * PX_STREAM_BYTES));
    knet_stats ks;
    knet_server_stats(px.srv.srv, &ks);
    CHECK_EQ(ks.bytes_in, PX_STREAMS * PX_STREAM_BYTES);
    CHECK_EQ(ks.bytes_out, PX_STREAMS * PX_STREAM_BYTES);
    CHECK_EQ(ks.accepted, PX_STREAMS);
    /* live falls just after the last connect(false) returned, which freed the session */
    WAIT_UNTIL((knet_server_stats(px.srv.srv, &ks), ks.live == 0));
    for (int i = 0; i < PX_STREAMS; i++) {
        px_result r = px_res(&px, i);
        CHECK_EQ(r.down_reason, KNET_EOF);
        CHECK_EQ(r.up_reason, 0); /* our graceful close, completed by the echo's FIN */
        CHECK_EQ(r.up_connects, 1);
        CHECK_EQ(r.dial_rc, KNET_ECLIENTCLOSED);
    }
    px_stop(&px);
    CHECK_EQ(tu_server_stop(&echo), KNET_ESERVERCLOSED);
}

/* ------------------------------------------------------------------ plain upstream */

/* Accepts one connection on the plain listener lfd (bounded by its SO_RCVTIMEO). */
static int px_accept(int lfd)
{
    int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    CHECK_GE(fd, 0);
    tu_set_timeouts(fd);
    return fd;
}

/* Reads to EOF (or a reset, when reset_ok) the pattern of seed from offset off on,
 * checking every byte; returns the offset reached. */
static size_t px_read_from(int fd, uint32_t seed, size_t off, bool reset_ok)
{
    static _Thread_local uint8_t buf[64 * 1024];
    for (;;) {
        ssize_t r = tu_read_some(fd, buf, sizeof buf);
        if (r == 0 || (reset_ok && r == -ECONNRESET))
            return off;
        CHECK_GT(r, 0);
        CHECK_EQ(tu_pattern_mismatch(buf, (size_t)r, off, seed), r);
        off += (size_t)r;
    }
}

static void px_write_pattern(int fd, size_t n, uint32_t seed)
{
    static _Thread_local uint8_t buf[64 * 1024];
    for (size_t off = 0; off < n;) {
        size_t m = n - off < sizeof buf ? n - off : sizeof buf;
        tu_pattern_fill(buf, m, off, seed);
        tu_write_all(fd, buf, m);
        off += m;
    }
}

/* The client writes 2 MiB and half-closes at once (the bytes may reach the proxy before
 * its upstream is connected): the upstream gets every byte, then EOF. The client's
 * half-close ends its own side (KNET_EOF: knet closes on the peer's FIN), the upstream
 * is shut down gracefully (reason 0 once it closes too). */
static void test_client_fin_reaches_upstream(void)
{
    int up_port;
    int lfd = tu_listen(&up_port, 0);
    px_proxy px;
    px_start(&px, up_port, 0);
    for (int round = 0; round < 4; round++) {
        int fd = tu_connect(px.port);
        px_write_pattern(fd, (size_t)2 << 20, 7u + (uint32_t)round);
        CHECK_EQ(shutdown(fd, SHUT_WR), 0);
        int ufd = px_accept(lfd);
        CHECK_EQ(px_read_from(ufd, 7u + (uint32_t)round, 0, false), (size_t)2 << 20);
        EXPECT_PEER_CLOSED(fd); /* knet closed its side on the client's FIN */
        close(ufd);
        close(fd);
        WAIT_GE(&px.finished, round + 1);
        px_result r = px_res(&px, round);
        CHECK_EQ(r.down_reason, KNET_EOF);
        CHECK_EQ(r.up_reason, 0);
        CHECK_EQ(r.up_connects, 1);
    }
    CHECK_EQ(atomic_load(&px.other), 0);
    px_stop(&px);
    close(lfd);
}

/* The upstream writes 8 MiB and closes at once: the client (a small window, so the
 * proxy queues most of it) still reads every byte, then EOF. */
static void test_upstream_fin_delivers_rest(void)
{
    int up_port;
    int lfd = tu_listen(&up_port, 0);
    px_proxy px;
    px_start(&px, up_port, 0);
    int fd = tu_connect_ex(px.port, 16 * 1024);
    int ufd = px_accept(lfd);
    px_write_pattern(ufd, (size_t)8 << 20, 99u);
    close(ufd);
    CHECK_EQ(px_read_from(fd, 99u, 0, false), (size_t)8 << 20);
    close(fd);
    WAIT_GE(&px.finished, 1);
    px_result r = px_res(&px, 0);
    CHECK_EQ(r.up_reason, KNET_EOF);
    CHECK_EQ(r.down_reason, 0); /* our graceful close, completed by the client's close */
    CHECK_EQ(atomic_load(&px.full) + atomic_load(&px.closed) + atomic_load(&px.other), 0);
    px_stop(&px);
    close(lfd);
}

typedef struct px_flood {
    int fd;
    size_t max, written;
    int err;
} px_flood;

/* Writes up to max bytes without blocking for good: stops at an error or when no byte
 * goes out for 5 s after the relay stopped taking them. */
static void *px_flood_main(void *arg)
{
    px_flood *f = (px_flood *)arg;
    static _Thread_local uint8_t buf[64 * 1024];
    memset(buf, 'f', sizeof buf);
    while (f->written < f->max) {
        struct pollfd p = {f->fd, POLLOUT, 0};
        if (poll(&p, 1, 5000) <= 0)
            break;
        ssize_t w = send(f->fd, buf, sizeof buf, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0 && (errno == EAGAIN || errno == EINTR))
            continue;
        if (w < 0) {
            f->err = errno;
            break;
        }
        f->written += (size_t)w;
    }
    return NULL;
}

/* Backpressure: the client stops reading while the upstream floods. The proxy's byte
 * bound (1 MiB) refuses a relay send with KNET_EPENDINGFULL; as knet cannot stop
 * reading a connection, the proxy closes both sides. Memory stays bounded; the
 * upstream's writes end with an error. */
enum { PX_BP_BYTES_DOWN, PX_BP_MESSAGES_DOWN, PX_BP_BYTES_UP };

/* One side floods, the other stops reading (a 16 KiB window): the bound on the relay's
 * target refuses a send with KNET_EPENDINGFULL — the server's byte bound (1 MiB), a
 * pending-send limit of 16 messages set in connect(true), or the upstream client's byte
 * bound (1 MiB) for an upload — and the proxy closes both sides. Memory stays bounded;
 * the flood's writes end with an error. */
static void px_backpressure(int kind)
{
    int up_port;
    int lfd = tu_listen(&up_port, kind == PX_BP_BYTES_UP ? 16 * 1024 : 0);
    px_proxy px;
    px_start_ex(&px, up_port, kind == PX_BP_BYTES_DOWN ? (size_t)1 << 20 : 0,
                kind == PX_BP_MESSAGES_DOWN ? 16 : 0, kind == PX_BP_BYTES_UP ? (size_t)1 << 20 : 0);
    size_t rss0 = tu_rss();
    int fd = tu_connect_ex(px.port, 16 * 1024);
    int ufd = px_accept(lfd);
    px_flood f = {.fd = kind == PX_BP_BYTES_UP ? fd : ufd, .max = (size_t)256 << 20};
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, px_flood_main, &f), 0);
    WAIT_GE(&px.finished, 1);
    CHECK_EQ(pthread_join(t, NULL), 0);
    CHECK_GE(atomic_load(&px.full), 1);
    CHECK_EQ(atomic_load(&px.other), 0);
    CHECK_NE(f.err, 0); /* the proxy's close reached the flood */
    CHECK_LT(f.written, (size_t)256 << 20);
    px_result r = px_res(&px, 0);
    CHECK_EQ(r.down_reason, 0);
    CHECK_EQ(r.up_reason, KNET_ECLIENTCLOSED);
    size_t rss1 = tu_rss();
#ifndef TU_SANITIZED
    CHECK_LT(rss1, rss0 + ((size_t)32 << 20));
#else
    (void)rss0;
    (void)rss1;
#endif
    close(ufd);
    close(fd);
    px_stop(&px);
    close(lfd);
}

static void test_backpressure_byte_bound_closes(void) { px_backpressure(PX_BP_BYTES_DOWN); }
static void test_backpressure_pending_limit_closes(void) { px_backpressure(PX_BP_MESSAGES_DOWN); }
static void test_backpressure_upload_bound_closes(void) { px_backpressure(PX_BP_BYTES_UP); }

/* A reset on either side ends the other: the client's reset closes the upstream (it
 * reads EOF), the upstream's reset closes the client's connection. */
static void test_resets_propagate(void)
{
    int up_port;
    int lfd = tu_listen(&up_port, 0);
    px_proxy px;
    px_start(&px, up_port, 0);
    for (int round = 0; round < 2; round++) {
        int fd = tu_connect(px.port);
        tu_write_str(fd, "hello");
        int ufd = px_accept(lfd);
        char b[5];
        READ_EXACT(ufd, b, 5);
        tu_write_str(ufd, "world");
        READ_EXACT(fd, b, 5);
        CHECK_EQ(memcmp(b, "world", 5), 0);
        WAIT_GE(&px.ups, round + 1);
        bool client_resets = round == 0;
        int rs = client_resets ? fd : ufd, other = client_resets ? ufd : fd;
        tu_set_linger0(rs);
        close(rs);
        EXPECT_PEER_CLOSED(other);
        close(other);
        WAIT_GE(&px.finished, round + 1);
        px_result r = px_res(&px, round);
        if (client_resets) {
            CHECK_EQ(r.down_reason, -ECONNRESET);
            CHECK_EQ(r.up_reason, KNET_ECLIENTCLOSED);
        } else {
            CHECK_EQ(r.up_reason, -ECONNRESET);
            CHECK_EQ(r.down_reason, 0);
        }
    }
    px_stop(&px);
    close(lfd);
}

/* Writes the pattern stream of seed to fd until an error (the relay closing) or, once a
 * relay send was refused as the stream's far end is closing, until it stopped writing
 * (so the test does not depend on how much the proxy queued before). */
typedef struct px_pump {
    int fd;
    uint32_t seed;
    atomic_long *refused; /* the proxy's count of KNET_ECLOSED sends */
    size_t written;
    int err;
} px_pump;

static void *px_pump_main(void *arg)
{
    px_pump *p = (px_pump *)arg;
    static _Thread_local uint8_t buf[32 * 1024];
    while (atomic_load(p->refused) == 0) {
        size_t n = sizeof buf;
        tu_pattern_fill(buf, n, p->written, p->seed);
        struct pollfd pf = {p->fd, POLLOUT, 0};
        if (poll(&pf, 1, 10) == 0)
            continue;
        ssize_t w = send(p->fd, buf, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (w <= 0) {
            p->err = errno;
            break;
        }
        p->written += (size_t)w;
    }
    return NULL;
}

/* The client half-closes in the middle of a download (the upstream streaming to it):
 * knet drains to the client what the relay's sends were given before the FIN was read
 * and refuses the rest (KNET_ECLOSED), so the client reads exactly the bytes the proxy's
 * sends accepted, in order, then EOF. */
static void test_client_fin_mid_download(void)
{
    int up_port;
    int lfd = tu_listen(&up_port, 0);
    px_proxy px;
    px_start(&px, up_port, 0);
    int fd = tu_connect(px.port);
    int ufd = px_accept(lfd);
    px_pump p = {.fd = ufd, .seed = 4242u, .refused = &px.closed};
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, px_pump_main, &p), 0);
    static uint8_t buf[64 * 1024];
    size_t got = 0;
    while (got < ((size_t)1 << 20)) {
        ssize_t r = tu_read_some(fd, buf, sizeof buf);
        CHECK_GT(r, 0);
        CHECK_EQ(tu_pattern_mismatch(buf, (size_t)r, got, 4242u), r);
        got += (size_t)r;
    }
    CHECK_EQ(shutdown(fd, SHUT_WR), 0);
    got = px_read_from(fd, 4242u, got, false);
    CHECK_EQ(pthread_join(t, NULL), 0);
    EXPECT_PEER_CLOSED(ufd); /* the upstream is shut down gracefully in turn */
    close(ufd);
    WAIT_GE(&px.finished, 1);
    px_result r = px_res(&px, 0);
    CHECK_EQ(r.down_reason, KNET_EOF);
    CHECK_EQ(r.up_reason, 0);
    CHECK_EQ(got, atomic_load(&px.relayed_down)); /* every accepted byte, no other */
    CHECK_GE(atomic_load(&px.closed), 1);
    CHECK_EQ(atomic_load(&px.other), 0);
    close(fd);
    px_stop(&px);
    close(lfd);
}

/* The same the other way: the upstream half-closes in the middle of an upload. The
 * upstream reads exactly the bytes the proxy's sends accepted, then EOF; the client's
 * side is shut down gracefully (it reads EOF). */
static void test_upstream_fin_mid_upload(void)
{
    int up_port;
    int lfd = tu_listen(&up_port, 0);
    px_proxy px;
    px_start(&px, up_port, 0);
    int fd = tu_connect(px.port);
    px_pump p = {.fd = fd, .seed = 777u, .refused = &px.closed};
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, px_pump_main, &p), 0);
    int ufd = px_accept(lfd);
    static uint8_t buf[64 * 1024];
    size_t got = 0;
    while (got < ((size_t)1 << 20)) {
        ssize_t r = tu_read_some(ufd, buf, sizeof buf);
        CHECK_GT(r, 0);
        CHECK_EQ(tu_pattern_mismatch(buf, (size_t)r, got, 777u), r);
        got += (size_t)r;
    }
    CHECK_EQ(shutdown(ufd, SHUT_WR), 0);
    got = px_read_from(ufd, 777u, got, false);
    CHECK_EQ(pthread_join(t, NULL), 0);
    EXPECT_PEER_CLOSED(fd); /* the client's side is shut down gracefully in turn */
    close(fd);
    WAIT_GE(&px.finished, 1);
    px_result r = px_res(&px, 0);
    CHECK_EQ(r.up_reason, KNET_EOF);
    CHECK_EQ(r.down_reason, 0);
    CHECK_EQ(got, atomic_load(&px.relayed_up));
    CHECK_GE(atomic_load(&px.closed), 1);
    CHECK_EQ(atomic_load(&px.other), 0);
    close(ufd);
    px_stop(&px);
    close(lfd);
}

/* Clients that send a short request and half-close at once, 32 at a time: the proxy
 * gets the bytes and the FIN before (or while) its upstream connects; each upstream
 * still reads the whole request, then EOF. Then 32 clients that reset right after
 * writing: every session ends (closes racing the dial and the attach), nothing leaks. */
static void test_early_fin_and_reset_churn(void)
{
    int up_port;
    int lfd = tu_listen(&up_port, 0);
    CHECK_EQ(listen(lfd, 64), 0);
    px_proxy px;
    px_start(&px, up_port, 0);
    enum { N = 32, LEN = 100 };
    int fds[N];
    for (int i = 0; i < N; i++) {
        fds[i] = tu_connect(px.port);
        uint8_t req[LEN];
        tu_pattern_fill(req, LEN, 0, 500u);
        req[0] = (uint8_t)i;
        tu_write_all(fds[i], req, LEN);
        CHECK_EQ(shutdown(fds[i], SHUT_WR), 0);
    }
    bool seen[N] = {false};
    for (int i = 0; i < N; i++) {
        int u = px_accept(lfd);
        uint8_t req[LEN + 1];
        CHECK_EQ(tu_read_full(u, req, sizeof req), LEN); /* the request, then EOF */
        CHECK_LT(req[0], N);
        CHECK(!seen[req[0]]);
        seen[req[0]] = true;
        CHECK_EQ(tu_pattern_mismatch(req + 1, LEN - 1, 1, 500u), LEN - 1);
        close(u);
    }
    for (int i = 0; i < N; i++) {
        EXPECT_PEER_CLOSED(fds[i]);
        close(fds[i]);
    }
    WAIT_GE(&px.finished, N);
    for (int i = 0; i < N; i++) {
        fds[i] = tu_connect(px.port);
        tu_write_str(fds[i], "abc");
        tu_set_linger0(fds[i]);
        close(fds[i]);
    }
    /* Upstreams of the reset clients that got dialed: serve them until they end. */
    int64_t end = tu_now_ms() + TU_DEADLINE_MS;
    while (tu_counter_get(&px.finished) < 2 * N) {
        CHECK_LT(tu_now_ms(), end);
        struct pollfd p = {lfd, POLLIN, 0};
        if (poll(&p, 1, 10) == 1) {
            int u = px_accept(lfd);
            char b[16];
            while (tu_read_some(u, b, sizeof b) > 0) {
            }
            close(u);
        }
    }
    px_stop(&px);
    close(lfd);
}

#define PX_PAIRS 8

/* Opens n sessions through the proxy, each with a known upstream socket: the client
 * sends its index, the upstream reads it. */
static void px_open_pairs(px_proxy *px, int lfd, int n, int *fds, int *ufds)
{
    for (int i = 0; i < n; i++) {
        fds[i] = tu_connect(px->port);
        uint8_t id = (uint8_t)i;
        tu_write_all(fds[i], &id, 1);
    }
    for (int i = 0; i < n; i++) {
        int u = px_accept(lfd);
        uint8_t id;
        READ_EXACT(u, &id, 1);
        CHECK_LT(id, n);
        ufds[id] = u;
    }
}

/* knet_server_close of the proxy ends every session: its connections report
 * KNET_ESERVERCLOSED, and their connect(false) closes the upstream clients (the
 * upstreams read EOF); listen_and_serve returns once they all ended. */
static void test_server_close_ends_upstreams(void)
{
    int up_port;
    int lfd = tu_listen(&up_port, 0);
    px_proxy px;
    px_start(&px, up_port, 0);
    int fds[PX_PAIRS], ufds[PX_PAIRS];
    px_open_pairs(&px, lfd, PX_PAIRS, fds, ufds);
    WAIT_GE(&px.ups, PX_PAIRS);
    CHECK_EQ(knet_server_close(px.srv.srv), 0);
    for (int i = 0; i < PX_PAIRS; i++) {
        EXPECT_PEER_CLOSED(ufds[i]);
        EXPECT_PEER_CLOSED(fds[i]);
        close(ufds[i]);
        close(fds[i]);
    }
    WAIT_GE(&px.finished, PX_PAIRS);
    for (int i = 0; i < PX_PAIRS; i++) {
        px_result r = px_res(&px, i);
        CHECK_EQ(r.down_reason, KNET_ESERVERCLOSED);
        CHECK_EQ(r.up_reason, KNET_ECLIENTCLOSED);
    }
    px_stop(&px);
    close(lfd);
}

/* knet_server_shutdown of the proxy: every client reads EOF; clients that do not close
 * are force-closed at the deadline (-ETIMEDOUT), those that do end with 0; either way
 * connect(false) closes the upstream, which reads EOF; listen_and_serve returns. */
static void test_server_shutdown_ends_upstreams(void)
{
    int up_port;
    int lfd = tu_listen(&up_port, 0);
    px_proxy px;
    px_start(&px, up_port, 0);
    int fds[PX_PAIRS], ufds[PX_PAIRS];
    px_open_pairs(&px, lfd, PX_PAIRS, fds, ufds);
    WAIT_GE(&px.ups, PX_PAIRS);
    int64_t t0 = tu_now_ms();
    CHECK_EQ(knet_server_shutdown(px.srv.srv, 500), 0);
    for (int i = 0; i < PX_PAIRS; i++) {
        char b[4];
        CHECK_EQ(tu_read_some(fds[i], b, sizeof b), 0); /* FIN */
        if (i % 2 == 0)
            close(fds[i]);
    }
    for (int i = 0; i < PX_PAIRS; i++) {
        EXPECT_PEER_CLOSED(ufds[i]);
        close(ufds[i]);
    }
    CHECK_EQ(tu_server_join(&px.srv), KNET_ESERVERCLOSED);
    CHECK_GE(tu_now_ms() - t0, 400);
    WAIT_GE(&px.finished, PX_PAIRS);
    int timed_out = 0;
    for (int i = 0; i < PX_PAIRS; i++) {
        px_result r = px_res(&px, i);
        CHECK(r.down_reason == 0 || r.down_reason == -ETIMEDOUT);
        timed_out += r.down_reason == -ETIMEDOUT;
        /* A client that closed: the upstream is shut down gracefully (it closes too). */
        CHECK_EQ(r.up_reason, r.down_reason == 0 ? 0 : KNET_ECLIENTCLOSED);
    }
    CHECK_EQ(timed_out, PX_PAIRS / 2);
    for (int i = 1; i < PX_PAIRS; i += 2)
        close(fds[i]);
    tu_counter_destroy(&px.downs);
    tu_counter_destroy(&px.ups);
    tu_counter_destroy(&px.finished);
    pthread_mutex_destroy(&px.mu);
    close(lfd);
}

typedef struct px_end {
    int fd;
    uint32_t out_seed, in_seed;
    size_t out_len, got;
    pthread_t thread;
} px_end;

/* Writes out_len bytes of its pattern, half-closes, reads the other's pattern to EOF. */
static void *px_end_main(void *arg)
{
    px_end *e = (px_end *)arg;
    px_write_pattern(e->fd, e->out_len, e->out_seed);
    CHECK_EQ(shutdown(e->fd, SHUT_WR), 0);
    e->got = px_read_from(e->fd, e->in_seed, 0, false);
    return NULL;
}

/* Both ends send 256 KiB and half-close at the same moment, on 8 sessions for 5 rounds:
 * each side's FIN meets the other's data in flight. Every byte a relay send accepted
 * reaches its peer, in order, and nothing else does (knet refuses sends to a side whose
 * peer's FIN it read, so some bytes are refused, never lost after acceptance); every
 * session ends, no deadlock. */
static void test_both_sides_fin_at_once(void)
{
    int up_port;
    int lfd = tu_listen(&up_port, 0);
    px_proxy px;
    px_start(&px, up_port, 0);
    size_t to_clients = 0, to_upstreams = 0;
    for (int round = 0; round < 5; round++) {
        int fds[PX_PAIRS], ufds[PX_PAIRS];
        px_open_pairs(&px, lfd, PX_PAIRS, fds, ufds);
        WAIT_GE(&px.ups, (round + 1) * PX_PAIRS);
        px_end ends[2 * PX_PAIRS];
        for (int i = 0; i < PX_PAIRS; i++) {
            uint32_t cs = 100u * (uint32_t)round + (uint32_t)i, us = cs + 50u;
            ends[2 * i] = (px_end){.fd = fds[i], .out_seed = cs, .in_seed = us, .out_len = 256 << 10};
            ends[2 * i + 1] = (px_end){.fd = ufds[i], .out_seed = us, .in_seed = cs, .out_len = 256 << 10};
        }
        for (int i = 0; i < 2 * PX_PAIRS; i++)
            CHECK_EQ(pthread_create(&ends[i].thread, NULL, px_end_main, &ends[i]), 0);
        for (int i = 0; i < 2 * PX_PAIRS; i++) {
            CHECK_EQ(pthread_join(ends[i].thread, NULL), 0);
            *(i % 2 ? &to_upstreams : &to_clients) += ends[i].got;
            close(ends[i].fd);
        }
        WAIT_GE(&px.finished, (round + 1) * PX_PAIRS);
    }
    size_t up_bytes = 0, down_bytes = 0;
    for (int i = 0; i < 5 * PX_PAIRS; i++) {
        px_result r = px_res(&px, i);
        up_bytes += r.up_bytes;
        down_bytes += r.down_bytes;
    }
    CHECK_EQ(to_clients, down_bytes);
    CHECK_EQ(to_upstreams + 5 * PX_PAIRS, up_bytes); /* + the id byte px_open_pairs sent */
    CHECK_EQ(atomic_load(&px.other), 0);
    CHECK_EQ(atomic_load(&px.full), 0);
    px_stop(&px);
    close(lfd);
}

static uint64_t px_bytes_out(px_proxy *px)
{
    knet_stats ks;
    knet_server_stats(px->srv.srv, &ks);
    return ks.bytes_out;
}

static void *px_reader_main(void *arg)
{
    px_end *e = (px_end *)arg;
    e->got = px_read_from(e->fd, e->in_seed, 0, false);
    return NULL;
}

/* knet_server_shutdown of the proxy while 8 upstreams stream to their clients: every
 * byte a relay send accepted before the shutdown (or racing it) reaches its client, in
 * order, before the EOF; later sends are refused (KNET_ECLOSED), which shuts the
 * upstream down gracefully in turn; every session ends once the clients close. */
static void test_server_shutdown_mid_download(void)
{
    int up_port;
    int lfd = tu_listen(&up_port, 0);
    px_proxy px;
    px_start(&px, up_port, 0);
    int fds[PX_PAIRS], ufds[PX_PAIRS];
    px_open_pairs(&px, lfd, PX_PAIRS, fds, ufds);
    WAIT_GE(&px.ups, PX_PAIRS);
    px_pump pumps[PX_PAIRS];
    px_end readers[PX_PAIRS];
    pthread_t pt[PX_PAIRS];
    for (int i = 0; i < PX_PAIRS; i++) {
        pumps[i] = (px_pump){.fd = ufds[i], .seed = 900u + (uint32_t)i, .refused = &px.closed};
        readers[i] = (px_end){.fd = fds[i], .in_seed = 900u + (uint32_t)i};
        CHECK_EQ(pthread_create(&pt[i], NULL, px_pump_main, &pumps[i]), 0);
        CHECK_EQ(pthread_create(&readers[i].thread, NULL, px_reader_main, &readers[i]), 0);
    }
    WAIT_UNTIL(px_bytes_out(&px) >= (uint64_t)PX_PAIRS << 20); /* streams under way */
    CHECK_EQ(knet_server_shutdown(px.srv.srv, PX_DRAIN_MS), 0);
    size_t to_clients = 0;
    for (int i = 0; i < PX_PAIRS; i++) {
        CHECK_EQ(pthread_join(pt[i], NULL), 0);
        CHECK_EQ(pthread_join(readers[i].thread, NULL), 0);
        to_clients += readers[i].got;
        close(fds[i]);
        EXPECT_PEER_CLOSED(ufds[i]);
        close(ufds[i]);
    }
    CHECK_EQ(tu_server_join(&px.srv), KNET_ESERVERCLOSED);
    WAIT_GE(&px.finished, PX_PAIRS);
    size_t down_bytes = 0;
    for (int i = 0; i < PX_PAIRS; i++) {
        px_result r = px_res(&px, i);
        CHECK_EQ(r.down_reason, 0);
        CHECK_EQ(r.up_reason, 0);
        down_bytes += r.down_bytes;
    }
    CHECK_EQ(to_clients, down_bytes);
    CHECK_GE(atomic_load(&px.closed), 1);
    CHECK_EQ(atomic_load(&px.other) + atomic_load(&px.full), 0);
    tu_counter_destroy(&px.downs);
    tu_counter_destroy(&px.ups);
    tu_counter_destroy(&px.finished);
    pthread_mutex_destroy(&px.mu);
    close(lfd);
}

/* Both ends reset at the same moment, on 8 sessions for 10 rounds: each side's
 * connect(false) closes the other (often already closing) from its own loop; no
 * deadlock, every session ends, no handle used after its release (ASan). */
static void test_both_sides_reset_at_once(void)
{
    int up_port;
    int lfd = tu_listen(&up_port, 0);
    px_proxy px;
    px_start(&px, up_port, 0);
    for (int round = 0; round < 10; round++) {
        int fds[PX_PAIRS], ufds[PX_PAIRS];
        px_open_pairs(&px, lfd, PX_PAIRS, fds, ufds);
        WAIT_GE(&px.ups, (round + 1) * PX_PAIRS);
        for (int i = 0; i < PX_PAIRS; i++) {
            tu_set_linger0(fds[i]);
            tu_set_linger0(ufds[i]);
            close(fds[i]);
            close(ufds[i]);
        }
        WAIT_GE(&px.finished, (round + 1) * PX_PAIRS);
    }
    px_stop(&px);
    close(lfd);
}

int main(void)
{
    knet_set_loop_threads(3); /* down and up sides of a session mostly on different loops */
    tu_begin();
    RUN(test_relay_many_streams);
    RUN(test_client_fin_reaches_upstream);
    RUN(test_upstream_fin_delivers_rest);
    RUN(test_backpressure_byte_bound_closes);
    RUN(test_backpressure_pending_limit_closes);
    RUN(test_backpressure_upload_bound_closes);
    RUN(test_client_fin_mid_download);
    RUN(test_upstream_fin_mid_upload);
    RUN(test_early_fin_and_reset_churn);
    RUN(test_resets_propagate);
    RUN(test_server_close_ends_upstreams);
    RUN(test_server_shutdown_ends_upstreams);
    RUN(test_server_shutdown_mid_download);
    RUN(test_both_sides_fin_at_once);
    RUN(test_both_sides_reset_at_once);
    return tu_end();
}
