/*
 * latency: round-trip times of 64-byte messages through an echo server.
 *
 *   latency [--host H] PORT CONNS SECONDS
 *
 * CONNS connections, one 64-byte message outstanding on each: send, wait for
 * all 64 bytes back, record the time, send again. Samples from the first
 * 200 ms (warm-up) are dropped. Every echo is checked byte for byte. Prints
 * p50, p99, p99.9 and the mean in microseconds. With every connection always
 * busy the mean is CONNS / (round trips per second) (Little's law): it follows
 * the throughput, where the percentiles also depend on how the two sides'
 * batches fall.
 *
 * The load is closed-loop (the next send waits for the echo), so a server stall
 * of T delays only the one message in flight per connection: it is one sample,
 * where a client sending at the measured rate would have seen T / p50 messages
 * delayed (coordinated omission). The *_co_us lines correct for that as
 * HdrHistogram's recordValueWithExpectedInterval does, with the run's p50 as the
 * expected interval: a sample v adds v - p50, v - 2 p50, ... down to p50.
 */
#define _GNU_SOURCE
#include "../common/bench.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/epoll.h>

/* One connection and its outstanding message. */
struct lconn {
    int fd;
    int got;
    uint64_t sent_at;
    unsigned char in[64]; /* the echo being received */
};

static uint32_t *samples;
static size_t nsamples, capsamples;

static void add_sample(uint64_t ns)
{
    if (nsamples == capsamples) {
        capsamples = capsamples ? capsamples * 2 : 1 << 16;
        samples = realloc(samples, capsamples * sizeof *samples);
        if (samples == NULL) {
            perror("realloc");
            exit(1);
        }
    }
    samples[nsamples++] = ns > UINT32_MAX ? UINT32_MAX : (uint32_t)ns;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static double pct_of(const uint32_t *v, size_t n, double p)
{
    size_t k = (size_t)(p * (double)(n - 1) + 0.5);
    return v[k] / 1000.0;
}

static double pct_us(double p)
{
    return pct_of(samples, nsamples, p);
}

/* Percentiles corrected for coordinated omission (see the top): the sorted samples
 * plus, for each sample above the expected interval, the samples the stall would
 * have delayed at the measured pace. At most 64 Mi values (256 MiB). */
static void print_corrected(void)
{
    uint32_t expect = samples[(size_t)(0.5 * (double)(nsamples - 1) + 0.5)];
    size_t cap = nsamples, n = 0, limit = (size_t)64 << 20;
    uint32_t *v = malloc(cap * sizeof *v);
    int truncated = 0;
    if (v == NULL || expect == 0) {
        free(v);
        return;
    }
    for (size_t k = 0; k < nsamples; k++) {
        for (uint64_t x = samples[k];; x -= expect) {
            if (n == cap) {
                if (cap >= limit) {
                    truncated = 1;
                    break;
                }
                uint32_t *nv = realloc(v, cap * 2 * sizeof *v);
                if (nv == NULL) {
                    truncated = 1;
                    break;
                }
                v = nv;
                cap *= 2;
            }
            v[n++] = (uint32_t)x;
            if (x < 2ull * expect)
                break;
        }
        if (truncated)
            break;
    }
    qsort(v, n, sizeof *v, cmp_u32);
    printf("%.1f p50_co_us\n", pct_of(v, n, 0.50));
    printf("%.1f p99_co_us\n", pct_of(v, n, 0.99));
    printf("%.1f p999_co_us\n", pct_of(v, n, 0.999));
    if (truncated)
        fprintf(stderr, "corrected percentiles truncated at %zu values\n", n);
    free(v);
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
    int conns = bench_positive(argv[i + 1], argv[0]);
    int seconds = bench_positive(argv[i + 2], argv[0]);
    struct sockaddr_storage ss;
    socklen_t len;
    unsigned char msg[64];
    bench_raise_nofile();
    signal(SIGPIPE, SIG_IGN);
    bench_fill_block(msg, sizeof msg);
    if (bench_resolve(host, port, &ss, &len) != 0)
        return 1;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct lconn *cs = calloc((size_t)conns, sizeof *cs);
    if (ep < 0 || cs == NULL)
        return 1;
    for (int k = 0; k < conns; k++) {
        cs[k].fd = bench_connect(&ss, len);
        if (cs[k].fd < 0) {
            fprintf(stderr, "connect: %s\n", strerror(errno));
            return 1;
        }
        (void)fcntl(cs[k].fd, F_SETFL, O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &cs[k]};
        (void)epoll_ctl(ep, EPOLL_CTL_ADD, cs[k].fd, &ev);
    }
    uint64_t start = bench_now_ns();
    uint64_t warm = start + 200000000ull;
    uint64_t end = start + (uint64_t)seconds * 1000000000ull;
    for (int k = 0; k < conns; k++) {
        cs[k].sent_at = bench_now_ns();
        if (send(cs[k].fd, msg, sizeof msg, MSG_NOSIGNAL) != (ssize_t)sizeof msg) {
            perror("send");
            return 1;
        }
    }
    struct epoll_event evs[256];
    uint64_t now = start;
    while (now < end) {
        int n = epoll_wait(ep, evs, 256, 100);
        now = bench_now_ns();
        for (int k = 0; k < n; k++) {
            struct lconn *c = evs[k].data.ptr;
            ssize_t r = recv(c->fd, c->in + c->got, sizeof c->in - (size_t)c->got, 0);
            if (r < 0 && errno == EAGAIN)
                continue;
            if (r <= 0) {
                fprintf(stderr, "connection lost: %s\n", r == 0 ? "closed" : strerror(errno));
                return 1;
            }
            c->got += (int)r;
            if (c->got < (int)sizeof msg)
                continue;
            if (memcmp(c->in, msg, sizeof msg) != 0) {
                fprintf(stderr, "wrong bytes echoed\n");
                return 1;
            }
            c->got = 0;
            /* Timed when this echo is read, not when the wait returned: a wait can
             * return many echoes, and the later ones in the batch wait for the
             * earlier ones to be handled (a per-batch time would leave that out, and
             * so measure less the more the client batches). The next send follows at
             * once. */
            uint64_t t = bench_now_ns();
            if (c->sent_at >= warm)
                add_sample(t - c->sent_at);
            c->sent_at = t;
            if (send(c->fd, msg, sizeof msg, MSG_NOSIGNAL) != (ssize_t)sizeof msg) {
                perror("send");
                return 1;
            }
        }
    }
    if (nsamples == 0) {
        fprintf(stderr, "no round trip completed\n");
        return 1;
    }
    qsort(samples, nsamples, sizeof *samples, cmp_u32);
    printf("%zu round trips\n", nsamples);
    printf("%.1f p50_us\n", pct_us(0.50));
    printf("%.1f p99_us\n", pct_us(0.99));
    printf("%.1f p999_us\n", pct_us(0.999));
    double sum = 0;
    for (size_t k = 0; k < nsamples; k++)
        sum += samples[k];
    printf("%.1f mean_us\n", sum / (double)nsamples / 1000.0);
    printf("%.1f max_us\n", samples[nsamples - 1] / 1000.0);
    print_corrected();
    fflush(stdout);
    return 0;
}
