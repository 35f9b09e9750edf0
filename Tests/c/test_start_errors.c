/* Errors where the core starts things: loops that cannot be made (out of
 * descriptors), loop threads that cannot start (pthread_create is wrapped at link
 * time to fail with EAGAIN) and a listener no loop can watch (epoll_ctl is
 * wrapped to fail like a full max_user_watches). Each is returned by the call
 * that met it, leaves no descriptor behind, and a later call works. */
#include "testutil.h"

#include <sys/epoll.h>
#include <sys/resource.h>

int __real_epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev);
int __wrap_epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev);

static _Atomic int fail_adds; /* EPOLL_CTL_ADDs still to fail */

int __wrap_epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev)
{
    if (op == EPOLL_CTL_ADD && atomic_load(&fail_adds) > 0) {
        atomic_fetch_sub(&fail_adds, 1);
        errno = ENOSPC;
        return -1;
    }
    return __real_epoll_ctl(epfd, op, fd, ev);
}

int __real_pthread_create(pthread_t *t, const pthread_attr_t *a, void *(*fn)(void *), void *arg);
int __wrap_pthread_create(pthread_t *t, const pthread_attr_t *a, void *(*fn)(void *), void *arg);

static _Atomic bool fail_creates; /* every pthread_create fails (as at RLIMIT_NPROC) */

int __wrap_pthread_create(pthread_t *t, const pthread_attr_t *a, void *(*fn)(void *), void *arg)
{
    if (atomic_load(&fail_creates))
        return EAGAIN;
    return __real_pthread_create(t, a, fn, arg);
}

/* Serves a new server (listen_and_serve on a thread) with an echo handler, checks
 * one round trip, closes and frees it. */
static void serve_and_echo(void)
{
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    tu_server ts;
    int fd = tu_connect(tu_tracked_server_start(&ts, t, NULL)); /* checks port > 0 */
    tu_write_str(fd, "ping");
    char b[4];
    READ_EXACT(fd, b, sizeof b);
    CHECK(memcmp(b, "ping", 4) == 0);
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* A log sink that asks about the loops while they start (and fail to). */
static _Atomic int sink_calls, sink_threads, sink_set_rc;

static void asking_sink(int level, const char *msg, void *ud)
{
    (void)level, (void)msg, (void)ud;
    atomic_fetch_add(&sink_calls, 1);
    atomic_store(&sink_threads, (int)knet_loop_threads());
    atomic_store(&sink_set_rc, knet_set_loop_threads(2));
}

/* Runs first: the loops start with the first listen or dial. */
static void test_loops_out_of_fds(void)
{
    CHECK_EQ(knet_set_loop_threads(4), 0);
    knet_set_log(asking_sink, KNET_LOG_ERROR, NULL);
    knet_server *s = knet_server_new("127.0.0.1:0");
    CHECK(s != NULL);
    int base = tu_fd_count();
    struct rlimit old, tight;
    CHECK_EQ(getrlimit(RLIMIT_NOFILE, &old), 0);
    tight = old;
    tight.rlim_cur = (rlim_t)base + 3; /* 4 loops need 8: the second one's eventfd fails */
    CHECK_EQ(setrlimit(RLIMIT_NOFILE, &tight), 0);
    int rc = knet_server_listen_and_serve(s, NULL, NULL);
    CHECK_EQ(setrlimit(RLIMIT_NOFILE, &old), 0);
    knet_set_log(NULL, KNET_LOG_WARN, NULL);
    CHECK_EQ(rc, -EMFILE);                  /* returned, the process goes on */
    /* The failure was logged, and the sink could ask (no deadlock): still 4, and the
     * count could not change while the loops were being made. */
    CHECK_GE(atomic_load(&sink_calls), 1);
    CHECK_EQ(atomic_load(&sink_threads), 4);
    CHECK_EQ(atomic_load(&sink_set_rc), KNET_EBUSY);
    CHECK_EQ(tu_fd_count(), base);          /* the loops made so far were undone */
    CHECK_EQ(knet_set_loop_threads(4), 0);  /* none started: still configurable */
    knet_server_free(s);
    serve_and_echo();                       /* with descriptors back, the loops start */
    CHECK_EQ(knet_loop_threads(), 4u);
}

/* Runs before the loops start: no loop thread starts, so the listen fails with
 * -EAGAIN, the loops made for them are undone, and the count stays settable. */
static void test_no_loop_thread_starts(void)
{
    CHECK_EQ(knet_set_loop_threads(2), 0);
    knet_set_log(NULL, KNET_LOG_ERROR + 1, NULL); /* the expected error, not printed */
    knet_server *s = knet_server_new("127.0.0.1:0");
    CHECK(s != NULL);
    int base = tu_fd_count();
    atomic_store(&fail_creates, true);
    int rc = knet_server_listen_and_serve(s, NULL, NULL);
    atomic_store(&fail_creates, false);
    knet_set_log(NULL, KNET_LOG_WARN, NULL);
    CHECK_EQ(rc, -EAGAIN);
    CHECK_EQ(tu_fd_count(), base);         /* both loops' epoll and eventfd closed */
    CHECK_EQ(knet_loop_threads(), 2u);     /* not started: what was asked for */
    CHECK_EQ(knet_set_loop_threads(2), 0); /* and still configurable */
    knet_server_free(s);
}

static void test_listener_not_watched(void)
{
    knet_server *s = knet_server_new("127.0.0.1:0");
    CHECK(s != NULL);
    int base = tu_fd_count();
    atomic_store(&fail_adds, 1);
    /* Returns at once (it would otherwise serve a listener nothing accepts from). */
    CHECK_EQ(knet_server_listen_and_serve(s, NULL, NULL), -ENOSPC);
    CHECK_EQ(atomic_load(&fail_adds), 0);
    CHECK_EQ(knet_server_wait_listening(s, TU_DEADLINE_MS), -ENOSPC);
    CHECK_EQ(knet_server_port(s), -ENOSPC);
    CHECK_FDS(base); /* the listening socket was closed */
    knet_server_free(s);
    serve_and_echo(); /* the loop goes on watching new listeners */
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    RUN(test_no_loop_thread_starts); /* before the loops start, as the next one */
    RUN(test_loops_out_of_fds); /* before tu_begin, whose warm-up starts the loops */
    tu_begin();
    RUN(test_listener_not_watched);
    return tu_end();
}
