/*
 * knet_pingpong: knet (through its C API) in knet's ping-pong benchmark suite.
 *
 *   knet_pingpong [--host H] server PORT THREADS
 *   knet_pingpong [--host H] client PORT CONNS BLOCK SECONDS THREADS
 *   knet_pingpong                  (smoke run: server + 10 x 16 KiB client, 10 s)
 *
 * Server: raw-stream codec, a handler whose receive sends the bytes back.
 * Client: CONNS persistent knet clients, each blocking in
 * knet_client_dial_and_serve on its own thread, started one after another;
 * connect(true) sends the first block, receive echoes and counts. Prints the
 * suite's four result lines, counted from when every connection is up.
 */
#define _GNU_SOURCE
#include "common/bench.h"

#include <knet/knet.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>

/* One client connection's state; its handler's ud. */
struct pp_client {
    knet_client *client;
    pthread_t tid;
    int rc;    /* what knet_client_dial_and_serve returned */
    int state; /* 0 dialing, 1 connected, 2 dial_and_serve returned; under settle_mu */
};

/* Counters per loop thread, as the epoll and libuv clients count per loop: a
 * receive touches its own thread's line, not a cold line per connection. Only
 * that thread writes them (relaxed load + store, no read-modify-write); main
 * reads them at the start and the end of the count. */
struct pp_counter {
    _Atomic uint64_t bytes;
    _Atomic uint64_t msgs;
} __attribute__((aligned(64)));

#define PP_MAX_LOOPS 1024 /* THREADS above it are refused (KNET_LOOP_THREADS's bound too) */
static struct pp_counter counters[PP_MAX_LOOPS];
static _Atomic int ncounters;
static _Thread_local struct pp_counter *my_counter;

/* run_client starts the clients one at a time, each once the one before has
 * connected, so client connection i lands on client loop i % THREADS and
 * (accepted in the same order) pairs with one server loop, as in the other
 * contenders; racing dials would pair loops at random and add run-to-run noise. */
static pthread_mutex_t settle_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t settle_cv = PTHREAD_COND_INITIALIZER;

static void settle(struct pp_client *pc, int state)
{
    pthread_mutex_lock(&settle_mu);
    pc->state = state;
    pthread_cond_broadcast(&settle_cv);
    pthread_mutex_unlock(&settle_mu);
}

/* Waits until pc has connected (1) or its dial_and_serve returned (2). */
static int wait_settled(struct pp_client *pc)
{
    pthread_mutex_lock(&settle_mu);
    while (pc->state == 0)
        pthread_cond_wait(&settle_cv, &settle_mu);
    int state = pc->state;
    pthread_mutex_unlock(&settle_mu);
    return state;
}

/* Sums every loop thread's counters. */
static void totals(uint64_t *bytes, uint64_t *msgs)
{
    *bytes = *msgs = 0;
    int n = atomic_load(&ncounters);
    for (int i = 0; i < n; i++) {
        *bytes += atomic_load_explicit(&counters[i].bytes, memory_order_relaxed);
        *msgs += atomic_load_explicit(&counters[i].msgs, memory_order_relaxed);
    }
}

/* connect(false) calls before main stops the clients: lost connections, which
 * knet's persistent client would redial at once (hiding the loss). */
static atomic_int lost;
static atomic_bool stopping;

static const unsigned char *first_block;
static size_t first_block_len;

/* "host:port", with IPv6 hosts in brackets as knet expects. */
static void format_addr(char *out, size_t n, const char *host, int port)
{
    if (strchr(host, ':') != NULL && host[0] != '[')
        snprintf(out, n, "[%s]:%d", host, port);
    else
        snprintf(out, n, "%s:%d", host, port);
}

static void echo_receive(knet_conn *conn, const void *buf, size_t len, void *ud)
{
    (void)ud;
    (void)knet_conn_send(conn, buf, len);
}

static void client_connect(knet_conn *conn, bool connected, void *ud)
{
    if (connected) {
        /* connect(true) runs on the loop thread that runs this connection's receives. */
        if (my_counter == NULL)
            my_counter = &counters[atomic_fetch_add(&ncounters, 1)];
        (void)knet_conn_send(conn, first_block, first_block_len);
        settle(ud, 1);
    } else if (!atomic_load(&stopping)) {
        atomic_fetch_add(&lost, 1);
    }
}

static void client_receive(knet_conn *conn, const void *buf, size_t len, void *ud)
{
    (void)ud;
    struct pp_counter *k = my_counter; /* set by connect(true) on this thread */
    atomic_store_explicit(&k->bytes, atomic_load_explicit(&k->bytes, memory_order_relaxed) + len,
                          memory_order_relaxed);
    atomic_store_explicit(&k->msgs, atomic_load_explicit(&k->msgs, memory_order_relaxed) + 1,
                          memory_order_relaxed);
    (void)knet_conn_send(conn, buf, len);
}

static void *client_thread(void *arg)
{
    struct pp_client *pc = arg;
    knet_handler h = {client_connect, client_receive, pc};
    pc->rc = knet_client_dial_and_serve(pc->client, &h, &knet_default_codec);
    settle(pc, 2);
    return NULL;
}

/* Runs CONNS clients for SECONDS and prints the result lines; returns the exit status. */
static int run_client(const char *host, int port, int conns, int block, int seconds)
{
    char addr[300];
    format_addr(addr, sizeof addr, host, port);
    unsigned char *blk = malloc((size_t)block);
    struct pp_client *cs = calloc((size_t)conns, sizeof *cs);
    if (blk == NULL || cs == NULL) {
        perror("alloc");
        return 1;
    }
    bench_fill_block(blk, (size_t)block);
    first_block = blk;
    first_block_len = (size_t)block;

    /* The dialing threads only block in knet: a small stack keeps 1000s cheap. */
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    int started = 0;
    for (int i = 0; i < conns; i++) {
        cs[i].client = knet_client_new(addr);
        if (cs[i].client == NULL || pthread_create(&cs[i].tid, &attr, client_thread, &cs[i]) != 0) {
            fprintf(stderr, "cannot start client %d\n", i);
            break;
        }
        started++;
        if (wait_settled(&cs[i]) != 1)
            break; /* its dial failed: reported below */
    }
    pthread_attr_destroy(&attr);

    /* Counted from the moment every connection is up. */
    uint64_t bytes0, msgs0, bytes, msgs;
    totals(&bytes0, &msgs0);
    if (started == conns)
        bench_sleep_ms((uint64_t)seconds * 1000);
    totals(&bytes, &msgs);
    bytes -= bytes0;
    msgs -= msgs0;
    int status = started == conns ? 0 : 1;
    atomic_store(&stopping, true);
    for (int i = 0; i < started; i++)
        (void)knet_client_close(cs[i].client);
    for (int i = 0; i < started; i++) {
        pthread_join(cs[i].tid, NULL);
        if (cs[i].rc != KNET_ECLIENTCLOSED) {
            fprintf(stderr, "client %d: %s\n", i, knet_strerror(cs[i].rc));
            status = 1;
        }
        knet_client_free(cs[i].client);
    }
    if (started < conns && cs[started].client != NULL)
        knet_client_free(cs[started].client);
    bench_print_results(bytes, msgs, seconds);
    if (bench_check_lost(atomic_load(&lost), conns) != 0)
        status = 1;
    free(cs);
    free(blk);
    return status;
}

static const knet_handler echo_handler = {NULL, echo_receive, NULL};

/* Closes the server on SIGTERM/SIGINT (knet calls are not async-signal-safe,
 * so the signals are taken synchronously here instead of in a handler). */
static void *signal_thread(void *arg)
{
    knet_server *s = arg;
    sigset_t set;
    int sig;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    if (sigwait(&set, &sig) == 0)
        (void)knet_server_close(s);
    return NULL;
}

static int run_server(const char *host, int port)
{
    char addr[300];
    format_addr(addr, sizeof addr, host, port);
    knet_server *s = knet_server_new(addr);
    if (s == NULL)
        return 1;
    pthread_t sigtid;
    if (pthread_create(&sigtid, NULL, signal_thread, s) != 0)
        return 1;
    int rc = knet_server_listen_and_serve(s, &echo_handler, &knet_default_codec);
    if (rc != KNET_ESERVERCLOSED) {
        fprintf(stderr, "listen %s: %s\n", addr, knet_strerror(rc));
        return 1; /* the signal thread still waits: exit without freeing */
    }
    pthread_join(sigtid, NULL);
    knet_server_free(s);
    return 0;
}

static void *smoke_server_thread(void *arg)
{
    knet_server *s = arg;
    int rc = knet_server_listen_and_serve(s, &echo_handler, &knet_default_codec);
    if (rc != KNET_ESERVERCLOSED)
        fprintf(stderr, "smoke server: %s\n", knet_strerror(rc));
    return NULL;
}

/* No arguments: server and a 10 x 16 KiB client in one process for 10 s. */
static int run_smoke(void)
{
    knet_server *s = knet_server_new("127.0.0.1:0");
    pthread_t tid;
    if (s == NULL || pthread_create(&tid, NULL, smoke_server_thread, s) != 0)
        return 1;
    int port = knet_server_wait_listening(s, 5000);
    int status = 1;
    if (port > 0)
        status = run_client("127.0.0.1", port, 10, 16384, 10);
    else
        fprintf(stderr, "smoke server did not listen: %s\n", knet_strerror(port));
    (void)knet_server_close(s);
    pthread_join(tid, NULL);
    knet_server_free(s);
    return status;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    bench_raise_nofile();
    if (argc == 1)
        return run_smoke();
    struct bench_args a;
    bench_parse(argc, argv, &a);
    /* knet_set_loop_threads takes more, but every client loop needs a counter. */
    if (a.threads > PP_MAX_LOOPS) {
        fprintf(stderr, "%s: THREADS %d is above %d\n", argv[0], a.threads, PP_MAX_LOOPS);
        bench_usage(argv[0]);
    }
    int rc = knet_set_loop_threads((unsigned)a.threads);
    if (rc != 0) {
        fprintf(stderr, "knet_set_loop_threads: %s\n", knet_strerror(rc));
        return 1;
    }
    if (a.server) {
        /* Block the signals before knet starts its threads, so only the
         * signal thread receives them. */
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGTERM);
        sigaddset(&set, SIGINT);
        pthread_sigmask(SIG_BLOCK, &set, NULL);
        return run_server(a.host, a.port);
    }
    return run_client(a.host, a.port, a.conns, a.block, a.seconds);
}
