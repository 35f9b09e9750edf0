/*
 * scale: configuration D (64-byte ping-pong) on 10,000 connections against any
 * contender's server, checking that every connection is served.
 *
 *   scale [--host H] PORT CONNS SECONDS
 *
 * Opens CONNS connections in windows of 256 and proves each with one 64-byte
 * round trip (so the server has accepted them all, and a full accept queue
 * never costs a SYN retransmit). Then runs the D protocol on all of them at
 * once for SECONDS: every connection keeps one 64-byte block in flight and
 * writes back whatever it reads. Prints the connections, how many were served
 * (got at least one whole block back) in the timed phase, the fewest blocks
 * any connection got back, and the 64-byte messages echoed per second. Exits
 * non-zero when a connection fails.
 */
#define _GNU_SOURCE
#include "../common/bench.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/time.h>

#define BLOCK 64
#define WINDOW 256

/* One connection: bytes echoed back to it in the timed phase, and what it
 * still has to write (a short write keeps the rest here). */
struct sconn {
    int fd;
    uint64_t got;
    unsigned char out[BLOCK];
    size_t outlen;
};

static int ep;

static void arm(struct sconn *c, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) != 0) {
        perror("epoll_ctl");
        exit(1);
    }
}

/* Writes what c holds; arms EPOLLOUT while some is left. */
static void flush(struct sconn *c)
{
    while (c->outlen > 0) {
        ssize_t w = send(c->fd, c->out, c->outlen, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            arm(c, EPOLLIN | EPOLLOUT);
            return;
        }
        if (w <= 0) {
            fprintf(stderr, "send: %s\n", strerror(errno));
            exit(1);
        }
        memmove(c->out, c->out + w, c->outlen - (size_t)w);
        c->outlen -= (size_t)w;
        if (c->outlen == 0)
            arm(c, EPOLLIN);
    }
}

/* Opens and proves connections [from, to): one 64-byte round trip each. */
static void open_window(struct sconn *cs, int from, int to, const struct sockaddr_storage *ss,
                        socklen_t len, const unsigned char *block)
{
    struct timeval tv = {10, 0};
    for (int k = from; k < to; k++) {
        cs[k].fd = bench_connect(ss, len);
        if (cs[k].fd < 0) {
            fprintf(stderr, "connect #%d: %s\n", k, strerror(errno));
            exit(1);
        }
        (void)setsockopt(cs[k].fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        if (send(cs[k].fd, block, BLOCK, MSG_NOSIGNAL) != BLOCK) {
            fprintf(stderr, "send #%d: %s\n", k, strerror(errno));
            exit(1);
        }
    }
    for (int k = from; k < to; k++) {
        unsigned char back[BLOCK];
        size_t got = 0;
        while (got < BLOCK) {
            ssize_t r = recv(cs[k].fd, back + got, BLOCK - got, 0);
            if (r <= 0) {
                fprintf(stderr, "echo #%d: %s\n", k, r == 0 ? "closed" : strerror(errno));
                exit(1);
            }
            got += (size_t)r;
        }
        if (memcmp(back, block, BLOCK) != 0) {
            fprintf(stderr, "echo #%d: wrong bytes\n", k);
            exit(1);
        }
        int fl = fcntl(cs[k].fd, F_GETFL);
        (void)fcntl(cs[k].fd, F_SETFL, fl | O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &cs[k]};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, cs[k].fd, &ev) != 0) {
            perror("epoll_ctl");
            exit(1);
        }
    }
}

int main(int argc, char **argv)
{
    const char *host = "127.0.0.1";
    int i = 1;
    if (argc > 2 && strcmp(argv[1], "--host") == 0) {
        host = argv[2];
        i = 3;
    }
    if (argc - i != 3) {
        fprintf(stderr, "usage: %s [--host H] PORT CONNS SECONDS\n", argv[0]);
        return 2;
    }
    int port = bench_positive(argv[i], argv[0]);
    int n = bench_positive(argv[i + 1], argv[0]);
    int seconds = bench_positive(argv[i + 2], argv[0]);
    struct sockaddr_storage ss;
    socklen_t len;
    bench_raise_nofile();
    signal(SIGPIPE, SIG_IGN);
    if (bench_resolve(host, port, &ss, &len) != 0)
        return 1;
    struct sconn *cs = calloc((size_t)n, sizeof *cs);
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (cs == NULL || ep < 0) {
        perror("setup");
        return 1;
    }
    unsigned char block[BLOCK];
    bench_fill_block(block, sizeof block);
    for (int k = 0; k < n; k += WINDOW)
        open_window(cs, k, k + WINDOW < n ? k + WINDOW : n, &ss, len, block);

    /* The timed phase: every connection puts one block in flight. */
    for (int k = 0; k < n; k++) {
        memcpy(cs[k].out, block, BLOCK);
        cs[k].outlen = BLOCK;
        flush(&cs[k]);
    }
    uint64_t end = bench_now_ns() + (uint64_t)seconds * 1000000000ull;
    struct epoll_event evs[256];
    unsigned char buf[BLOCK];
    for (;;) {
        uint64_t now = bench_now_ns();
        if (now >= end)
            break;
        int timeout = (int)((end - now) / 1000000ull) + 1;
        int m = epoll_wait(ep, evs, 256, timeout);
        if (m < 0 && errno == EINTR)
            continue;
        if (m < 0) {
            perror("epoll_wait");
            return 1;
        }
        for (int e = 0; e < m; e++) {
            struct sconn *c = evs[e].data.ptr;
            if (evs[e].events & EPOLLOUT)
                flush(c);
            if (!(evs[e].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) || c->outlen > 0)
                continue; /* read once the echo of the last read is out */
            ssize_t r = recv(c->fd, buf, sizeof buf, 0);
            if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
                continue;
            if (r <= 0) {
                fprintf(stderr, "connection %d: %s\n", (int)(c - cs),
                        r == 0 ? "closed by the server" : strerror(errno));
                return 1;
            }
            c->got += (uint64_t)r;
            memcpy(c->out, buf, (size_t)r);
            c->outlen = (size_t)r;
            flush(c);
        }
    }
    uint64_t total = 0, fewest = UINT64_MAX;
    int served = 0;
    for (int k = 0; k < n; k++) {
        total += cs[k].got;
        if (cs[k].got >= BLOCK)
            served++;
        if (cs[k].got / BLOCK < fewest)
            fewest = cs[k].got / BLOCK;
    }
    printf("%d connections\n", n);
    printf("%d served\n", served);
    printf("%llu fewest blocks\n", (unsigned long long)fewest);
    printf("%.0f msg/s\n", (double)total / BLOCK / seconds);
    fflush(stdout);
    for (int k = 0; k < n; k++)
        close(cs[k].fd);
    return 0;
}
