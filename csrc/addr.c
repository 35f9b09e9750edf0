/* Address strings: "host:port", "[v6]:port", ":port", "" — parsed the way Go's
 * net package reads them — and "ip:port" formatting. */
#include "internal.h"

#include <arpa/inet.h>
#include <net/if.h>
#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

socklen_t knet__sockaddr_len(const kn_sockaddr *a) {
    return a->sa.sa_family == AF_INET6 ? sizeof a->in6 : sizeof a->in;
}

unsigned knet__sockaddr_port(const kn_sockaddr *a) {
    return a->sa.sa_family == AF_INET6  ? ntohs(a->in6.sin6_port)
           : a->sa.sa_family == AF_INET ? ntohs(a->in.sin_port)
                                        : 0;
}

/* Splits addr into host (without brackets) and a numeric port. */
static int split(const char *addr, char *host, size_t hostcap, unsigned *port) {
    const char *colon, *h = addr;
    size_t hlen;
    if (*addr == '[') {
        const char *end = strchr(addr, ']');
        if (!end || end[1] != ':') return KNET_EADDR;
        h = addr + 1;
        hlen = (size_t)(end - h);
        colon = end + 1;
    } else {
        colon = strrchr(addr, ':');
        if (!colon) return KNET_EADDR;
        hlen = (size_t)(colon - addr);
        if (memchr(addr, ':', hlen) || memchr(addr, '[', hlen) || memchr(addr, ']', hlen))
            return KNET_EADDR; /* an IPv6 literal needs brackets */
    }
    if (hlen >= hostcap) return KNET_EADDR;
    memcpy(host, h, hlen);
    host[hlen] = '\0';
    const char *p = colon + 1;
    if (*p == '\0' || strlen(p) > 5) return KNET_EADDR;
    unsigned v = 0;
    for (; *p; p++) {
        if (*p < '0' || *p > '9') return KNET_EADDR;
        v = v * 10 + (unsigned)(*p - '0');
    }
    if (v > 65535) return KNET_EADDR;
    *port = v;
    return 0;
}

/* An IPv6 literal with a zone, "fe80::1%eth0" or "fe80::1%2" (an interface name or
 * index): 1 with the address and its scope in out, else KNET_EADDR (also for a zone
 * no interface has: dialing it would fail later, or silently use no scope). */
static int parse_scoped(const char *host, kn_sockaddr *out, unsigned port) {
    const char *pct = strchr(host, '%');
    char ip[INET6_ADDRSTRLEN];
    if (!pct || (size_t)(pct - host) >= sizeof ip || pct[1] == '\0') return KNET_EADDR;
    memcpy(ip, host, (size_t)(pct - host));
    ip[pct - host] = '\0';
    if (inet_pton(AF_INET6, ip, &out->in6.sin6_addr) != 1) return KNET_EADDR;
    const char *zone = pct + 1;
    unsigned long scope = 0;
    if (strspn(zone, "0123456789") == strlen(zone)) {
        if (strlen(zone) <= 10) scope = strtoul(zone, NULL, 10);
        if (scope > UINT32_MAX) scope = 0;
    } else {
        scope = if_nametoindex(zone);
    }
    if (scope == 0) return KNET_EADDR;
    out->in6.sin6_family = AF_INET6;
    out->in6.sin6_port = htons((uint16_t)port);
    out->in6.sin6_scope_id = (uint32_t)scope;
    return 1;
}

int knet__addr_parse(const char *addr, bool passive, kn_sockaddr *out, char *host,
                     size_t hostcap, unsigned *port) {
    if (!addr) return KNET_EADDR;
    if (*addr == '\0') addr = ":0";
    int rc = split(addr, host, hostcap, port);
    if (rc < 0) return rc;
    memset(out, 0, sizeof *out);
    if (host[0] == '\0') {
        if (passive) { /* every interface: dual-stack IPv6 wildcard (the server falls back to IPv4) */
            out->in6.sin6_family = AF_INET6;
            out->in6.sin6_addr = in6addr_any;
            out->in6.sin6_port = htons((uint16_t)*port);
        } else { /* like Go, dialing ":port" means the local system */
            out->in.sin_family = AF_INET;
            out->in.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            out->in.sin_port = htons((uint16_t)*port);
        }
        return 1;
    }
    if (inet_pton(AF_INET, host, &out->in.sin_addr) == 1) {
        out->in.sin_family = AF_INET;
        out->in.sin_port = htons((uint16_t)*port);
        return 1;
    }
    if (inet_pton(AF_INET6, host, &out->in6.sin6_addr) == 1) {
        if (addr[0] != '[') return KNET_EADDR;
        out->in6.sin6_family = AF_INET6;
        out->in6.sin6_port = htons((uint16_t)*port);
        return 1;
    }
    /* Brackets hold literals only, maybe with a zone (RFC 4007), as Go and libuv read them. */
    if (addr[0] == '[') return parse_scoped(host, out, *port);
    return 0;
}

int knet__addr_resolve(const char *addr, bool passive, kn_sockaddr *out, int max) {
    char host[256];
    unsigned port;
    if (max < 1) return KNET_EADDR;
    int rc = knet__addr_parse(addr, passive, out, host, sizeof host, &port);
    if (rc != 0) return rc;
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : 0);
    char ps[8];
    snprintf(ps, sizeof ps, "%u", port);
    rc = getaddrinfo(host, ps, &hints, &res);
    if (rc != 0) {
        int err = errno;
        knet__log(KNET_LOG_DEBUG, "resolve %s: %s", host, gai_strerror(rc));
        /* Out of memory or descriptors is that, not a name that does not resolve. */
        if (rc == EAI_MEMORY) return -ENOMEM;
        if (rc == EAI_SYSTEM && err > 0) return -err;
        return KNET_ERESOLVE;
    }
    int n = 0;
    /* IPv4 first, as Go does for listening on a name and as loopback tests expect. */
    for (int pass = 0; pass < 2; pass++) {
        for (struct addrinfo *ai = res; ai && n < max; ai = ai->ai_next) {
            int fam = pass == 0 ? AF_INET : AF_INET6;
            if (ai->ai_family != fam || ai->ai_addrlen > sizeof out[n]) continue;
            memset(&out[n], 0, sizeof out[n]);
            memcpy(&out[n], ai->ai_addr, ai->ai_addrlen);
            n++;
        }
    }
    freeaddrinfo(res);
    return n > 0 ? n : KNET_ERESOLVE;
}

int knet__addr_format(const kn_sockaddr *a, char *buf, size_t len) {
    char ip[INET6_ADDRSTRLEN];
    unsigned port = knet__sockaddr_port(a);
    int n;
    if (a->sa.sa_family == AF_INET) {
        inet_ntop(AF_INET, &a->in.sin_addr, ip, sizeof ip);
        n = snprintf(buf, len, "%s:%u", ip, port);
    } else if (a->sa.sa_family == AF_INET6) {
        if (IN6_IS_ADDR_V4MAPPED(&a->in6.sin6_addr)) {
            inet_ntop(AF_INET, &a->in6.sin6_addr.s6_addr[12], ip, sizeof ip);
            n = snprintf(buf, len, "%s:%u", ip, port);
        } else {
            inet_ntop(AF_INET6, &a->in6.sin6_addr, ip, sizeof ip);
            /* Keep the zone, as Go writes it, so the string dials the same peer again:
             * the interface's name, or its index once no interface has it. At most
             * "[" 39 "%" 15 "]:" 5 characters, which KNET_ADDRSTRLEN holds. */
            char zone[IF_NAMESIZE + 1] = "", name[IF_NAMESIZE];
            unsigned scope = a->in6.sin6_scope_id;
            if (scope != 0 && if_indextoname(scope, name))
                snprintf(zone, sizeof zone, "%%%s", name);
            else if (scope != 0)
                snprintf(zone, sizeof zone, "%%%u", scope);
            n = snprintf(buf, len, "[%s%s]:%u", ip, zone, port);
        }
    } else {
        n = snprintf(buf, len, "%s", "");
    }
    if (n < 0 || (size_t)n >= len) return -ENOSPC;
    return n;
}
