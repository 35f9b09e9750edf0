/*
 * Shared helpers of the C contenders and tools of knet's benchmark suite:
 * argument parsing for the common ping-pong protocol, result printing,
 * socket setup. Header-only (static functions) so each program is one file.
 */
#ifndef KNET_BENCH_H
#define KNET_BENCH_H

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* Size of the per-thread read buffer every C contender reads into. */
#define BENCH_READ_BUF 16384

/* Parsed command line of a ping-pong contender. */
struct bench_args {
    const char *host; /* "--host H", default 127.0.0.1 */
    int server;       /* 1 = server mode, 0 = client mode */
    int port;
    int threads;
    int conns;   /* client only */
    int block;   /* client only */
    int seconds; /* client only */
};

/* Prints the usage of a ping-pong contender and exits with status 2. */
static inline _Noreturn void bench_usage(const char *prog)
{
    fprintf(stderr,
            "usage: %s [--host H] server PORT THREADS\n"
            "       %s [--host H] client PORT CONNS BLOCK SECONDS THREADS\n",
            prog, prog);
    exit(2);
}

/* Parses a positive decimal integer argument, or exits with the usage. */
static inline int bench_positive(const char *s, const char *prog)
{
    char *end = NULL;
    long v = strtol(s, &end, 10);
    if (end == s || *end != '\0' || v <= 0 || v > 1000000000L)
        bench_usage(prog);
    return (int)v;
}

/* Parses "[--host H] server PORT THREADS" or "[--host H] client PORT CONNS BLOCK SECONDS THREADS". */
static inline void bench_parse(int argc, char **argv, struct bench_args *a)
{
    const char *prog = argv[0];
    int i = 1;
    memset(a, 0, sizeof *a);
    a->host = "127.0.0.1";
    if (argc > 2 && strcmp(argv[1], "--host") == 0) {
        a->host = argv[2];
        i = 3;
    }
    if (argc - i == 3 && strcmp(argv[i], "server") == 0) {
        a->server = 1;
        a->port = bench_positive(argv[i + 1], prog);
        a->threads = bench_positive(argv[i + 2], prog);
    } else if (argc - i == 6 && strcmp(argv[i], "client") == 0) {
        a->port = bench_positive(argv[i + 1], prog);
        a->conns = bench_positive(argv[i + 2], prog);
        a->block = bench_positive(argv[i + 3], prog);
        a->seconds = bench_positive(argv[i + 4], prog);
        a->threads = bench_positive(argv[i + 5], prog);
    } else {
        bench_usage(prog);
    }
    if (a->port > 65535)
        bench_usage(prog);
}

/* Raises the soft open-file limit to the hard limit (10,000-connection runs). */
static inline void bench_raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        (void)setrlimit(RLIMIT_NOFILE, &rl);
    }
}

/* Fills buf with the protocol's first block: byte i = i % 128. */
static inline void bench_fill_block(unsigned char *buf, size_t n)
{
    for (size_t i = 0; i < n; i++)
        buf[i] = (unsigned char)(i % 128);
}

/* Prints the four result lines every contender prints, to stdout. */
static inline void bench_print_results(uint64_t bytes, uint64_t msgs, int seconds)
{
    double mibps = (double)bytes / (double)seconds / 1048576.0;
    printf("%llu total bytes read\n", (unsigned long long)bytes);
    printf("%llu total messages read\n", (unsigned long long)msgs);
    printf("%llu average message size\n", (unsigned long long)(msgs ? bytes / msgs : 0));
    printf("%.1f MiB/s throughput\n", mibps);
    fflush(stdout);
}

/* A client whose connection closed before the end of the count measured fewer
 * connections than asked (and its server broke the protocol): says so and returns
 * the exit status 1, else 0. */
static inline int bench_check_lost(int lost, int conns)
{
    if (lost > 0) {
        fprintf(stderr, "%d of %d connections closed during the run\n", lost, conns);
        return 1;
    }
    return 0;
}

/* Monotonic clock in nanoseconds. */
static inline uint64_t bench_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Sleeps for ms milliseconds (restarting after signals). */
static inline void bench_sleep_ms(uint64_t ms)
{
    struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* Resolves host:port (numeric or name, IPv4 or IPv6) into *ss; returns 0 or -1. */
static inline int bench_resolve(const char *host, int port, struct sockaddr_storage *ss, socklen_t *len)
{
    struct addrinfo hints, *res = NULL;
    char service[16];
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    snprintf(service, sizeof service, "%d", port);
    int rc = getaddrinfo(host, service, &hints, &res);
    if (rc != 0 || res == NULL) {
        fprintf(stderr, "cannot resolve %s: %s\n", host, gai_strerror(rc));
        return -1;
    }
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    *len = (socklen_t)res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

/* Sets TCP_NODELAY on fd. */
static inline void bench_nodelay(int fd)
{
    int one = 1;
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* Opens a listening socket on host:port (flags: e.g. SOCK_NONBLOCK); returns fd or -1. */
static inline int bench_listen(const char *host, int port, int flags)
{
    struct sockaddr_storage ss;
    socklen_t len;
    int one = 1;
    if (bench_resolve(host, port, &ss, &len) != 0)
        return -1;
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC | flags, 0);
    if (fd < 0) {
        perror("socket");
        return -1;
    }
    (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&ss, len) != 0 || listen(fd, 4096) != 0) {
        fprintf(stderr, "listen %s:%d: %s\n", host, port, strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

/* Connects a blocking TCP socket to host:port with TCP_NODELAY; returns fd or -1. */
static inline int bench_connect(const struct sockaddr_storage *ss, socklen_t len)
{
    int fd = socket(ss->ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (const struct sockaddr *)ss, len) != 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    bench_nodelay(fd);
    return fd;
}

#endif /* KNET_BENCH_H */
