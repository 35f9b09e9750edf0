/*
 * test_args.c — arguments at the edges of what knet.h documents: address strings
 * (IPv6 literals with a zone, as "[v6]:port" takes them in Go and libuv).
 */
#include "testutil.h"

#include <net/if.h>

/* True when this host can listen on ::1 (IPv6 loopback); else the IPv6 tests skip. */
static bool have_ipv6_loopback(void)
{
    int fd = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return false;
    struct sockaddr_in6 a;
    memset(&a, 0, sizeof a);
    a.sin6_family = AF_INET6;
    a.sin6_addr = in6addr_loopback;
    bool ok = bind(fd, (struct sockaddr *)&a, sizeof a) == 0;
    close(fd);
    return ok;
}

/* Dials addr with a tracked client; returns what the dial came to: 1 once connect(true)
 * ran (the client is then closed), else dial_and_serve's error. */
static int dial_once(const char *addr)
{
    tu_tracker *t = tu_tracker_new();
    knet_handler h = tu_tracker_handler(t);
    knet_client *c = knet_client_new(addr);
    CHECK(c != NULL);
    tu_client tc;
    tu_client_start(&tc, c, &h, NULL);
    WAIT_UNTIL(tu_counter_get(&t->connects) >= 1 || tu_counter_get(&tc.done) >= 1);
    int result = tu_counter_get(&t->connects) >= 1 ? 1 : 0;
    if (result == 1) {
        char buf[KNET_ADDRSTRLEN];
        knet_conn *conn = knet_client_conn(c);
        CHECK(conn != NULL);
        CHECK_GT(knet_conn_remote_addr(conn, buf, sizeof buf), 0);
        CHECK_EQ(strncmp(buf, "[::1]:", 6), 0);
        knet_conn_release(conn);
        CHECK_EQ(knet_client_close(c), 0);
    }
    int rc = tu_client_join(&tc);
    if (result == 0) {
        fprintf(stderr, "dial \"%s\": %s\n", addr, knet_strerror(rc));
        result = rc;
    } else {
        CHECK_EQ(rc, KNET_ECLIENTCLOSED);
        WAIT_GE(&t->disconnects, 1);
    }
    knet_client_free(c);
    tu_tracker_free(t);
    return result;
}

/* "[::1%lo]:port" and "[::1%<index of lo>]:port": a server listens on it and a client
 * dials it (Go's net reads both; before: KNET_EADDR). A zone no interface has, or an
 * empty one, is KNET_EADDR (parsed only: nothing is dialed). */
static void test_ipv6_zone(void)
{
    unsigned lo = if_nametoindex("lo");
    if (!have_ipv6_loopback() || lo == 0) {
        printf("skipped: no IPv6 loopback or no interface \"lo\"\n");
        return;
    }
    tu_server ts;
    int port = tu_server_start(&ts, "[::1%lo]:0", NULL, NULL);
    if (port <= 0) fprintf(stderr, "listen \"[::1%%lo]:0\": %s\n", knet_strerror(port));
    CHECK_GT(port, 0);
    char addr[64];
    snprintf(addr, sizeof addr, "[::1%%lo]:%d", port);
    CHECK_EQ(dial_once(addr), 1);
    snprintf(addr, sizeof addr, "[::1%%%u]:%d", lo, port);
    CHECK_EQ(dial_once(addr), 1);
    snprintf(addr, sizeof addr, "[::1]:%d", port);
    CHECK_EQ(dial_once(addr), 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);

    static const char *const bad[] = {"[::1%]:0", "[::1%nosuchif9]:0", "[::1%99999999999]:0",
                                      "[127.0.0.1%lo]:0", "[%lo]:0", "[::1%lo%lo]:0"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        knet_server *s = knet_server_new(bad[i]);
        CHECK(s != NULL);
        int rc = knet_server_listen_and_serve(s, NULL, NULL);
        if (rc != KNET_EADDR) fprintf(stderr, "listen \"%s\"\n", bad[i]);
        CHECK_EQ(rc, KNET_EADDR);
        knet_server_free(s);
    }
}

int main(void)
{
    tu_begin();
    RUN(test_ipv6_zone);
    return tu_end();
}
