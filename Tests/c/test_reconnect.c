/* The persistent client against a server that comes and goes: a listener that flaps
 * on one port (held meanwhile) over many cycles — every outage is paced by the backoff
 * (initial, doubling, capped; back to initial after each served connection),
 * connect(true)/connect(false) alternate on a loop thread, nothing grows; a knet
 * server restarted on the same port; the client closed or shut down at every stage
 * (dialing, backing off, inside its own callbacks, racing a re-dial); sends on a
 * connection that ended are refused and never reach the next one. */
#include "testutil.h"

#include <poll.h>
#include <signal.h>

/* ------------------------------------------------------------------ poll (wrapped) */

int __real_poll(struct pollfd *fds, nfds_t n, int timeout);

/* When set, the next wait of a dial (the client's wake-up descriptor and a socket
 * waiting for POLLOUT) fails with this errno instead of polling. */
static atomic_int fail_dial_poll;
/* When set, that many backoff waits' polls (the wake-up descriptor alone) fail with
 * ENOMEM instead of polling. */
static atomic_int fail_backoff_polls;

int __wrap_poll(struct pollfd *fds, nfds_t n, int timeout)
{
    if (n == 2 && fds[1].events == POLLOUT) {
        int e = atomic_exchange(&fail_dial_poll, 0);
        if (e) {
            errno = e;
            return -1;
        }
    }
    if (n == 1 && timeout > 0 && atomic_load(&fail_backoff_polls) > 0) {
        atomic_fetch_sub(&fail_backoff_polls, 1);
        errno = ENOMEM;
        return -1;
    }
    return __real_poll(fds, n, timeout);
}

/* ------------------------------------------------------------------ backoff log */

#define MAX_WAITS 4096

static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;
static tu_counter nwaits;                 /* "retrying in N ms" lines seen */
static unsigned waits[MAX_WAITS];         /* their N */
static int64_t wait_at[MAX_WAITS];        /* when each was logged */

static void log_sink(int level, const char *msg, void *ud)
{
    (void)level;
    (void)ud;
    const char *p = strstr(msg, "retrying in ");
    if (!p)
        return;
    unsigned ms = 0;
    CHECK_EQ(sscanf(p, "retrying in %u ms", &ms), 1);
    pthread_mutex_lock(&log_mu);
    long i = tu_counter_get(&nwaits);
    CHECK_LT(i, MAX_WAITS);
    waits[i] = ms;
    wait_at[i] = tu_now_ms();
    pthread_mutex_unlock(&log_mu);
    tu_counter_add(&nwaits, 1);
}

/* ------------------------------------------------------------------ alternation */

/* The client's connections, one at a time: connect(true) only while none is up,
 * connect(false) only for the one that is, each on a loop thread (named knet-loop-N). */
static _Atomic int up;
static _Atomic int alternation_errors;

static void alternate_hook(tu_rec *r, bool connected)
{
    (void)r;
    char name[32] = "";
    pthread_getname_np(pthread_self(), name, sizeof name);
    if (strncmp(name, "knet-loop-", 10) != 0)
        atomic_fetch_add(&alternation_errors, 1);
    int want = connected ? 0 : 1;
    if (!atomic_compare_exchange_strong(&up, &want, connected ? 1 : 0))
        atomic_fetch_add(&alternation_errors, 1);
}

/* ------------------------------------------------------------------ helpers */

/* A socket bound to 127.0.0.1:port (0 = any) with SO_REUSEADDR; listening when backlog >= 0. */
static int reuse_socket(int port, int backlog)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK_GE(fd, 0);
    int one = 1;
    CHECK_EQ(setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one), 0);
    struct sockaddr_in a = tu_loopback(port);
    CHECK_EQ(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    if (backlog >= 0)
        CHECK_EQ(listen(fd, backlog), 0);
    return fd;
}

/* Accepts one connection (bounded wait). */
static int accept_one(int lfd)
{
    struct pollfd p = {lfd, POLLIN, 0};
    CHECK_EQ(poll(&p, 1, TU_DEADLINE_MS), 1);
    int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    CHECK_GE(fd, 0);
    tu_set_timeouts(fd);
    return fd;
}

static int thread_count(void) { return tu_dir_count("/proc/self/task"); }

/* Checks the waits logged in [from, to): initial, doubling, capped at max; and that
 * each dial after a wait came no sooner than the wait. */
static void check_backoff(long from, long to, unsigned initial, unsigned max)
{
    pthread_mutex_lock(&log_mu);
    unsigned want = initial;
    for (long i = from; i < to; i++) {
        if (waits[i] != want) {
            fprintf(stderr, "wait %ld of outage: %u ms, want %u\n", i - from, waits[i], want);
            CHECK_EQ(waits[i], want);
        }
        if (i + 1 < to)
            CHECK_GE(wait_at[i + 1] - wait_at[i], (int64_t)waits[i] - 1);
        want = want > max / 2 ? max : want * 2;
    }
    pthread_mutex_unlock(&log_mu);
}

/* ------------------------------------------------------------------ flapping */

/* A plain listener flaps on one port for 100 cycles: accept the client, stop
 * listening, drop the connection, let at least four dials fail (initial 4 ms, cap
 * 16 ms: 4, 8, 16, 16), listen again. Each outage's waits start at the initial value
 * (the served connection reset the backoff) and double up to the cap; the client's
 * connections alternate connect(true)/connect(false) on a loop thread; descriptors,
 * threads and memory stay flat. */
static void test_flapping_listener(void)
{
    enum { CYCLES = 100, INITIAL = 4, MAX = 16, FAILS = 4 };
    int holder = reuse_socket(0, -1); /* keeps the port while nothing listens */
    int port = tu_sock_port(holder);
    tu_tracker *t = tu_tracker_new();
    t->on_connect = alternate_hook;
    atomic_store(&up, 0);
    atomic_store(&alternation_errors, 0);
    knet_handler h = tu_tracker_handler(t);
    knet_client *c = tu_client_for_port(port);
    knet_client_enable_retry(c);
    knet_client_set_retry_backoff(c, INITIAL, MAX);

    int lfd = reuse_socket(port, 8);
    tu_client tc;
    tu_client_start(&tc, c, &h, NULL);
    int fds0 = -1, threads0 = -1;
    long rss0 = 0;
    int64_t t0 = tu_now_ms();
    for (int i = 0; i < CYCLES; i++) {
        int peer = accept_one(lfd);
        WAIT_GE(&t->connects, i + 1);
        CHECK_EQ(atomic_load(&up), 1);
        CHECK_EQ(tu_counter_get(&t->disconnects), i);
        knet_conn *cur = knet_client_conn(c);
        CHECK(cur == t->recs[i].conn);
        knet_conn_release(cur);
        if (i == 10) { /* warmed up: allocator arenas, loop buffers */
            fds0 = tu_fd_count();
            threads0 = thread_count();
            rss0 = (long)(tu_rss() / 1024);
        }
        long w0 = tu_counter_get(&nwaits);
        close(lfd); /* stop listening first: the re-dial is refused */
        close(peer);
        WAIT_GE(&t->disconnects, i + 1);
        CHECK_EQ(atomic_load(&t->recs[i].reason), KNET_EOF);
        WAIT_GE(&nwaits, w0 + FAILS);
        lfd = reuse_socket(port, 8);
        long w1 = tu_counter_get(&nwaits);
        check_backoff(w0, w1, INITIAL, MAX);
        if (i >= 10) {
            CHECK_LE(tu_fd_count(), fds0 + 1); /* + the listener, maybe a socket mid-dial */
            CHECK_EQ(thread_count(), threads0);
        }
    }
    int peer = accept_one(lfd);
    WAIT_GE(&t->connects, CYCLES + 1);
    long grown = (long)(tu_rss() / 1024) - rss0;
    printf("  %d cycles in %lld ms, %ld waits logged, RSS grew %ld KiB\n", CYCLES,
           (long long)(tu_now_ms() - t0), tu_counter_get(&nwaits), grown);
    CHECK_LT(grown, 8 * 1024);
    CHECK_EQ(knet_client_close(c), 0);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    CHECK_EQ(tu_counter_get(&t->connects), CYCLES + 1);
    CHECK_EQ(tu_counter_get(&t->disconnects), CYCLES + 1);
    CHECK_EQ(atomic_load(&t->recs[CYCLES].reason), KNET_ECLIENTCLOSED);
    CHECK_EQ(atomic_load(&alternation_errors), 0);
    CHECK(knet_client_conn(c) == NULL);
    knet_client_free(c);
    EXPECT_PEER_CLOSED(peer);
    close(peer);
    close(lfd);
    close(holder);
    tu_tracker_free(t);
}

/* A knet server stopped and started again on the same (held) port for 30 cycles,
 * alternately closed and shut down: the client follows, one connection per cycle,
 * and echoes a message on each. */
static void test_flapping_knet_server(void)
{
    enum { CYCLES = 30 };
    int holder = reuse_socket(0, -1);
    int port = tu_sock_port(holder);
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
    tu_tracker *st = tu_tracker_new();
    st->echo = true;
    knet_handler sh = tu_tracker_handler(st);
    tu_tracker *ct = tu_tracker_new();
    ct->on_connect = alternate_hook;
    atomic_store(&up, 0);
    atomic_store(&alternation_errors, 0);
    knet_handler ch = tu_tracker_handler(ct);
    knet_client *c = tu_client_for_port(port);
    knet_client_enable_retry(c);
    knet_client_set_retry_backoff(c, 2, 20);
    tu_client tc;
    tu_client_start(&tc, c, &ch, NULL);
    for (int i = 0; i < CYCLES; i++) {
        long base = tu_counter_get(&ct->connects); /* all ended: see below */
        tu_server ts;
        CHECK_EQ(tu_server_start(&ts, addr, &sh, NULL), port);
        tu_rec *r = tu_tracker_rec(ct, (int)base);
        CHECK_EQ(knet_conn_send(r->conn, "ping", 4), 0);
        WAIT_GE(&ct->bytes, 4 * (i + 1));
        if (i % 2)
            CHECK_EQ(knet_server_shutdown(ts.srv, 2000), 0);
        else
            CHECK_EQ(knet_server_close(ts.srv), 0);
        CHECK_EQ(tu_server_join(&ts), KNET_ESERVERCLOSED);
        /* The listener closes on its loop after knet_server_close returned: a re-dial
         * can reach its backlog first (and is then reset), one more connection. */
        WAIT_UNTIL(tu_counter_get(&ct->disconnects) == tu_counter_get(&ct->connects));
        CHECK_EQ(atomic_load(&up), 0);
    }
    CHECK_EQ(knet_client_close(c), 0);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    printf("  %ld connections in %d cycles\n", tu_counter_get(&ct->connects), CYCLES);
    CHECK_GE(tu_counter_get(&ct->connects), CYCLES);
    CHECK_EQ(tu_counter_get(&ct->disconnects), tu_counter_get(&ct->connects));
    CHECK_EQ(atomic_load(&alternation_errors), 0);
    knet_client_free(c);
    close(holder);
    tu_tracker_free(ct);
    tu_tracker_free(st);
}

/* ------------------------------------------------------------------ stopping at every stage */

/* The client's dial sits in SYN retries (the listener's backlog is full): a
 * knet_client_shutdown returns at once and so does dial_and_serve, with no callbacks. */
static void test_shutdown_while_dialing(void)
{
    int lfd = reuse_socket(0, 0);
    int port = tu_sock_port(lfd);
    int filler = tu_connect(port); /* fills the backlog; never accepted */
    tu_tracker *t = tu_tracker_new();
    knet_handler h = tu_tracker_handler(t);
    knet_client *c = tu_client_for_port(port);
    knet_client_enable_retry(c);
    tu_client tc;
    tu_client_start(&tc, c, &h, NULL);
    WAIT_UNTIL(tu_syn_sent_to(port) >= 1); /* the dial is in progress */
    int64_t t0 = tu_now_ms();
    CHECK_EQ(knet_client_shutdown(c, 60000), 0);
    CHECK_EQ(knet_client_shutdown(c, 60000), KNET_ECLIENTCLOSED);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    int64_t ms = tu_now_ms() - t0;
    printf("  shutdown ended the dial after %lld ms\n", (long long)ms);
    CHECK_LT(ms, 5000);
    CHECK_EQ(tu_counter_get(&t->connects), 0);
    CHECK_EQ(knet_client_close(c), 0); /* force-close after a shutdown: 0 */
    knet_client_free(c);
    close(filler);
    close(lfd);
    tu_tracker_free(t);
}

/* knet_client_shutdown during a 30 s backoff wait returns, and ends dial_and_serve, at once. */
static void test_shutdown_during_backoff(void)
{
    int hold, port = tu_reserve_port(&hold);
    knet_client *c = tu_client_for_port(port);
    knet_client_enable_retry(c);
    knet_client_set_retry_backoff(c, 30000, 60000);
    long w0 = tu_counter_get(&nwaits);
    tu_client tc;
    tu_client_start(&tc, c, NULL, NULL);
    WAIT_GE(&nwaits, w0 + 1);
    int64_t t0 = tu_now_ms();
    CHECK_EQ(knet_client_shutdown(c, 1000), 0);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    CHECK_LT(tu_now_ms() - t0, 5000);
    CHECK(knet_client_conn(c) == NULL);
    knet_client_free(c);
    close(hold);
}

/* Where the handler closes its own client. */
enum { IN_CONNECT, IN_RECEIVE, IN_DISCONNECT };
static knet_client *_Atomic self_cli;
static _Atomic int self_where, self_graceful, self_rc;

static void self_close(void)
{
    knet_client *c = atomic_load(&self_cli);
    int rc = atomic_load(&self_graceful) ? knet_client_shutdown(c, 1000) : knet_client_close(c);
    atomic_store(&self_rc, rc);
}

static void self_on_connect(tu_rec *r, bool connected)
{
    (void)r;
    int w = atomic_load(&self_where);
    if ((connected && w == IN_CONNECT) || (!connected && w == IN_DISCONNECT))
        self_close();
}

static void self_on_receive(tu_rec *r, const void *buf, size_t len)
{
    (void)r;
    (void)buf;
    (void)len;
    if (atomic_load(&self_where) == IN_RECEIVE)
        self_close();
}

/* The client closed (or shut down) from inside its own connect(true), receive, or the
 * connect(false) of a connection the server dropped: the call returns 0, dial_and_serve
 * returns KNET_ECLIENTCLOSED, and there is no second connection although the listener
 * still accepts and retry is on. */
static void self_close_case(int where, bool graceful)
{
    int port;
    int lfd = tu_listen(&port, 0);
    tu_tracker *t = tu_tracker_new();
    t->on_connect = self_on_connect;
    t->on_receive = self_on_receive;
    knet_handler h = tu_tracker_handler(t);
    knet_client *c = tu_client_for_port(port);
    knet_client_enable_retry(c);
    knet_client_set_retry_backoff(c, 1, 1);
    atomic_store(&self_cli, c);
    atomic_store(&self_where, where);
    atomic_store(&self_graceful, graceful);
    atomic_store(&self_rc, 1);
    tu_client tc;
    tu_client_start(&tc, c, &h, NULL);
    int peer = accept_one(lfd);
    WAIT_GE(&t->connects, 1);
    if (where == IN_RECEIVE)
        tu_write_str(peer, "x");
    if (where == IN_DISCONNECT)
        close(peer); /* the server drops the client; it would re-dial at once */
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    CHECK_EQ(atomic_load(&self_rc), 0);
    CHECK_EQ(tu_counter_get(&t->connects), 1);
    CHECK_EQ(tu_counter_get(&t->disconnects), 1);
    int reason = atomic_load(&t->recs[0].reason);
    if (where == IN_DISCONNECT)
        CHECK_EQ(reason, KNET_EOF);
    else if (!graceful)
        CHECK_EQ(reason, KNET_ECLIENTCLOSED);
    /* No re-dial reached the listener. */
    struct pollfd p = {lfd, POLLIN, 0};
    CHECK_EQ(poll(&p, 1, 50), 0);
    if (where != IN_DISCONNECT) {
        EXPECT_PEER_CLOSED(peer);
        close(peer);
    }
    knet_client_free(c);
    close(lfd);
    tu_tracker_free(t);
}

static void test_close_in_own_callbacks(void)
{
    for (int g = 0; g < 2; g++) {
        self_close_case(IN_CONNECT, g);
        self_close_case(IN_RECEIVE, g);
        self_close_case(IN_DISCONNECT, g);
    }
}

/* The server drops the client's connection while another thread closes the client, 60
 * times with the close at varying points of the re-dial (retry on, the listener still
 * accepting): every close returns 0, dial_and_serve returns KNET_ECLIENTCLOSED within a
 * bound, callbacks stay balanced, nothing leaks. */
static void test_close_races_redial(void)
{
    enum { ROUNDS = 60 };
    int port;
    int lfd = tu_listen(&port, 0);
    for (int i = 0; i < ROUNDS; i++) {
        tu_tracker *t = tu_tracker_new();
        t->on_connect = alternate_hook;
        atomic_store(&up, 0);
        atomic_store(&alternation_errors, 0);
        knet_handler h = tu_tracker_handler(t);
        knet_client *c = tu_client_for_port(port);
        knet_client_enable_retry(c);
        knet_client_set_retry_backoff(c, 1, 4);
        tu_client tc;
        tu_client_start(&tc, c, &h, NULL);
            int peer = accept_one(lfd);
        WAIT_GE(&t->connects, 1);
        tu_set_linger0(peer); /* a reset: the client's end is immediate */
        close(peer);
        for (volatile int spin = 0; spin < (i % 12) * 2000; spin++) {
        }
        int64_t t0 = tu_now_ms();
        CHECK_EQ(knet_client_close(c), 0);
        CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
        CHECK_LT(tu_now_ms() - t0, 5000);
        CHECK_EQ(tu_counter_get(&t->connects), tu_counter_get(&t->disconnects));
        CHECK_LE(tu_counter_get(&t->connects), 2);
        CHECK_EQ(atomic_load(&alternation_errors), 0);
        knet_client_free(c);
        /* A re-dial that got through before the close: take and drop it. */
        struct pollfd p = {lfd, POLLIN, 0};
        while (poll(&p, 1, 0) == 1) {
            int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
            CHECK_GE(fd, 0);
            close(fd);
        }
        tu_tracker_free(t);
    }
    close(lfd);
}

/* ------------------------------------------------------------------ retry */

/* The server resets the connection right after accepting it (retry off): the
 * connection was served (connect(true), then connect(false) with -ECONNRESET), the
 * client re-dials at once; the listener is gone, so dial_and_serve returns -ECONNREFUSED. */
static void test_reset_after_accept_retry_off(void)
{
    int holder = reuse_socket(0, -1);
    int port = tu_sock_port(holder);
    int lfd = reuse_socket(port, 8);
    tu_tracker *t = tu_tracker_new();
    knet_handler h = tu_tracker_handler(t);
    knet_client *c = tu_client_for_port(port);
    tu_client tc;
    tu_client_start(&tc, c, &h, NULL);
    int peer = accept_one(lfd);
    WAIT_GE(&t->connects, 1);
    close(lfd);
    tu_set_linger0(peer);
    close(peer);
    int64_t t0 = tu_now_ms();
    CHECK_EQ(tu_client_join(&tc), -ECONNREFUSED);
    CHECK_LT(tu_now_ms() - t0, 5000);
    CHECK_EQ(tu_counter_get(&t->disconnects), 1);
    CHECK_EQ(atomic_load(&t->recs[0].reason), -ECONNRESET);
    knet_client_free(c);
    close(holder);
    tu_tracker_free(t);
}

/* Retry turned off while the client backs off: the outage's dials stop with the
 * refused error at the next failure after the disable, without another wait. */
static void test_disable_retry_during_backoff(void)
{
    int hold, port = tu_reserve_port(&hold);
    knet_client *c = tu_client_for_port(port);
    knet_client_enable_retry(c);
    knet_client_set_retry_backoff(c, 20, 20);
    long w0 = tu_counter_get(&nwaits);
    tu_client tc;
    tu_client_start(&tc, c, NULL, NULL);
    WAIT_GE(&nwaits, w0 + 3);
    knet_client_disable_retry(c);
    CHECK_EQ(tu_client_join(&tc), -ECONNREFUSED);
    long after = tu_counter_get(&nwaits);
    /* At most the wait under way when the disable came was logged after it. */
    CHECK_LE(after, w0 + 5);
    knet_client_free(c);
    close(hold);
}

/* ------------------------------------------------------------------ sends while reconnecting */

/* A connection that ended stays refused (KNET_ECLOSED) while the client backs off and
 * after it connected again; knet_client_conn is NULL meanwhile; nothing sent on the old
 * connection reaches the new one. */
static void test_send_on_ended_conn_while_reconnecting(void)
{
    int holder = reuse_socket(0, -1);
    int port = tu_sock_port(holder);
    int lfd = reuse_socket(port, 8);
    tu_tracker *t = tu_tracker_new();
    knet_handler h = tu_tracker_handler(t);
    knet_client *c = tu_client_for_port(port);
    knet_client_enable_retry(c);
    knet_client_set_retry_backoff(c, 10, 40);
    tu_client tc;
    tu_client_start(&tc, c, &h, NULL);
    int peer = accept_one(lfd);
    tu_rec *first = tu_tracker_rec(t, 0);
    CHECK_EQ(knet_conn_send(first->conn, "one", 3), 0);
    char buf[16];
    READ_EXACT(peer, buf, 3);
    long w0 = tu_counter_get(&nwaits);
    close(lfd);
    close(peer);
    WAIT_GE(&t->disconnects, 1);
    WAIT_GE(&nwaits, w0 + 2); /* backing off */
    CHECK_EQ(knet_conn_send(first->conn, "stale", 5), KNET_ECLOSED);
    CHECK(knet_client_conn(c) == NULL);
    lfd = reuse_socket(port, 8);
    peer = accept_one(lfd);
    tu_rec *second = tu_tracker_rec(t, 1);
    CHECK_EQ(knet_conn_send(first->conn, "stale", 5), KNET_ECLOSED);
    CHECK_EQ(knet_conn_send(second->conn, "two", 3), 0);
    READ_EXACT(peer, buf, 3);
    CHECK_EQ(memcmp(buf, "two", 3), 0);
    CHECK_EQ(knet_client_close(c), 0);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    EXPECT_PEER_CLOSED(peer); /* nothing else came */
    knet_client_free(c);
    close(peer);
    close(lfd);
    close(holder);
    tu_tracker_free(t);
}

/* The dial's wait for the connect to complete fails (poll: ENOMEM) while the SYN is
 * unanswered (the listener's backlog is full). The socket is not connected: the dial
 * failed, with that error (retry off); no connect(true) for a connection that never
 * was (before: the socket, still connecting, was served as connected). */
static void test_dial_wait_fails(void)
{
    int lfd = reuse_socket(0, 0);
    int port = tu_sock_port(lfd);
    int filler = tu_connect(port); /* fills the backlog; never accepted */
    tu_tracker *t = tu_tracker_new();
    knet_handler h = tu_tracker_handler(t);
    knet_client *c = tu_client_for_port(port);
    atomic_store(&fail_dial_poll, ENOMEM);
    tu_client tc;
    tu_client_start(&tc, c, &h, NULL);
    WAIT_UNTIL(tu_counter_get(&tc.done) > 0 || tu_counter_get(&t->connects) > 0);
    CHECK_EQ(tu_counter_get(&t->connects), 0);
    CHECK_EQ(tu_client_join(&tc), -ENOMEM);
    CHECK_EQ(atomic_load(&fail_dial_poll), 0);
    knet_client_free(c);
    close(filler);
    close(lfd);
    tu_tracker_free(t);
}

/* ------------------------------------------------------------------ knet_client_conn */

static atomic_int dialer_held, dialer_go;

/* SIGUSR2 on the dialing thread: holds it (in its wait for the connection to end)
 * until dialer_go. Atomics and nanosleep only. */
static void hold_dialer(int sig)
{
    (void)sig;
    atomic_store(&dialer_held, 1);
    while (!atomic_load(&dialer_go)) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
}

/* Whether knet_client_conn(c) is NULL now (releasing what it returned). */
static bool client_conn_is_null(knet_client *c)
{
    knet_conn *conn = knet_client_conn(c);
    if (conn)
        knet_conn_release(conn);
    return conn == NULL;
}

/* knet.h: a closing connection stays current "until its connect(false) ran". Once it
 * ran, knet_client_conn returns NULL, also while the dialing thread has not yet woken
 * up to dial again (held here by a signal handler; on a loaded machine it can be late). */
static void test_client_conn_null_once_disconnected(void)
{
    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = hold_dialer;
    CHECK_EQ(sigaction(SIGUSR2, &sa, &old), 0);
    atomic_store(&dialer_held, 0);
    atomic_store(&dialer_go, 0);
    int port;
    int lfd = tu_listen(&port, 0);
    tu_tracker *t = tu_tracker_new();
    knet_handler h = tu_tracker_handler(t);
    knet_client *c = tu_client_for_port(port);
    tu_client tc;
    tu_client_start(&tc, c, &h, NULL);
    int peer = accept_one(lfd);
    WAIT_GE(&t->connects, 1);
    CHECK(!client_conn_is_null(c));
    CHECK_EQ(pthread_kill(tc.thread, SIGUSR2), 0);
    WAIT_UNTIL(atomic_load(&dialer_held));
    close(lfd); /* the re-dial (retry off) is refused: dial_and_serve returns */
    close(peer);
    WAIT_GE(&t->disconnects, 1);
    WAIT_UNTIL(client_conn_is_null(c));
    atomic_store(&dialer_go, 1);
    CHECK_EQ(tu_client_join(&tc), -ECONNREFUSED);
    CHECK(client_conn_is_null(c));
    knet_client_free(c);
    tu_tracker_free(t);
    CHECK_EQ(sigaction(SIGUSR2, &old, NULL), 0);
}

/* knet.h: a closing connection stays current "until its connect(false) ran": inside
 * that connect(false), knet_client_conn returns it (TCPClient.connection too). */
static atomic_int current_in_disconnect; /* 1: it was the connection, 2: another or NULL */

static void current_check_connect(knet_conn *conn, bool connected, void *ud)
{
    if (connected)
        return;
    knet_client *c = ud;
    knet_conn *cur = knet_client_conn(c);
    atomic_store(&current_in_disconnect, cur == conn ? 1 : 2);
    if (cur)
        knet_conn_release(cur);
    knet_client_close(c);
}

static void test_client_conn_current_in_own_disconnect(void)
{
    atomic_store(&current_in_disconnect, 0);
    int port;
    int lfd = tu_listen(&port, 0);
    knet_client *c = tu_client_for_port(port);
    knet_handler h = {current_check_connect, NULL, c};
    tu_client tc;
    tu_client_start(&tc, c, &h, NULL);
    int peer = accept_one(lfd);
    close(peer); /* ends the connection: connect(false) */
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    CHECK_EQ(atomic_load(&current_in_disconnect), 1);
    CHECK(client_conn_is_null(c));
    knet_client_free(c);
    close(lfd);
}

/* A backoff wait whose poll fails (ENOMEM, 3 times in a row) still waits out its time
 * before the next dial, rather than dialing at once. */
static void test_backoff_poll_fails(void)
{
    enum { WAIT_MS = 200 };
    int hold, port = tu_reserve_port(&hold);
    knet_client *c = tu_client_for_port(port);
    knet_client_enable_retry(c);
    knet_client_set_retry_backoff(c, WAIT_MS, WAIT_MS);
    long w0 = tu_counter_get(&nwaits);
    atomic_store(&fail_backoff_polls, 3);
    tu_client tc;
    tu_client_start(&tc, c, NULL, NULL);
    WAIT_GE(&nwaits, w0 + 3);
    CHECK_EQ(knet_client_close(c), 0);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    CHECK_EQ(atomic_load(&fail_backoff_polls), 0);
    pthread_mutex_lock(&log_mu);
    int64_t gap = wait_at[w0 + 1] - wait_at[w0]; /* the first wait, its polls failing */
    pthread_mutex_unlock(&log_mu);
    printf("  the wait whose polls failed: next dial after %lld ms\n", (long long)gap);
    CHECK_GE(gap, WAIT_MS - 5);
    knet_client_free(c);
    close(hold);
}

/* A close during a backoff wait whose polls keep failing (ENOMEM) ends it after at
 * most one of its naps, as a close ends a backoff wait at once otherwise (before:
 * the close was noticed only once the whole wait, 4 s here, was over). */
static void test_close_during_failing_backoff(void)
{
    enum { WAIT_MS = 4000 };
    int hold, port = tu_reserve_port(&hold);
    knet_client *c = tu_client_for_port(port);
    knet_client_enable_retry(c);
    knet_client_set_retry_backoff(c, WAIT_MS, WAIT_MS);
    long w0 = tu_counter_get(&nwaits);
    atomic_store(&fail_backoff_polls, 1000000); /* every poll of the wait fails */
    tu_client tc;
    tu_client_start(&tc, c, NULL, NULL);
    WAIT_GE(&nwaits, w0 + 1); /* the first dial was refused: the wait is under way */
    int64_t t0 = tu_now_ms();
    CHECK_EQ(knet_client_close(c), 0);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    int64_t took = tu_now_ms() - t0;
    atomic_store(&fail_backoff_polls, 0);
    if (took >= 1000) fprintf(stderr, "dial_and_serve returned %lld ms after the close\n", (long long)took);
    CHECK_LT(took, 1000);
    knet_client_free(c);
    close(hold);
}

int main(void)
{
    tu_counter_init(&nwaits);
    knet_set_log(log_sink, KNET_LOG_WARN, NULL);
    tu_begin();
    RUN(test_flapping_listener);
    RUN(test_flapping_knet_server);
    RUN(test_shutdown_while_dialing);
    RUN(test_shutdown_during_backoff);
    RUN(test_close_in_own_callbacks);
    RUN(test_close_races_redial);
    RUN(test_reset_after_accept_retry_off);
    RUN(test_disable_retry_during_backoff);
    RUN(test_send_on_ended_conn_while_reconnecting);
    RUN(test_client_conn_null_once_disconnected);
    RUN(test_client_conn_current_in_own_disconnect);
    RUN(test_dial_wait_fails);
    RUN(test_backoff_poll_fails);
    RUN(test_close_during_failing_backoff);
    knet_set_log(NULL, KNET_LOG_WARN, NULL);
    return tu_end();
}
