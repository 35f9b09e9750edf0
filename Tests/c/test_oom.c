/* Out of memory where knet stops things. A server's close and shutdown reach the
 * loops through task nodes made when it started serving, and every connection has
 * its timer's heap slot from its attach, so neither a stop nor a graceful close
 * needs an allocation (before: a lost stop task left listen_and_serve blocked for
 * good, a timer heap that could not grow aborted the process). A connection whose
 * loop cannot make that room is closed at attach, with no callbacks, and the server
 * goes on; a client connection that cannot be handed to its loop is a failed dial.
 * malloc and realloc are wrapped at link time to fail on demand. */
#include "testutil.h"

void *__real_malloc(size_t n);
void *__wrap_malloc(size_t n);
void *__real_realloc(void *p, size_t n);
void *__wrap_realloc(void *p, size_t n);

static _Thread_local bool tls_fail_malloc; /* this thread's mallocs fail */
static _Atomic bool fail_realloc;          /* every realloc fails */
static _Atomic long failed;                /* allocations refused */

void *__wrap_malloc(size_t n)
{
    if (tls_fail_malloc) {
        atomic_fetch_add(&failed, 1);
        errno = ENOMEM;
        return NULL;
    }
    return __real_malloc(n);
}

void *__wrap_realloc(void *p, size_t n)
{
    if (atomic_load(&fail_realloc)) {
        atomic_fetch_add(&failed, 1);
        errno = ENOMEM;
        return NULL;
    }
    return __real_realloc(p, n);
}

enum { PEERS = 4 };

/* Stops a server with PEERS connections (one round trip each) while every allocation
 * of the stopping thread fails: the stop allocates nothing, and it all happens —
 * connect(false) for each connection (a close's KNET_ESERVERCLOSED; a shutdown's 0,
 * once the peer closed in turn), the listener closed, listen_and_serve returned. */
static void stop_allocates_nothing(bool graceful)
{
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int peers[PEERS];
    for (int i = 0; i < PEERS; i++) {
        peers[i] = tu_connect(port);
        char b;
        tu_write_str(peers[i], "x");
        READ_EXACT(peers[i], &b, 1);
    }
    WAIT_GE(&t->connects, PEERS);
    atomic_store(&failed, 0);
    tls_fail_malloc = true;
    int rc = graceful ? knet_server_shutdown(ts.srv, TU_DEADLINE_MS) : knet_server_close(ts.srv);
    tls_fail_malloc = false;
    CHECK_EQ(rc, 0);
    CHECK_EQ(atomic_load(&failed), 0);
    for (int i = 0; i < PEERS; i++) {
        EXPECT_PEER_CLOSED(peers[i]); /* the close, or the shutdown's FIN */
        close(peers[i]);
    }
    CHECK_EQ(tu_server_join(&ts), KNET_ESERVERCLOSED);
    CHECK_EQ(tu_counter_get(&t->disconnects), PEERS);
    for (int i = 0; i < PEERS; i++)
        CHECK_EQ(atomic_load(&t->recs[i].reason), graceful ? 0 : KNET_ESERVERCLOSED);
    CHECK_EQ(tu_try_connect_ex(port, 0), -ECONNREFUSED);
    tu_tracker_free(t);
}

static void test_close_allocates_nothing(void) { stop_allocates_nothing(false); }

static void test_shutdown_allocates_nothing(void) { stop_allocates_nothing(true); }

static _Atomic int no_room_logged; /* error lines about a connection's timer room */

static void counting_sink(int level, const char *msg, void *ud)
{
    (void)ud;
    if (level == KNET_LOG_ERROR && strstr(msg, "no room for a connection's timer"))
        atomic_fetch_add(&no_room_logged, 1);
}

enum { MANY = 200 }; /* 100 a loop: past the 64 timer slots a loop starts with */

/* With realloc failing, connections beyond a loop's timer room are closed at attach
 * (the peer reads EOF or a reset; no callbacks) while the others are served; a shutdown then
 * starts every served connection's timer without allocating, and each ends
 * gracefully. */
static void test_timer_room_taken_at_attach(void)
{
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    static int peers[MANY];
    static bool served[MANY];
    int nserved = 0;
    knet_set_log(counting_sink, KNET_LOG_WARN, NULL);
    atomic_store(&fail_realloc, true);
    for (int i = 0; i < MANY; i++) {
        peers[i] = tu_connect(port);
        tu_write_str(peers[i], "x");
        char b;
        ssize_t r = tu_read_full(peers[i], &b, 1); /* refused: EOF, or a reset (unread "x") */
        CHECK(r == 0 || r == -ECONNRESET || (r == 1 && b == 'x'));
        served[i] = r == 1;
        nserved += served[i];
    }
    printf("  %d of %d served, the rest closed at attach\n", nserved, MANY);
    CHECK_GE(nserved, 2 * 60);
    CHECK_LT(nserved, MANY);
    WAIT_UNTIL(tu_counter_get(&t->connects) == nserved);
    CHECK_EQ(atomic_load(&no_room_logged), MANY - nserved); /* one error line each */
    knet_set_log(NULL, KNET_LOG_WARN, NULL);

    CHECK_EQ(knet_server_shutdown(ts.srv, TU_DEADLINE_MS), 0);
    for (int i = 0; i < MANY; i++) {
        if (served[i])
            EXPECT_PEER_CLOSED(peers[i]);
        close(peers[i]);
    }
    CHECK_EQ(tu_server_join(&ts), KNET_ESERVERCLOSED);
    atomic_store(&fail_realloc, false);
    CHECK_EQ(tu_counter_get(&t->disconnects), nserved);
    for (int i = 0; i < nserved; i++)
        CHECK_EQ(atomic_load(&t->recs[i].reason), 0);
    tu_tracker_free(t);
}

/* Runs dial_and_serve with every allocation of the dialing thread failing. */
static void *failing_dialer(void *arg)
{
    tls_fail_malloc = true;
    void *r = tu_client_main(arg);
    tls_fail_malloc = false;
    return r;
}

/* A dialed connection that cannot be handed to its loop (the attach task's
 * allocation fails) is a failed dial, as knet.h says: with retry off
 * dial_and_serve returns -ENOMEM; the server side sees the connection closed; no
 * callbacks. */
static void test_client_attach_out_of_memory(void)
{
    int port;
    int lfd = tu_listen(&port, 0);
    tu_tracker *t = tu_tracker_new();
    tu_client tc;
    memset(&tc, 0, sizeof tc);
    tc.cli = tu_client_for_port(port); /* retry off */
    tc.handler = tu_tracker_handler(t);
    tu_counter_init(&tc.done);
    atomic_store(&failed, 0);
    CHECK_EQ(pthread_create(&tc.thread, NULL, failing_dialer, &tc), 0);
    CHECK_EQ(tu_client_join(&tc), -ENOMEM);
    CHECK_GE(atomic_load(&failed), 1);
    int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    CHECK_GE(fd, 0);
    EXPECT_PEER_CLOSED(fd);
    close(fd);
    knet_client_free(tc.cli);
    CHECK_EQ(tu_counter_get(&t->connects), 0);
    tu_tracker_free(t);
    close(lfd);
}

int main(void)
{
    CHECK_EQ(knet_set_loop_threads(2), 0);
    tu_begin();
    RUN(test_close_allocates_nothing);
    RUN(test_shutdown_allocates_nothing);
    RUN(test_timer_room_taken_at_attach);
    RUN(test_client_attach_out_of_memory);
    return tu_end();
}
