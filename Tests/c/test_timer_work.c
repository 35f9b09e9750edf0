/* Work a timer callback queues on its own loop (one loop thread) is done
 * without waiting for another event: X's idle close, in its connect(false),
 * closes Y (another server, no timers): Y must close at once, not at the next event. */
#include "testutil.h"

static knet_conn *_Atomic y_conn;
static void y_connect(knet_conn *c, bool connected, void *ud)
{
    (void)ud;
    if (connected) { knet_conn_retain(c); atomic_store(&y_conn, c); }
}
static void x_connect(knet_conn *c, bool connected, void *ud)
{
    (void)c, (void)ud;
    if (!connected) {
        CHECK_EQ(knet_conn_close_reason(c), -ETIMEDOUT);
        knet_conn_close(atomic_load(&y_conn));
    }
}

static void test_timer_work_is_done_at_once(void)
{
    knet_handler hx = {x_connect, NULL, NULL}, hy = {y_connect, NULL, NULL};
    tu_server sx, sy;
    tu_server_init(&sx, "127.0.0.1:0", &hx, NULL);
    knet_server_set_idle_timeout(sx.srv, 300);
    int px = tu_server_run(&sx);
    int py = tu_server_start(&sy, "127.0.0.1:0", &hy, NULL);
    CHECK_GT(px, 0);
    CHECK_GT(py, 0);
    int fy = tu_connect(py);
    WAIT_UNTIL(atomic_load(&y_conn) != NULL);
    int64_t t0 = tu_now_ms();
    int fx = tu_connect(px);
    char b;
    CHECK_EQ(tu_read_some(fy, &b, 1), 0); /* Y closed (SO_RCVTIMEO bounds it) */
    int64_t dt = tu_now_ms() - t0;
    printf("  Y closed %lld ms after X connected\n", (long long)dt);
    CHECK_LT(dt, 2000);
    close(fx);
    close(fy);
    knet_conn_release(atomic_load(&y_conn));
    CHECK_EQ(tu_server_stop(&sx), KNET_ESERVERCLOSED);
    CHECK_EQ(tu_server_stop(&sy), KNET_ESERVERCLOSED);
}

int main(void)
{
    CHECK_EQ(knet_set_loop_threads(1), 0);
    tu_begin();
    RUN(test_timer_work_is_done_at_once);
    return tu_end();
}
