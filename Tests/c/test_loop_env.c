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

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    RUN(test_zero_means_online_cpus); /* before tu_begin, whose warm-up starts the loops */
    tu_begin();
    RUN(test_env_sets_loop_threads_and_conns_spread);
    return tu_end();
}
