/* Stress: off-loop and on-loop sends of random sizes to one connection whose
 * peer reads slowly, under a pending-send limit. Each message is
 * [u32 len][u32 src<<31|seq][pattern]: per source in order and intact; the
 * pending count must return (no sender stuck on KNET_EPENDINGFULL). */
#include "testutil.h"

#define PENDING 4
#define NMSG 3000

static knet_conn *g_a;
static atomic_uint g_loop_seq;
static atomic_long g_loop_full;
static atomic_bool g_stop;
static uint32_t rnd(uint32_t *s) { *s ^= *s << 13; *s ^= *s >> 17; *s ^= *s << 5; return *s; }

static size_t msg_make(uint8_t *buf, uint32_t id, size_t body)
{
    uint32_t len = (uint32_t)(body + 4);
    memcpy(buf, &len, 4);
    memcpy(buf + 4, &id, 4);
    tu_pattern_fill(buf + 8, body, 0, id);
    return body + 8;
}

static uint8_t loop_buf[70000];
static void on_recv_hook(tu_rec *r, const void *buf, size_t len)
{
    (void)buf;
    if (r->index != 1 || atomic_load(&g_stop)) return;
    static uint32_t s = 99;
    for (size_t i = 0; i < len; i++) {
        uint32_t seq = atomic_load(&g_loop_seq);
        size_t body = rnd(&s) % 3 == 0 ? rnd(&s) % 66000 : rnd(&s) % 200;
        size_t n = msg_make(loop_buf, 0x80000000u | seq, body);
        int rc = knet_conn_send(g_a, loop_buf, n);
        if (rc == 0) atomic_store(&g_loop_seq, seq + 1);
        else if (rc == KNET_ECLOSED) return; /* the test is ending */
        else { CHECK_EQ(rc, KNET_EPENDINGFULL); atomic_fetch_add(&g_loop_full, 1); }
    }
}

static void *off_sender(void *arg)
{
    (void)arg;
    uint32_t s = 12345;
    uint8_t *buf = malloc(300000);
    CHECK(buf != NULL);
    for (uint32_t seq = 0; seq < NMSG; seq++) {
        uint32_t k = rnd(&s) % 10;
        size_t body = k == 0 ? rnd(&s) % 250000 : k < 4 ? rnd(&s) % 9000 : rnd(&s) % 100;
        size_t n = msg_make(buf, seq, body);
        int64_t t0 = tu_now_ms();
        int rc;
        while ((rc = knet_conn_send(g_a, buf, n)) == KNET_EPENDINGFULL) {
            if (tu_now_ms() - t0 > 10000) {
                fprintf(stderr, "off-loop sender stuck on KNET_EPENDINGFULL at seq %u\n", seq);
                tu_fail(__FILE__, __LINE__, "pending count never returned");
            }
            sched_yield();
        }
        CHECK_EQ(rc, 0);
    }
    free(buf);
    return NULL;
}

static void *pacer(void *arg)
{
    int fd = *(int *)arg;
    char b[4] = {'x', 'x', 'x', 'x'};
    uint32_t s = 7;
    while (!atomic_load(&g_stop)) {
        tu_write_all(fd, b, 1 + rnd(&s) % 3);
        usleep(200);
    }
    return NULL;
}

static void test_mixed_sends_under_pending_limit(void)
{
    tu_tracker *t = tu_tracker_new();
    t->on_receive = on_recv_hook;
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, NULL);
    CHECK_GT(port, 0);
    int slow = tu_connect_ex(port, 4096);
    g_a = tu_tracker_rec(t, 0)->conn;
    knet_conn_set_pending_send(g_a, PENDING);
    knet_conn_set_max_queued_bytes(g_a, 0);
    int pace = tu_connect(port);
    (void)tu_tracker_rec(t, 1);

    pthread_t st, pt;
    CHECK_EQ(pthread_create(&st, NULL, off_sender, NULL), 0);
    CHECK_EQ(pthread_create(&pt, NULL, pacer, &pace), 0);

    uint32_t next[2] = {0, 0};
    uint8_t *body = malloc(300000);
    CHECK(body != NULL);
    uint32_t s = 5;
    while (next[0] < NMSG) {
        uint32_t len, id;
        CHECK_EQ(tu_read_full(slow, &len, 4), 4);
        CHECK_EQ(tu_read_full(slow, &id, 4), 4);
        CHECK_GE(len, 4);
        size_t blen = len - 4;
        CHECK_LE(blen, 300000);
        size_t got = 0;
        while (got < blen) {
            size_t want = blen - got;
            size_t cap_ = 1 + rnd(&s) % 5000;
            if (want > cap_) want = cap_;
            ssize_t n = tu_read_some(slow, body + got, want);
            CHECK_GT(n, 0);
            got += (size_t)n;
        }
        unsigned src = id >> 31;
        CHECK_EQ(id & 0x7fffffffu, next[src]);
        CHECK_EQ(tu_pattern_mismatch(body, blen, 0, id), blen);
        next[src]++;
    }
    atomic_store(&g_stop, true);
    pthread_join(st, NULL);
    pthread_join(pt, NULL);
    printf("  off-loop %u, on-loop %u messages (%ld refused full)\n", next[0], next[1],
           atomic_load(&g_loop_full));
    free(body);
    close(slow);
    close(pace);
    WAIT_GE(&t->disconnects, 2);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

int main(void)
{
    tu_begin();
    RUN(test_mixed_sends_under_pending_limit);
    return tu_end();
}
