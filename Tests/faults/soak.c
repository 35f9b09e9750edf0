/*
 * knet_soak — mixes the fault suite's scenarios for a given time and reports
 * what it did and what, if anything, was lost.
 *
 *   knet_soak [SECONDS] [WORKERS]      (defaults: 120 s, 4 worker threads)
 *
 * Four long-lived servers (echo with an idle timeout and a byte bound; stream:
 * sends a known byte stream then shuts down gracefully; length codec with a
 * small max_frame; echo with max_conns 8) serve worker threads that pick
 * scenarios at random: echo round trips with checksums, reading whole streams,
 * resets in the middle of a queue, slow readers, good and oversized frames,
 * connect/close churn, persistent ping-pong clients closed or shut down at a
 * random moment, connection floods against the limit, idle peers. Every few
 * seconds the main thread also runs a graceful shutdown of a loaded temporary
 * server (every byte checked) or a hard close of one under traffic.
 *
 * "Lost" means a byte that knet promised to deliver did not arrive intact (a
 * checksum or length mismatch, or a reset where a graceful end was promised);
 * "failures" are broken promises of other kinds (connect(false) not exactly
 * once, an unexpected error code). Exit status 0 when both are zero.
 */
#include "faultutil.h"

#include <signal.h>
#include <stdarg.h>

/* ------------------------------------------------------------------ report */

enum {
    K_ECHO, K_STREAM, K_STREAM_RESET, K_SLOW_READER, K_CODEC_GOOD, K_CODEC_BAD, K_CHURN,
    K_CLIENT, K_FLOOD, K_IDLE, K_SHUTDOWN, K_CLOSE, K_COUNT
};
static const char *const kind_names[K_COUNT] = {
    "echo round trips", "streams read whole", "resets mid-stream", "slow readers",
    "good frames", "oversized frames", "churn bursts", "ping-pong clients", "floods vs max_conns",
    "idle peers", "graceful server shutdowns", "hard server closes"};

static struct {
    atomic_long runs[K_COUNT];
    atomic_long conns;        /* connections opened by the soak's peers */
    atomic_long bytes_checked; /* bytes compared against what was sent */
    atomic_long lost;          /* episodes where promised bytes did not arrive intact */
    atomic_long failures;      /* other broken promises */
    pthread_mutex_t mu;
    char first_problems[8][300];
    int nproblems;
} R = {.mu = PTHREAD_MUTEX_INITIALIZER};

/* Records a problem (lost data when lost is true); keeps the first few messages. */
static void problem(bool lost, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void problem(bool lost, const char *fmt, ...)
{
    atomic_fetch_add(lost ? &R.lost : &R.failures, 1);
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&R.mu);
    if (R.nproblems < 8)
        snprintf(R.first_problems[R.nproblems++], sizeof R.first_problems[0], "%s: %s", lost ? "LOST" : "FAILURE", msg);
    pthread_mutex_unlock(&R.mu);
    fprintf(stderr, "soak: %s: %s\n", lost ? "LOST" : "FAILURE", msg);
}

/* ------------------------------------------------------------------ servers */

#define STREAM_BYTES (512 * 1024)
#define STREAM_MSG (16 * 1024)
#define IDLE_MS 2000u

typedef struct soak_server {
    tu_server ts;
    fu_reg *reg;
    const char *name;
} soak_server;

static soak_server S_echo, S_stream, S_codec, S_limit;
static knet_length_field codec_field = {4, false, 4096};

/* Stream server: on connect(true) queue STREAM_BYTES of the pattern named by the
 * peer's port, then shut down gracefully (everything queued is delivered). */
static void stream_connect(knet_conn *c, bool connected, void *ud)
{
    fu_reg_on_connect(c, connected, ud);
    if (!connected)
        return;
    char a[KNET_ADDRSTRLEN];
    if (knet_conn_remote_addr(c, a, sizeof a) <= 0) {
        problem(false, "stream server: no remote address");
        return;
    }
    uint32_t seed = (uint32_t)fu_addr_port(a);
    uint8_t *buf = malloc(STREAM_MSG);
    CHECK(buf != NULL);
    for (size_t off = 0; off < STREAM_BYTES; off += STREAM_MSG) {
        tu_pattern_fill(buf, STREAM_MSG, off, seed);
        int rc = knet_conn_send(c, buf, STREAM_MSG);
        if (rc != 0) {
            /* A peer that reset at once: the direct write on the loop reports it. */
            if (rc != -ECONNRESET && rc != -EPIPE && rc != KNET_ECLOSED)
                problem(false, "stream server: send returned %s", knet_strerror(rc));
            break;
        }
    }
    free(buf);
    knet_conn_close_with_timeout(c, 15000);
}

static void server_start(soak_server *s, const char *name, knet_handler h, const knet_codec *c,
                         const fu_limits *lim)
{
    s->name = name;
    CHECK_GT(fu_server_start(&s->ts, &h, c, lim), 0);
}

static void servers_start(void)
{
    S_echo.reg = fu_reg_new(true, false);
    fu_limits le = {0, IDLE_MS, 8 * FU_MIB};
    server_start(&S_echo, "echo", fu_reg_handler(S_echo.reg), NULL, &le);

    S_stream.reg = fu_reg_new(false, false);
    knet_handler hs = {stream_connect, fu_reg_on_receive, S_stream.reg};
    server_start(&S_stream, "stream", hs, NULL, NULL);

    S_codec.reg = fu_reg_new(true, false);
    knet_codec lc;
    CHECK_EQ(knet_length_codec(&lc, &codec_field), 0);
    server_start(&S_codec, "codec", fu_reg_handler(S_codec.reg), &lc, NULL);

    S_limit.reg = fu_reg_new(true, false);
    fu_limits ll = {8, 0, 0};
    server_start(&S_limit, "limit", fu_reg_handler(S_limit.reg), NULL, &ll);
}

/* ------------------------------------------------------------------ peer helpers */

/* Connects to port (rcvbuf > 0 sets a small window); -errno on failure. */
static int peer_connect(int port, int rcvbuf)
{
    int fd = tu_try_connect_ex(port, rcvbuf);
    if (fd >= 0)
        atomic_fetch_add(&R.conns, 1);
    return fd;
}

/* Writes everything; false on error. */
static bool write_all(int fd, const void *buf, size_t n)
{
    const uint8_t *p = buf;
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return false;
        p += w;
        n -= (size_t)w;
    }
    return true;
}

/* Closes with FIN or (rst) RST. */
static void peer_close(int fd, bool rst)
{
    if (rst)
        tu_set_linger0(fd);
    close(fd);
}

/* ------------------------------------------------------------------ scenarios */

/* Echo: up to 256 KiB in random chunks, read back and compared. */
static void ep_echo(uint64_t *rng)
{
    int fd = peer_connect(S_echo.ts.port, 0);
    if (fd < 0) {
        problem(false, "echo: connect: %s", strerror(-fd));
        return;
    }
    size_t total = 1 + fu_rand(rng) % (256 * 1024);
    uint32_t seed = (uint32_t)fu_rand(rng);
    uint8_t *out = malloc(total), *in = malloc(total);
    CHECK(out && in);
    tu_pattern_fill(out, total, 0, seed);
    size_t off = 0;
    bool ok = true;
    while (off < total && ok) {
        size_t n = 1 + fu_rand(rng) % 32768;
        if (n > total - off)
            n = total - off;
        ok = write_all(fd, out + off, n);
        off += n;
    }
    ssize_t got = ok ? tu_read_full(fd, in, total) : -1;
    if (!ok || got != (ssize_t)total)
        problem(true, "echo: %zu bytes sent, %zd read back", total, got);
    else if (memcmp(in, out, total) != 0)
        problem(true, "echo: %zu bytes came back different", total);
    else
        atomic_fetch_add(&R.bytes_checked, (long)total);
    free(out);
    free(in);
    peer_close(fd, fu_rand(rng) & 1);
    atomic_fetch_add(&R.runs[K_ECHO], 1);
}

/* Stream: read the whole stream (optionally after a pause with a tiny window),
 * check every byte and the EOF after it. */
static void ep_stream(uint64_t *rng, bool slow)
{
    int fd = peer_connect(S_stream.ts.port, slow ? 4096 : 0);
    if (fd < 0) {
        problem(false, "stream: connect: %s", strerror(-fd));
        return;
    }
    uint32_t seed = (uint32_t)tu_sock_port(fd);
    if (slow)
        tu_sleep_ms(50 + (int)(fu_rand(rng) % 300)); /* the peer does not read for a while */
    uint8_t buf[65536];
    size_t got = 0;
    ssize_t r;
    bool bad = false;
    while ((r = tu_read_some(fd, buf, sizeof buf)) > 0) {
        if (!bad && tu_pattern_mismatch(buf, (size_t)r, got, seed) != (size_t)r)
            bad = true;
        got += (size_t)r;
    }
    if (bad || r != 0 || got != STREAM_BYTES)
        problem(true, "stream%s: %zu of %d bytes, end %zd, %s", slow ? " (slow reader)" : "", got,
                STREAM_BYTES, r, bad ? "corrupt" : "intact");
    else
        atomic_fetch_add(&R.bytes_checked, (long)got);
    close(fd);
    atomic_fetch_add(&R.runs[slow ? K_SLOW_READER : K_STREAM], 1);
}

/* Reset in the middle of the stream. */
static void ep_stream_reset(uint64_t *rng)
{
    int fd = peer_connect(S_stream.ts.port, 4096);
    if (fd < 0) {
        problem(false, "stream reset: connect: %s", strerror(-fd));
        return;
    }
    uint8_t buf[16384];
    size_t want = fu_rand(rng) % (STREAM_BYTES / 2), got = 0;
    while (got < want) {
        ssize_t r = tu_read_some(fd, buf, sizeof buf);
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    peer_close(fd, true);
    atomic_fetch_add(&R.runs[K_STREAM_RESET], 1);
}

/* Length codec: good frames echoed, or (bad) a good frame then an oversized header. */
static void ep_codec(uint64_t *rng, bool bad)
{
    int fd = peer_connect(S_codec.ts.port, 0);
    if (fd < 0) {
        problem(false, "codec: connect: %s", strerror(-fd));
        return;
    }
    int frames = bad ? 1 : 1 + (int)(fu_rand(rng) % 20);
    uint8_t body[4096], back[4096], hdr[4];
    for (int i = 0; i < frames; i++) {
        size_t n = fu_rand(rng) % (sizeof body + 1);
        tu_pattern_fill(body, n, 0, (uint32_t)i);
        tu_put_len(hdr, n, 4, false);
        if (!write_all(fd, hdr, 4) || !write_all(fd, body, n) || tu_read_full(fd, hdr, 4) != 4 ||
            tu_get_len(hdr, 4, false) != n || tu_read_full(fd, back, n) != (ssize_t)n ||
            memcmp(back, body, n) != 0) {
            problem(true, "codec: frame %d of %zu bytes not echoed intact", i, n);
            close(fd);
            return;
        }
        atomic_fetch_add(&R.bytes_checked, (long)n);
    }
    if (bad) {
        tu_put_len(hdr, 4097 + fu_rand(rng) % 100000, 4, false);
        if (write_all(fd, hdr, 4)) {
            ssize_t r = tu_read_some(fd, back, sizeof back);
            if (r != 0 && r != -ECONNRESET)
                problem(false, "codec: oversized frame did not close the connection (%zd)", r);
        }
    }
    close(fd);
    atomic_fetch_add(&R.runs[bad ? K_CODEC_BAD : K_CODEC_GOOD], 1);
}

/* 200 connect/close cycles, FIN and RST, with and without data. */
static void ep_churn(uint64_t *rng)
{
    for (int i = 0; i < 200; i++) {
        int fd = peer_connect(S_echo.ts.port, 0);
        if (fd < 0) {
            problem(false, "churn: connect: %s", strerror(-fd));
            return;
        }
        unsigned mode = (unsigned)(fu_rand(rng) % 3);
        if (mode == 0) {
            char c = 'c', g = 0;
            if (!write_all(fd, &c, 1) || tu_read_full(fd, &g, 1) != 1 || g != 'c')
                problem(true, "churn: byte not echoed");
        } else if (mode == 1) {
            (void)write_all(fd, "xyz", 3);
        }
        peer_close(fd, fu_rand(rng) & 1);
    }
    atomic_fetch_add(&R.runs[K_CHURN], 1);
}

/* A persistent ping-pong client, closed or shut down after a random time. */
static void ep_client(uint64_t *rng)
{
    fu_pp p;
    fu_pp_start(&p, S_echo.ts.port, 4096 + fu_rand(rng) % 32768, 1 + (int)(fu_rand(rng) % 4), false);
    tu_sleep_ms(20 + (int)(fu_rand(rng) % 300));
    bool graceful = fu_rand(rng) & 1;
    int rc = graceful ? knet_client_shutdown(p.cli, 5000) : knet_client_close(p.cli);
    if (rc != 0)
        problem(false, "client: %s returned %s", graceful ? "shutdown" : "close", knet_strerror(rc));
    rc = fu_pp_join(&p);
    if (rc != KNET_ECLIENTCLOSED)
        problem(false, "client: dial_and_serve returned %s", knet_strerror(rc));
    if (atomic_load(&p.up) != atomic_load(&p.down) || atomic_load(&p.up) > 1)
        problem(false, "client: %d connect(true), %d connect(false)", atomic_load(&p.up),
                atomic_load(&p.down));
    atomic_fetch_add(&R.conns, atomic_load(&p.up));
    atomic_fetch_add(&R.runs[K_CLIENT], 1);
}

/* 16 connections against max_conns 8: at most 8 served, every served one echoes. */
static void ep_flood(uint64_t *rng)
{
    (void)rng;
    int fds[16], served = 0;
    for (int i = 0; i < 16; i++)
        fds[i] = peer_connect(S_limit.ts.port, 0);
    for (int i = 0; i < 16; i++) {
        if (fds[i] < 0)
            continue;
        char c = 'f', g = 0;
        if (send(fds[i], &c, 1, MSG_NOSIGNAL) == 1 && tu_read_some(fds[i], &g, 1) == 1) {
            if (g != 'f')
                problem(true, "flood: wrong echo");
            served++;
        }
    }
    for (int i = 0; i < 16; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    if (served > 8)
        problem(false, "flood: %d connections served, limit 8", served);
    atomic_fetch_add(&R.runs[K_FLOOD], 1);
}

/* An idle peer: closed by the echo server's idle timeout. */
static void ep_idle(uint64_t *rng)
{
    (void)rng;
    int fd = peer_connect(S_echo.ts.port, 0);
    if (fd < 0) {
        problem(false, "idle: connect: %s", strerror(-fd));
        return;
    }
    int64_t t0 = tu_now_ms();
    char b;
    ssize_t r = tu_read_some(fd, &b, 1);
    int64_t ms = tu_now_ms() - t0;
    if (r != 0 || ms + 5 < (int64_t)IDLE_MS)
        problem(false, "idle: read %zd after %lld ms (idle timeout %u ms)", r, (long long)ms, IDLE_MS);
    close(fd);
    atomic_fetch_add(&R.runs[K_IDLE], 1);
}

/* ------------------------------------------------------------------ workers */

static atomic_bool stopping;

static void *worker_main(void *arg)
{
    uint64_t rng = 0x9E3779B97F4A7C15ull ^ (uint64_t)(uintptr_t)arg * 0xBF58476D1CE4E5B9ull;
    while (!atomic_load(&stopping)) {
        unsigned pick = (unsigned)(fu_rand(&rng) % 100);
        if (pick < 28) ep_echo(&rng);
        else if (pick < 43) ep_stream(&rng, false);
        else if (pick < 51) ep_stream_reset(&rng);
        else if (pick < 55) ep_stream(&rng, true);
        else if (pick < 67) ep_codec(&rng, false);
        else if (pick < 72) ep_codec(&rng, true);
        else if (pick < 82) ep_churn(&rng);
        else if (pick < 94) ep_client(&rng);
        else if (pick < 98) ep_flood(&rng);
        else ep_idle(&rng);
    }
    return NULL;
}

/* ------------------------------------------------------------------ periodic stops */

/* A temporary server with 20 peers, 256 KiB queued on each, shut down
 * gracefully: every byte must arrive (checksums), then EOF. */
static void ep_shutdown(void)
{
    enum { N = 20, PER = 256 * 1024, MSG = 16 * 1024 };
    fu_reg *reg = fu_reg_new(false, true);
    knet_handler h = fu_reg_handler(reg);
    tu_server ts;
    CHECK_GT(fu_server_start(&ts, &h, NULL, NULL), 0);
    int fds[N];
    uint32_t seeds[N];
    for (int i = 0; i < N; i++) {
        fds[i] = peer_connect(ts.port, 8192);
        CHECK_GE(fds[i], 0);
        seeds[i] = (uint32_t)tu_sock_port(fds[i]);
    }
    WAIT_GE(&reg->up, N);
    uint8_t *buf = malloc(MSG);
    CHECK(buf != NULL);
    for (int k = 0; k < N; k++) {
        knet_conn *c = atomic_load(&reg->conns[k]);
        char a[KNET_ADDRSTRLEN];
        CHECK_GT(knet_conn_remote_addr(c, a, sizeof a), 0);
        uint32_t seed = (uint32_t)fu_addr_port(a);
        for (size_t off = 0; off < PER; off += MSG) {
            tu_pattern_fill(buf, MSG, off, seed);
            int rc = knet_conn_send(c, buf, MSG);
            if (rc != 0)
                problem(false, "shutdown: send returned %s", knet_strerror(rc));
        }
    }
    CHECK_EQ(knet_server_shutdown(ts.srv, 15000), 0);
    for (int i = 0; i < N; i++) {
        size_t got = 0;
        ssize_t r;
        bool bad = false;
        while ((r = tu_read_some(fds[i], buf, MSG)) > 0) {
            if (!bad && tu_pattern_mismatch(buf, (size_t)r, got, seeds[i]) != (size_t)r)
                bad = true;
            got += (size_t)r;
        }
        if (bad || r != 0 || got != PER)
            problem(true, "shutdown: peer %d read %zu of %d bytes, end %zd, %s", i, got, PER, r,
                    bad ? "corrupt" : "intact");
        else
            atomic_fetch_add(&R.bytes_checked, (long)got);
        close(fds[i]);
    }
    free(buf);
    int rc = tu_server_join(&ts);
    if (rc != KNET_ESERVERCLOSED)
        problem(false, "shutdown: listen_and_serve returned %s", knet_strerror(rc));
    if (atomic_load(&reg->errors) || tu_counter_get(&reg->up) != tu_counter_get(&reg->down))
        problem(false, "shutdown: connect(true)/connect(false) unbalanced");
    if (atomic_load(&reg->reasons[FU_R_LOCAL]) != N)
        problem(true, "shutdown: %ld of %d connections ended gracefully",
                atomic_load(&reg->reasons[FU_R_LOCAL]), N);
    fu_reg_free(reg);
    atomic_fetch_add(&R.runs[K_SHUTDOWN], 1);
}

/* A temporary server closed hard under ping-pong traffic from 8 clients. */
static void ep_close(void)
{
    enum { N = 8 };
    fu_reg *reg = fu_reg_new(true, false);
    knet_handler h = fu_reg_handler(reg);
    tu_server ts;
    CHECK_GT(fu_server_start(&ts, &h, NULL, NULL), 0);
    fu_pp pp[N];
    for (int i = 0; i < N; i++)
        fu_pp_start(&pp[i], ts.port, 16384, 2, true);
    WAIT_GE(&reg->up, N);
    WAIT_STATS(&ts, st.bytes_in >= 4 * FU_MIB);
    CHECK_EQ(knet_server_close(ts.srv), 0);
    int rc = tu_server_join(&ts);
    if (rc != KNET_ESERVERCLOSED)
        problem(false, "close: listen_and_serve returned %s", knet_strerror(rc));
    for (int i = 0; i < N; i++) {
        rc = fu_pp_join(&pp[i]);
        if (rc != KNET_ECLIENTCLOSED)
            problem(false, "close: client returned %s", knet_strerror(rc));
        if (atomic_load(&pp[i].up) != 1 || atomic_load(&pp[i].down) != 1)
            problem(false, "close: client saw %d/%d connects", atomic_load(&pp[i].up),
                    atomic_load(&pp[i].down));
        atomic_fetch_add(&R.conns, 1);
    }
    if (atomic_load(&reg->errors) || tu_counter_get(&reg->up) != tu_counter_get(&reg->down) ||
        atomic_load(&reg->reasons[FU_R_SERVER]) != N)
        problem(false, "close: server side unbalanced or wrong reasons");
    fu_reg_free(reg);
    atomic_fetch_add(&R.runs[K_CLOSE], 1);
}

/* ------------------------------------------------------------------ main */

static void print_server(soak_server *s)
{
    knet_stats st = fu_stats(&s->ts);
    printf("  %-7s accepted %8llu  refused %6llu  idle-closed %5llu  in %8llu MiB  out %8llu MiB\n",
           s->name, (unsigned long long)st.accepted, (unsigned long long)st.refused,
           (unsigned long long)st.idle_closed, (unsigned long long)(st.bytes_in >> 20),
           (unsigned long long)(st.bytes_out >> 20));
}

static void stop_server(soak_server *s, long reasons[FU_R_COUNT])
{
    CHECK_EQ(knet_server_close(s->ts.srv), 0);
    int rc = fu_server_wait(&s->ts);
    if (rc != KNET_ESERVERCLOSED)
        problem(false, "%s server: listen_and_serve returned %s", s->name, knet_strerror(rc));
    print_server(s);
    fu_server_free(&s->ts);
    if (atomic_load(&s->reg->errors) != 0)
        problem(false, "%s server: %ld callback-order violations", s->name, atomic_load(&s->reg->errors));
    if (tu_counter_get(&s->reg->up) != tu_counter_get(&s->reg->down))
        problem(false, "%s server: %ld connect(true) but %ld connect(false)", s->name,
                tu_counter_get(&s->reg->up), tu_counter_get(&s->reg->down));
    for (int i = 0; i < FU_R_COUNT; i++)
        reasons[i] += atomic_load(&s->reg->reasons[i]);
    fu_reg_free(s->reg);
}

int main(int argc, char **argv)
{
    int seconds = argc > 1 ? atoi(argv[1]) : 120;
    int workers = argc > 2 ? atoi(argv[2]) : 4;
    if (seconds <= 0 || workers <= 0 || workers > 64) {
        fprintf(stderr, "usage: %s [SECONDS] [WORKERS]\n", argv[0]);
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGPIPE, SIG_IGN); /* the peers' own writes; knet never raises it */
    fu_log_capture("no pattern"); /* keep expected warnings (back-off...) off stderr */
    printf("knet soak: %d s, %d workers, %u loop threads\n", seconds, workers, knet_loop_threads());
    tu_begin();
    int fds0 = tu_fd_count();
    size_t rss0 = tu_rss();
    servers_start();

    pthread_t th[64];
    for (int i = 0; i < workers; i++)
        CHECK_EQ(pthread_create(&th[i], NULL, worker_main, (void *)(uintptr_t)(i + 1)), 0);
    int64_t t0 = tu_now_ms(), end = t0 + (int64_t)seconds * 1000, next_report = t0 + 10000;
    int turn = 0;
    while (tu_now_ms() < end) {
        if (turn++ % 2 == 0)
            ep_shutdown();
        else
            ep_close();
        for (int i = 0; i < 30 && tu_now_ms() < end; i++)
            tu_sleep_ms(100); /* pacing between stop episodes */
        if (tu_now_ms() >= next_report) {
            printf("  [%3llds] %ld connections, %ld MiB checked, %ld lost, %ld failures\n",
                   (long long)((tu_now_ms() - t0) / 1000), atomic_load(&R.conns),
                   atomic_load(&R.bytes_checked) / (long)FU_MIB, atomic_load(&R.lost),
                   atomic_load(&R.failures));
            next_report += 10000;
        }
    }
    atomic_store(&stopping, true);
    for (int i = 0; i < workers; i++)
        CHECK_EQ(pthread_join(th[i], NULL), 0);
    int64_t elapsed = tu_now_ms() - t0;

    printf("\nservers:\n");
    long reasons[FU_R_COUNT] = {0};
    stop_server(&S_echo, reasons);
    stop_server(&S_stream, reasons);
    stop_server(&S_codec, reasons);
    stop_server(&S_limit, reasons);

    printf("\nwhat it did in %.1f s:\n", (double)elapsed / 1000.0);
    for (int k = 0; k < K_COUNT; k++)
        printf("  %-28s %8ld\n", kind_names[k], atomic_load(&R.runs[k]));
    printf("  %-28s %8ld\n", "connections opened", atomic_load(&R.conns));
    printf("  %-28s %8ld MiB\n", "bytes checked", atomic_load(&R.bytes_checked) / (long)FU_MIB);
    printf("server-side closes by reason:");
    for (int i = 0; i < FU_R_COUNT; i++)
        printf(" %s %ld", fu_reason_name(i), reasons[i]);
    printf("\n");

    /* Everything closed: descriptors back, memory reported. */
    int64_t fd_end = tu_now_ms() + TU_DEADLINE_MS;
    while (tu_fd_count() != fds0 && tu_now_ms() < fd_end)
        tu_sleep_ms(10);
    int fds1 = tu_fd_count();
    if (fds1 != fds0)
        problem(false, "%d descriptors open at the end, %d at the start", fds1, fds0);
    printf("descriptors: %d at start, %d at end; RSS %+lld KiB\n", fds0, fds1,
           ((long long)tu_rss() - (long long)rss0) / 1024);

    long lost = atomic_load(&R.lost), failures = atomic_load(&R.failures);
    for (int i = 0; i < R.nproblems; i++)
        printf("  %s\n", R.first_problems[i]);
    printf("lost: %ld, failures: %ld -> %s\n", lost, failures, lost || failures ? "FAILED" : "OK");
    fu_log_restore();
    return lost || failures ? 1 : 0;
}
