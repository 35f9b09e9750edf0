/*
 * libFuzzer harness for knet's address parser (knet__addr_parse: no DNS) and
 * formatter (knet__addr_format).
 *
 * For any string, in both modes (dial and listen): the parser returns 1
 * (literal or wildcard address), 0 (a host name to resolve) or KNET_EADDR,
 * never writes past the host buffer it is given (whatever its size), and
 * reports the port it put into the address. A literal address round-trips:
 * parse(format(parse(x))) == parse(x), and formatting is stable. The
 * formatter never overflows and reports -ENOSPC for every buffer too small.
 *
 * Built with the core's sources (see fuzz/run.sh); a failed check aborts.
 */
#include "internal.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FZ_CHECK(cond)                                                                             \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_addr.c:%d: check failed: %s\n", __LINE__, #cond);                \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

/* The port stored in a parsed address. */
static unsigned sa_port(const kn_sockaddr *a)
{
    return ntohs(a->sa.sa_family == AF_INET6 ? a->in6.sin6_port : a->in.sin_port);
}

/* The address as 16 bytes of IPv6 (IPv4 as v4-mapped), to compare across families. */
static void sa_ip16(const kn_sockaddr *a, uint8_t out[16])
{
    if (a->sa.sa_family == AF_INET6) {
        memcpy(out, &a->in6.sin6_addr, 16);
    } else {
        memset(out, 0, 10);
        out[10] = out[11] = 0xff;
        memcpy(out + 12, &a->in.sin_addr, 4);
    }
}

/* Formats a into buf and checks the formatter's contract for every smaller buffer. */
static int format_checked(const kn_sockaddr *a, char *buf, size_t cap)
{
    int n = knet__addr_format(a, buf, cap);
    FZ_CHECK(n > 0 && (size_t)n < cap && strlen(buf) == (size_t)n);
    FZ_CHECK(n < KNET_ADDRSTRLEN);
    char small[KNET_ADDRSTRLEN + 8];
    for (size_t len = 0; len <= (size_t)n; len++) {
        memset(small, 'Z', sizeof small);
        FZ_CHECK(knet__addr_format(a, small, len) == -ENOSPC);
        for (size_t i = len; i < sizeof small; i++)
            FZ_CHECK(small[i] == 'Z'); /* nothing written past len */
    }
    return n;
}

static void check_one(const char *s, bool passive, size_t hostcap_sel)
{
    kn_sockaddr a;
    char host[256];
    unsigned port = 99999;
    int rc = knet__addr_parse(s, passive, &a, host, sizeof host, &port);
    FZ_CHECK(rc == 1 || rc == 0 || rc == KNET_EADDR);

    /* A small host buffer: the same answer, or KNET_EADDR when the host does not fit;
     * never a write past hostcap (the guard bytes stay). */
    {
        size_t cap = hostcap_sel % 32 + 1;
        char small[64];
        memset(small, 'G', sizeof small);
        kn_sockaddr b;
        unsigned p2;
        int rc2 = knet__addr_parse(s, passive, &b, small, cap, &p2);
        for (size_t i = cap; i < sizeof small; i++)
            FZ_CHECK(small[i] == 'G');
        FZ_CHECK(rc2 == rc || rc2 == KNET_EADDR);
        if (rc2 == rc && rc >= 0) {
            FZ_CHECK(p2 == port);
            FZ_CHECK(strcmp(small, host) == 0);
        }
    }

    if (rc == KNET_EADDR)
        return;
    FZ_CHECK(port <= 65535);
    if (rc == 0) { /* a name: non-empty, not bracketed */
        FZ_CHECK(host[0] != '\0');
        FZ_CHECK(s[0] != '[');
        return;
    }
    FZ_CHECK(a.sa.sa_family == AF_INET || a.sa.sa_family == AF_INET6);
    FZ_CHECK(sa_port(&a) == port);
    FZ_CHECK(knet__sockaddr_len(&a) ==
             (a.sa.sa_family == AF_INET6 ? sizeof a.in6 : sizeof a.in));

    char f1[KNET_ADDRSTRLEN];
    format_checked(&a, f1, sizeof f1);
    kn_sockaddr b;
    char host2[256];
    unsigned port2;
    FZ_CHECK(knet__addr_parse(f1, passive, &b, host2, sizeof host2, &port2) == 1);
    FZ_CHECK(port2 == port && sa_port(&b) == port);
    uint8_t ia[16], ib[16];
    sa_ip16(&a, ia);
    sa_ip16(&b, ib);
    FZ_CHECK(memcmp(ia, ib, 16) == 0);
    /* Same family, except that a v4-mapped IPv6 address is shown (and re-read) as IPv4. */
    if (a.sa.sa_family != b.sa.sa_family)
        FZ_CHECK(a.sa.sa_family == AF_INET6 && IN6_IS_ADDR_V4MAPPED(&a.in6.sin6_addr) &&
                 b.sa.sa_family == AF_INET);
    char f2[KNET_ADDRSTRLEN];
    format_checked(&b, f2, sizeof f2);
    FZ_CHECK(strcmp(f1, f2) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0 || size > 300)
        return 0;
    char s[301];
    memcpy(s, data + 1, size - 1); /* the first byte picks the small host buffer's size */
    s[size - 1] = '\0';           /* an embedded NUL just ends the string early */
    check_one(s, false, data[0]);
    check_one(s, true, data[0]);

    /* Formatting raw socket addresses: any bytes as an IPv4 or IPv6 address. */
    if (size >= 19) {
        kn_sockaddr a;
        memset(&a, 0, sizeof a);
        if (data[0] & 1) {
            a.in6.sin6_family = AF_INET6;
            memcpy(&a.in6.sin6_addr, data + 1, 16);
            memcpy(&a.in6.sin6_port, data + 17, 2);
        } else {
            a.in.sin_family = AF_INET;
            memcpy(&a.in.sin_addr, data + 1, 4);
            memcpy(&a.in.sin_port, data + 5, 2);
        }
        char f[KNET_ADDRSTRLEN];
        format_checked(&a, f, sizeof f);
        kn_sockaddr b;
        char host[256];
        unsigned port;
        FZ_CHECK(knet__addr_parse(f, false, &b, host, sizeof host, &port) == 1);
        FZ_CHECK(port == sa_port(&a));
        uint8_t ia[16], ib[16];
        sa_ip16(&a, ia);
        sa_ip16(&b, ib);
        FZ_CHECK(memcmp(ia, ib, 16) == 0);
    }
    return 0;
}
