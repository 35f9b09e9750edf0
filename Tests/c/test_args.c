/*
 * test_args.c — arguments at the edges of what knet.h documents: address strings
 * (IPv6 literals with a zone, as "[v6]:port" takes them in Go and libuv), parsed only:
 * the tests use no address but 127.0.0.1.
 */
#include "testutil.h"
#include "../../csrc/internal.h"

#include <net/if.h>

/* Parses addr for a dial (knet__addr_parse, no socket made); returns its result. */
static int parse(const char *addr, kn_sockaddr *out)
{
    char host[256];
    unsigned port = 0;
    return knet__addr_parse(addr, false, out, host, sizeof host, &port);
}

/* "[::1%lo]:port" and "[::1%<index of lo>]:port" parse to ::1 with lo's scope id and the
 * port, as Go's net reads them (before: KNET_EADDR); so do link-local literals. A zone no
 * interface has, or an empty one, is KNET_EADDR, also from listen_and_serve, which fails
 * before it makes a socket. Parsed only: tests use no address but 127.0.0.1. */
static void test_ipv6_zone(void)
{
    unsigned lo = if_nametoindex("lo");
    if (lo == 0) {
        printf("skipped: no interface \"lo\"\n");
        return;
    }
    char by_index[64];
    snprintf(by_index, sizeof by_index, "[::1%%%u]:1234", lo);
    const char *const good[] = {"[::1%lo]:1234", by_index, "[fe80::1%lo]:1234"};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        kn_sockaddr a;
        int rc = parse(good[i], &a);
        if (rc != 1) fprintf(stderr, "parse \"%s\": %d\n", good[i], rc);
        CHECK_EQ(rc, 1);
        CHECK_EQ(a.sa.sa_family, AF_INET6);
        CHECK_EQ(a.in6.sin6_scope_id, lo);
        CHECK_EQ(ntohs(a.in6.sin6_port), 1234);
        struct in6_addr want;
        CHECK_EQ(inet_pton(AF_INET6, i < 2 ? "::1" : "fe80::1", &want), 1);
        CHECK_EQ(memcmp(&a.in6.sin6_addr, &want, sizeof want), 0);
    }

    static const char *const bad[] = {"[::1%]:0", "[::1%nosuchif9]:0", "[::1%99999999999]:0",
                                      "[127.0.0.1%lo]:0", "[%lo]:0", "[::1%lo%lo]:0"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        kn_sockaddr a;
        CHECK_EQ(parse(bad[i], &a), KNET_EADDR);
        knet_server *s = knet_server_new(bad[i]);
        CHECK(s != NULL);
        int rc = knet_server_listen_and_serve(s, NULL, NULL);
        if (rc != KNET_EADDR) fprintf(stderr, "listen \"%s\"\n", bad[i]);
        CHECK_EQ(rc, KNET_EADDR);
        knet_server_free(s);
    }
}

/* knet__addr_format writes a scoped IPv6 address with its zone, as Go does, so the
 * string dials the same peer again (before: the zone was dropped, "[fe80::1]:1234"):
 * the interface's name, or the index when no interface has it. The longest such string
 * fits KNET_ADDRSTRLEN. */
static void test_ipv6_zone_format(void)
{
    unsigned lo = if_nametoindex("lo");
    if (lo == 0) {
        printf("skipped: no interface \"lo\"\n");
        return;
    }
    char by_index[64], buf[KNET_ADDRSTRLEN];
    snprintf(by_index, sizeof by_index, "[fe80::1%%%u]:1234", lo);
    const char *const in[] = {"[fe80::1%lo]:1234", by_index, "[::1%lo]:1", "[::1]:80"};
    const char *const want[] = {"[fe80::1%lo]:1234", "[fe80::1%lo]:1234", "[::1%lo]:1", "[::1]:80"};
    for (size_t i = 0; i < sizeof in / sizeof in[0]; i++) {
        kn_sockaddr a;
        CHECK_EQ(parse(in[i], &a), 1);
        int n = knet__addr_format(&a, buf, sizeof buf);
        if (n < 0 || strcmp(buf, want[i]) != 0) fprintf(stderr, "%s -> %d \"%s\"\n", in[i], n, buf);
        CHECK_EQ(n, (int)strlen(want[i]));
        CHECK(strcmp(buf, want[i]) == 0);
        kn_sockaddr back;
        CHECK_EQ(parse(buf, &back), 1);
        CHECK_EQ(back.in6.sin6_scope_id, a.in6.sin6_scope_id);
    }

    kn_sockaddr a;
    CHECK_EQ(parse("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe]:65535", &a), 1);
    a.in6.sin6_scope_id = UINT32_MAX; /* no interface has it: written as its index */
    const char *longest = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe%4294967295]:65535";
    CHECK_EQ(knet__addr_format(&a, buf, sizeof buf), (int)strlen(longest));
    CHECK(strcmp(buf, longest) == 0);
    CHECK_EQ(knet__addr_format(&a, buf, strlen(longest)), -ENOSPC);
}

int main(void)
{
    tu_begin();
    RUN(test_ipv6_zone);
    RUN(test_ipv6_zone_format);
    return tu_end();
}
