/* The accept path under stress and faults: out of descriptors (no spin, back-off,
 * recovery), accept4 denied before it takes the connection (back-off, not a spin),
 * a connect storm spread over the loops, a close racing a burst of connects
 * (callbacks and counters consistent). */
#include "testutil.h"

#include <fcntl.h>
#include <sys/resource.h>

/* accept4 wrapped (white-box): with deny set it fails with EPERM before taking the
 * pending connection, as a Linux security module's socket_accept hook (or a
 * seccomp filter) does; the connection stays queued and the listener readable. */
int __real_accept4(int fd, struct sockaddr *sa, socklen_t *sl, int flags);
int __wrap_accept4(int fd, struct sockaddr *sa, socklen_t *sl, int flags);
static atomic_bool deny;
static atomic_long accept_calls;

int __wrap_accept4(int fd, struct sockaddr *sa, socklen_t *sl, int flags)
{
    atomic_fetch_add(&accept_calls, 1);
    if (atomic_load(&deny)) {
        errno = EPERM;
        return -1;
    }
    return __real_accept4(fd, sa, sl, flags);
}

/* ------------------------------------------------------------------ counting handler */

typedef struct counts {
    atomic_long up, down, rx;
    atomic_long per_loop[64];
} counts;

static _Thread_local int tl_loop_slot = -1;
static atomic_int next_slot;

static void cnt_connect(knet_conn *c, bool connected, void *ud)
{
    (void)c;
    counts *k = ud;
    if (connected) {
        if (tl_loop_slot < 0)
            tl_loop_slot = atomic_fetch_add(&next_slot, 1);
        atomic_fetch_add(&k->per_loop[tl_loop_slot % 64], 1);
        atomic_fetch_add(&k->up, 1);
    } else {
        atomic_fetch_add(&k->down, 1);
    }
}

static void cnt_receive(knet_conn *c, const void *buf, size_t len, void *ud)
{
    counts *k = ud;
    atomic_fetch_add(&k->rx, (long)len);
    (void)knet_conn_send(c, buf, len);
}

/* Starts an echo server on 127.0.0.1:0 whose callbacks count into k (zeroed); returns
 * its port. */
static int counting_server_start(tu_server *ts, counts *k)
{
    memset(k, 0, sizeof *k);
    knet_handler h = {cnt_connect, cnt_receive, k};
    int port = tu_server_start(ts, "127.0.0.1:0", &h, NULL);
    CHECK_GT(port, 0);
    return port;
}

static knet_stats stats_of(knet_server *s)
{
    knet_stats st;
    knet_server_stats(s, &st);
    return st;
}

static atomic_long accept_logs;
static void count_log(int level, const char *msg, void *ud)
{
    (void)level;
    (void)ud;
    if (strstr(msg, "accept error"))
        atomic_fetch_add(&accept_logs, 1);
}

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

/* ------------------------------------------------------------------ EMFILE in process */

/* Out of descriptors: the listener backs off (little CPU over a bounded interval),
 * the existing connection keeps echoing, and once descriptors free up every
 * waiting connection is accepted. */
static void test_emfile_backoff_in_process(void)
{
    enum { WAITING = 4 };
    counts k;
    tu_server ts;
    int port = counting_server_start(&ts, &k);
    int keeper = tu_connect(port);
    WAIT_UNTIL(atomic_load(&k.up) == 1);

    int cl[WAITING];
    for (int i = 0; i < WAITING; i++) {
        cl[i] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        CHECK_GE(cl[i], 0);
    }
    /* Fill every free descriptor below a limit, then lower the limit to it. */
    struct rlimit old;
    CHECK_EQ(getrlimit(RLIMIT_NOFILE, &old), 0);
    int maxfd = 0;
    DIR *d = opendir("/proc/self/fd");
    CHECK(d != NULL);
    for (struct dirent *e; (e = readdir(d));)
        if (atoi(e->d_name) > maxfd)
            maxfd = atoi(e->d_name);
    closedir(d);
    int fill[1024], nfill = 0, top;
    for (;;) { /* open returns the lowest free number: above maxfd, no hole is left */
        CHECK_LT(nfill, 1024);
        top = fill[nfill++] = open("/dev/null", O_RDONLY | O_CLOEXEC);
        CHECK_GE(top, 0);
        if (top > maxfd)
            break;
    }
    struct rlimit low = old;
    low.rlim_cur = (rlim_t)top + 1;
    atomic_store(&accept_logs, 0);
    knet_set_log(count_log, KNET_LOG_WARN, NULL);
    CHECK_EQ(setrlimit(RLIMIT_NOFILE, &low), 0);

    struct sockaddr_in a = tu_loopback(port);
    for (int i = 0; i < WAITING; i++)
        CHECK_EQ(connect(cl[i], (struct sockaddr *)&a, sizeof a), 0);
    WAIT_UNTIL(atomic_load(&accept_logs) >= 1);

    double c0 = cpu_seconds();
    int64_t t0 = tu_now_ms();
    /* The existing connection keeps echoing meanwhile. */
    for (int i = 0; i < 20; i++) {
        char out = (char)('a' + i), in;
        tu_write_all(keeper, &out, 1);
        READ_EXACT(keeper, &in, 1);
        CHECK_EQ(in, out);
    }
    while (tu_now_ms() - t0 < 1500)
        tu_sleep_ms(50); /* a measuring interval, not synchronisation */
    double cpu = cpu_seconds() - c0;
    long logs = atomic_load(&accept_logs);
    printf("  out of fds: %.3f s CPU in 1.5 s, %ld accept-error logs, up %ld\n", cpu, logs,
           atomic_load(&k.up));
    CHECK_EQ(atomic_load(&k.up), 1);
    CHECK(cpu < 0.3);

    /* Descriptors back: every waiting connection is accepted. */
    CHECK_EQ(setrlimit(RLIMIT_NOFILE, &old), 0);
    for (int i = 0; i < nfill; i++)
        close(fill[i]);
    int64_t r0 = tu_now_ms();
    WAIT_UNTIL(atomic_load(&k.up) == 1 + WAITING);
    printf("  recovered in %lld ms\n", (long long)(tu_now_ms() - r0));
    knet_set_log(NULL, KNET_LOG_WARN, NULL);
    knet_stats st = stats_of(ts.srv);
    CHECK_EQ(st.accepted, 1 + WAITING);
    for (int i = 0; i < WAITING; i++)
        close(cl[i]);
    close(keeper);
    WAIT_UNTIL(atomic_load(&k.down) == 1 + WAITING);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
}

/* ------------------------------------------------------------------ EPERM */

/* accept4 denied with EPERM (the pending connection is not taken): the listener
 * must back off and say so, as for EMFILE, not retry at once forever. */
static void test_eperm_does_not_spin(void)
{
    counts k;
    tu_server ts;
    int port = counting_server_start(&ts, &k);
    atomic_store(&accept_logs, 0);
    knet_set_log(count_log, KNET_LOG_WARN, NULL);
    atomic_store(&deny, true);
    atomic_store(&accept_calls, 0);
    int fd = tu_connect(port); /* completes in the backlog; accept4 is denied */
    WAIT_UNTIL(atomic_load(&accept_calls) >= 1);
    double c0 = cpu_seconds();
    int64_t t0 = tu_now_ms();
    long calls0 = atomic_load(&accept_calls);
    while (tu_now_ms() - t0 < 500)
        tu_sleep_ms(20); /* a measuring interval, not synchronisation */
    double cpu = cpu_seconds() - c0;
    long calls = atomic_load(&accept_calls) - calls0;
    printf("  accept4 denied (EPERM) for 500 ms: %ld accept4 calls, %.3f s CPU, %ld logs\n",
           calls, cpu, atomic_load(&accept_logs));
    atomic_store(&deny, false);
    WAIT_UNTIL(atomic_load(&k.up) == 1); /* served once allowed */
    knet_set_log(NULL, KNET_LOG_WARN, NULL);
    close(fd);
    WAIT_UNTIL(atomic_load(&k.down) == 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    CHECK_LT(calls, 100); /* a back-off: 5 ms doubling gives ~7 in 500 ms */
    CHECK(cpu < 0.2); /* spinning: about 0.5 s */
    CHECK_GE(atomic_load(&accept_logs), 1);
}

/* ------------------------------------------------------------------ storm */

/* A connect to a that completes in the listener's backlog, not waited for. */
static int connect_nonblocking(const struct sockaddr_in *a)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    CHECK_GE(fd, 0);
    int r = connect(fd, (const struct sockaddr *)a, sizeof *a);
    CHECK(r == 0 || errno == EINPROGRESS);
    return fd;
}

/* 2,000 connects while 4 connections echo: all accepted, counters exact, spread
 * over the loops (each takes two descriptors here: the soft limit is raised). */
static void test_connect_storm(void)
{
    enum { STORM = 2000, BUSY = 4 };
    struct rlimit rl;
    CHECK_EQ(getrlimit(RLIMIT_NOFILE, &rl), 0);
    if (rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        CHECK_EQ(setrlimit(RLIMIT_NOFILE, &rl), 0);
    }
    if (rl.rlim_cur < 2 * STORM + 200) {
        printf("  skipped: %llu descriptors allowed\n", (unsigned long long)rl.rlim_cur);
        return;
    }
    counts k;
    tu_server ts;
    int port = counting_server_start(&ts, &k);
    int busy[BUSY];
    for (int i = 0; i < BUSY; i++)
        busy[i] = tu_connect(port);
    WAIT_UNTIL(atomic_load(&k.up) == BUSY);
    int *fds = calloc(STORM, sizeof *fds);
    struct sockaddr_in a = tu_loopback(port);
    for (int i = 0; i < STORM; i++) {
        fds[i] = connect_nonblocking(&a);
        if (i % 100 == 0) {
            char out = 'x', in;
            tu_write_all(busy[i / 100 % BUSY], &out, 1);
            READ_EXACT(busy[i / 100 % BUSY], &in, 1);
        }
    }
    WAIT_UNTIL(atomic_load(&k.up) == BUSY + STORM);
    knet_stats st = stats_of(ts.srv);
    CHECK_EQ(st.accepted, BUSY + STORM);
    CHECK_EQ(st.live, BUSY + STORM);
    CHECK_EQ(st.refused, 0);
    for (unsigned i = 0; i < 64; i++)
        if (atomic_load(&k.per_loop[i]))
            printf("  loop slot %u: %ld\n", i, atomic_load(&k.per_loop[i]));
    for (int i = 0; i < STORM; i++)
        close(fds[i]);
    free(fds);
    for (int i = 0; i < BUSY; i++)
        close(busy[i]);
    WAIT_UNTIL(atomic_load(&k.down) == BUSY + STORM);
    WAIT_UNTIL(stats_of(ts.srv).live == 0);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
}

/* ------------------------------------------------------------------ close vs burst */

static void test_close_races_burst(void)
{
    enum { BURST = 600 };
    for (int round = 0; round < 5; round++) {
        counts k;
        tu_server ts;
        int port = counting_server_start(&ts, &k);
        int fds[BURST];
        struct sockaddr_in a = tu_loopback(port);
        for (int i = 0; i < BURST; i++) {
            fds[i] = connect_nonblocking(&a);
            if (i == BURST / 2 + round * 20)
                CHECK_EQ(knet_server_close(ts.srv), 0);
        }
        WAIT_GE(&ts.done, 1);
        knet_stats st = stats_of(ts.srv);
        CHECK_EQ(atomic_load(&k.up), atomic_load(&k.down));
        CHECK_EQ(st.live, 0);
        CHECK_GE((long)st.accepted, atomic_load(&k.up));
        printf("  round %d: accepted %llu, served %ld\n", round, (unsigned long long)st.accepted,
               atomic_load(&k.up));
        CHECK_EQ(tu_server_join(&ts), KNET_ESERVERCLOSED);
        for (int i = 0; i < BURST; i++)
            close(fds[i]);
    }
}

int main(int argc, char **argv)
{
    tu_begin();
    const char *only = argc > 1 ? argv[1] : NULL;
#define MAYBE(fn) if (!only || strcmp(only, #fn) == 0) RUN(fn)
    MAYBE(test_emfile_backoff_in_process);
    MAYBE(test_eperm_does_not_spin);
    MAYBE(test_close_races_burst);
    MAYBE(test_connect_storm);
    return tu_end();
}
