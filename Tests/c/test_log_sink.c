/* The log sink's lifetime: once knet_set_log has returned, the sink it replaced (and
 * its ud) is no longer in use, so the caller may free that ud at once. A dialing
 * thread's retry warning holds the old sink inside its call while another thread
 * replaces it; a sink that replaces the sink from inside itself does not wait for
 * itself. */
#include "testutil.h"

typedef struct sink_state {
    tu_counter entered;       /* calls of the old sink that began */
    atomic_bool replaced;     /* knet_set_log(new) returned */
    atomic_int used_after;    /* the old sink saw that while still running */
    pthread_mutex_t mu;
    pthread_cond_t cv;
} sink_state;

/* The old sink: on the dial warning it stays in the call until knet_set_log(new)
 * returns or 300 ms passed. Seeing the return while inside is the defect: a caller
 * that frees ud after knet_set_log returned would free it under this call. */
static void holding_sink(int level, const char *msg, void *ud)
{
    (void)level;
    sink_state *st = ud;
    if (!strstr(msg, "retrying"))
        return;
    tu_counter_add(&st->entered, 1);
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_nsec += 300 * 1000000L;
    if (dl.tv_nsec >= 1000000000L) {
        dl.tv_sec++;
        dl.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&st->mu);
    int rc = 0;
    while (!atomic_load(&st->replaced) && rc == 0)
        rc = pthread_cond_timedwait(&st->cv, &st->mu, &dl);
    pthread_mutex_unlock(&st->mu);
    if (atomic_load(&st->replaced))
        atomic_fetch_add(&st->used_after, 1); /* st would be freed by now */
}

static void quiet_sink(int level, const char *msg, void *ud)
{
    (void)level;
    (void)msg;
    (void)ud;
}

static void *replace_sink(void *arg)
{
    sink_state *st = arg;
    knet_set_log(quiet_sink, KNET_LOG_WARN, NULL);
    pthread_mutex_lock(&st->mu);
    atomic_store(&st->replaced, true);
    pthread_cond_broadcast(&st->cv);
    pthread_mutex_unlock(&st->mu);
    return NULL;
}

static void test_replaced_sink_not_in_use_after_return(void)
{
    sink_state *st = calloc(1, sizeof *st);
    CHECK(st != NULL);
    tu_counter_init(&st->entered);
    pthread_mutex_init(&st->mu, NULL);
    pthread_cond_init(&st->cv, NULL);
    knet_set_log(holding_sink, KNET_LOG_WARN, st);

    int hold;
    knet_client *c = tu_client_for_port(tu_reserve_port(&hold));
    knet_client_enable_retry(c);
    knet_client_set_retry_backoff(c, 60000, 60000); /* one warning, then a long wait */
    tu_client tc;
    tu_client_start(&tc, c, NULL, NULL);
    WAIT_GE(&st->entered, 1); /* the dialing thread is inside the old sink */

    pthread_t th;
    CHECK_EQ(pthread_create(&th, NULL, replace_sink, st), 0);
    CHECK_EQ(pthread_join(th, NULL), 0);
    CHECK_EQ(atomic_load(&st->used_after), 0);

    CHECK_EQ(knet_client_close(c), 0);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    knet_client_free(c);
    close(hold);
    knet_set_log(NULL, KNET_LOG_WARN, NULL);
    tu_counter_destroy(&st->entered);
    pthread_cond_destroy(&st->cv);
    pthread_mutex_destroy(&st->mu);
    free(st); /* what a caller does once knet_set_log returned */
}

/* A sink that replaces itself from inside its call returns (it cannot wait for
 * itself), and the new sink gets the next line. */
static tu_counter second_calls;

static void second_sink(int level, const char *msg, void *ud)
{
    (void)level;
    (void)msg;
    (void)ud;
    tu_counter_add(&second_calls, 1);
}

static void self_replacing_sink(int level, const char *msg, void *ud)
{
    (void)level;
    (void)msg;
    (void)ud;
    knet_set_log(second_sink, KNET_LOG_WARN, NULL);
}

static void test_sink_replaces_itself(void)
{
    tu_counter_init(&second_calls);
    knet_set_log(self_replacing_sink, KNET_LOG_WARN, NULL);
    int hold;
    knet_client *c = tu_client_for_port(tu_reserve_port(&hold));
    knet_client_enable_retry(c);
    knet_client_set_retry_backoff(c, 1, 1);
    tu_client tc;
    tu_client_start(&tc, c, NULL, NULL);
    WAIT_GE(&second_calls, 1); /* the first warning switched sinks, the next reached it */
    CHECK_EQ(knet_client_close(c), 0);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    knet_client_free(c);
    close(hold);
    knet_set_log(NULL, KNET_LOG_WARN, NULL);
    tu_counter_destroy(&second_calls);
}

int main(void)
{
    tu_begin();
    RUN(test_replaced_sink_not_in_use_after_return);
    RUN(test_sink_replaces_itself);
    return tu_end();
}
