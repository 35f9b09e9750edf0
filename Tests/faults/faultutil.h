/*
 * faultutil.h — helpers for knet's fault suite, on top of the functional
 * suite's testutil.h (checks, bounded waits, plain sockets, tracker handler).
 * Adds: counts scaled down under sanitizers, RSS, a capturing log sink, a
 * server started with limits, and a handler for thousands of connections.
 */
#ifndef KNET_FAULTUTIL_H
#define KNET_FAULTUTIL_H

#include "../c/testutil.h"

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <sys/resource.h>

/* Set by CMake when KNET_SANITIZE is non-empty: counts shrink, RSS checks relax. */
#ifdef KNET_FAULTS_SANITIZED
#define FU_SANITIZED 1
#else
#define FU_SANITIZED 0
#endif

/* n, divided by div under sanitizers (at least 1). */
static inline int fu_scale(int n, int div)
{
    if (!FU_SANITIZED)
        return n;
    return n / div > 0 ? n / div : 1;
}

#define FU_MIB ((size_t)1 << 20)

/* ------------------------------------------------------------------ log capture */

/* Counts knet log lines that contain a pattern (and keeps the last one). */
typedef struct fu_log {
    pthread_mutex_t mu;
    const char *pattern;
    long matches, lines;
    char last[512];
    tu_counter matched; /* bumped per matching line: wait on it */
} fu_log;

/* The process's one capture (initialised on first use, from the main thread). */
static inline fu_log *fu_log_get(void)
{
    static fu_log l;
    static bool inited;
    if (!inited) {
        pthread_mutex_init(&l.mu, NULL);
        tu_counter_init(&l.matched);
        inited = true;
    }
    return &l;
}

/* knet log sink: counts lines that contain the capture's pattern. */
static inline void fu_log_sink(int level, const char *msg, void *ud)
{
    (void)level;
    fu_log *l = (fu_log *)ud;
    pthread_mutex_lock(&l->mu);
    l->lines++;
    bool hit = l->pattern && strstr(msg, l->pattern) != NULL;
    if (hit) {
        l->matches++;
        snprintf(l->last, sizeof l->last, "%s", msg);
    }
    pthread_mutex_unlock(&l->mu);
    if (hit)
        tu_counter_add(&l->matched, 1);
}

/* Routes knet's log (WARN and up) into the capture, counting lines with pattern;
 * returns the capture (wait on ->matched). */
static inline fu_log *fu_log_capture(const char *pattern)
{
    fu_log *l = fu_log_get();
    pthread_mutex_lock(&l->mu);
    l->pattern = pattern;
    l->matches = 0;
    l->last[0] = '\0';
    pthread_mutex_unlock(&l->mu);
    pthread_mutex_lock(&l->matched.mu);
    l->matched.value = 0;
    pthread_mutex_unlock(&l->matched.mu);
    knet_set_log(fu_log_sink, KNET_LOG_WARN, l);
    return l;
}

/* Restores the default log (stderr). */
static inline void fu_log_restore(void)
{
    knet_set_log(NULL, KNET_LOG_WARN, NULL);
}

/* ------------------------------------------------------------------ servers with limits */

/* Limits applied before listen_and_serve (0 = leave the default). */
typedef struct fu_limits {
    size_t max_conns;
    uint32_t idle_ms;
    size_t max_queued; /* SIZE_MAX = set 0 (unlimited) */
} fu_limits;

/* tu_server_start, with limits set on the server before it serves. */
static inline int fu_server_start(tu_server *ts, const knet_handler *h, const knet_codec *c,
                                  const fu_limits *lim)
{
    memset(ts, 0, sizeof *ts);
    ts->srv = knet_server_new("127.0.0.1:0");
    CHECK(ts->srv != NULL);
    if (lim) {
        if (lim->max_conns)
            knet_server_set_max_conns(ts->srv, lim->max_conns);
        if (lim->idle_ms)
            knet_server_set_idle_timeout(ts->srv, lim->idle_ms);
        if (lim->max_queued)
            knet_server_set_max_queued_bytes(ts->srv, lim->max_queued == SIZE_MAX ? 0 : lim->max_queued);
    }
    ts->handler = h ? *h : knet_default_handler;
    if (c) {
        ts->codec = *c;
        ts->has_codec = true;
    }
    tu_counter_init(&ts->done);
    CHECK_EQ(pthread_create(&ts->thread, NULL, tu_server_main, ts), 0);
    ts->port = knet_server_wait_listening(ts->srv, TU_DEADLINE_MS);
    return ts->port;
}

/* Waits (bounded) for listen_and_serve to return and joins, but keeps the
 * server (its counters stay readable); free it with fu_server_free. */
static inline int fu_server_wait(tu_server *ts)
{
    WAIT_GE(&ts->done, 1);
    CHECK_EQ(pthread_join(ts->thread, NULL), 0);
    pthread_mutex_lock(&ts->done.mu);
    int rc = ts->rc;
    pthread_mutex_unlock(&ts->done.mu);
    return rc;
}

/* Frees a server after fu_server_wait. */
static inline void fu_server_free(tu_server *ts)
{
    knet_server_free(ts->srv);
    ts->srv = NULL;
    tu_counter_destroy(&ts->done);
}

/* The server's counters. */
static inline knet_stats fu_stats(tu_server *ts)
{
    knet_stats st;
    knet_server_stats(ts->srv, &st);
    return st;
}

/* Polls the server's counters until cond (over `st`) holds, with the suite's deadline. */
#define WAIT_STATS(ts, cond)                                                                       \
    do {                                                                                           \
        int64_t fu_end_ = tu_now_ms() + TU_DEADLINE_MS;                                            \
        for (;;) {                                                                                 \
            knet_stats st = fu_stats(ts);                                                          \
            if (cond)                                                                              \
                break;                                                                             \
            if (tu_now_ms() > fu_end_) {                                                           \
                fprintf(stderr,                                                                    \
                        "%s:%d: FAILED: timed out waiting for %s (live %llu accepted %llu "      \
                        "refused %llu idle_closed %llu in %llu out %llu)\n",                       \
                        __FILE__, __LINE__, #cond, (unsigned long long)st.live,                    \
                        (unsigned long long)st.accepted, (unsigned long long)st.refused,           \
                        (unsigned long long)st.idle_closed, (unsigned long long)st.bytes_in,       \
                        (unsigned long long)st.bytes_out);                                         \
                abort();                                                                           \
            }                                                                                      \
            tu_sleep_ms(1);                                                                        \
        }                                                                                          \
    } while (0)

/* ------------------------------------------------------------------ close reasons */

/* Close reasons knet reports, bucketed for counting. */
enum {
    FU_R_LOCAL,   /* 0: local close or graceful shutdown */
    FU_R_EOF,     /* KNET_EOF */
    FU_R_RESET,   /* -ECONNRESET / -EPIPE */
    FU_R_TIMEOUT, /* -ETIMEDOUT */
    FU_R_CODEC,   /* KNET_ECODEC */
    FU_R_SERVER,  /* KNET_ESERVERCLOSED */
    FU_R_CLIENT,  /* KNET_ECLIENTCLOSED */
    FU_R_OTHER,
    FU_R_COUNT
};

/* The name of a bucket, for reports. */
static inline const char *fu_reason_name(int bucket)
{
    static const char *const names[FU_R_COUNT] = {
        "local", "eof", "reset", "timeout", "codec", "server-closed", "client-closed", "other"};
    return bucket >= 0 && bucket < FU_R_COUNT ? names[bucket] : "?";
}

/* The bucket of a close reason. */
static inline int fu_reason_bucket(int reason)
{
    switch (reason) {
    case 0: return FU_R_LOCAL;
    case KNET_EOF: return FU_R_EOF;
    case -ECONNRESET:
    case -EPIPE: return FU_R_RESET;
    case -ETIMEDOUT: return FU_R_TIMEOUT;
    case KNET_ECODEC: return FU_R_CODEC;
    case KNET_ESERVERCLOSED: return FU_R_SERVER;
    case KNET_ECLIENTCLOSED: return FU_R_CLIENT;
    default: return FU_R_OTHER;
    }
}

/* ------------------------------------------------------------------ many-connection handler */

/* Per-connection state of fu_reg: detects a second connect(false). */
typedef struct fu_cs {
    atomic_int phase; /* 1 after connect(true), 2 after connect(false) */
    int slot;         /* index in fu_reg.conns, or -1 */
} fu_cs;

#define FU_REG_SLOTS 1024

/* A handler for any number of connections: counts connect(true)/connect(false)
 * (exactly once each), close reasons, received bytes; optionally echoes and
 * keeps the first FU_REG_SLOTS connections retained for other threads. */
typedef struct fu_reg {
    bool echo;
    bool keep; /* retain conns into conns[] */
    tu_counter up, down;
    atomic_long errors;      /* protocol violations seen in callbacks */
    atomic_long rx_bytes;
    atomic_long echo_fail;   /* echo sends that did not return 0 */
    atomic_long echo_bytes;  /* bytes of echo sends that returned 0 */
    atomic_long reasons[FU_R_COUNT];
    atomic_int nconns;
    _Atomic(knet_conn *) conns[FU_REG_SLOTS];
} fu_reg;

/* connect callback of fu_reg. */
static inline void fu_reg_on_connect(knet_conn *c, bool connected, void *ud)
{
    fu_reg *r = (fu_reg *)ud;
    if (connected) {
        fu_cs *cs = (fu_cs *)calloc(1, sizeof *cs);
        CHECK(cs != NULL);
        atomic_store(&cs->phase, 1);
        cs->slot = -1;
        if (knet_conn_userdata(c) != NULL || knet_conn_close_reason(c) != 1)
            atomic_fetch_add(&r->errors, 1);
        if (r->keep) {
            int i = atomic_fetch_add(&r->nconns, 1);
            if (i < FU_REG_SLOTS) {
                knet_conn_retain(c);
                cs->slot = i;
                atomic_store(&r->conns[i], c);
            }
        }
        knet_conn_set_userdata(c, cs);
        tu_counter_add(&r->up, 1);
    } else {
        fu_cs *cs = (fu_cs *)knet_conn_userdata(c);
        if (!cs || atomic_exchange(&cs->phase, 2) != 1) {
            atomic_fetch_add(&r->errors, 1); /* no connect(true), or a second connect(false) */
            return;
        }
        int reason = knet_conn_close_reason(c);
        if (reason == 1)
            atomic_fetch_add(&r->errors, 1);
        atomic_fetch_add(&r->reasons[fu_reason_bucket(reason)], 1);
        if (cs->slot < 0) { /* nobody else holds it: free now */
            knet_conn_set_userdata(c, NULL);
            free(cs);
        }
        tu_counter_add(&r->down, 1);
    }
}

/* receive callback of fu_reg. */
static inline void fu_reg_on_receive(knet_conn *c, const void *buf, size_t len, void *ud)
{
    fu_reg *r = (fu_reg *)ud;
    fu_cs *cs = (fu_cs *)knet_conn_userdata(c);
    if (!cs || atomic_load(&cs->phase) != 1)
        atomic_fetch_add(&r->errors, 1);
    atomic_fetch_add(&r->rx_bytes, (long)len);
    if (r->echo) {
        if (knet_conn_send(c, buf, len) == 0)
            atomic_fetch_add(&r->echo_bytes, (long)len);
        else
            atomic_fetch_add(&r->echo_fail, 1);
    }
}

/* Allocates a registry. */
static inline fu_reg *fu_reg_new(bool echo, bool keep)
{
    fu_reg *r = (fu_reg *)calloc(1, sizeof *r);
    CHECK(r != NULL);
    r->echo = echo;
    r->keep = keep;
    tu_counter_init(&r->up);
    tu_counter_init(&r->down);
    return r;
}

/* The handler that feeds r. */
static inline knet_handler fu_reg_handler(fu_reg *r)
{
    knet_handler h = {fu_reg_on_connect, fu_reg_on_receive, r};
    return h;
}

/* Releases the kept connections and frees r (after its server/client returned). */
static inline void fu_reg_free(fu_reg *r)
{
    int n = atomic_load(&r->nconns);
    if (n > FU_REG_SLOTS)
        n = FU_REG_SLOTS;
    for (int i = 0; i < n; i++) {
        knet_conn *c = atomic_load(&r->conns[i]);
        if (c) {
            free(knet_conn_userdata(c));
            knet_conn_release(c);
        }
    }
    tu_counter_destroy(&r->up);
    tu_counter_destroy(&r->down);
    free(r);
}

/* Checks the exactly-once contract on r once everything has closed. */
static inline void fu_reg_check_balanced(fu_reg *r)
{
    CHECK_EQ(atomic_load(&r->errors), 0);
    CHECK_EQ(tu_counter_get(&r->up), tu_counter_get(&r->down));
}

/* ------------------------------------------------------------------ ping-pong clients */

/* A persistent knet client that keeps `inflight` blocks circulating: it sends
 * them on connect(true) and sends back whatever it receives (the server
 * echoes). Counts the bytes of every send that returned 0 and every byte
 * received, so a test can account for each byte. With close_on_end it closes
 * its client from connect(false), so it never dials a second time. */
typedef struct fu_pp {
    knet_client *cli;
    tu_client tc;
    size_t block;
    int inflight;
    bool close_on_end;
    atomic_long tx_ok, rx, send_fail;
    atomic_int up, down, reason;
} fu_pp;

/* connect callback of fu_pp. */
static inline void fu_pp_connect(knet_conn *c, bool connected, void *ud)
{
    fu_pp *p = (fu_pp *)ud;
    if (connected) {
        atomic_fetch_add(&p->up, 1);
        uint8_t *b = (uint8_t *)malloc(p->block);
        CHECK(b != NULL);
        tu_pattern_fill(b, p->block, 0, 3);
        for (int i = 0; i < p->inflight; i++) {
            if (knet_conn_send(c, b, p->block) == 0)
                atomic_fetch_add(&p->tx_ok, (long)p->block);
            else
                atomic_fetch_add(&p->send_fail, 1);
        }
        free(b);
    } else {
        atomic_store(&p->reason, knet_conn_close_reason(c));
        atomic_fetch_add(&p->down, 1);
        if (p->close_on_end)
            (void)knet_client_close(p->cli); /* no second dial */
    }
}

/* receive callback of fu_pp: send it back. */
static inline void fu_pp_receive(knet_conn *c, const void *buf, size_t len, void *ud)
{
    fu_pp *p = (fu_pp *)ud;
    atomic_fetch_add(&p->rx, (long)len);
    if (knet_conn_send(c, buf, len) == 0)
        atomic_fetch_add(&p->tx_ok, (long)len);
    else
        atomic_fetch_add(&p->send_fail, 1);
}

/* Starts a ping-pong client against 127.0.0.1:port (retry off). */
static inline void fu_pp_start(fu_pp *p, int port, size_t block, int inflight, bool close_on_end)
{
    memset(p, 0, sizeof *p);
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
    p->cli = knet_client_new(addr);
    CHECK(p->cli != NULL);
    p->block = block;
    p->inflight = inflight;
    p->close_on_end = close_on_end;
    knet_handler h = {fu_pp_connect, fu_pp_receive, p};
    tu_client_start(&p->tc, p->cli, &h, NULL);
}

/* Joins the client thread, frees the client; returns what dial_and_serve returned. */
static inline int fu_pp_join(fu_pp *p)
{
    int rc = tu_client_join(&p->tc);
    knet_client_free(p->cli);
    p->cli = NULL;
    return rc;
}

/* ------------------------------------------------------------------ misc */

/* Makes fd non-blocking. */
static inline void fu_set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    CHECK_GE(fl, 0);
    CHECK_EQ(fcntl(fd, F_SETFL, fl | O_NONBLOCK), 0);
}

/* The local port of the peer side of a connection, from "ip:port". */
static inline int fu_addr_port(const char *addr)
{
    const char *p = strrchr(addr, ':');
    CHECK(p != NULL);
    return atoi(p + 1);
}

/* A cheap per-thread random generator (xorshift64*). */
static inline uint64_t fu_rand(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1Dull;
}

#endif /* KNET_FAULTUTIL_H */
