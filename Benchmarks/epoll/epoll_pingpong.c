/*
 * epoll_pingpong: the raw-epoll contender of knet's benchmark suite, the
 * practical ceiling. One level-triggered epoll per thread, connections spread
 * round-robin over the threads; each readiness event reads up to 16 KiB into
 * the thread's buffer and writes it straight back; only an unwritten remainder
 * is queued on the connection (and EPOLLOUT armed only while it waits).
 *
 *   epoll_pingpong [--host H] server PORT THREADS
 *   epoll_pingpong [--host H] client PORT CONNS BLOCK SECONDS THREADS
 */
#define _GNU_SOURCE
#include "../common/bench.h"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <sys/epoll.h>

/* One connection: its socket and the bytes it still owes its peer. */
struct conn {
    int fd;
    uint32_t pend_off; /* first unwritten byte in pend */
    uint32_t pend_len; /* bytes queued after pend_off */
    uint32_t pend_cap;
    unsigned char *pend;
};

/* One event-loop thread. */
struct loop {
    int ep;
    pthread_t tid;
    uint64_t bytes; /* client: bytes read (read by main after join) */
    uint64_t msgs;  /* client: read completions */
    unsigned char buf[BENCH_READ_BUF];
} __attribute__((aligned(64)));

static struct loop *loops;
static int nloops;
static int listen_fd = -1;
static int is_client;
static atomic_bool stop_flag;
static atomic_int lost; /* client: connections closed before the end (peer closed or error) */
static unsigned next_loop; /* round-robin cursor, used by loop 0 only */

/* Marks the listening socket in epoll data (connections carry their struct conn). */
static struct conn listen_marker;

static void conn_close(struct conn *c)
{
    if (is_client)
        atomic_fetch_add(&lost, 1);
    close(c->fd); /* also removes it from its epoll set */
    free(c->pend);
    free(c);
}

/* Appends len bytes to the connection's queue; returns 0 or -1 (out of memory). */
static int conn_queue(struct conn *c, const unsigned char *p, size_t len)
{
    size_t need = (size_t)c->pend_off + c->pend_len + len;
    if (need > c->pend_cap) {
        if (c->pend_off > 0) { /* compact first */
            memmove(c->pend, c->pend + c->pend_off, c->pend_len);
            c->pend_off = 0;
            need = (size_t)c->pend_len + len;
        }
        if (need > c->pend_cap) {
            size_t cap = c->pend_cap ? c->pend_cap : BENCH_READ_BUF;
            while (cap < need)
                cap *= 2;
            unsigned char *np = realloc(c->pend, cap);
            if (np == NULL)
                return -1;
            c->pend = np;
            c->pend_cap = (uint32_t)cap;
        }
    }
    memcpy(c->pend + c->pend_off + c->pend_len, p, len);
    c->pend_len += (uint32_t)len;
    return 0;
}

static void conn_arm(struct loop *l, struct conn *c, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.ptr = c};
    (void)epoll_ctl(l->ep, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Writes p[0..len) now, queueing what the socket does not take; returns 0 or -1 (close). */
static int conn_send(struct loop *l, struct conn *c, const unsigned char *p, size_t len)
{
    if (c->pend_len > 0) /* keep order: already waiting for EPOLLOUT */
        return conn_queue(c, p, len);
    ssize_t w = send(c->fd, p, len, MSG_NOSIGNAL);
    if (w < 0) {
        if (errno != EAGAIN && errno != EINTR)
            return -1;
        w = 0;
    }
    if ((size_t)w < len) {
        if (conn_queue(c, p + w, len - (size_t)w) != 0)
            return -1;
        conn_arm(l, c, EPOLLIN | EPOLLOUT);
    }
    return 0;
}

/* Registers a new connection with loop l (callable from any thread: the
 * epoll_ctl publishes c to l). Returns c, or NULL on failure. */
static struct conn *loop_add(struct loop *l, int fd)
{
    struct conn *c = calloc(1, sizeof *c);
    if (c == NULL)
        return NULL;
    c->fd = fd;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    if (epoll_ctl(l->ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
        free(c);
        return NULL;
    }
    return c;
}

static void on_accept(void)
{
    for (int i = 0; i < 64; i++) { /* bounded, so accepting cannot starve loop 0 */
        int fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return; /* EAGAIN, or EMFILE etc.: level-triggered, retried next round */
        bench_nodelay(fd);
        struct loop *target = &loops[next_loop++ % (unsigned)nloops];
        if (loop_add(target, fd) == NULL)
            close(fd);
    }
}

static void on_readable(struct loop *l, struct conn *c)
{
    ssize_t n = read(c->fd, l->buf, sizeof l->buf);
    if (n <= 0) {
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return;
        conn_close(c);
        return;
    }
    l->bytes += (uint64_t)n;
    l->msgs++;
    if (conn_send(l, c, l->buf, (size_t)n) != 0)
        conn_close(c);
}

/* Writes queued bytes; returns -1 when it closed (and freed) c, else 0. */
static int on_writable(struct loop *l, struct conn *c)
{
    ssize_t w = send(c->fd, c->pend + c->pend_off, c->pend_len, MSG_NOSIGNAL);
    if (w < 0) {
        if (errno != EAGAIN && errno != EINTR) {
            conn_close(c);
            return -1;
        }
        return 0;
    }
    c->pend_off += (uint32_t)w;
    c->pend_len -= (uint32_t)w;
    if (c->pend_len == 0) {
        c->pend_off = 0;
        conn_arm(l, c, EPOLLIN);
    }
    return 0;
}

static void *loop_run(void *arg)
{
    struct loop *l = arg;
    struct epoll_event evs[256];
    /* Clients poll the stop flag; servers run until killed. */
    int timeout = is_client ? 100 : -1;
    while (!atomic_load_explicit(&stop_flag, memory_order_relaxed)) {
        int n = epoll_wait(l->ep, evs, 256, timeout);
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            uint32_t e = evs[i].events;
            if (c == &listen_marker) {
                on_accept();
                continue;
            }
            if ((e & EPOLLOUT) && on_writable(l, c) != 0)
                continue;
            if (e & (EPOLLIN | EPOLLERR | EPOLLHUP))
                on_readable(l, c);
        }
    }
    return NULL;
}

static void on_signal(int sig)
{
    (void)sig;
    _exit(0);
}

static void start_loops(int n)
{
    nloops = n;
    loops = aligned_alloc(64, sizeof(struct loop) * (size_t)n);
    if (loops == NULL) {
        perror("alloc");
        exit(1);
    }
    memset(loops, 0, sizeof(struct loop) * (size_t)n);
    for (int i = 0; i < n; i++) {
        loops[i].ep = epoll_create1(EPOLL_CLOEXEC);
        if (loops[i].ep < 0) {
            perror("epoll_create1");
            exit(1);
        }
    }
}

static int run_server(const struct bench_args *a)
{
    listen_fd = bench_listen(a->host, a->port, SOCK_NONBLOCK);
    if (listen_fd < 0)
        return 1;
    start_loops(a->threads);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &listen_marker};
    if (epoll_ctl(loops[0].ep, EPOLL_CTL_ADD, listen_fd, &ev) != 0) {
        perror("epoll_ctl");
        return 1;
    }
    for (int i = 1; i < nloops; i++)
        if (pthread_create(&loops[i].tid, NULL, loop_run, &loops[i]) != 0) {
            perror("pthread_create");
            return 1;
        }
    loop_run(&loops[0]); /* until killed */
    return 0;
}

static int run_client(const struct bench_args *a)
{
    struct sockaddr_storage ss;
    socklen_t len;
    is_client = 1;
    if (bench_resolve(a->host, a->port, &ss, &len) != 0)
        return 1;
    unsigned char *block = malloc((size_t)a->block);
    if (block == NULL)
        return 1;
    bench_fill_block(block, (size_t)a->block);
    start_loops(a->threads);
    for (int i = 0; i < a->conns; i++) {
        int fd = bench_connect(&ss, len);
        if (fd < 0) {
            fprintf(stderr, "connect %s:%d: %s\n", a->host, a->port, strerror(errno));
            return 1;
        }
        (void)fcntl(fd, F_SETFL, O_NONBLOCK);
        struct loop *l = &loops[i % nloops];
        struct conn *c = loop_add(l, fd);
        /* The loops do not run yet, so this thread may still touch c. */
        if (c == NULL || conn_send(l, c, block, (size_t)a->block) != 0) {
            perror("first block");
            return 1;
        }
    }
    free(block);
    for (int i = 0; i < nloops; i++)
        if (pthread_create(&loops[i].tid, NULL, loop_run, &loops[i]) != 0) {
            perror("pthread_create");
            return 1;
        }
    bench_sleep_ms((uint64_t)a->seconds * 1000);
    atomic_store(&stop_flag, true);
    uint64_t bytes = 0, msgs = 0;
    for (int i = 0; i < nloops; i++) {
        pthread_join(loops[i].tid, NULL);
        bytes += loops[i].bytes;
        msgs += loops[i].msgs;
    }
    bench_print_results(bytes, msgs, a->seconds);
    return bench_check_lost(atomic_load(&lost), a->conns);
}

int main(int argc, char **argv)
{
    struct bench_args a;
    bench_parse(argc, argv, &a);
    bench_raise_nofile();
    signal(SIGPIPE, SIG_IGN);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    return a.server ? run_server(&a) : run_client(&a);
}
