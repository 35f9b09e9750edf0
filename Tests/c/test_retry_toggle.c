/* knet_client_enable_retry / knet_client_disable_retry are thread-safe and apply to a
 * dial that fails after the call, also when that dial began before it: connect is
 * wrapped at link time to hold a chosen dial until the test lets it go on (and
 * getsockopt, to hold one after its wait for the connect ended). */
#include "testutil.h"

int __real_connect(int fd, const struct sockaddr *addr, socklen_t len);
int __wrap_connect(int fd, const struct sockaddr *addr, socklen_t len);
static void hold_result(void);

static _Atomic int hold_dials;  /* dials to hold in connect */
static tu_counter dials;        /* connect calls made by dials */
static tu_counter released;     /* how many held dials may go on */

int __wrap_connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    long n = tu_counter_get(&dials);
    tu_counter_add(&dials, 1);
    if (atomic_load(&hold_dials) > 0) {
        atomic_fetch_sub(&hold_dials, 1);
        CHECK(tu_counter_wait_ge(&released, n + 1, TU_DEADLINE_MS));
    }
    int rc = __real_connect(fd, addr, len);
    if (rc < 0 && errno != EINPROGRESS) { /* refused at once: the result is known here */
        int e = errno;
        hold_result();
        errno = e;
    }
    return rc;
}

/* Starts a client (retry as given, the backoff initial..max) on a port whose dials
 * are refused, and returns once its first dial is held in connect. */
static knet_client *start_held_dial(tu_client *tc, int *holder, bool retry, uint32_t initial,
                                    uint32_t max)
{
    int port = tu_reserve_port(holder); /* bound, not listening: dials are refused */
    knet_client *cli = tu_client_for_port(port);
    if (retry)
        knet_client_enable_retry(cli);
    knet_client_set_retry_backoff(cli, initial, max);
    tu_counter_init(&dials);
    tu_counter_init(&released);
    atomic_store(&hold_dials, 1);
    tu_client_start(tc, cli, NULL, NULL);
    WAIT_GE(&dials, 1); /* the first dial is in connect */
    return cli;
}

/* Retry enabled while the first dial is under way (retry off when it began): the
 * refused dial is retried, dial_and_serve does not return -ECONNREFUSED. */
static void test_enable_retry_during_dial(void)
{
    int holder;
    tu_client tc;
    knet_client *cli = start_held_dial(&tc, &holder, false, 1, 1);
    knet_client_enable_retry(cli);
    tu_counter_add(&released, 1000000); /* let it (and every later dial) go on */
    /* Retried: a second dial comes, dial_and_serve goes on until closed. */
    bool redialed = tu_counter_wait_ge(&dials, 2, 5000);
    if (!redialed) {
        pthread_mutex_lock(&tc.done.mu);
        fprintf(stderr, "no second dial; dial_and_serve returned %d (%s)\n", tc.rc, knet_strerror(tc.rc));
        pthread_mutex_unlock(&tc.done.mu);
    }
    CHECK(redialed);
    CHECK_EQ(knet_client_close(cli), 0);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    knet_client_free(cli);
    close(holder);
    tu_counter_destroy(&dials);
    tu_counter_destroy(&released);
}

/* Retry disabled while a dial is under way (retry on when it began): the refused dial
 * makes dial_and_serve return its error, with no backoff wait and no further dial. */
static void test_disable_retry_during_dial(void)
{
    int holder;
    tu_client tc;
    knet_client *cli = start_held_dial(&tc, &holder, true, 30000, 60000); /* a retry would wait 30 s */
    knet_client_disable_retry(cli);
    tu_counter_add(&released, 1000000);
    bool returned = tu_counter_wait_ge(&tc.done, 1, 5000);
    if (!returned) fprintf(stderr, "dial_and_serve still running 5 s after a refused dial with retry off\n");
    CHECK(returned);
    CHECK_EQ(tu_client_join(&tc), -ECONNREFUSED);
    CHECK_EQ(tu_counter_get(&dials), 1);
    knet_client_free(cli);
    close(holder);
    tu_counter_destroy(&dials);
    tu_counter_destroy(&released);
}

/* Holds a dial that has its connect's result: after connect refused at once, or, once
 * the wait for an EINPROGRESS connect ended, in getsockopt(SO_ERROR). */
int __real_getsockopt(int fd, int level, int name, void *val, socklen_t *len);
int __wrap_getsockopt(int fd, int level, int name, void *val, socklen_t *len);

static _Atomic int hold_results; /* dials to hold as they have their connect's result */
static tu_counter results;       /* dials holding there */

static void hold_result(void)
{
    if (atomic_load(&hold_results) > 0) {
        atomic_fetch_sub(&hold_results, 1);
        tu_counter_add(&results, 1);
        CHECK(tu_counter_wait_ge(&released, 2, TU_DEADLINE_MS));
    }
}

int __wrap_getsockopt(int fd, int level, int name, void *val, socklen_t *len)
{
    if (level == SOL_SOCKET && name == SO_ERROR) hold_result();
    return __real_getsockopt(fd, level, name, val, len);
}

/* A close made once a refused dial's wait has ended, before dial_and_serve returns
 * (retry off), wins over that dial's failure: dial_and_serve returns
 * KNET_ECLIENTCLOSED, as knet.h promises after a close (before: -ECONNREFUSED). */
static void test_close_as_dial_fails(void)
{
    int holder;
    tu_client tc;
    tu_counter_init(&results);
    atomic_store(&hold_results, 1);
    knet_client *cli = start_held_dial(&tc, &holder, false, 1, 1);
    tu_counter_add(&released, 1); /* connect goes on: refused, seen by the wait */
    WAIT_GE(&results, 1);         /* held reading the result: the wait is over */
    CHECK_EQ(knet_client_close(cli), 0);
    tu_counter_add(&released, 1);
    int rc = tu_client_join(&tc);
    if (rc != KNET_ECLIENTCLOSED) fprintf(stderr, "dial_and_serve returned %d (%s)\n", rc, knet_strerror(rc));
    CHECK_EQ(rc, KNET_ECLIENTCLOSED);
    CHECK_EQ(tu_counter_get(&dials), 1);
    knet_client_free(cli);
    close(holder);
    tu_counter_destroy(&dials);
    tu_counter_destroy(&released);
    tu_counter_destroy(&results);
}

int main(void)
{
    tu_begin();
    RUN(test_enable_retry_during_dial);
    RUN(test_disable_retry_during_dial);
    RUN(test_close_as_dial_fails);
    return tu_end();
}
