/* Fault: connection churn and racing control calls. Promise: 10,000
 * connect/close cycles from several threads (FIN and RST, with and without
 * data) and persistent clients created and closed at every stage leave no
 * descriptor or memory behind and deliver connect(false) exactly once per
 * connect(true); knet_conn_send / close / shutdown / close_with_timeout /
 * setters called concurrently from several threads on the same connections
 * (and a server close in the middle) never crash, never report anything but
 * 0 / KNET_EPENDINGFULL / KNET_ECLOSED, and a send after the same thread's
 * close or shutdown is always KNET_ECLOSED. Built to be TSan clean. */
#include "faultutil.h"

/* RSS may grow by this much over a test (malloc keeps freed memory; the data
 * itself is tiny). Not checked under sanitizers, whose allocators quarantine. */
#define RSS_SLACK (48 * FU_MIB)

static void check_rss(size_t before, const char *what)
{
    size_t after = tu_rss();
    long long growth = (long long)after - (long long)before;
    printf("  RSS after %s: %+lld KiB\n", what, growth / 1024);
    if (!FU_SANITIZED)
        CHECK_LT(growth, (long long)RSS_SLACK);
}

/* ------------------------------------------------------------------ connect/close cycles */

typedef struct cycler {
    int port, id, cycles;
} cycler;

/* One thread's share of the cycles, rotating through four ways to leave. */
static void *cycler_main(void *arg)
{
    cycler *c = (cycler *)arg;
    for (int i = 0; i < c->cycles; i++) {
        int fd = tu_connect(c->port);
        switch ((i + c->id) % 4) {
        case 0: { /* a request and its answer, then FIN */
            char b = 'e', got;
            tu_write_all(fd, &b, 1);
            READ_EXACT(fd, &got, 1);
            CHECK_EQ(got, 'e');
            break;
        }
        case 1: /* RST at once */
            tu_set_linger0(fd);
            break;
        case 2: /* data, then RST before the answer */
            tu_write_all(fd, "0123456789abcdef", 16);
            tu_set_linger0(fd);
            break;
        default: /* FIN at once */
            break;
        }
        close(fd);
    }
    return NULL;
}

/* Runs n cycles on `threads` threads against port. */
static void run_cycles(int port, int threads, int n)
{
    pthread_t th[8];
    cycler cs[8];
    for (int i = 0; i < threads; i++) {
        cs[i].port = port;
        cs[i].id = i;
        cs[i].cycles = n / threads + (i < n % threads ? 1 : 0);
        CHECK_EQ(pthread_create(&th[i], NULL, cycler_main, &cs[i]), 0);
    }
    for (int i = 0; i < threads; i++)
        CHECK_EQ(pthread_join(th[i], NULL), 0);
}

/* 10,000 connect/close cycles from 4 threads. */
static void test_connect_close_cycles(void)
{
    enum { THREADS = 4 };
    const int warm = 400, cycles = 10000; /* fast enough under sanitizers too */
    fu_reg *r = fu_reg_new(true, false);
    knet_handler h = fu_reg_handler(r);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, NULL);
    CHECK_GT(port, 0);

    run_cycles(port, THREADS, warm); /* malloc arenas and kernel caches settle */
    WAIT_STATS(&ts, st.accepted == (uint64_t)warm && st.live == 0);
    int fds0 = tu_fd_count();
    size_t rss0 = tu_rss();

    int64_t t0 = tu_now_ms();
    run_cycles(port, THREADS, cycles);
    WAIT_STATS(&ts, st.accepted == (uint64_t)(warm + cycles) && st.live == 0);
    int64_t ms = tu_now_ms() - t0;
    WAIT_GE(&r->down, warm + cycles);
    fu_reg_check_balanced(r);
    CHECK_EQ(tu_counter_get(&r->up), warm + cycles);
    printf("  %d cycles on %d threads in %lld ms; reasons: eof %ld reset %ld other %ld\n", cycles,
           THREADS, (long long)ms, atomic_load(&r->reasons[FU_R_EOF]),
           atomic_load(&r->reasons[FU_R_RESET]), atomic_load(&r->reasons[FU_R_OTHER]));
    CHECK_EQ(atomic_load(&r->reasons[FU_R_OTHER]), 0);
    CHECK_FDS(fds0);
    check_rss(rss0, "cycles");
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    fu_reg_free(r);
}

/* ------------------------------------------------------------------ persistent clients */

/* The handler of one short-lived client. */
typedef struct cstate {
    tu_counter up, down;
    atomic_int errors;
    atomic_int reason;
} cstate;

static void cstate_connect(knet_conn *c, bool connected, void *ud)
{
    cstate *s = (cstate *)ud;
    if (connected) {
        if (tu_counter_get(&s->up) != tu_counter_get(&s->down))
            atomic_fetch_add(&s->errors, 1); /* a second connection before the first ended */
        tu_counter_add(&s->up, 1);
    } else {
        atomic_store(&s->reason, knet_conn_close_reason(c));
        tu_counter_add(&s->down, 1);
    }
}

typedef struct client_cycler {
    int port, id, cycles;
} client_cycler;

/* Creates, runs and closes clients: at once (racing the dial), once connected,
 * or with a graceful shutdown after sending. */
static void *client_cycler_main(void *arg)
{
    client_cycler *cc = (client_cycler *)arg;
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", cc->port);
    for (int i = 0; i < cc->cycles; i++) {
        cstate s;
        memset(&s, 0, sizeof s);
        tu_counter_init(&s.up);
        tu_counter_init(&s.down);
        knet_handler h = {cstate_connect, NULL, &s};
        knet_client *cli = knet_client_new(addr);
        CHECK(cli != NULL);
        tu_client tc;
        tu_client_start(&tc, cli, &h, NULL);
        int mode = (i + cc->id) % 3;
        if (mode == 0) {
            CHECK_EQ(knet_client_close(cli), 0);
        } else {
            WAIT_GE(&s.up, 1);
            if (mode == 1) {
                CHECK_EQ(knet_client_close(cli), 0);
            } else {
                knet_conn *c = knet_client_conn(cli);
                if (c) {
                    int rc = knet_conn_send(c, "bye", 3);
                    CHECK(rc == 0 || rc == KNET_ECLOSED);
                    knet_conn_release(c);
                }
                CHECK_EQ(knet_client_shutdown(cli, 5000), 0);
            }
        }
        CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
        knet_client_free(cli);
        CHECK_EQ(atomic_load(&s.errors), 0);
        CHECK_EQ(tu_counter_get(&s.up), tu_counter_get(&s.down));
        CHECK_LE(tu_counter_get(&s.up), 1);
        if (mode == 1)
            CHECK_EQ(atomic_load(&s.reason), KNET_ECLIENTCLOSED);
        if (mode == 2) {
            int rsn = atomic_load(&s.reason);
            CHECK(rsn == 0 || rsn == KNET_EOF); /* graceful: we finished, or the server did */
        }
        tu_counter_destroy(&s.up);
        tu_counter_destroy(&s.down);
    }
    return NULL;
}

/* Persistent clients closed at every stage, from 4 threads. */
static void test_client_cycles(void)
{
    enum { THREADS = 4 };
    const int per = fu_scale(60, 2);
    fu_reg *r = fu_reg_new(true, false);
    knet_handler h = fu_reg_handler(r);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, NULL);
    CHECK_GT(port, 0);
    size_t rss0 = tu_rss();
    pthread_t th[THREADS];
    client_cycler cc[THREADS];
    int64_t t0 = tu_now_ms();
    for (int i = 0; i < THREADS; i++) {
        cc[i].port = port;
        cc[i].id = i;
        cc[i].cycles = per;
        CHECK_EQ(pthread_create(&th[i], NULL, client_cycler_main, &cc[i]), 0);
    }
    for (int i = 0; i < THREADS; i++)
        CHECK_EQ(pthread_join(th[i], NULL), 0);
    WAIT_STATS(&ts, st.live == 0);
    WAIT_GE(&r->down, tu_counter_get(&r->up));
    fu_reg_check_balanced(r);
    printf("  %d clients in %lld ms; server saw %ld connections\n", THREADS * per,
           (long long)(tu_now_ms() - t0), tu_counter_get(&r->up));
    check_rss(rss0, "client cycles");
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    fu_reg_free(r);
}

/* ------------------------------------------------------------------ racing control calls */

#define RACE_PEERS 24

/* Reads (and discards) everything on the peers, and pokes each with a few bytes
 * so that receive (and the echo send on the loop) races the other threads. */
typedef struct drainer {
    int fds[RACE_PEERS];
    atomic_bool stop;
} drainer;

static void *drainer_main(void *arg)
{
    drainer *d = (drainer *)arg;
    struct pollfd p[RACE_PEERS];
    bool open[RACE_PEERS];
    for (int i = 0; i < RACE_PEERS; i++) {
        p[i].fd = d->fds[i];
        p[i].events = POLLIN;
        open[i] = true;
    }
    char buf[16384];
    unsigned tick = 0;
    while (!atomic_load(&d->stop)) {
        int n = poll(p, RACE_PEERS, 5);
        CHECK_GE(n, 0);
        for (int i = 0; i < RACE_PEERS; i++) {
            if (!open[i])
                continue;
            if (p[i].revents) {
                ssize_t r = recv(p[i].fd, buf, sizeof buf, MSG_DONTWAIT);
                if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
                    open[i] = false;
                    p[i].fd = -1; /* poll ignores it */
                    continue;
                }
            }
            if ((tick + (unsigned)i) % 4 == 0)
                (void)send(p[i].fd, "ping-ping-ping-ping", 19, MSG_DONTWAIT | MSG_NOSIGNAL);
        }
        tick++;
    }
    return NULL;
}

typedef struct racer {
    fu_reg *reg;
    int base, count; /* the round's conns: reg->conns[base .. base+count) */
    int iters;
    uint64_t seed;
    long sends_ok, full, closed;
    atomic_int *progress;
} racer;

static void *racer_main(void *arg)
{
    racer *rc = (racer *)arg;
    char buf[4096];
    memset(buf, 'z', sizeof buf);
    for (int i = 0; i < rc->iters; i++) {
        uint64_t x = fu_rand(&rc->seed);
        knet_conn *c = atomic_load(&rc->reg->conns[rc->base + (int)(x % (uint64_t)rc->count)]);
        /* Closes are rare enough that most connections live through much of the
         * round, so sends race with them rather than hitting closed conns. */
        unsigned op = (unsigned)((x >> 16) % 1000000);
        if (op < 990000) {
            int r = knet_conn_send(c, buf, 1 + (x >> 32) % sizeof buf);
            if (r == 0)
                rc->sends_ok++;
            else if (r == KNET_EPENDINGFULL)
                rc->full++;
            else {
                CHECK_EQ(r, KNET_ECLOSED);
                rc->closed++;
            }
        } else if (op < 990067) {
            knet_conn_close(c);
            CHECK_EQ(knet_conn_send(c, "x", 1), KNET_ECLOSED);
        } else if (op < 990133) {
            knet_conn_shutdown(c);
            CHECK_EQ(knet_conn_send(c, "x", 1), KNET_ECLOSED);
        } else if (op < 990200) {
            knet_conn_close_with_timeout(c, 50);
            CHECK_EQ(knet_conn_send(c, "x", 1), KNET_ECLOSED);
        } else if (op < 995000) {
            knet_conn_set_pending_send(c, (x >> 40) % 64);
            knet_conn_set_max_queued_bytes(c, ((x >> 48) % 8) * 65536);
        } else {
            int r = knet_conn_set_nodelay(c, (x >> 40) & 1);
            CHECK(r == 0 || r == KNET_ECLOSED || r == -EINVAL || r == -EBADF);
            char a[KNET_ADDRSTRLEN];
            CHECK_GT(knet_conn_remote_addr(c, a, sizeof a), 0);
            int la = knet_conn_local_addr(c, a, sizeof a);
            CHECK(la > 0 || la == KNET_ECLOSED);
            int reason = knet_conn_close_reason(c);
            CHECK(reason <= 1);
        }
        if (i == rc->iters / 2)
            atomic_fetch_add(rc->progress, 1);
    }
    return NULL;
}

/* Rounds of 24 connections hammered by 4 threads; the last round closes the
 * server in the middle. */
static void test_close_send_race(void)
{
    enum { THREADS = 4 };
    const int rounds = fu_scale(6, 2), iters = fu_scale(20000, 4);
    fu_reg *r = fu_reg_new(true, true);
    knet_handler h = fu_reg_handler(r);
    fu_limits lim = {0, 0, 256 * 1024};
    tu_server ts;
    int port = fu_server_start(&ts, &h, NULL, &lim);
    CHECK_GT(port, 0);
    size_t rss0 = tu_rss();
    long ok = 0, full = 0, closed = 0;
    bool server_closed = false;

    for (int round = 0; round < rounds; round++) {
        drainer d;
        memset(&d, 0, sizeof d);
        int base = round * RACE_PEERS;
        for (int i = 0; i < RACE_PEERS; i++) {
            d.fds[i] = tu_connect_ex(port, 8192);
            fu_set_nonblock(d.fds[i]);
        }
        WAIT_GE(&r->up, base + RACE_PEERS);
        CHECK_LE(base + RACE_PEERS, FU_REG_SLOTS);
        pthread_t dth;
        CHECK_EQ(pthread_create(&dth, NULL, drainer_main, &d), 0);

        atomic_int progress = 0;
        pthread_t th[THREADS];
        racer rs[THREADS];
        for (int i = 0; i < THREADS; i++) {
            memset(&rs[i], 0, sizeof rs[i]);
            rs[i].reg = r;
            rs[i].base = base;
            rs[i].count = RACE_PEERS;
            rs[i].iters = iters;
            rs[i].seed = 0x9E3779B97F4A7C15ull * (uint64_t)(round * THREADS + i + 1);
            rs[i].progress = &progress;
            CHECK_EQ(pthread_create(&th[i], NULL, racer_main, &rs[i]), 0);
        }
        if (round == rounds - 1) { /* the server goes away under the racers' feet */
            WAIT_UNTIL(atomic_load(&progress) >= 1);
            CHECK_EQ(knet_server_close(ts.srv), 0);
            server_closed = true;
        }
        for (int i = 0; i < THREADS; i++) {
            CHECK_EQ(pthread_join(th[i], NULL), 0);
            ok += rs[i].sends_ok;
            full += rs[i].full;
            closed += rs[i].closed;
        }
        /* The peers leave (half of them with a reset); every conn ends. */
        atomic_store(&d.stop, true);
        CHECK_EQ(pthread_join(dth, NULL), 0);
        for (int i = 0; i < RACE_PEERS; i++) {
            if (i % 2)
                tu_set_linger0(d.fds[i]);
            close(d.fds[i]);
        }
        WAIT_GE(&r->down, base + RACE_PEERS);
        for (int i = base; i < base + RACE_PEERS; i++) {
            knet_conn *c = atomic_load(&r->conns[i]);
            CHECK_NE(knet_conn_close_reason(c), 1);
            CHECK_EQ(knet_conn_send(c, "x", 1), KNET_ECLOSED);
        }
    }
    CHECK(server_closed);
    CHECK_EQ(tu_server_join(&ts), KNET_ESERVERCLOSED);
    fu_reg_check_balanced(r);
    printf("  %d rounds x %d conns x %d threads: sends ok %ld, full %ld, closed %ld\n", rounds,
           RACE_PEERS, THREADS, ok, full, closed);
    printf("  reasons:");
    for (int i = 0; i < FU_R_COUNT; i++)
        printf(" %s %ld", fu_reason_name(i), atomic_load(&r->reasons[i]));
    printf("\n");
    CHECK_GT(ok, 0);
    fu_reg_free(r);
    check_rss(rss0, "races");
}

int main(void)
{
    tu_begin();
    RUN(test_connect_close_cycles);
    RUN(test_client_cycles);
    RUN(test_close_send_race);
    return tu_end();
}
