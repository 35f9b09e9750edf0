/* Fault: stopping in the middle of things. Promise: knet_server_close under
 * heavy traffic closes every connection at once (reason KNET_ESERVERCLOSED) and
 * listen_and_serve returns KNET_ESERVERCLOSED promptly; knet_server_shutdown
 * under heavy traffic loses nothing: every byte either side's send accepted
 * reaches the other side's receive, then both ends close; knet_client_close
 * interrupts a dial in progress, a back-off wait and a serving connection at
 * once (KNET_ECLIENTCLOSED); knet_client_shutdown delivers what was queued. */
#include "faultutil.h"

enum { CLIENTS = 16, BLOCK = 16 * 1024, INFLIGHT = 4 };

/* Starts CLIENTS ping-pong clients and waits until every one got connect(true)
 * on the server (live counts connections as soon as they are accepted, before
 * connect(true) runs on their loop) and `bytes` went through the server. */
static void start_traffic(tu_server *ts, fu_reg *r, fu_pp *pp, long bytes)
{
    for (int i = 0; i < CLIENTS; i++)
        fu_pp_start(&pp[i], ts->port, BLOCK, INFLIGHT, true);
    WAIT_GE(&r->up, CLIENTS);
    WAIT_STATS(ts, st.bytes_in >= (uint64_t)bytes);
}

/* knet_server_close while 16 clients ping-pong: everything closes at once. */
static void test_server_close_under_traffic(void)
{
    fu_reg *r = fu_reg_new(true, false);
    knet_handler h = fu_reg_handler(r);
    tu_server ts;
    CHECK_GT(tu_server_start(&ts, "127.0.0.1:0", &h, NULL), 0);
    fu_pp pp[CLIENTS];
    start_traffic(&ts, r, pp, (long)fu_scale(64, 4) * (long)FU_MIB);

    int64_t t0 = tu_now_ms();
    CHECK_EQ(knet_server_close(ts.srv), 0);
    CHECK_EQ(knet_server_close(ts.srv), KNET_ESERVERCLOSED);
    CHECK_EQ(tu_server_join(&ts), KNET_ESERVERCLOSED);
    int64_t ms = tu_now_ms() - t0;
    for (int i = 0; i < CLIENTS; i++) {
        CHECK_EQ(fu_pp_join(&pp[i]), KNET_ECLIENTCLOSED);
        CHECK_EQ(atomic_load(&pp[i].up), 1);
        CHECK_EQ(atomic_load(&pp[i].down), 1);
        int reason = atomic_load(&pp[i].reason);
        CHECK(reason == KNET_EOF || reason == -ECONNRESET || reason == -EPIPE);
    }
    fu_reg_check_balanced(r);
    CHECK_EQ(atomic_load(&r->reasons[FU_R_SERVER]), CLIENTS);
    printf("  closed with %ld MiB moved; listen_and_serve returned after %lld ms\n",
           atomic_load(&r->rx_bytes) / (long)FU_MIB, (long long)ms);
    CHECK_LT(ms, 5000);
    fu_reg_free(r);
}

/* knet_server_shutdown while 16 clients ping-pong: every accepted byte arrives,
 * both ways; every server-side connection ends gracefully (reason 0). */
static void test_server_shutdown_under_traffic(void)
{
    fu_reg *r = fu_reg_new(true, false);
    knet_handler h = fu_reg_handler(r);
    tu_server ts;
    CHECK_GT(tu_server_start(&ts, "127.0.0.1:0", &h, NULL), 0);
    fu_pp pp[CLIENTS];
    start_traffic(&ts, r, pp, (long)fu_scale(64, 4) * (long)FU_MIB);

    int64_t t0 = tu_now_ms();
    CHECK_EQ(knet_server_shutdown(ts.srv, 10000), 0);
    CHECK_EQ(knet_server_shutdown(ts.srv, 10000), KNET_ESERVERCLOSED);
    CHECK_EQ(fu_server_wait(&ts), KNET_ESERVERCLOSED);
    int64_t ms = tu_now_ms() - t0;
    long client_tx = 0, client_rx = 0;
    for (int i = 0; i < CLIENTS; i++) {
        CHECK_EQ(fu_pp_join(&pp[i]), KNET_ECLIENTCLOSED);
        CHECK_EQ(atomic_load(&pp[i].up), 1);
        CHECK_EQ(atomic_load(&pp[i].down), 1);
        CHECK_EQ(atomic_load(&pp[i].reason), KNET_EOF); /* the server's FIN, after its data */
        client_tx += atomic_load(&pp[i].tx_ok);
        client_rx += atomic_load(&pp[i].rx);
    }
    fu_reg_check_balanced(r);
    CHECK_EQ(atomic_load(&r->reasons[FU_R_LOCAL]), CLIENTS); /* graceful, before the deadline */
    knet_stats st = fu_stats(&ts);
    /* Nothing lost in either direction. */
    CHECK_EQ(atomic_load(&r->rx_bytes), client_tx);
    CHECK_EQ((long)st.bytes_in, client_tx);
    CHECK_EQ(atomic_load(&r->echo_bytes), client_rx);
    CHECK_EQ((long)st.bytes_out, client_rx);
    fu_server_free(&ts);
    printf("  shutdown with %ld MiB moved: %ld bytes in, %ld bytes out, all delivered, %lld ms\n",
           client_tx / (long)FU_MIB, client_tx, client_rx, (long long)ms);
    CHECK_LT(ms, 10000);
    fu_reg_free(r);
}

/* knet_client_close while the dial is in progress (the listener's backlog is
 * full, so the SYN goes unanswered): dial_and_serve returns at once. */
static void test_client_close_while_dialing(void)
{
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK_GE(lfd, 0);
    struct sockaddr_in a = tu_loopback(0);
    CHECK_EQ(bind(lfd, (struct sockaddr *)&a, sizeof a), 0);
    CHECK_EQ(listen(lfd, 0), 0);
    int port = tu_sock_port(lfd);
    int filler = tu_connect(port); /* fills the backlog; never accepted */

    tu_tracker *t = tu_tracker_new();
    knet_handler h = tu_tracker_handler(t);
    knet_client *cli = tu_client_for_port(port);
    tu_client tc;
    tu_client_start(&tc, cli, &h, NULL);
    WAIT_UNTIL(tu_syn_sent_to(port) >= 1); /* the dial is in progress */
    int64_t t0 = tu_now_ms();
    CHECK_EQ(knet_client_close(cli), 0);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    int64_t ms = tu_now_ms() - t0;
    printf("  dial interrupted after %lld ms\n", (long long)ms);
    CHECK_LT(ms, 5000); /* the dial alone would take its SYN retries (over a minute) */
    CHECK_EQ(tu_counter_get(&t->connects), 0);
    knet_client_free(cli);
    close(filler);
    close(lfd);
    tu_tracker_free(t);
}

/* knet_client_close during a 30 s back-off wait returns at once. */
static void test_client_close_while_backing_off(void)
{
    fu_log *log = fu_log_capture("retrying in");
    int hold, port = tu_reserve_port(&hold);
    knet_client *cli = tu_client_for_port(port);
    knet_client_enable_retry(cli);
    knet_client_set_retry_backoff(cli, 30000, 60000);
    tu_client tc;
    tu_client_start(&tc, cli, NULL, NULL);
    WAIT_GE(&log->matched, 1); /* refused, now waiting 30 s */
    int64_t t0 = tu_now_ms();
    CHECK_EQ(knet_client_close(cli), 0);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    int64_t ms = tu_now_ms() - t0;
    printf("  back-off interrupted after %lld ms\n", (long long)ms);
    CHECK_LT(ms, 5000); /* against a 30 s wait */
    knet_client_free(cli);
    close(hold);
    fu_log_restore();
}

/* knet_client_close while the connection carries traffic: connect(false) with
 * KNET_ECLIENTCLOSED, dial_and_serve returns KNET_ECLIENTCLOSED, the server's
 * side closes too. */
static void test_client_close_while_serving(void)
{
    fu_reg *r = fu_reg_new(true, false);
    knet_handler h = fu_reg_handler(r);
    tu_server ts;
    CHECK_GT(tu_server_start(&ts, "127.0.0.1:0", &h, NULL), 0);
    fu_pp p;
    fu_pp_start(&p, ts.port, BLOCK, INFLIGHT, false);
    WAIT_STATS(&ts, st.bytes_in >= 8 * FU_MIB);
    CHECK_EQ(knet_client_close(p.cli), 0);
    CHECK_EQ(knet_client_close(p.cli), KNET_ECLIENTCLOSED);
    CHECK_EQ(fu_pp_join(&p), KNET_ECLIENTCLOSED);
    CHECK_EQ(atomic_load(&p.up), 1);
    CHECK_EQ(atomic_load(&p.down), 1);
    CHECK_EQ(atomic_load(&p.reason), KNET_ECLIENTCLOSED);
    WAIT_STATS(&ts, st.live == 0);
    WAIT_GE(&r->down, 1);
    fu_reg_check_balanced(r);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    fu_reg_free(r);
}

/* A receiver that checks the stream against the pattern and keeps a checksum. */
typedef struct sink {
    uint64_t fnv, bytes;
    atomic_int bad;
    tu_counter down;
    atomic_int reason;
} sink;

static void sink_connect(knet_conn *c, bool connected, void *ud)
{
    sink *s = (sink *)ud;
    if (!connected) {
        atomic_store(&s->reason, knet_conn_close_reason(c));
        tu_counter_add(&s->down, 1);
    }
}

static void sink_receive(knet_conn *c, const void *buf, size_t len, void *ud)
{
    (void)c;
    sink *s = (sink *)ud;
    if (tu_pattern_mismatch(buf, len, s->bytes, 41) != len)
        atomic_store(&s->bad, 1);
    s->fnv = tu_fnv(s->fnv, buf, len);
    s->bytes += len;
}

/* knet_client_shutdown with 8 MiB queued: the server receives every byte
 * (checksum), then both sides close; dial_and_serve returns KNET_ECLIENTCLOSED. */
static void test_client_shutdown_delivers(void)
{
    sink s;
    memset(&s, 0, sizeof s);
    s.fnv = TU_FNV_INIT;
    tu_counter_init(&s.down);
    knet_handler h = {sink_connect, sink_receive, &s};
    tu_server ts;
    CHECK_GT(tu_server_start(&ts, "127.0.0.1:0", &h, NULL), 0);
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", ts.port);
    tu_tracker *ct = tu_tracker_new();
    knet_handler ch = tu_tracker_handler(ct);
    knet_client *cli = knet_client_new(addr);
    CHECK(cli != NULL);
    tu_client tc;
    tu_client_start(&tc, cli, &ch, NULL);
    knet_conn *conn = tu_tracker_rec(ct, 0)->conn;

    enum { MSG = 64 * 1024 };
    const size_t total = (size_t)fu_scale(8, 2) * FU_MIB;
    uint8_t *buf = malloc(MSG);
    CHECK(buf != NULL);
    uint64_t fnv = TU_FNV_INIT;
    for (size_t off = 0; off < total; off += MSG) {
        tu_pattern_fill(buf, MSG, off, 41);
        fnv = tu_fnv(fnv, buf, MSG);
        CHECK_EQ(knet_conn_send(conn, buf, MSG), 0);
    }
    free(buf);
    CHECK_EQ(knet_client_shutdown(cli, 10000), 0);
    CHECK_EQ(knet_conn_send(conn, "x", 1), KNET_ECLOSED);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    knet_client_free(cli);
    WAIT_GE(&s.down, 1);
    CHECK_EQ(s.bytes, total);
    CHECK_EQ(s.fnv, fnv);
    CHECK_EQ(atomic_load(&s.bad), 0);
    CHECK_EQ(atomic_load(&s.reason), KNET_EOF);
    CHECK_EQ(atomic_load(&ct->recs[0].reason), 0); /* the client's graceful close completed */
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_counter_destroy(&s.down);
    tu_tracker_free(ct);
}

int main(void)
{
    tu_begin();
    RUN(test_server_close_under_traffic);
    RUN(test_server_shutdown_under_traffic);
    RUN(test_client_close_while_dialing);
    RUN(test_client_close_while_backing_off);
    RUN(test_client_close_while_serving);
    RUN(test_client_shutdown_delivers);
    return tu_end();
}
