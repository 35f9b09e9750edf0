/* The persistent client: a refused dial with retry off returns -ECONNREFUSED at once;
 * with retry on it connects once a server appears; knet_client_close interrupts a
 * long backoff; it re-dials after the server closes the connection; knet_client_conn
 * returns the live connection; dial retries are logged at WARN through knet_set_log. */
#include "testutil.h"

#include <signal.h>

/* ------------------------------------------------------------------ log sink */

static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;
static tu_counter log_warns;  /* WARN-or-above lines received */
static int log_min_seen = 99; /* lowest level received */
static char log_last[512];
static int log_ud_token;

/* Custom sink: counts lines, keeps the last one, checks its ud. */
static void log_sink(int level, const char *msg, void *ud)
{
    CHECK(ud == &log_ud_token);
    CHECK(msg != NULL);
    pthread_mutex_lock(&log_mu);
    if (level < log_min_seen)
        log_min_seen = level;
    snprintf(log_last, sizeof log_last, "%s", msg);
    pthread_mutex_unlock(&log_mu);
    if (level >= KNET_LOG_WARN)
        tu_counter_add(&log_warns, 1);
}

/* ------------------------------------------------------------------ tests */

static void test_refused_without_retry(void)
{
    int hold;
    knet_client *c = tu_client_for_port(tu_reserve_port(&hold));
    CHECK(knet_client_conn(c) == NULL);
    int64_t t0 = tu_now_ms();
    CHECK_EQ(knet_client_dial_and_serve(c, NULL, NULL), -ECONNREFUSED);
    CHECK_LT(tu_now_ms() - t0, 5000);
    knet_client_free(c);
    close(hold);
}

static void test_bad_client_address(void)
{
    static const char *const bad[] = {"nonsense", "127.0.0.1:99999", "[::1", "127.0.0.1:"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        knet_client *c = knet_client_new(bad[i]);
        CHECK(c != NULL);
        int rc = knet_client_dial_and_serve(c, NULL, NULL);
        if (rc != KNET_EADDR) {
            fprintf(stderr, "address \"%s\"\n", bad[i]);
            CHECK_EQ(rc, KNET_EADDR);
        }
        knet_client_free(c);
    }
}

/* Retry on (20..200 ms backoff): the client keeps dialing (logging each failure at
 * WARN through the custom sink) and connects once a server appears on the port. */
static void test_retry_until_server_appears(void)
{
    int hold, port = tu_reserve_port(&hold);
    long warns0 = tu_counter_get(&log_warns);

    tu_tracker *ct = tu_tracker_new();
    knet_handler ch = tu_tracker_handler(ct);
    knet_client *c = tu_client_for_port(port);
    knet_client_enable_retry(c);
    knet_client_set_retry_backoff(c, 20, 200);
    tu_client tc;
    tu_client_start(&tc, c, &ch, NULL);
    WAIT_GE(&log_warns, warns0 + 2); /* it failed and retried at least twice */
    pthread_mutex_lock(&log_mu);
    CHECK_GT(strlen(log_last), 0);
    CHECK_GE(log_min_seen, KNET_LOG_WARN); /* nothing below the sink's min_level */
    printf("  last log line: %s\n", log_last);
    pthread_mutex_unlock(&log_mu);
    CHECK_EQ(tu_counter_get(&ct->connects), 0);

    tu_tracker *st = tu_tracker_new();
    st->echo = true;
    knet_handler sh = tu_tracker_handler(st);
    tu_server ts;
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
    close(hold); /* the server takes the port over */
    CHECK_EQ(tu_server_start(&ts, addr, &sh, NULL), port);
    tu_rec *cr = tu_tracker_rec(ct, 0);
    CHECK_EQ(knet_conn_send(cr->conn, "hello", 5), 0);
    WAIT_GE(&ct->bytes, 5);
    CHECK_EQ(knet_client_close(c), 0);
    CHECK_EQ(knet_client_close(c), KNET_ECLIENTCLOSED);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    knet_client_free(c);
    CHECK_EQ(tu_counter_get(&ct->connects), 1);
    CHECK_EQ(tu_counter_get(&ct->disconnects), 1);
    CHECK_EQ(atomic_load(&cr->reason), KNET_ECLIENTCLOSED);
    WAIT_GE(&st->disconnects, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(ct);
    tu_tracker_free(st);
}

/* A client address ":port" dials this host (127.0.0.1), as knet.h says: the
 * connection is up, its remote address is 127.0.0.1:port, and bytes round-trip. */
static void test_client_port_only_address(void)
{
    tu_tracker *st = tu_tracker_new();
    st->echo = true;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, st, NULL);
    char addr[16], want[32], got[64];
    snprintf(addr, sizeof addr, ":%d", port);
    snprintf(want, sizeof want, "127.0.0.1:%d", port);
    knet_client *c = knet_client_new(addr);
    CHECK(c != NULL);
    tu_tracker *ct = tu_tracker_new();
    knet_handler ch = tu_tracker_handler(ct);
    tu_client tc;
    tu_client_start(&tc, c, &ch, NULL);
    tu_rec *cr = tu_tracker_rec(ct, 0);
    CHECK_EQ(knet_conn_remote_addr(cr->conn, got, sizeof got), (int)strlen(want));
    CHECK_EQ(strcmp(got, want), 0);
    CHECK_EQ(knet_conn_send(cr->conn, "hello", 5), 0);
    WAIT_GE(&ct->bytes, 5);
    CHECK_EQ(knet_client_close(c), 0);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    knet_client_free(c);
    WAIT_GE(&st->disconnects, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(ct);
    tu_tracker_free(st);
}

/* The backoff values knet.h says are adjusted: an initial wait of 0 counts as 1 ms,
 * a max below the initial wait as the initial wait (every logged wait shows it). */
static void backoff_logs(uint32_t initial, uint32_t max, const char *want)
{
    int hold, port = tu_reserve_port(&hold);
    long warns0 = tu_counter_get(&log_warns);
    knet_client *c = tu_client_for_port(port);
    knet_client_enable_retry(c);
    knet_client_set_retry_backoff(c, initial, max);
    tu_client tc;
    tu_client_start(&tc, c, NULL, NULL);
    WAIT_GE(&log_warns, warns0 + 3); /* the second and later waits use max too */
    pthread_mutex_lock(&log_mu);
    printf("  backoff (%u, %u): %s\n", initial, max, log_last);
    CHECK(strstr(log_last, want) != NULL);
    pthread_mutex_unlock(&log_mu);
    CHECK_EQ(knet_client_close(c), 0);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    knet_client_free(c);
    close(hold);
}

static void test_backoff_values_adjusted(void)
{
    backoff_logs(0, 0, "retrying in 1 ms");
    backoff_logs(50, 10, "retrying in 50 ms");
}

static void on_sigusr1(int sig)
{
    (void)sig;
}

/* A retry backoff wait ends on time although the dialing thread takes a handled
 * signal (a profiler's SIGPROF, an application's timer) every 50 ms: with a 300 ms
 * backoff several dials follow in 3 s (before: poll restarted with the whole wait
 * at each signal, so no second dial ever came). */
static void test_backoff_survives_signals(void)
{
    struct sigaction sa, old;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigusr1;
    sa.sa_flags = SA_RESTART; /* poll(2) is not restarted, SA_RESTART or not */
    CHECK_EQ(sigaction(SIGUSR1, &sa, &old), 0);
    int hold;
    knet_client *c = tu_client_for_port(tu_reserve_port(&hold));
    knet_client_enable_retry(c);
    knet_client_set_retry_backoff(c, 300, 300);
    long warns0 = tu_counter_get(&log_warns);
    tu_client tc;
    tu_client_start(&tc, c, NULL, NULL);
    WAIT_GE(&log_warns, warns0 + 1); /* the first dial failed: its wait began */
    int64_t t0 = tu_now_ms();
    while (tu_now_ms() - t0 < 3000) {
        pthread_kill(tc.thread, SIGUSR1);
        tu_sleep_ms(50); /* the signals' period, not synchronisation */
    }
    long dials = tu_counter_get(&log_warns) - warns0;
    printf("  %ld failed dials in 3 s of signals every 50 ms, backoff 300 ms\n", dials);
    CHECK_GE(dials, 4);
    CHECK_EQ(knet_client_close(c), 0);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    knet_client_free(c);
    close(hold);
    CHECK_EQ(sigaction(SIGUSR1, &old, NULL), 0);
}

/* knet_client_close during a 10 s backoff returns KNET_ECLIENTCLOSED promptly; a
 * second dial_and_serve meanwhile gets KNET_EBUSY and leaves the first serving. */
static void test_close_during_backoff(void)
{
    long warns0 = tu_counter_get(&log_warns);
    int hold;
    knet_client *c = tu_client_for_port(tu_reserve_port(&hold));
    knet_client_enable_retry(c);
    knet_client_set_retry_backoff(c, 10000, 60000);
    tu_client tc;
    tu_client_start(&tc, c, NULL, NULL);
    WAIT_GE(&log_warns, warns0 + 1); /* the first dial failed: now in the 10 s wait */
    CHECK_EQ(knet_client_dial_and_serve(c, NULL, NULL), KNET_EBUSY);
    int64_t t0 = tu_now_ms();
    CHECK_EQ(knet_client_close(c), 0);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    int64_t elapsed = tu_now_ms() - t0;
    printf("  dial_and_serve returned %lld ms after close\n", (long long)elapsed);
    CHECK_LT(elapsed, 5000);
    knet_client_free(c);
    close(hold);
}

/* Closed before dial_and_serve ran: it returns KNET_ECLIENTCLOSED at once. */
static void test_close_before_dial(void)
{
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", NULL, NULL);
    CHECK_GT(port, 0);
    knet_client *c = tu_client_for_port(port);
    CHECK_EQ(knet_client_close(c), 0);
    int64_t t0 = tu_now_ms();
    CHECK_EQ(knet_client_dial_and_serve(c, NULL, NULL), KNET_ECLIENTCLOSED);
    CHECK_LT(tu_now_ms() - t0, 5000);
    knet_client_free(c);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
}

/* The persistent client dials again after the server closes its connection, and
 * knet_client_conn follows the live connection. */
static void test_redial_after_server_closes_conn(void)
{
    tu_tracker *st = tu_tracker_new();
    knet_handler sh = tu_tracker_handler(st);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &sh, NULL);
    CHECK_GT(port, 0);

    tu_tracker *ct = tu_tracker_new();
    knet_handler ch = tu_tracker_handler(ct);
    knet_client *c = tu_client_for_port(port);
    tu_client tc;
    tu_client_start(&tc, c, &ch, NULL);

    tu_rec *first = tu_tracker_rec(ct, 0);
    knet_conn *live = knet_client_conn(c);
    CHECK(live == first->conn);
    knet_conn_release(live);

    knet_conn_close(tu_tracker_rec(st, 0)->conn); /* the server drops the client */
    WAIT_GE(&ct->disconnects, 1);
    CHECK_EQ(atomic_load(&first->reason), KNET_EOF);
    tu_rec *second = tu_tracker_rec(ct, 1); /* connect(true) again: re-dialed */
    CHECK(second->conn != first->conn);
    WAIT_GE(&st->connects, 2);

    /* connect(true) of the second connection was delivered: it is the live one. */
    knet_conn *now = knet_client_conn(c);
    CHECK(now == second->conn);
    CHECK_EQ(knet_conn_send(now, "via client_conn", 15), 0);
    knet_conn_release(now);
    WAIT_GE(&st->bytes, 15);
    CHECK_EQ(atomic_load(&st->recs[1].rx_bytes), 15);

    CHECK_EQ(knet_client_close(c), 0);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    CHECK(knet_client_conn(c) == NULL);
    knet_client_free(c);
    CHECK_EQ(tu_counter_get(&ct->connects), 2);
    CHECK_EQ(tu_counter_get(&ct->disconnects), 2);
    CHECK_EQ(atomic_load(&second->reason), KNET_ECLIENTCLOSED);
    WAIT_GE(&st->disconnects, 2);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(ct);
    tu_tracker_free(st);
}

/* Retry off: when the server goes away, the re-dial is refused and dial_and_serve
 * returns that error (the connection itself ended with KNET_EOF). */
static void test_server_gone_without_retry(void)
{
    tu_tracker *st = tu_tracker_new();
    knet_handler sh = tu_tracker_handler(st);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &sh, NULL);
    CHECK_GT(port, 0);
    tu_tracker *ct = tu_tracker_new();
    knet_handler ch = tu_tracker_handler(ct);
    knet_client *c = tu_client_for_port(port);
    tu_client tc;
    tu_client_start(&tc, c, &ch, NULL);
    WAIT_GE(&ct->connects, 1);
    /* Accepted by the server too (a connection still in the backlog would be reset). */
    WAIT_GE(&st->connects, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    CHECK_EQ(atomic_load(&st->recs[0].reason), KNET_ESERVERCLOSED);
    CHECK_EQ(tu_client_join(&tc), -ECONNREFUSED);
    knet_client_free(c);
    CHECK_EQ(tu_counter_get(&ct->disconnects), 1);
    CHECK_EQ(atomic_load(&ct->recs[0].reason), KNET_EOF);
    tu_tracker_free(ct);
    tu_tracker_free(st);
}

/* disable_retry after enable_retry: a refused dial returns again. */
static void test_disable_retry(void)
{
    int hold;
    knet_client *c = tu_client_for_port(tu_reserve_port(&hold));
    knet_client_enable_retry(c);
    knet_client_disable_retry(c);
    CHECK_EQ(knet_client_dial_and_serve(c, NULL, NULL), -ECONNREFUSED);
    knet_client_free(c);
    close(hold);
}

int main(void)
{
    tu_counter_init(&log_warns);
    knet_set_log(log_sink, KNET_LOG_WARN, &log_ud_token);
    tu_begin();
    RUN(test_refused_without_retry);
    RUN(test_bad_client_address);
    RUN(test_retry_until_server_appears);
    RUN(test_client_port_only_address);
    RUN(test_backoff_values_adjusted);
    RUN(test_backoff_survives_signals);
    RUN(test_close_during_backoff);
    RUN(test_close_before_dial);
    RUN(test_redial_after_server_closes_conn);
    RUN(test_server_gone_without_retry);
    RUN(test_disable_retry);
    knet_set_log(NULL, KNET_LOG_WARN, NULL); /* back to stderr */
    return tu_end();
}
