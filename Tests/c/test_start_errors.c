/* Errors where the core starts things: loops that cannot be made (out of
 * descriptors), loop threads that cannot start (pthread_create is wrapped at link
 * time to fail with EAGAIN), a listener no loop can watch (epoll_ctl is wrapped
 * to fail like a full max_user_watches), a client made with no descriptor left
 * a server closed while it resolves (getaddrinfo is wrapped to wait), and a
 * dialed connection no loop can watch. Each is
 * returned by the call that met it, leaves no descriptor behind, and a later call
 * works. */
#include "testutil.h"

#include <fcntl.h>
#include <netdb.h>
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

/* pthread_creates that still succeed before every later one fails as at
 * RLIMIT_NPROC; -1: all succeed. */
static _Atomic int creates_left = -1;

int __wrap_pthread_create(pthread_t *t, const pthread_attr_t *a, void *(*fn)(void *), void *arg)
{
    int left = atomic_load(&creates_left);
    while (left > 0 && !atomic_compare_exchange_weak(&creates_left, &left, left - 1)) {
    }
    if (left == 0)
        return EAGAIN;
    return __real_pthread_create(t, a, fn, arg);
}

int __real_getaddrinfo(const char *host, const char *serv, const struct addrinfo *hints,
                       struct addrinfo **res);
int __wrap_getaddrinfo(const char *host, const char *serv, const struct addrinfo *hints,
                       struct addrinfo **res);

static _Atomic bool hold_resolves; /* getaddrinfo waits for resolves_released */
static tu_counter resolves_held, resolves_released;
static _Atomic int resolve_fails_with; /* nonzero: getaddrinfo returns it (once) */

int __wrap_getaddrinfo(const char *host, const char *serv, const struct addrinfo *hints,
                       struct addrinfo **res)
{
    int fail = atomic_exchange(&resolve_fails_with, 0);
    if (fail) {
        if (fail == EAI_SYSTEM)
            errno = EMFILE;
        return fail;
    }
    if (atomic_load(&hold_resolves)) {
        tu_counter_add(&resolves_held, 1);
        WAIT_GE(&resolves_released, 1);
    }
    return __real_getaddrinfo(host, serv, hints, res);
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
}

/* A log sink that counts the warnings it is given. */
static _Atomic int warn_calls;
static char warn_msg[128];

static void warn_sink(int level, const char *msg, void *ud)
{
    (void)ud;
    if (level == KNET_LOG_WARN && atomic_fetch_add(&warn_calls, 1) == 0)
        snprintf(warn_msg, sizeof warn_msg, "%s", msg);
}

/* Runs after the failed starts: 2 of 4 loop threads start. The listen works on
 * the loops that run (a warning says how many), the two that never ran are undone,
 * and connections are spread over the two that did, none onto an unstarted one. */
static void test_some_loop_threads_start(void)
{
    CHECK_EQ(knet_loop_threads(), 4u); /* asked for by the test before */
    int base = tu_fd_count();
    knet_set_log(warn_sink, KNET_LOG_WARN, NULL);
    atomic_store(&creates_left, 3); /* the serving thread, then two loop threads */
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL); /* this starts the loops */
    atomic_store(&creates_left, -1);
    knet_set_log(NULL, KNET_LOG_WARN, NULL);
    CHECK_EQ(knet_loop_threads(), 2u);
    CHECK_EQ(atomic_load(&warn_calls), 1);
    CHECK(strstr(warn_msg, "2 of 4") != NULL);
    /* Two loops' epoll + eventfd, and the listener; the other two loops' are closed. */
    CHECK_EQ(tu_fd_count(), base + 5);

    int fds[4];
    for (int i = 0; i < 4; i++) {
        fds[i] = tu_connect(port);
        tu_write_str(fds[i], "ping");
        char b[4];
        READ_EXACT(fds[i], b, sizeof b);
        CHECK(memcmp(b, "ping", 4) == 0);
    }
    WAIT_GE(&t->connects, 4);
    bool two_loops = false; /* connections were served on both loops */
    for (int i = 1; i < 4; i++)
        two_loops |= !pthread_equal(tu_tracker_rec(t, i)->thread, tu_tracker_rec(t, 0)->thread);
    CHECK(two_loops);
    for (int i = 0; i < 4; i++)
        close(fds[i]);
    WAIT_GE(&t->disconnects, 4);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* Out of descriptors, knet_client_new still makes a client (it opens none);
 * knet_client_dial_and_serve returns -EMFILE (its wake-up eventfd cannot be made)
 * and leaves nothing open; with descriptors back the same client serves. */
static void test_client_new_out_of_fds(void)
{
    int base = tu_fd_count();
    int lowest_free = open("/dev/null", O_RDONLY | O_CLOEXEC); /* the lowest free number */
    CHECK_GE(lowest_free, 0);
    close(lowest_free);
    struct rlimit old, tight;
    CHECK_EQ(getrlimit(RLIMIT_NOFILE, &old), 0);
    tight = old;
    tight.rlim_cur = (rlim_t)lowest_free; /* no new descriptor at all */
    CHECK_EQ(setrlimit(RLIMIT_NOFILE, &tight), 0);
    knet_client *c = knet_client_new("127.0.0.1:1"); /* retry off */
    CHECK(c != NULL);
    int rc = knet_client_dial_and_serve(c, NULL, NULL);
    CHECK_EQ(setrlimit(RLIMIT_NOFILE, &old), 0);
    CHECK_EQ(rc, -EMFILE);
    CHECK_EQ(tu_fd_count(), base);
    int holder;
    int port = tu_reserve_port(&holder); /* bound, not listening: dials are refused */
    knet_client_free(c);
    c = tu_client_for_port(port);
    CHECK_EQ(knet_client_dial_and_serve(c, NULL, NULL), -ECONNREFUSED);
    knet_client_free(c);
    close(holder);
}

/* A server closed while it resolves its address never listens: no port is
 * published, listen_and_serve and wait_listening report the close, and the socket
 * it opened after the resolve is closed. */
static void test_closed_while_resolving(void)
{
    int base = tu_fd_count();
    tu_counter_init(&resolves_held);
    tu_counter_init(&resolves_released);
    tu_server ts;
    tu_server_init(&ts, "localhost:0", NULL, NULL);
    atomic_store(&hold_resolves, true);
    CHECK_EQ(pthread_create(&ts.thread, NULL, tu_server_main, &ts), 0);
    WAIT_GE(&resolves_held, 1);
    atomic_store(&hold_resolves, false);
    CHECK_EQ(knet_server_close(ts.srv), 0);
    tu_counter_add(&resolves_released, 1);
    WAIT_GE(&ts.done, 1);
    CHECK_EQ(knet_server_port(ts.srv), 0);
    CHECK_EQ(knet_server_wait_listening(ts.srv, TU_DEADLINE_MS), KNET_ESERVERCLOSED);
    CHECK_EQ(tu_server_join(&ts), KNET_ESERVERCLOSED);
    CHECK_FDS(base);
    tu_counter_destroy(&resolves_held);
    tu_counter_destroy(&resolves_released);
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
    atomic_store(&creates_left, 0);
    int rc = knet_server_listen_and_serve(s, NULL, NULL);
    atomic_store(&creates_left, -1);
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

static tu_counter backoff_logged; /* warnings that a dial waits 60000 ms */

static void backoff_sink(int level, const char *msg, void *ud)
{
    (void)ud;
    if (level == KNET_LOG_WARN && strstr(msg, "No space left on device; retrying in 60000 ms"))
        tu_counter_add(&backoff_logged, 1);
}

/* A dialed connection its loop cannot watch (epoll_ctl fails as at
 * max_user_watches) counts as a failed dial, not as a served connection that ended:
 * with retry off dial_and_serve returns the error; with retry on the backoff paces
 * the next dial (not a connect/close storm against the server). No callbacks. */
static void test_client_conn_not_watched(void)
{
    int port;
    int lfd = tu_listen(&port, 0);
    int base = tu_fd_count();
    tu_tracker *t = tu_tracker_new();
    knet_handler h = tu_tracker_handler(t);

    knet_client *c = tu_client_for_port(port); /* retry off */
    tu_client tc;
    atomic_store(&fail_adds, 1);
    tu_client_start(&tc, c, &h, NULL);
    CHECK_EQ(tu_client_join(&tc), -ENOSPC);
    CHECK_EQ(atomic_load(&fail_adds), 0);
    int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    CHECK_GE(fd, 0);
    EXPECT_PEER_CLOSED(fd);
    close(fd);
    knet_client_free(c);
    CHECK_FDS(base);

    tu_counter_init(&backoff_logged);
    knet_set_log(backoff_sink, KNET_LOG_WARN, NULL);
    c = tu_client_for_port(port);
    knet_client_enable_retry(c);
    knet_client_set_retry_backoff(c, 60000, 60000);
    atomic_store(&fail_adds, 1);
    tu_client_start(&tc, c, &h, NULL);
    WAIT_GE(&backoff_logged, 1);
    fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    CHECK_GE(fd, 0);
    EXPECT_PEER_CLOSED(fd);
    close(fd);
    CHECK_EQ(fcntl(lfd, F_SETFL, O_NONBLOCK), 0);
    CHECK_EQ(accept(lfd, NULL, NULL), -1); /* one dial, then the wait */
    CHECK(errno == EAGAIN || errno == EWOULDBLOCK);
    CHECK_EQ(knet_client_close(c), 0); /* interrupts the 60 s wait */
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    knet_set_log(NULL, KNET_LOG_WARN, NULL);
    knet_client_free(c);
    tu_counter_destroy(&backoff_logged);
    CHECK_EQ(tu_counter_get(&t->connects), 0);
    tu_tracker_free(t);
    close(lfd);
}

/* A resolve that fails for memory or descriptors reports that, not KNET_ERESOLVE
 * (which says the name does not resolve): EAI_MEMORY is -ENOMEM, EAI_SYSTEM its errno. */
static void test_resolve_out_of_resources(void)
{
    const int fails[] = {EAI_MEMORY, EAI_SYSTEM, EAI_NONAME};
    const int want[] = {-ENOMEM, -EMFILE, KNET_ERESOLVE};
    for (int i = 0; i < 3; i++) {
        knet_server *s = knet_server_new("localhost:0");
        CHECK(s != NULL);
        atomic_store(&resolve_fails_with, fails[i]);
        CHECK_EQ(knet_server_listen_and_serve(s, NULL, NULL), want[i]);
        knet_server_free(s);
        knet_client *c = knet_client_new("localhost:1"); /* retry off */
        CHECK(c != NULL);
        atomic_store(&resolve_fails_with, fails[i]);
        CHECK_EQ(knet_client_dial_and_serve(c, NULL, NULL), want[i]);
        knet_client_free(c);
    }
}

/* Holds the loop running it in receive until hold_go (for test_relisten_fails_after_close). */
static tu_counter hold_in, hold_go;

static void holding_receive(knet_conn *c, const void *buf, size_t len, void *ud)
{
    (void)c, (void)buf, (void)len, (void)ud;
    tu_counter_add(&hold_in, 1);
    WAIT_GE(&hold_go, 1);
}

/* A listen that failed on its loop, then a second listen of the same server closed
 * while it resolves and failing to bind: it returns with nothing of the close's left
 * queued on any loop, so the caller may free the server at once. (Before, the close
 * saw the first listen's loop and posted stop tasks to every loop; the failing listen
 * did not wait for them and a loop ran them on the freed server: ASan
 * heap-use-after-free. One loop is held meanwhile so its task runs after the free.) */
static void test_relisten_fails_after_close(void)
{
    tu_counter_init(&resolves_held);
    tu_counter_init(&resolves_released);
    tu_counter_init(&hold_in);
    tu_counter_init(&hold_go);
    knet_handler hh = {NULL, holding_receive, NULL};
    tu_server hs;
    int hport = tu_server_start(&hs, "127.0.0.1:0", &hh, NULL);
    CHECK_GT(hport, 0);

    int holder;
    int port = tu_reserve_port(&holder);
    close(holder); /* free for the first listen, which binds it and then fails */
    char addr[64];
    snprintf(addr, sizeof addr, "localhost:%d", port); /* a name: the resolve can be held */
    tu_server ts;
    tu_server_init(&ts, addr, NULL, NULL);
    atomic_store(&fail_adds, 1);
    CHECK_EQ(knet_server_listen_and_serve(ts.srv, NULL, NULL), -ENOSPC);
    int occ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0); /* the second bind fails */
    CHECK_GE(occ, 0);
    struct sockaddr_in a = tu_loopback(port);
    CHECK_EQ(bind(occ, (struct sockaddr *)&a, sizeof a), 0);
    CHECK_EQ(listen(occ, 8), 0);

    atomic_store(&hold_resolves, true);
    CHECK_EQ(pthread_create(&ts.thread, NULL, tu_server_main, &ts), 0);
    WAIT_GE(&resolves_held, 1);
    atomic_store(&hold_resolves, false);
    int peer = tu_connect(hport);
    tu_write_str(peer, "x");
    WAIT_GE(&hold_in, 1); /* one loop held */
    CHECK_EQ(knet_server_close(ts.srv), 0);
    tu_counter_add(&resolves_released, 1);
    CHECK_EQ(tu_server_join(&ts), -EADDRINUSE); /* which frees the server at once */
    tu_counter_add(&hold_go, 1);
    close(peer);
    /* hs's stop tasks run on every loop after anything queued there before. */
    CHECK_EQ(tu_server_stop(&hs), KNET_ESERVERCLOSED);
    close(occ);
    tu_counter_destroy(&resolves_held);
    tu_counter_destroy(&resolves_released);
    tu_counter_destroy(&hold_in);
    tu_counter_destroy(&hold_go);
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    RUN(test_no_loop_thread_starts); /* before the loops start, as the next one */
    RUN(test_loops_out_of_fds); /* before tu_begin, whose warm-up starts the loops */
    RUN(test_some_loop_threads_start); /* the start that works, after the two that fail */
    tu_begin();
    RUN(test_listener_not_watched);
    RUN(test_client_new_out_of_fds);
    RUN(test_closed_while_resolving);
    RUN(test_client_conn_not_watched);
    RUN(test_resolve_out_of_resources);
    RUN(test_relisten_fails_after_close);
    return tu_end();
}
