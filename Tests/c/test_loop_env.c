/* KNET_LOOP_THREADS (set to 3 by ctest for this program) picks the number of
 * loop threads when knet_set_loop_threads was not called; accepted
 * connections are spread round-robin over those loops. */
#include "testutil.h"

static void test_env_sets_loop_threads_and_conns_spread(void)
{
    CHECK_EQ(knet_loop_threads(), 3);
    tu_tracker *t = tu_tracker_new();
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, NULL);
    CHECK_GT(port, 0);
    CHECK_EQ(knet_loop_threads(), 3);
    CHECK_EQ(knet_set_loop_threads(5), KNET_EBUSY); /* the loops run now */

    enum { N = 6 };
    int fds[N];
    for (int i = 0; i < N; i++) {
        fds[i] = tu_connect(port);
        (void)tu_tracker_rec(t, i); /* waits for its connect(true) */
    }
    pthread_t seen[N];
    int nseen = 0;
    for (int i = 0; i < N; i++) {
        pthread_t th = t->recs[i].thread;
        bool known = false;
        for (int j = 0; j < nseen; j++) known = known || pthread_equal(seen[j], th);
        if (!known) seen[nseen++] = th;
    }
    CHECK_EQ(nseen, 3); /* six consecutive accepts land on all three loops */

    for (int i = 0; i < N; i++) close(fds[i]);
    WAIT_GE(&t->disconnects, N);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* knet_set_loop_threads(0) means the online CPUs, whatever KNET_LOOP_THREADS says
 * (the variable counts only when the function was not called). Before the loops
 * start, so knet_set_loop_threads(3) restores what the environment asked for. */
static void test_zero_means_online_cpus(void)
{
    CHECK_EQ(knet_loop_threads(), 3); /* the environment's, while not called */
    CHECK_EQ(knet_set_loop_threads(0), 0);
    CHECK_EQ(knet_loop_threads(), (unsigned)sysconf(_SC_NPROCESSORS_ONLN));
    CHECK_EQ(knet_set_loop_threads(3), 0);
}

/* A log sink may ask for the loop count (it must only not start, stop or free a server
 * or client). With a KNET_LOOP_THREADS knet ignores, knet_loop_threads warns about it:
 * that warning must not call the sink again and again (before: every call warned, so a
 * sink asking for the count recursed without end and overflowed the stack). */
static atomic_int sink_depth, sink_max_depth, sink_warnings;

static void counting_sink(int level, const char *msg, void *ud)
{
    (void)level;
    (void)ud;
    if (strstr(msg, "KNET_LOOP_THREADS"))
        atomic_fetch_add(&sink_warnings, 1);
    int d = atomic_fetch_add(&sink_depth, 1) + 1;
    if (d > atomic_load(&sink_max_depth))
        atomic_store(&sink_max_depth, d);
    if (d < 50) /* the test's own bound: a crash would say less */
        CHECK_GT(knet_loop_threads(), 0);
    atomic_fetch_sub(&sink_depth, 1);
}

static void test_sink_asking_loop_count_with_bad_env(void)
{
    unsigned cpus = (unsigned)sysconf(_SC_NPROCESSORS_ONLN);
    CHECK_EQ(setenv("KNET_LOOP_THREADS", "three", 1), 0);
    knet_set_log(counting_sink, KNET_LOG_DEBUG, NULL);
    CHECK_EQ(knet_loop_threads(), cpus);
    CHECK_EQ(knet_loop_threads(), cpus);
    knet_set_log(NULL, KNET_LOG_WARN, NULL);
    CHECK_EQ(setenv("KNET_LOOP_THREADS", "3", 1), 0);
    CHECK_EQ(atomic_load(&sink_max_depth), 1);
    CHECK_GE(atomic_load(&sink_warnings), 1); /* the bad value is still reported */
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    RUN(test_sink_asking_loop_count_with_bad_env); /* before anything sets the count */
    RUN(test_zero_means_online_cpus); /* before tu_begin, whose warm-up starts the loops */
    tu_begin();
    RUN(test_env_sets_loop_threads_and_conns_spread);
    return tu_end();
}
