/*
 * uv_pingpong: the libuv contender of knet's benchmark suite. One uv_loop per
 * thread; loop 0 accepts and hands connections round-robin to the loops.
 * Reads go into a 16 KiB per-loop buffer and are echoed with uv_try_write;
 * only what the socket does not take is copied into a uv_write request.
 *
 *   uv_pingpong [--host H] server PORT THREADS
 *   uv_pingpong [--host H] client PORT CONNS BLOCK SECONDS THREADS
 */
#define _GNU_SOURCE
#include "../common/bench.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <uv.h>

/* One loop thread. */
struct uvloop {
    uv_loop_t loop;
    uv_async_t async; /* server: new fds queued; client: stop */
    pthread_t tid;
    /* client: bytes read and read callbacks; only this loop writes them (plain
     * load + store), main reads them when every connect settled and after join */
    _Atomic uint64_t bytes, msgs;
    pthread_mutex_t mu;
    int *fds; /* server: accepted fds handed over by loop 0, under mu */
    size_t nfds, capfds;
    /* libuv's suggested 64 KiB, as its docs and examples allocate: libuv reads again
     * after a read that fills the buffer, so a 16 KiB buffer cost it one more read
     * (EAGAIN) per 16 KiB block, a read the ceiling and knet do not make. */
    char buf[64 * 1024];
};

/* One connection. */
struct uconn {
    uv_tcp_t tcp; /* first: the handle pointer is the connection pointer */
    struct uvloop *l;
};

/* A queued echo remainder: the request and its bytes in one allocation. */
struct wreq {
    uv_write_t req;
    char data[];
};

static struct uvloop *loops;
static int nloops;
static int is_client;
static uv_tcp_t server_tcp;
static unsigned next_loop; /* loop 0 only */
static char *block;
static int block_len;
static struct sockaddr_storage peer;
static atomic_int settled; /* client: connects that completed or failed */
static atomic_int lost;    /* client: connections closed before the end */

static void on_close_free(uv_handle_t *h)
{
    free(h);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)suggested; /* 64 KiB: the loop's buffer has that size */
    struct uconn *c = (struct uconn *)h;
    *buf = uv_buf_init(c->l->buf, sizeof c->l->buf);
}

static void on_write_done(uv_write_t *req, int status)
{
    (void)status;
    free(req);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct uconn *c = (struct uconn *)s;
    if (nread <= 0) {
        if (nread < 0) {
            if (is_client)
                atomic_fetch_add(&lost, 1);
            uv_close((uv_handle_t *)s, on_close_free);
        }
        return;
    }
    struct uvloop *l = c->l;
    atomic_store_explicit(&l->bytes, atomic_load_explicit(&l->bytes, memory_order_relaxed) + (uint64_t)nread,
                          memory_order_relaxed);
    atomic_store_explicit(&l->msgs, atomic_load_explicit(&l->msgs, memory_order_relaxed) + 1,
                          memory_order_relaxed);
    uv_buf_t b = uv_buf_init(buf->base, (unsigned)nread);
    int w = uv_try_write(s, &b, 1);
    if (w == UV_EAGAIN)
        w = 0;
    if (w < 0) {
        uv_close((uv_handle_t *)s, on_close_free);
        return;
    }
    if (w < nread) {
        size_t rem = (size_t)nread - (size_t)w;
        struct wreq *r = malloc(sizeof *r + rem);
        if (r == NULL) {
            uv_close((uv_handle_t *)s, on_close_free);
            return;
        }
        memcpy(r->data, buf->base + w, rem);
        uv_buf_t rb = uv_buf_init(r->data, (unsigned)rem);
        if (uv_write(&r->req, s, &rb, 1, on_write_done) != 0) {
            free(r);
            uv_close((uv_handle_t *)s, on_close_free);
        }
    }
}

/* Adopts an accepted fd on loop l (runs on l's thread). */
static void adopt_fd(struct uvloop *l, int fd)
{
    struct uconn *c = malloc(sizeof *c);
    if (c == NULL) {
        close(fd);
        return;
    }
    c->l = l;
    uv_tcp_init(&l->loop, &c->tcp);
    if (uv_tcp_open(&c->tcp, fd) != 0) {
        close(fd);
        uv_close((uv_handle_t *)&c->tcp, on_close_free);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
}

static void on_handover(uv_async_t *a)
{
    struct uvloop *l = a->data;
    pthread_mutex_lock(&l->mu);
    for (size_t i = 0; i < l->nfds; i++)
        adopt_fd(l, l->fds[i]);
    l->nfds = 0;
    pthread_mutex_unlock(&l->mu);
}

static void on_connection(uv_stream_t *server, int status)
{
    if (status < 0)
        return;
    struct uvloop *l0 = &loops[0];
    struct uvloop *target = &loops[next_loop++ % (unsigned)nloops];
    struct uconn *c = malloc(sizeof *c);
    if (c == NULL)
        return;
    c->l = l0;
    uv_tcp_init(&l0->loop, &c->tcp);
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
        uv_close((uv_handle_t *)&c->tcp, on_close_free);
        return;
    }
    if (target == l0) {
        uv_tcp_nodelay(&c->tcp, 1);
        uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
        return;
    }
    /* Another loop's handles may only be touched on its thread: pass it the
     * fd (a dup, since closing the handle here closes the original). */
    uv_os_fd_t fd;
    int nfd = -1;
    if (uv_fileno((uv_handle_t *)&c->tcp, &fd) == 0)
        nfd = dup(fd);
    uv_close((uv_handle_t *)&c->tcp, on_close_free);
    if (nfd < 0)
        return;
    pthread_mutex_lock(&target->mu);
    if (target->nfds == target->capfds) {
        size_t cap = target->capfds ? target->capfds * 2 : 64;
        int *nf = realloc(target->fds, cap * sizeof *nf);
        if (nf == NULL) {
            pthread_mutex_unlock(&target->mu);
            close(nfd);
            return;
        }
        target->fds = nf;
        target->capfds = cap;
    }
    target->fds[target->nfds++] = nfd;
    pthread_mutex_unlock(&target->mu);
    uv_async_send(&target->async);
}

static void on_stop(uv_async_t *a)
{
    uv_stop(a->loop);
}

static void on_connect(uv_connect_t *req, int status)
{
    struct uconn *c = req->data;
    free(req);
    atomic_fetch_add(&settled, 1);
    if (status < 0) {
        fprintf(stderr, "connect: %s\n", uv_strerror(status));
        uv_close((uv_handle_t *)&c->tcp, on_close_free);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    uv_buf_t b = uv_buf_init(block, (unsigned)block_len); /* block lives for the whole run */
    uv_write_t *w = malloc(sizeof *w);
    if (w == NULL || uv_write(w, (uv_stream_t *)&c->tcp, &b, 1, on_write_done) != 0) {
        free(w);
        uv_close((uv_handle_t *)&c->tcp, on_close_free);
        return;
    }
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
}

static void *loop_thread(void *arg)
{
    struct uvloop *l = arg;
    uv_run(&l->loop, UV_RUN_DEFAULT);
    return NULL;
}

static void init_loops(int n)
{
    nloops = n;
    loops = calloc((size_t)n, sizeof *loops);
    if (loops == NULL) {
        perror("calloc");
        exit(1);
    }
    for (int i = 0; i < n; i++) {
        struct uvloop *l = &loops[i];
        uv_loop_init(&l->loop);
        pthread_mutex_init(&l->mu, NULL);
        uv_async_init(&l->loop, &l->async, is_client ? on_stop : on_handover);
        l->async.data = l;
    }
}

static void on_signal(int sig)
{
    (void)sig;
    _exit(0);
}

static int run_server(const struct bench_args *a)
{
    struct sockaddr_storage ss;
    socklen_t len;
    if (bench_resolve(a->host, a->port, &ss, &len) != 0)
        return 1;
    init_loops(a->threads);
    uv_tcp_init(&loops[0].loop, &server_tcp);
    int rc = uv_tcp_bind(&server_tcp, (const struct sockaddr *)&ss, 0);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&server_tcp, 4096, on_connection);
    if (rc != 0) {
        fprintf(stderr, "listen %s:%d: %s\n", a->host, a->port, uv_strerror(rc));
        return 1;
    }
    for (int i = 1; i < nloops; i++)
        if (pthread_create(&loops[i].tid, NULL, loop_thread, &loops[i]) != 0) {
            perror("pthread_create");
            return 1;
        }
    uv_run(&loops[0].loop, UV_RUN_DEFAULT); /* until killed */
    return 0;
}

static int run_client(const struct bench_args *a)
{
    socklen_t len;
    is_client = 1;
    if (bench_resolve(a->host, a->port, &peer, &len) != 0)
        return 1;
    block_len = a->block;
    block = malloc((size_t)a->block);
    if (block == NULL)
        return 1;
    bench_fill_block((unsigned char *)block, (size_t)a->block);
    init_loops(a->threads);
    /* Start every connect before the loops run: each loop is set up from
     * this thread first and only then handed to its own thread. */
    for (int i = 0; i < a->conns; i++) {
        struct uvloop *l = &loops[i % nloops];
        struct uconn *c = malloc(sizeof *c);
        uv_connect_t *req = malloc(sizeof *req);
        if (c == NULL || req == NULL)
            return 1;
        c->l = l;
        req->data = c;
        uv_tcp_init(&l->loop, &c->tcp);
        int rc = uv_tcp_connect(req, &c->tcp, (const struct sockaddr *)&peer, on_connect);
        if (rc != 0) {
            fprintf(stderr, "connect: %s\n", uv_strerror(rc));
            return 1;
        }
    }
    for (int i = 0; i < nloops; i++)
        if (pthread_create(&loops[i].tid, NULL, loop_thread, &loops[i]) != 0) {
            perror("pthread_create");
            return 1;
        }
    /* Count from the moment every connection is up, as the other clients do. */
    while (atomic_load(&settled) < a->conns)
        bench_sleep_ms(1);
    uint64_t bytes0 = 0, msgs0 = 0;
    for (int i = 0; i < nloops; i++) {
        bytes0 += atomic_load_explicit(&loops[i].bytes, memory_order_relaxed);
        msgs0 += atomic_load_explicit(&loops[i].msgs, memory_order_relaxed);
    }
    bench_sleep_ms((uint64_t)a->seconds * 1000);
    uint64_t bytes = 0, msgs = 0;
    for (int i = 0; i < nloops; i++)
        uv_async_send(&loops[i].async);
    for (int i = 0; i < nloops; i++) {
        pthread_join(loops[i].tid, NULL);
        bytes += atomic_load(&loops[i].bytes);
        msgs += atomic_load(&loops[i].msgs);
    }
    bench_print_results(bytes - bytes0, msgs - msgs0, a->seconds);
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
