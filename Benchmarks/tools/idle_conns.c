/*
 * idle_conns: measures a server's resident memory per idle connection.
 *
 *   idle_conns [--host H] PORT N SERVER_PID
 *
 * Reads the server's VmRSS, opens N connections and waits until the server
 * holds them all (its /proc/PID/fd count), reads VmRSS again ("connected":
 * never used), then does one 64-byte echo round trip on every connection and
 * reads it a third time ("after one round trip": the connection has been
 * read from and written to, and is idle again). Prints the three readings
 * and the per-connection deltas in KiB, then closes everything.
 */
#define _GNU_SOURCE
#include "../common/bench.h"

#include <dirent.h>
#include <poll.h>
#include <signal.h>
#include <sys/time.h>

static long pid_rss_kib(int pid)
{
    char path[64], line[256];
    long kib = -1;
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return -1;
    while (fgets(line, sizeof line, f) != NULL)
        if (strncmp(line, "VmRSS:", 6) == 0) {
            kib = strtol(line + 6, NULL, 10);
            break;
        }
    fclose(f);
    return kib;
}

static long pid_fd_count(int pid)
{
    char path[64];
    long n = 0;
    snprintf(path, sizeof path, "/proc/%d/fd", pid);
    DIR *d = opendir(path);
    if (d == NULL)
        return -1;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

/* Waits until the server holds at least want fds; returns 0 or -1 after timeout_ms. */
static int wait_fds(int pid, long want, uint64_t timeout_ms)
{
    uint64_t deadline = bench_now_ns() + timeout_ms * 1000000ull;
    while (pid_fd_count(pid) < want) {
        if (bench_now_ns() > deadline)
            return -1;
        bench_sleep_ms(2);
    }
    return 0;
}

/* Samples RSS every 100 ms until two samples agree (the server is done
 * allocating), at most 3 s; returns the last sample. */
static long settled_rss(int pid)
{
    long prev = pid_rss_kib(pid);
    for (int i = 0; i < 30; i++) {
        bench_sleep_ms(100);
        long cur = pid_rss_kib(pid);
        if (cur == prev)
            return cur;
        prev = cur;
    }
    return prev;
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
        fprintf(stderr, "usage: %s [--host H] PORT N SERVER_PID\n", argv[0]);
        return 2;
    }
    int port = bench_positive(argv[i], argv[0]);
    int n = bench_positive(argv[i + 1], argv[0]);
    int pid = bench_positive(argv[i + 2], argv[0]);
    struct sockaddr_storage ss;
    socklen_t len;
    bench_raise_nofile();
    signal(SIGPIPE, SIG_IGN);
    if (bench_resolve(host, port, &ss, &len) != 0)
        return 1;
    int *fds = calloc((size_t)n, sizeof *fds);
    if (fds == NULL)
        return 1;

    long fd0 = pid_fd_count(pid);
    long rss0 = settled_rss(pid);
    if (fd0 < 0 || rss0 < 0) {
        fprintf(stderr, "cannot read /proc/%d\n", pid);
        return 1;
    }
    /* Connect in windows of 256 ahead of the server's accepts, so a full
     * accept queue never costs a 1 s SYN retransmit. */
    for (int k = 0; k < n; k++) {
        if (k % 256 == 0 && k > 0 && wait_fds(pid, fd0 + k - 256, 20000) != 0) {
            fprintf(stderr, "server stopped accepting at %d connections\n", k);
            return 1;
        }
        fds[k] = bench_connect(&ss, len);
        if (fds[k] < 0) {
            fprintf(stderr, "connect #%d: %s\n", k, strerror(errno));
            return 1;
        }
    }
    if (wait_fds(pid, fd0 + n, 20000) != 0) {
        fprintf(stderr, "server holds %ld of %d connections\n", pid_fd_count(pid) - fd0, n);
        return 1;
    }
    long rss1 = settled_rss(pid);

    unsigned char msg[64], back[64];
    bench_fill_block(msg, sizeof msg);
    struct timeval tv = {10, 0};
    for (int k = 0; k < n; k++) {
        (void)setsockopt(fds[k], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        if (send(fds[k], msg, sizeof msg, MSG_NOSIGNAL) != (ssize_t)sizeof msg) {
            fprintf(stderr, "send #%d: %s\n", k, strerror(errno));
            return 1;
        }
    }
    for (int k = 0; k < n; k++) {
        size_t got = 0;
        while (got < sizeof back) {
            ssize_t r = recv(fds[k], back + got, sizeof back - got, 0);
            if (r <= 0) {
                fprintf(stderr, "echo #%d: %s\n", k, r == 0 ? "closed" : strerror(errno));
                return 1;
            }
            got += (size_t)r;
        }
        if (memcmp(back, msg, sizeof msg) != 0) {
            fprintf(stderr, "echo #%d: wrong bytes\n", k);
            return 1;
        }
    }
    long rss2 = settled_rss(pid);

    printf("%d connections\n", n);
    printf("%ld rss_before_kib\n", rss0);
    printf("%ld rss_connected_kib\n", rss1);
    printf("%ld rss_after_round_trip_kib\n", rss2);
    printf("%.2f kib_per_idle_conn\n", (double)(rss1 - rss0) / n);
    printf("%.2f kib_per_used_idle_conn\n", (double)(rss2 - rss0) / n);
    fflush(stdout);
    for (int k = 0; k < n; k++)
        close(fds[k]);
    return 0;
}
