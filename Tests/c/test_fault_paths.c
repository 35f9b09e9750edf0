/* Error paths no other test drives (found with gcov): allocations failing where the
 * read path keeps a partial frame, where a send queues what the socket did not take
 * (on and off the loop, at every allocation a framed send makes), where a connection
 * is made (accept, dial) and where a server or client first serves; a listen that
 * fails after its bind; a host without IPv6 (the wildcard listener falls back to
 * IPv4); an accept that loses its connection (ECONNABORTED); a second serve call; a
 * process stopped and continued (every loop's epoll_wait returns EINTR). Each checks
 * the promised code, the callbacks and that no descriptor is left open.
 * malloc, calloc, realloc, listen, socket, accept4 and the loops' epoll_wait are
 * wrapped at link time. */
#include "testutil.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>

void *__real_malloc(size_t n);
void *__wrap_malloc(size_t n);
void *__real_calloc(size_t n, size_t size);
void *__wrap_calloc(size_t n, size_t size);
void *__real_realloc(void *p, size_t n);
void *__wrap_realloc(void *p, size_t n);
int __real_listen(int fd, int backlog);
int __wrap_listen(int fd, int backlog);
int __real_socket(int domain, int type, int protocol);
int __wrap_socket(int domain, int type, int protocol);
int __real_accept4(int fd, struct sockaddr *sa, socklen_t *sl, int flags);
int __wrap_accept4(int fd, struct sockaddr *sa, socklen_t *sl, int flags);
struct epoll_event;
int __real_knet__sys_epoll_wait(int epfd, struct epoll_event *evs, int max, int timeout);
int __wrap_knet__sys_epoll_wait(int epfd, struct epoll_event *evs, int max, int timeout);

/* This thread's mallocs and reallocs / callocs left before they fail (-1 = never fail). */
static _Thread_local long tls_malloc_budget = -1;
static _Thread_local long tls_calloc_budget = -1;
static _Atomic bool loop_calloc_fails;    /* every calloc of a loop thread fails */
static _Atomic size_t loop_realloc_above; /* a loop thread's realloc above this fails (0 = off) */
static _Atomic int listen_errno;          /* the next listen fails with it (0 = off) */
static _Atomic bool no_ipv6;              /* socket(AF_INET6) fails: EAFNOSUPPORT */
static _Atomic int accepts_to_abort;      /* accept4 calls that fail with ECONNABORTED */
static _Thread_local bool tls_no_fds;     /* this thread's sockets fail: EMFILE */
static _Atomic long failed;               /* allocations refused */

static bool on_loop_thread(void)
{
    char name[16] = "";
    pthread_getname_np(pthread_self(), name, sizeof name);
    return strncmp(name, "knet-loop-", 10) == 0;
}

static bool take_budget(long *budget)
{
    if (*budget < 0)
        return true;
    if (*budget == 0) {
        atomic_fetch_add(&failed, 1);
        return false;
    }
    (*budget)--;
    return true;
}

void *__wrap_malloc(size_t n)
{
    if (!take_budget(&tls_malloc_budget)) {
        errno = ENOMEM;
        return NULL;
    }
    return __real_malloc(n);
}

void *__wrap_calloc(size_t n, size_t size)
{
    if (atomic_load(&loop_calloc_fails) && on_loop_thread()) {
        atomic_fetch_add(&failed, 1);
        errno = ENOMEM;
        return NULL;
    }
    if (!take_budget(&tls_calloc_budget)) {
        errno = ENOMEM;
        return NULL;
    }
    return __real_calloc(n, size);
}

void *__wrap_realloc(void *p, size_t n)
{
    if (!take_budget(&tls_malloc_budget)) {
        errno = ENOMEM;
        return NULL;
    }
    size_t above = atomic_load(&loop_realloc_above);
    if (above && n > above && on_loop_thread()) {
        atomic_fetch_add(&failed, 1);
        errno = ENOMEM;
        return NULL;
    }
    return __real_realloc(p, n);
}

int __wrap_listen(int fd, int backlog)
{
    int e = atomic_exchange(&listen_errno, 0);
    if (e) {
        errno = e;
        return -1;
    }
    return __real_listen(fd, backlog);
}

int __wrap_socket(int domain, int type, int protocol)
{
    if (tls_no_fds) {
        errno = EMFILE;
        return -1;
    }
    if (domain == AF_INET6 && atomic_load(&no_ipv6)) {
        errno = EAFNOSUPPORT;
        return -1;
    }
    return __real_socket(domain, type, protocol);
}

int __wrap_accept4(int fd, struct sockaddr *sa, socklen_t *sl, int flags)
{
    int left = atomic_load(&accepts_to_abort);
    while (left > 0 && !atomic_compare_exchange_weak(&accepts_to_abort, &left, left - 1)) {
    }
    if (left > 0) {
        errno = ECONNABORTED;
        return -1;
    }
    return __real_accept4(fd, sa, sl, flags);
}

static _Atomic long epoll_eintr; /* epoll_waits of the loops that returned EINTR */

int __wrap_knet__sys_epoll_wait(int epfd, struct epoll_event *evs, int max, int timeout)
{
    int n = __real_knet__sys_epoll_wait(epfd, evs, max, timeout);
    if (n < 0 && errno == EINTR)
        atomic_fetch_add(&epoll_eintr, 1);
    return n;
}

/* Sends what the socket takes of buf, ignoring errors (the server may close first). */
static void send_quiet(int fd, const void *buf, size_t n)
{
    const char *p = buf;
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return;
        p += w;
        n -= (size_t)w;
    }
}

/* Reads until EOF or a reset; returns the bytes read. */
static size_t read_to_end(int fd)
{
    static char buf[65536];
    size_t total = 0;
    for (;;) {
        ssize_t r = tu_read_some(fd, buf, sizeof buf);
        if (r == 0 || r == -ECONNRESET)
            return total;
        CHECK_GT(r, 0);
        total += (size_t)r;
    }
}

/* An echo round trip on a new connection to port (the server still serves). */
static void expect_echo(int port)
{
    int fd = tu_connect(port);
    char b[2];
    tu_write_str(fd, "ok");
    READ_EXACT(fd, b, 2);
    CHECK(memcmp(b, "ok", 2) == 0);
    close(fd);
}

/* ------------------------------------------------------------------ read path */

/* The partial frame of a read cannot be kept (realloc fails): the connection closes
 * with -ENOMEM, no receive, exactly one connect(false); the server serves on. */
static void test_partial_frame_store_out_of_memory(void)
{
    tu_tracker *t = tu_tracker_new();
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, &knet_std_codec);
    int fd = tu_connect(port);
    WAIT_GE(&t->connects, 1);
    atomic_store(&failed, 0);
    atomic_store(&loop_realloc_above, 1);
    uint8_t part[12] = {0x03, 0xe8}; /* a 1000-byte frame, 10 bytes of it */
    tu_write_all(fd, part, sizeof part);
    WAIT_GE(&t->disconnects, 1);
    atomic_store(&loop_realloc_above, 0);
    CHECK_GE(atomic_load(&failed), 1);
    CHECK_EQ(atomic_load(&t->recs[0].reason), -ENOMEM);
    CHECK_EQ(tu_counter_get(&t->msgs), 0);
    EXPECT_PEER_CLOSED(fd);
    close(fd);
    int fd2 = tu_connect(port);
    uint8_t frame[4] = {0, 2, 'h', 'i'};
    tu_write_all(fd2, frame, sizeof frame);
    WAIT_GE(&t->msgs, 1);
    close(fd2);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    CHECK_EQ(tu_counter_get(&t->disconnects), 2);
    tu_tracker_free(t);
}

/* A partial frame larger than half the read buffer reads on in its own buffer; when
 * that buffer cannot grow the connection closes with -ENOMEM (no receive, one
 * connect(false)). */
static void test_large_partial_frame_growth_out_of_memory(void)
{
    static knet_length_field lf = {4, false, 1 << 20};
    knet_codec codec;
    CHECK_EQ(knet_length_codec(&codec, &lf), 0);
    tu_tracker *t = tu_tracker_new();
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, &codec);
    int fd = tu_connect(port);
    WAIT_GE(&t->connects, 1);
    atomic_store(&failed, 0);
    /* The kept partial frame (at most a read buffer, 64 KiB) still fits; its own
     * buffer's growth (to 96 KiB and more) does not. */
    atomic_store(&loop_realloc_above, (size_t)80 << 10);
    enum { BODY = 200000 };
    static uint8_t msg[4 + BODY];
    tu_put_len(msg, BODY, 4, false);
    send_quiet(fd, msg, sizeof msg);
    WAIT_GE(&t->disconnects, 1);
    atomic_store(&loop_realloc_above, 0);
    CHECK_GE(atomic_load(&failed), 1);
    CHECK_EQ(atomic_load(&t->recs[0].reason), -ENOMEM);
    CHECK_EQ(tu_counter_get(&t->msgs), 0);
    EXPECT_PEER_CLOSED(fd);
    close(fd);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* ------------------------------------------------------------------ send path, on the loop */

enum { BIG = 8 << 20 };
static uint8_t *big_msg; /* BIG pattern bytes (seed 7) */
static _Atomic int hook_rc1, hook_rc2, hook_rc3;

/* In receive: an 8 MiB send the peer (not reading) cannot take whole, whose rest
 * cannot be queued. */
static void send_big_failing(tu_rec *r, const void *buf, size_t len)
{
    (void)buf;
    (void)len;
    tls_malloc_budget = 0;
    atomic_store(&hook_rc1, knet_conn_send(r->conn, big_msg, BIG));
    tls_malloc_budget = -1;
}

/* A direct write the socket took part of, whose rest cannot be queued: half a
 * message is on the wire, so send returns -ENOMEM and the connection closes with it
 * after the callback; the peer gets the bytes written, then EOF. */
static void test_send_on_loop_rest_not_queued(void)
{
    tu_tracker *t = tu_tracker_new();
    t->on_receive = send_big_failing;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int fd = tu_connect_ex(port, 64 << 10);
    atomic_store(&failed, 0);
    tu_write_str(fd, "x");
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(atomic_load(&hook_rc1), -ENOMEM);
    CHECK_EQ(atomic_load(&failed), 1);
    CHECK_EQ(atomic_load(&t->recs[0].reason), -ENOMEM);
    knet_stats st;
    knet_server_stats(ts.srv, &st);
    CHECK_GT(st.bytes_out, 0);
    CHECK_LT(st.bytes_out, BIG);
    CHECK_EQ(read_to_end(fd), st.bytes_out);
    close(fd);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* In receive: an 8 MiB send (part written, the rest queued), a send whose queue
 * chunk cannot be allocated, then a send that works. */
static void send_queue_failing(tu_rec *r, const void *buf, size_t len)
{
    (void)buf;
    (void)len;
    atomic_store(&hook_rc1, knet_conn_send(r->conn, big_msg, BIG));
    tls_malloc_budget = 0;
    atomic_store(&hook_rc2, knet_conn_send(r->conn, "BBBBBBBBBB", 10));
    tls_malloc_budget = -1;
    atomic_store(&hook_rc3, knet_conn_send(r->conn, "CCCCCCCCCC", 10));
}

/* A send queued behind others that cannot be queued returns -ENOMEM and leaves
 * the queue and the connection as they were: the peer gets the first and third
 * messages whole, nothing of the second. */
static void test_send_on_loop_queue_out_of_memory(void)
{
    tu_tracker *t = tu_tracker_new();
    t->on_receive = send_queue_failing;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int fd = tu_connect_ex(port, 64 << 10);
    tu_write_str(fd, "x");
    WAIT_GE(&t->msgs, 1);
    CHECK_EQ(atomic_load(&hook_rc1), 0);
    CHECK_EQ(atomic_load(&hook_rc2), -ENOMEM);
    CHECK_EQ(atomic_load(&hook_rc3), 0);
    uint8_t *got = malloc(BIG + 10);
    CHECK(got != NULL);
    READ_EXACT(fd, got, BIG + 10);
    CHECK_EQ(tu_pattern_mismatch(got, BIG, 0, 7), BIG);
    CHECK(memcmp(got + BIG, "CCCCCCCCCC", 10) == 0);
    free(got);
    CHECK_EQ(knet_server_close(ts.srv), 0);
    CHECK_EQ(read_to_end(fd), 0);
    close(fd);
    CHECK_EQ(tu_server_join(&ts), KNET_ESERVERCLOSED);
    CHECK_EQ(atomic_load(&t->recs[0].reason), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* ------------------------------------------------------------------ send path, off the loop */

static tu_counter held, release;

/* In receive: holds the loop until the test lets it go. */
static void hold_loop(tu_rec *r, const void *buf, size_t len)
{
    (void)r;
    (void)buf;
    (void)len;
    tu_counter_add(&held, 1);
    WAIT_GE(&release, 1);
}

/* A send from another thread whose inbox chunk cannot be allocated returns -ENOMEM
 * and leaves the inbox as it was (its earlier message is not cut): the peer gets the
 * sends before and after it, nothing of it. */
static void test_send_off_loop_inbox_out_of_memory(void)
{
    tu_counter_init(&held);
    tu_counter_init(&release);
    tu_tracker *t = tu_tracker_new();
    t->on_receive = hold_loop;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int fd = tu_connect(port);
    tu_write_str(fd, "h");
    WAIT_GE(&held, 1);
    knet_conn *c = t->recs[0].conn;
    static char a[1000], b[4000];
    memset(a, 'a', sizeof a);
    memset(b, 'b', sizeof b);
    CHECK_EQ(knet_conn_send(c, a, sizeof a), 0); /* the inbox's first chunk, 4 KiB */
    atomic_store(&failed, 0);
    tls_malloc_budget = 0;
    CHECK_EQ(knet_conn_send(c, b, sizeof b), -ENOMEM); /* needs a second chunk */
    tls_malloc_budget = -1;
    CHECK_EQ(atomic_load(&failed), 1);
    CHECK_EQ(knet_conn_send(c, "cc", 2), 0);
    tu_counter_add(&release, 1);
    char got[1002];
    READ_EXACT(fd, got, sizeof got);
    CHECK(memcmp(got, a, sizeof a) == 0);
    CHECK(memcmp(got + sizeof a, "cc", 2) == 0);
    CHECK_EQ(knet_server_close(ts.srv), 0);
    CHECK_EQ(read_to_end(fd), 0);
    close(fd);
    CHECK_EQ(tu_server_join(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
    tu_counter_destroy(&held);
    tu_counter_destroy(&release);
}

/* A codec that frames a message as 3 pieces per 4 bytes of it: a header copied from
 * its own storage, the 4 message bytes (referenced), a trailer: many pieces, so the
 * writer's piece array and the send's iovec array are allocated. */
static int pieces_write(knet_writer *w, const void *msg, size_t len, void *ud)
{
    (void)ud;
    static const char hdr[2] = {'<', '<'}, trl[1] = {'>'};
    const char *m = msg;
    for (size_t i = 0; i < len; i += 4) {
        int rc = knet_writer_write(w, hdr, 1);
        if (rc == 0)
            rc = knet_writer_write(w, hdr + 1, 1); /* joins the piece before it */
        if (rc == 0)
            rc = knet_writer_write(w, m + i, 2);
        if (rc == 0)
            rc = knet_writer_write(w, m + i + 2, 2); /* joins the piece before it */
        if (rc == 0)
            rc = knet_writer_write(w, trl, 1);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* Off the loop, every allocation of a send failing in turn (the writer's pieces and
 * scratch, the iovec array, the inbox chunk): each such send returns -ENOMEM and
 * queues nothing; the first that gets all its memory goes out whole. */
static void test_framed_send_out_of_memory_at_each_allocation(void)
{
    knet_codec codec = {NULL, pieces_write, NULL, 0};
    tu_tracker *t = tu_tracker_new();
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, &codec);
    int fd = tu_connect(port);
    WAIT_GE(&t->connects, 1);
    knet_conn *c = t->recs[0].conn;
    enum { GROUPS = 32 };
    static char msg[4 * GROUPS]; /* 96 pieces; 96 scratch bytes outgrow the inline 64 */
    for (size_t i = 0; i < sizeof msg; i++)
        msg[i] = (char)('A' + i % 26);
    int fails = 0, rc;
    for (long budget = 0;; budget++) {
        atomic_store(&failed, 0);
        tls_malloc_budget = budget;
        rc = knet_conn_send(c, msg, sizeof msg);
        tls_malloc_budget = -1;
        if (rc == 0)
            break;
        CHECK_EQ(rc, -ENOMEM);
        CHECK_EQ(atomic_load(&failed), 1);
        CHECK_LT(++fails, 32);
    }
    printf("  %d allocations of a send failed in turn\n", fails);
    CHECK_GE(fails, 4); /* at least the pieces, the scratch, the iovecs, the chunk */
    char want[GROUPS * 7], got[GROUPS * 7];
    for (int g = 0; g < GROUPS; g++) {
        memcpy(want + 7 * g, "<<", 2);
        memcpy(want + 7 * g + 2, msg + 4 * g, 4);
        want[7 * g + 6] = '>';
    }
    READ_EXACT(fd, got, sizeof got);
    CHECK(memcmp(got, want, sizeof want) == 0);
    CHECK_EQ(knet_server_close(ts.srv), 0);
    CHECK_EQ(read_to_end(fd), 0); /* nothing of the failed sends */
    close(fd);
    CHECK_EQ(tu_server_join(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* ------------------------------------------------------------------ making connections */

/* An accepted connection whose handle cannot be allocated is closed at once, with no
 * callbacks; the server's counters come back to no live connection and it serves on. */
static void test_accept_conn_out_of_memory(void)
{
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    atomic_store(&failed, 0);
    atomic_store(&loop_calloc_fails, true);
    int fd = tu_connect(port);
    EXPECT_PEER_CLOSED(fd);
    atomic_store(&loop_calloc_fails, false);
    close(fd);
    CHECK_GE(atomic_load(&failed), 1);
    CHECK_EQ(tu_counter_get(&t->connects), 0);
    knet_stats st;
    WAIT_UNTIL((knet_server_stats(ts.srv, &st), st.live == 0));
    CHECK_EQ(st.accepted, 1);
    expect_echo(port);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    CHECK_EQ(tu_counter_get(&t->disconnects), 1);
    tu_tracker_free(t);
}

/* A server's first serve cannot allocate its per-loop state: listen_and_serve returns
 * -ENOMEM (so do wait_listening and port), its socket is closed; the next call serves. */
static void *serve_with_calloc_failing(void *arg)
{
    tu_server *ts = arg;
    tls_calloc_budget = 0;
    void *r = tu_server_main(ts);
    tls_calloc_budget = -1;
    return r;
}

static void test_server_start_out_of_memory(void)
{
    tu_server ts;
    tu_server_init(&ts, "127.0.0.1:0", NULL, NULL);
    atomic_store(&failed, 0);
    CHECK_EQ(pthread_create(&ts.thread, NULL, serve_with_calloc_failing, &ts), 0);
    CHECK_EQ(knet_server_wait_listening(ts.srv, TU_DEADLINE_MS), -ENOMEM);
    WAIT_GE(&ts.done, 1);
    CHECK_EQ(pthread_join(ts.thread, NULL), 0);
    CHECK_EQ(ts.rc, -ENOMEM);
    CHECK_EQ(knet_server_port(ts.srv), -ENOMEM);
    CHECK_GE(atomic_load(&failed), 1);
    CHECK_FDS(tu_fd_baseline); /* its socket closed */
    /* The same server serves on a later call (the error stands until it begins). */
    CHECK_EQ(pthread_create(&ts.thread, NULL, tu_server_main, &ts), 0);
    WAIT_UNTIL(knet_server_port(ts.srv) > 0);
    int port = knet_server_port(ts.srv);
    int fd = tu_connect(port);
    close(fd);
    CHECK_EQ(knet_server_close(ts.srv), 0);
    WAIT_GE(&ts.done, 2);
    CHECK_EQ(pthread_join(ts.thread, NULL), 0);
    CHECK_EQ(ts.rc, KNET_ESERVERCLOSED);
    knet_server_free(ts.srv);
    tu_counter_destroy(&ts.done);
}

/* Runs dial_and_serve with this thread's callocs limited to tc->codec.ud of them. */
static void *dial_with_calloc_budget(void *arg)
{
    tu_client *tc = arg;
    tls_calloc_budget = (long)(intptr_t)tc->codec.ud;
    void *r = tu_client_main(tc);
    tls_calloc_budget = -1;
    return r;
}

/* Runs dial_and_serve of cli (retry off, tracker t) on a thread with `budget` callocs. */
static void dial_start(tu_client *tc, knet_client *cli, tu_tracker *t, long budget)
{
    memset(tc, 0, sizeof *tc);
    tc->cli = cli;
    tc->handler = tu_tracker_handler(t);
    tc->codec.ud = (void *)(intptr_t)budget; /* has_codec stays false */
    tu_counter_init(&tc->done);
    CHECK_EQ(pthread_create(&tc->thread, NULL, dial_with_calloc_budget, tc), 0);
}

/* A dial (retry off) that connected, then ran out of memory: for the client's
 * per-loop state (its first serve), and in a second call of the same client, after
 * one connection was served and ended, for the next connection's handle.
 * dial_and_serve returns -ENOMEM both times, the server's side of the dial that
 * failed is closed, no callbacks for it. */
static void test_dial_out_of_memory(void)
{
    int port;
    int lfd = tu_listen(&port, 0);
    tu_tracker *t = tu_tracker_new();
    knet_client *cli = tu_client_for_port(port);
    tu_client tc;
    atomic_store(&failed, 0);
    dial_start(&tc, cli, t, 0); /* the owner's first calloc fails */
    CHECK_EQ(tu_client_join(&tc), -ENOMEM);
    CHECK_EQ(atomic_load(&failed), 1);
    int afd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    CHECK_GE(afd, 0);
    EXPECT_PEER_CLOSED(afd);
    close(afd);
    CHECK_EQ(tu_counter_get(&t->connects), 0);

    atomic_store(&failed, 0);
    dial_start(&tc, cli, t, 2); /* the owner's and one connection's, not the next one */
    afd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    CHECK_GE(afd, 0);
    WAIT_GE(&t->connects, 1);
    close(afd); /* ends the connection: the client dials again */
    int afd2 = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    CHECK_GE(afd2, 0);
    CHECK_EQ(tu_client_join(&tc), -ENOMEM);
    CHECK_EQ(atomic_load(&failed), 1);
    EXPECT_PEER_CLOSED(afd2);
    close(afd2);
    CHECK_EQ(tu_counter_get(&t->connects), 1);
    CHECK_EQ(tu_counter_get(&t->disconnects), 1);
    CHECK_EQ(atomic_load(&t->recs[0].reason), KNET_EOF);
    knet_client_free(cli);
    tu_tracker_free(t);
    close(lfd);
}


/* A dial whose socket cannot be made (out of descriptors) fails with that error:
 * dial_and_serve returns -EMFILE with retry off, and no callbacks run. */
static void *dial_without_fds(void *arg)
{
    tls_no_fds = true;
    void *r = tu_client_main(arg);
    tls_no_fds = false;
    return r;
}

static void test_dial_socket_fails(void)
{
    int port;
    int lfd = tu_listen(&port, 0);
    tu_tracker *t = tu_tracker_new();
    tu_client tc;
    memset(&tc, 0, sizeof tc);
    tc.cli = tu_client_for_port(port);
    tc.handler = tu_tracker_handler(t);
    tu_counter_init(&tc.done);
    CHECK_EQ(pthread_create(&tc.thread, NULL, dial_without_fds, &tc), 0);
    CHECK_EQ(tu_client_join(&tc), -EMFILE);
    CHECK_EQ(tu_counter_get(&t->connects), 0);
    knet_client_free(tc.cli);
    tu_tracker_free(t);
    close(lfd);
}

/* In receive: on the first connection 8 MiB its peer does not read; on others an echo. */
static void send_big(tu_rec *r, const void *buf, size_t len)
{
    if (r->index == 0)
        atomic_store(&hook_rc1, knet_conn_send(r->conn, big_msg, BIG));
    else
        CHECK_EQ(knet_conn_send(r->conn, buf, len), 0);
}

/* A peer that half-closes while knet still writes it a large queue (the drain knet
 * begins on EOF, 3 s) and then resets: the reset ends the connection at once, with a
 * reset reason (not -ETIMEDOUT at the drain's deadline), exactly one connect(false). */
static void test_reset_during_eof_drain(void)
{
    tu_tracker *t = tu_tracker_new();
    t->on_receive = send_big;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int fd = tu_connect_ex(port, 64 << 10);
    tu_write_str(fd, "x");
    WAIT_GE(&t->msgs, 1);
    CHECK_EQ(atomic_load(&hook_rc1), 0);
    CHECK_EQ(shutdown(fd, SHUT_WR), 0);
    /* The FIN is the server socket's (CLOSE_WAIT); a round trip on another connection of
     * the one loop then comes after knet read it. */
    WAIT_UNTIL(tu_tcp_sockets(port, tu_sock_port(fd), 8 /* CLOSE_WAIT */) == 1);
    expect_echo(port);
    CHECK_EQ(knet_conn_close_reason(t->recs[0].conn), 1); /* draining */
    tu_set_linger0(fd);
    close(fd);
    WAIT_UNTIL(atomic_load(&t->recs[0].disconnected)); /* the echo's may end first */
    int reason = atomic_load(&t->recs[0].reason);
    if (reason != -ECONNRESET && reason != -EPIPE)
        tu_fail_op(__FILE__, __LINE__, "reason", "is", "-ECONNRESET or -EPIPE", reason, -ECONNRESET);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* ------------------------------------------------------------------ listening */

/* A listen whose socket cannot be made (out of descriptors): listen_and_serve and
 * wait_listening return -EMFILE; on ":0" too (no IPv4 fallback for that error). */
static void *serve_without_fds(void *arg)
{
    tls_no_fds = true;
    void *r = tu_server_main(arg);
    tls_no_fds = false;
    return r;
}

static void test_listen_socket_fails(void)
{
    static const char *addrs[] = {"127.0.0.1:0", ":0"};
    for (int i = 0; i < 2; i++) {
        tu_server ts;
        tu_server_init(&ts, addrs[i], NULL, NULL);
        CHECK_EQ(pthread_create(&ts.thread, NULL, serve_without_fds, &ts), 0);
        CHECK_EQ(knet_server_wait_listening(ts.srv, TU_DEADLINE_MS), -EMFILE);
        CHECK_EQ(tu_server_join(&ts), -EMFILE);
    }
}

/* listen failing after the bind (another socket bound the port with SO_REUSEADDR
 * and listened first): listen_and_serve, wait_listening and port report the error,
 * the socket is closed, and a later call on the same server listens. */
static void test_listen_fails_after_bind(void)
{
    tu_server ts;
    tu_server_init(&ts, "127.0.0.1:0", NULL, NULL);
    atomic_store(&listen_errno, EADDRINUSE);
    CHECK_EQ(tu_server_run(&ts), -EADDRINUSE);
    WAIT_GE(&ts.done, 1);
    CHECK_EQ(pthread_join(ts.thread, NULL), 0);
    CHECK_EQ(ts.rc, -EADDRINUSE);
    CHECK_EQ(knet_server_port(ts.srv), -EADDRINUSE);
    CHECK_EQ(atomic_load(&listen_errno), 0);
    CHECK_FDS(tu_fd_baseline);
    /* A later call listens (the error stands until it begins). */
    CHECK_EQ(pthread_create(&ts.thread, NULL, tu_server_main, &ts), 0);
    WAIT_UNTIL(knet_server_port(ts.srv) > 0);
    int port = knet_server_port(ts.srv);
    int fd = tu_connect(port);
    close(fd);
    CHECK_EQ(knet_server_close(ts.srv), 0);
    WAIT_GE(&ts.done, 2);
    CHECK_EQ(pthread_join(ts.thread, NULL), 0);
    CHECK_EQ(ts.rc, KNET_ESERVERCLOSED);
    knet_server_free(ts.srv);
    tu_counter_destroy(&ts.done);
}

/* On a host without IPv6 (socket(AF_INET6) fails: EAFNOSUPPORT) ":0" listens on
 * every IPv4 interface: a port, and 127.0.0.1 reaches it. */
static void test_wildcard_listen_without_ipv6(void)
{
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    atomic_store(&no_ipv6, true);
    int port = tu_server_start(&ts, ":0", &h, NULL);
    atomic_store(&no_ipv6, false);
    CHECK_GT(port, 0);
    int fd = tu_connect(port);
    char b[2];
    tu_write_str(fd, "ok");
    READ_EXACT(fd, b, 2);
    char addr[KNET_ADDRSTRLEN], want[KNET_ADDRSTRLEN];
    CHECK_GT(knet_conn_local_addr(t->recs[0].conn, addr, sizeof addr), 0); /* still open */
    snprintf(want, sizeof want, "127.0.0.1:%d", port);
    CHECK(strcmp(addr, want) == 0);
    close(fd);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

static _Atomic int accept_warnings;

static void warn_sink(int level, const char *msg, void *ud)
{
    (void)ud;
    if (level >= KNET_LOG_WARN && strstr(msg, "accept error"))
        atomic_fetch_add(&accept_warnings, 1);
}

/* accept failing for the one pending connection (ECONNABORTED: the peer reset it
 * in the queue) skips to the next at once: no back-off, the connection behind it is
 * served. */
static void test_accept_aborted_skips_on(void)
{
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    knet_set_log(warn_sink, KNET_LOG_WARN, NULL);
    atomic_store(&accept_warnings, 0);
    atomic_store(&accepts_to_abort, 3);
    expect_echo(port);
    CHECK_EQ(atomic_load(&accepts_to_abort), 0);
    CHECK_EQ(atomic_load(&accept_warnings), 0);
    knet_set_log(NULL, KNET_LOG_WARN, NULL);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* A second listen_and_serve while one serves returns KNET_EBUSY and leaves the
 * serving one alone (its port, its connections). */
static void test_second_serve_busy(void)
{
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    knet_handler h = tu_tracker_handler(t);
    CHECK_EQ(knet_server_listen_and_serve(ts.srv, &h, NULL), KNET_EBUSY);
    CHECK_EQ(knet_server_port(ts.srv), port);
    CHECK_EQ(knet_server_wait_listening(ts.srv, 0), port);
    expect_echo(port);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* The process stopped (SIGSTOP) and continued (SIGCONT), as a shell's ^Z and fg do:
 * every loop's epoll_wait returns EINTR, and the loops go on serving. */
static char loop_thread_state(void)
{
    DIR *d = opendir("/proc/self/task");
    CHECK(d != NULL);
    char st = '?';
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char path[300], buf[512];
        snprintf(path, sizeof path, "/proc/self/task/%s/stat", e->d_name);
        int sfd = open(path, O_RDONLY | O_CLOEXEC);
        if (sfd < 0)
            continue;
        ssize_t n = read(sfd, buf, sizeof buf - 1);
        close(sfd);
        buf[n > 0 ? n : 0] = '\0';
        char *p = strrchr(buf, ')');
        if (strstr(buf, "(knet-loop-0)") && p && p[1] == ' ')
            st = p[2];
    }
    closedir(d);
    return st;
}

/* Forks a child that stops this process (SIGSTOP), waits until it is stopped (state
 * T) and continues it (SIGCONT). */
static void stop_and_continue_me(void)
{
    pid_t me = getpid();
    pid_t child = fork();
    CHECK_GE(child, 0);
    if (child == 0) {
        kill(me, SIGSTOP);
        char path[64], buf[512];
        snprintf(path, sizeof path, "/proc/%d/stat", (int)me);
        for (int i = 0; i < 20000; i++) {
            int sfd = open(path, O_RDONLY | O_CLOEXEC);
            if (sfd < 0)
                break;
            ssize_t n = read(sfd, buf, sizeof buf - 1);
            close(sfd);
            buf[n > 0 ? n : 0] = '\0';
            char *p = strrchr(buf, ')');
            if (p && p[1] == ' ' && p[2] == 'T')
                break;
            struct timespec ts1 = {0, 1000000};
            nanosleep(&ts1, NULL);
        }
        kill(me, SIGCONT);
        _exit(0);
    }
    int status;
    pid_t w;
    while ((w = waitpid(child, &status, 0)) < 0 && errno == EINTR) {
    }
    CHECK_EQ(w, child);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

/* The process stopped (SIGSTOP) and continued (SIGCONT), as a shell's ^Z and fg do:
 * a loop asleep in epoll_wait gets EINTR, and goes on serving (before, untested: any
 * other error of epoll_wait aborts). Stopped with its loop asleep (state S; a round
 * trip first), up to 20 times until one EINTR is seen. */
static void test_stop_and_continue(void)
{
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int fd = tu_connect(port);
    atomic_store(&epoll_eintr, 0);
    for (int round = 0; round < 20 && atomic_load(&epoll_eintr) == 0; round++) {
        char b[2];
        tu_write_str(fd, "ok");
        READ_EXACT(fd, b, 2);
        WAIT_UNTIL(loop_thread_state() == 'S');
        stop_and_continue_me();
    }
    CHECK_GE(atomic_load(&epoll_eintr), 1);
    char b[2];
    tu_write_str(fd, "ok");
    READ_EXACT(fd, b, 2);
    close(fd);
    expect_echo(port);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* Runs listen_and_serve with this thread's mallocs and callocs limited as ts->codec.ud
 * says (bits 0-7: mallocs, 8-15: callocs; 255 = unlimited). */
static void *serve_with_budgets(void *arg)
{
    tu_server *ts = arg;
    long b = (long)(intptr_t)ts->codec.ud;
    tls_malloc_budget = (b & 255) == 255 ? -1 : (b & 255);
    tls_calloc_budget = (b >> 8 & 255) == 255 ? -1 : (b >> 8 & 255);
    void *r = tu_server_main(ts);
    tls_malloc_budget = tls_calloc_budget = -1;
    return r;
}

/* The loops cannot be made (out of memory: their array, the second loop's read buffer,
 * the first's): the first listen returns -ENOMEM, every descriptor made for them is
 * closed again, the loop count stays settable; the next listen starts them. Run before
 * anything else starts the loops. */
static void test_loops_out_of_memory(void)
{
    int fds = tu_fd_count();
    static const long budgets[] = {255 | 0 << 8, 1 | 255 << 8, 0 | 255 << 8};
    for (size_t i = 0; i < sizeof budgets / sizeof budgets[0]; i++) {
        CHECK_EQ(knet_set_loop_threads(2), 0);
        tu_server ts;
        tu_server_init(&ts, "127.0.0.1:0", NULL, NULL);
        ts.codec.ud = (void *)(intptr_t)budgets[i]; /* has_codec stays false */
        atomic_store(&failed, 0);
        CHECK_EQ(pthread_create(&ts.thread, NULL, serve_with_budgets, &ts), 0);
        CHECK_EQ(tu_server_join(&ts), -ENOMEM);
        CHECK_EQ(atomic_load(&failed), 1);
        CHECK_EQ(tu_fd_count(), fds);
        CHECK_EQ(knet_loop_threads(), 2);
    }
    printf("[  OK  ] test_loops_out_of_memory\n");
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    test_loops_out_of_memory();
    CHECK_EQ(knet_set_loop_threads(1), 0);
    big_msg = malloc(BIG);
    CHECK(big_msg != NULL);
    tu_pattern_fill(big_msg, BIG, 0, 7);
    tu_begin();
    RUN(test_partial_frame_store_out_of_memory);
    RUN(test_large_partial_frame_growth_out_of_memory);
    RUN(test_send_on_loop_rest_not_queued);
    RUN(test_send_on_loop_queue_out_of_memory);
    RUN(test_send_off_loop_inbox_out_of_memory);
    RUN(test_framed_send_out_of_memory_at_each_allocation);
    RUN(test_accept_conn_out_of_memory);
    RUN(test_server_start_out_of_memory);
    RUN(test_dial_out_of_memory);
    RUN(test_dial_socket_fails);
    RUN(test_reset_during_eof_drain);
    RUN(test_listen_socket_fails);
    RUN(test_listen_fails_after_bind);
    RUN(test_wildcard_listen_without_ipv6);
    RUN(test_accept_aborted_skips_on);
    RUN(test_second_serve_busy);
    RUN(test_stop_and_continue);
    free(big_msg);
    return tu_end();
}
