/* A server's close racing the steps of its listen and of an accept, made deterministic
 * by wrapping bind, listen, epoll_ctl, close, accept4 and setsockopt at link time: the
 * serving thread is held after its bind or its listen, the listener's loop is made to
 * fail its watch or held as it takes a connection, and the close is made at that very
 * point. */
#include "testutil.h"

#include <sys/epoll.h>

int __real_bind(int fd, const struct sockaddr *a, socklen_t len);
int __wrap_bind(int fd, const struct sockaddr *a, socklen_t len);
int __real_listen(int fd, int backlog);
int __wrap_listen(int fd, int backlog);
int __real_epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev);
int __wrap_epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev);
int __real_close(int fd);
int __wrap_close(int fd);

static _Atomic bool hold_bind, hold_listen; /* the next bind / listen waits (once) */
static tu_counter bound, bind_go, listened, listen_go;
static _Atomic int bound_port;
static _Atomic int listen_fd = -1; /* the last socket knet listened on */

int __wrap_bind(int fd, const struct sockaddr *a, socklen_t len)
{
    int rc = __real_bind(fd, a, len);
    if (rc == 0 && atomic_exchange(&hold_bind, false)) {
        atomic_store(&bound_port, tu_sock_port(fd));
        tu_counter_add(&bound, 1);
        WAIT_GE(&bind_go, 1);
    }
    return rc;
}

int __wrap_listen(int fd, int backlog)
{
    int rc = __real_listen(fd, backlog);
    if (rc == 0)
        atomic_store(&listen_fd, fd);
    if (rc == 0 && atomic_exchange(&hold_listen, false)) {
        tu_counter_add(&listened, 1);
        WAIT_GE(&listen_go, 1);
    }
    return rc;
}


/* accept4 (after it took a connection) and the accepted socket's TCP_NODELAY (after
 * its admission) hold the listener's loop, once each, when asked. */
int __real_accept4(int fd, struct sockaddr *sa, socklen_t *sl, int flags);
int __wrap_accept4(int fd, struct sockaddr *sa, socklen_t *sl, int flags);
int __real_setsockopt(int fd, int level, int name, const void *v, socklen_t len);
int __wrap_setsockopt(int fd, int level, int name, const void *v, socklen_t len);
static _Atomic bool hold_accept, hold_nodelay;
static tu_counter step_held, step_go;
static pthread_t main_thread;

int __wrap_accept4(int fd, struct sockaddr *sa, socklen_t *sl, int flags)
{
    int rc = __real_accept4(fd, sa, sl, flags);
    if (rc >= 0 && atomic_exchange(&hold_accept, false)) {
        tu_counter_add(&step_held, 1);
        WAIT_GE(&step_go, 1);
    }
    return rc;
}

int __wrap_setsockopt(int fd, int level, int name, const void *v, socklen_t len)
{
    if (level == IPPROTO_TCP && name == TCP_NODELAY && !pthread_equal(pthread_self(), main_thread) &&
        atomic_exchange(&hold_nodelay, false)) {
        tu_counter_add(&step_held, 1);
        WAIT_GE(&step_go, 1);
    }
    return __real_setsockopt(fd, level, name, v, len);
}

static _Atomic int fail_add_of = -1; /* the next EPOLL_CTL_ADD of this fd fails */

int __wrap_epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev)
{
    if (op == EPOLL_CTL_ADD && fd >= 0 && atomic_load(&fail_add_of) == fd) {
        atomic_store(&fail_add_of, -1);
        errno = ENOSPC;
        return -1;
    }
    return __real_epoll_ctl(epfd, op, fd, ev);
}

/* When knet closes swap_fd: the number goes at once to swap_with (as another
 * thread's socket or accept would take it), and close_srv is closed right then. */
static _Atomic int swap_fd = -1;
static int swap_with;
static knet_server *close_srv;
static _Atomic int swap_close_rc = 1;

int __wrap_close(int fd)
{
    int rc = __real_close(fd);
    if (fd >= 0 && atomic_load(&swap_fd) == fd) {
        atomic_store(&swap_fd, -1);
        CHECK_EQ(dup2(swap_with, fd), fd);
        atomic_store(&swap_close_rc, knet_server_close(close_srv));
    }
    return rc;
}

/* knet.h: "From its return on, the port refuses new connections". A close made
 * while the serving thread is between its bind and its listen returns 0; the port
 * must then never listen (before: listen_and_serve went on to listen, and the port
 * took connections into its backlog until the serving thread saw the close). */
static void test_close_between_bind_and_listen(void)
{
    int base = tu_fd_count();
    tu_counter_init(&bound);
    tu_counter_init(&bind_go);
    tu_counter_init(&listened);
    tu_counter_init(&listen_go);
    tu_server ts;
    tu_server_init(&ts, "127.0.0.1:0", NULL, NULL);
    atomic_store(&hold_bind, true);
    atomic_store(&hold_listen, true);
    CHECK_EQ(pthread_create(&ts.thread, NULL, tu_server_main, &ts), 0);
    WAIT_GE(&bound, 1);
    int port = atomic_load(&bound_port);
    CHECK_GT(port, 0);
    CHECK_EQ(knet_server_close(ts.srv), 0);
    tu_counter_add(&bind_go, 1);
    /* Either it returns, or it listened (and is held right after its listen). */
    WAIT_UNTIL(tu_counter_get(&ts.done) >= 1 || tu_counter_get(&listened) >= 1);
    int fd = tu_try_connect_ex(port, 0);
    if (fd >= 0)
        close(fd);
    atomic_store(&hold_listen, false);
    tu_counter_add(&listen_go, 1);
    CHECK_EQ(fd, -ECONNREFUSED);
    CHECK_EQ(knet_server_wait_listening(ts.srv, TU_DEADLINE_MS), KNET_ESERVERCLOSED);
    CHECK_EQ(knet_server_port(ts.srv), 0);
    CHECK_EQ(tu_server_join(&ts), KNET_ESERVERCLOSED);
    CHECK_FDS(base);
    tu_counter_destroy(&bound);
    tu_counter_destroy(&bind_go);
    tu_counter_destroy(&listened);
    tu_counter_destroy(&listen_go);
}

/* The listener's loop fails to watch it and closes it; a close of the server made
 * just after that close(2) (the descriptor's number already another socket's, as
 * another thread may take it at any time) must not act on that number. Before, the
 * close still saw the listener as open and shut the other socket down. */
static void test_close_as_listener_fails_on_its_loop(void)
{
    int base = tu_fd_count();
    int lport;
    int lfd = tu_listen(&lport, 0);
    int a = tu_connect(lport);
    int b = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    CHECK_GE(b, 0);
    tu_set_timeouts(b);
    close(lfd);
    tu_counter_init(&bound);
    tu_counter_init(&bind_go);
    tu_counter_init(&listened);
    tu_counter_init(&listen_go);
    tu_server ts;
    tu_server_init(&ts, "127.0.0.1:0", NULL, NULL);
    close_srv = ts.srv;
    swap_with = a;
    atomic_store(&swap_close_rc, 1);
    atomic_store(&hold_listen, true);
    CHECK_EQ(pthread_create(&ts.thread, NULL, tu_server_main, &ts), 0);
    WAIT_GE(&listened, 1);
    int fd = atomic_load(&listen_fd);
    atomic_store(&fail_add_of, fd);
    atomic_store(&swap_fd, fd);
    knet_set_log(NULL, KNET_LOG_ERROR + 1, NULL); /* the expected error, not printed */
    tu_counter_add(&listen_go, 1);
    CHECK_EQ(tu_server_join(&ts), -ENOSPC);
    knet_set_log(NULL, KNET_LOG_WARN, NULL);
    CHECK_EQ(atomic_load(&swap_fd), -1); /* the listener was closed, its number taken */
    CHECK_EQ(atomic_load(&swap_close_rc), 0);
    /* fd is now a's socket: it was left alone, so a byte still goes through. */
    CHECK_EQ(send(fd, "x", 1, MSG_NOSIGNAL), 1);
    char c = 0;
    CHECK_EQ(tu_read_some(b, &c, 1), 1);
    CHECK_EQ(c, 'x');
    close(fd);
    close(a);
    close(b);
    CHECK_FDS(base);
    tu_counter_destroy(&bound);
    tu_counter_destroy(&bind_go);
    tu_counter_destroy(&listened);
    tu_counter_destroy(&listen_go);
}

/* A connection the listener's loop is taking when the server closes (or shuts down):
 * held after accept4 took it, or after its admission; it gets no callbacks or both,
 * the peer sees it closed, live ends at 0 and listen_and_serve returns. */
static void accept_races_stop(_Atomic bool *hold, bool force)
{
    tu_counter_init(&step_held);
    tu_counter_init(&step_go);
    tu_tracker *t = tu_tracker_new();
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    atomic_store(hold, true);
    int fd = tu_connect(port);
    WAIT_GE(&step_held, 1);
    CHECK_EQ(force ? knet_server_close(ts.srv) : knet_server_shutdown(ts.srv, 5000), 0);
    CHECK_EQ(tu_try_connect_ex(port, 0), -ECONNREFUSED);
    tu_counter_add(&step_go, 1);
    EXPECT_PEER_CLOSED(fd);
    close(fd);
    WAIT_GE(&ts.done, 1);
    knet_stats st;
    knet_server_stats(ts.srv, &st);
    CHECK_EQ(st.live, 0);
    CHECK_EQ(tu_counter_get(&t->connects), tu_counter_get(&t->disconnects));
    CHECK_EQ(tu_server_join(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
    tu_counter_destroy(&step_held);
    tu_counter_destroy(&step_go);
}

static void test_accept_races_stop(void)
{
    accept_races_stop(&hold_accept, true);
    accept_races_stop(&hold_accept, false);
    accept_races_stop(&hold_nodelay, true);
    accept_races_stop(&hold_nodelay, false);
}

int main(void)
{
    main_thread = pthread_self();
    tu_begin();
    RUN(test_close_as_listener_fails_on_its_loop);
    RUN(test_close_between_bind_and_listen);
    RUN(test_accept_races_stop);
    return tu_end();
}
