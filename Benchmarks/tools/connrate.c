/*
 * connrate: connection rate of an echo server.
 *
 *   connrate [--host H] PORT [SECONDS [CONCURRENCY]]
 *
 * For SECONDS (default: env SECONDS, else 10) keeps CONCURRENCY (default 4)
 * connection attempts in flight; each connects, sends 64 bytes, reads the 64
 * back and closes. The close is abortive (SO_LINGER 0, an RST): a FIN close
 * would leave every client port in TIME_WAIT and exhaust the ephemeral ports
 * within seconds at these rates. Prints completed connections per second.
 */
#define _GNU_SOURCE
#include "../common/bench.h"

#include <signal.h>
#include <sys/epoll.h>

/* One connection attempt in flight. */
struct slot {
    int fd;
    int got;      /* echo bytes read */
    int sent;     /* request written */
};

static struct sockaddr_storage peer;
static socklen_t peer_len;
static int ep;
static uint64_t errors;
static unsigned char msg[64];

static void slot_start(struct slot *s)
{
    for (;;) {
        s->fd = socket(peer.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        s->got = 0;
        s->sent = 0;
        if (s->fd < 0) {
            perror("socket");
            exit(1);
        }
        bench_nodelay(s->fd);
        int rc = connect(s->fd, (struct sockaddr *)&peer, peer_len);
        if (rc == 0 || errno == EINPROGRESS) {
            struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.ptr = s};
            if (epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev) != 0) {
                perror("epoll_ctl");
                exit(1);
            }
            return;
        }
        errors++;
        close(s->fd);
        if (errors > 1000) {
            fprintf(stderr, "connect: %s\n", strerror(errno));
            exit(1);
        }
    }
}

static void slot_abort(struct slot *s)
{
    struct linger lg = {1, 0};
    (void)setsockopt(s->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close(s->fd);
}

int main(int argc, char **argv)
{
    const char *host = "127.0.0.1";
    int i = 1;
    if (argc > 2 && strcmp(argv[1], "--host") == 0) {
        host = argv[2];
        i = 3;
    }
    if (argc - i < 1 || argc - i > 3) {
        fprintf(stderr, "usage: %s [--host H] PORT [SECONDS [CONCURRENCY]]\n", argv[0]);
        return 2;
    }
    int port = bench_positive(argv[i], argv[0]);
    const char *env = getenv("SECONDS");
    int seconds = argc - i >= 2 ? bench_positive(argv[i + 1], argv[0])
                  : env != NULL   ? bench_positive(env, argv[0])
                                  : 10;
    int conc = argc - i >= 3 ? bench_positive(argv[i + 2], argv[0]) : 4;
    bench_raise_nofile();
    signal(SIGPIPE, SIG_IGN);
    bench_fill_block(msg, sizeof msg);
    if (bench_resolve(host, port, &peer, &peer_len) != 0)
        return 1;
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct slot *slots = calloc((size_t)conc, sizeof *slots);
    if (ep < 0 || slots == NULL)
        return 1;
    for (int k = 0; k < conc; k++)
        slot_start(&slots[k]);

    uint64_t done = 0;
    uint64_t start = bench_now_ns();
    uint64_t end = start + (uint64_t)seconds * 1000000000ull;
    struct epoll_event evs[64];
    unsigned char buf[64];
    while (bench_now_ns() < end) {
        int n = epoll_wait(ep, evs, 64, 100);
        for (int k = 0; k < n; k++) {
            struct slot *s = evs[k].data.ptr;
            if (evs[k].events & (EPOLLERR | EPOLLHUP)) {
                errors++;
                slot_abort(s);
                slot_start(s);
                continue;
            }
            if (!s->sent && (evs[k].events & EPOLLOUT)) {
                if (send(s->fd, msg, sizeof msg, MSG_NOSIGNAL) != (ssize_t)sizeof msg) {
                    errors++;
                    slot_abort(s);
                    slot_start(s);
                    continue;
                }
                s->sent = 1;
                struct epoll_event ev = {.events = EPOLLIN, .data.ptr = s};
                (void)epoll_ctl(ep, EPOLL_CTL_MOD, s->fd, &ev);
                continue;
            }
            if (evs[k].events & EPOLLIN) {
                ssize_t r = recv(s->fd, buf, sizeof buf, 0);
                if (r < 0 && errno == EAGAIN)
                    continue;
                if (r <= 0) {
                    errors++;
                    slot_abort(s);
                    slot_start(s);
                    continue;
                }
                s->got += (int)r;
                if (s->got >= (int)sizeof msg) {
                    done++;
                    slot_abort(s);
                    slot_start(s);
                }
            }
        }
    }
    double secs = (double)(bench_now_ns() - start) / 1e9;
    printf("%llu connections\n", (unsigned long long)done);
    printf("%.0f connections/s\n", (double)done / secs);
    printf("%llu errors\n", (unsigned long long)errors);
    fflush(stdout);
    return done > 0 ? 0 : 1;
}
