/* Server lifecycle and errors: port in use (-EADDRINUSE), bad addresses (KNET_EADDR),
 * unresolvable hosts (KNET_ERESOLVE), knet_server_close (KNET_ESERVERCLOSED, also
 * before serving), knet_server_port / knet_server_wait_listening, "" and ":0". */
#include "testutil.h"

/* Runs listen_and_serve on addr, expects it to fail at once with want. */
static void expect_listen_error(const char *addr, int want)
{
    tu_server ts;
    int64_t t0 = tu_now_ms();
    int wl = tu_server_start(&ts, addr, NULL, NULL);
    int rc = tu_server_join(&ts);
    if (rc != want || wl != want) {
        fprintf(stderr, "address \"%s\": listen_and_serve %d (%s), wait_listening %d (%s)\n", addr,
                rc, knet_strerror(rc), wl, knet_strerror(wl));
        CHECK_EQ(rc, want);
        CHECK_EQ(wl, want);
    }
    CHECK_LT(tu_now_ms() - t0, 10000);
}

static void test_port_in_use_plain_listener(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK_GE(fd, 0);
    struct sockaddr_in a = tu_loopback(0);
    CHECK_EQ(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    CHECK_EQ(listen(fd, 8), 0);
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", tu_sock_port(fd));
    expect_listen_error(addr, -EADDRINUSE);
    close(fd);
}

static void test_port_in_use_knet_server(void)
{
    tu_server first;
    int port = tu_server_start(&first, "127.0.0.1:0", NULL, NULL);
    CHECK_GT(port, 0);
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
    expect_listen_error(addr, -EADDRINUSE);
    /* The first server is unaffected. */
    int fd = tu_connect(port);
    close(fd);
    CHECK_EQ(tu_server_stop(&first), KNET_ESERVERCLOSED);
}

/* knet_server_port on a failed server reports the listen error. */
static void test_port_after_failure(void)
{
    knet_server *s = knet_server_new("nonsense");
    CHECK(s != NULL);
    CHECK_EQ(knet_server_port(s), 0);
    CHECK_EQ(knet_server_listen_and_serve(s, NULL, NULL), KNET_EADDR);
    CHECK_EQ(knet_server_port(s), KNET_EADDR);
    CHECK_EQ(knet_server_wait_listening(s, 1000), KNET_EADDR);
    knet_server_free(s);
}

static void test_bad_addresses(void)
{
    static const char *const bad[] = {
        "nonsense", "127.0.0.1:99999", "127.0.0.1:65536", "127.0.0.1:-1", "127.0.0.1:abc",
        "127.0.0.1:80x", "[::1", "[::1]", "[::1]x:80", "::1:80",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        expect_listen_error(bad[i], KNET_EADDR);
}

/* A host name that cannot exist: its first label is longer than DNS allows (63), so
 * the resolver fails it locally, without sending a query anywhere. */
static void test_unresolvable_host(void)
{
    char addr[128];
    memset(addr, 'x', 64);
    snprintf(addr + 64, sizeof addr - 64, ".invalid:80");
    expect_listen_error(addr, KNET_ERESOLVE);
}

static void test_close_stops_serving(void)
{
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", NULL, NULL);
    CHECK_GT(port, 0);
    CHECK_EQ(knet_server_port(ts.srv), port);
    CHECK_EQ(knet_server_wait_listening(ts.srv, 0), port); /* already listening */
    CHECK_EQ(knet_server_close(ts.srv), 0);
    CHECK_EQ(knet_server_close(ts.srv), KNET_ESERVERCLOSED);
    CHECK_EQ(tu_server_join(&ts), KNET_ESERVERCLOSED);
    CHECK_EQ(tu_try_connect_ex(port, 0), -ECONNREFUSED);
}

/* Closed before listen_and_serve ran: it returns KNET_ESERVERCLOSED at once. */
static void test_close_before_serving(void)
{
    knet_server *s = knet_server_new("127.0.0.1:0");
    CHECK(s != NULL);
    CHECK_EQ(knet_server_close(s), 0);
    int64_t t0 = tu_now_ms();
    CHECK_EQ(knet_server_listen_and_serve(s, NULL, NULL), KNET_ESERVERCLOSED);
    CHECK_LT(tu_now_ms() - t0, 5000);
    knet_server_free(s);
}

/* A server that was never served can be freed; wait_listening times out. */
static void test_never_served(void)
{
    knet_server *s = knet_server_new("127.0.0.1:0");
    CHECK(s != NULL);
    CHECK_EQ(knet_server_port(s), 0);
    int64_t t0 = tu_now_ms();
    CHECK_EQ(knet_server_wait_listening(s, 50), -ETIMEDOUT);
    CHECK_GE(tu_now_ms() - t0, 40);
    knet_server_free(s);
}

/* "" and ":0" (every interface) and "127.0.0.1:0" get a kernel port that 127.0.0.1
 * reaches; knet_server_port says 0 before and the port after listening. */
static void kernel_port(const char *addr)
{
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, addr, &h, NULL);
    CHECK_GT(port, 0);
    CHECK_LE(port, 65535);
    CHECK_EQ(knet_server_port(ts.srv), port);
    int fd = tu_connect(port);
    char b[2];
    tu_write_str(fd, "hi");
    READ_EXACT(fd, b, 2);
    close(fd);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

static void test_kernel_ports(void)
{
    kernel_port("");
    kernel_port(":0");
    kernel_port("127.0.0.1:0");
}

static void test_port_before_listening(void)
{
    knet_server *s = knet_server_new("");
    CHECK(s != NULL);
    CHECK_EQ(knet_server_port(s), 0);
    knet_server_free(s);
}

/* A server can serve again after a previous one on the same port was closed
 * (SO_REUSEADDR: the closed connections' TIME_WAIT does not block the bind). */
static void test_rebind_after_close(void)
{
    tu_tracker *t = tu_tracker_new();
    t->on_receive = NULL;
    knet_handler h = tu_tracker_handler(t);
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, NULL);
    CHECK_GT(port, 0);
    int fd = tu_connect(port);
    WAIT_GE(&t->connects, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED); /* server side closes first */
    EXPECT_PEER_CLOSED(fd);
    close(fd);
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
    tu_server again;
    CHECK_EQ(tu_server_start(&again, addr, NULL, NULL), port);
    CHECK_EQ(tu_server_stop(&again), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

int main(void)
{
    tu_begin();
    RUN(test_port_before_listening);
    RUN(test_port_in_use_plain_listener);
    RUN(test_port_in_use_knet_server);
    RUN(test_port_after_failure);
    RUN(test_bad_addresses);
    RUN(test_unresolvable_host);
    RUN(test_close_stops_serving);
    RUN(test_close_before_serving);
    RUN(test_never_served);
    RUN(test_kernel_ports);
    RUN(test_rebind_after_close);
    return tu_end();
}
