/* The persistent client: dial, serve the connection until it ends, dial
 * again; failed dials retry with exponential backoff when enabled. Dialing
 * and backoff waits happen on the calling thread and are interrupted at once
 * by knet_client_close through an eventfd. */
#include "internal.h"

#include <errno.h>
#include <limits.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

struct knet_client {
    kn_owner o;
    char *addr;
    int wake_fd; /* readable once the client is closed; made by the first serve */
    /* under o.mu */
    bool retry, serving, closed;
    uint32_t backoff_initial, backoff_max;
    knet_conn *conn;
};

knet_client *knet_client_new(const char *addr) {
    knet_client *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->addr = strdup(addr ? addr : "");
    if (!c->addr) {
        free(c);
        return NULL;
    }
    c->wake_fd = -1;
    knet__owner_init(&c->o);
    c->o.close_reason = KNET_ECLIENTCLOSED;
    c->o.serves_one = true;
    c->backoff_initial = 1000;
    c->backoff_max = 60000;
    return c;
}

void knet_client_free(knet_client *c) {
    if (!c) return;
    if (c->wake_fd >= 0) close(c->wake_fd);
    knet__owner_destroy(&c->o);
    free(c->addr);
    free(c);
}

static void set_retry(knet_client *c, bool on) {
    pthread_mutex_lock(&c->o.mu);
    c->retry = on;
    pthread_mutex_unlock(&c->o.mu);
}

void knet_client_enable_retry(knet_client *c) { set_retry(c, true); }
void knet_client_disable_retry(knet_client *c) { set_retry(c, false); }

void knet_client_set_retry_backoff(knet_client *c, uint32_t initial_ms, uint32_t max_ms) {
    pthread_mutex_lock(&c->o.mu);
    /* The waits are poll timeouts: an int of milliseconds (about 24 days). */
    if (initial_ms > INT_MAX) initial_ms = INT_MAX;
    if (max_ms > INT_MAX) max_ms = INT_MAX;
    c->backoff_initial = initial_ms ? initial_ms : 1;
    c->backoff_max = max_ms < c->backoff_initial ? c->backoff_initial : max_ms;
    pthread_mutex_unlock(&c->o.mu);
}

/* Waits for fd (events) or the close signal; returns revents of fd, 0 on
 * timeout, KNET_ECLIENTCLOSED when the client was closed, or -errno when the
 * wait for fd failed (poll: ENOMEM). A timed wait alone keeps its deadline. */
static int wait_or_closed(knet_client *c, int fd, short events, int timeout_ms) {
    struct pollfd p[2] = {{c->wake_fd, POLLIN, 0}, {fd, events, 0}};
    uint64_t end = timeout_ms > 0 ? knet__now_ms() + (uint64_t)timeout_ms : 0;
    for (;;) {
        int n = poll(p, fd >= 0 ? 2 : 1, timeout_ms);
        if (n < 0 && (errno == EINTR || (fd < 0 && timeout_ms > 0))) {
            /* A handled signal (a profiler's SIGPROF, say): wait out the rest,
             * or signals more frequent than the wait would make it endless. A
             * backoff whose poll failed (ENOMEM) naps and tries again, so the
             * next dial is still paced (a close then waits out the nap: the
             * failing poll cannot tell of it, so closed is read after each nap). */
            if (errno != EINTR) {
                struct timespec nap = {0, (timeout_ms < 10 ? timeout_ms : 10) * 1000000L};
                nanosleep(&nap, NULL);
                pthread_mutex_lock(&c->o.mu);
                bool closed = c->closed;
                pthread_mutex_unlock(&c->o.mu);
                if (closed) return KNET_ECLIENTCLOSED;
            }
            if (timeout_ms > 0) {
                uint64_t now = knet__now_ms();
                timeout_ms = now >= end ? 0 : (int)(end - now);
            }
            continue;
        }
        if (n < 0) return -errno;
        if (n == 0) return 0;
        if (p[0].revents) return KNET_ECLIENTCLOSED;
        return p[1].revents;
    }
}

/* True when fd is connected to itself: a dial of a port of this host in the
 * ephemeral range, with no listener, can be given that port as its own and
 * complete a simultaneous open (Go's net.Dial checks for it too). */
static bool self_connected(int fd, const kn_sockaddr *peer) {
    kn_sockaddr local;
    socklen_t sl = sizeof local;
    if (getsockname(fd, &local.sa, &sl) < 0 || local.sa.sa_family != peer->sa.sa_family) return false;
    if (local.sa.sa_family == AF_INET)
        return local.in.sin_port == peer->in.sin_port &&
               local.in.sin_addr.s_addr == peer->in.sin_addr.s_addr;
    return local.in6.sin6_port == peer->in6.sin6_port &&
           memcmp(&local.in6.sin6_addr, &peer->in6.sin6_addr, sizeof local.in6.sin6_addr) == 0;
}

/* Non-blocking connect to each resolved address in turn. */
static int dial(knet_client *c, int *out, kn_sockaddr *peer) {
    kn_sockaddr addrs[8];
    int n = knet__addr_resolve(c->addr, false, addrs, 8);
    if (n < 0) return n;
    int rc = -ECONNREFUSED;
    for (int i = 0; i < n; i++) {
        int fd = socket(addrs[i].sa.sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            rc = -errno;
            continue;
        }
        int err = 0;
        if (connect(fd, &addrs[i].sa, knet__sockaddr_len(&addrs[i])) < 0) {
            err = errno;
            if (err == EINPROGRESS) {
                int w = wait_or_closed(c, fd, POLLOUT, -1);
                if (w == KNET_ECLIENTCLOSED) {
                    close(fd);
                    return KNET_ECLIENTCLOSED;
                }
                socklen_t sl = sizeof err;
                /* A failed wait says nothing of the socket, maybe still connecting. */
                if (w < 0) err = -w;
                else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &sl) < 0) err = errno;
            }
        }
        if (!err && self_connected(fd, &addrs[i])) err = ECONNREFUSED; /* no listener there */
        if (err) {
            rc = -err;
            close(fd);
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        *out = fd;
        *peer = addrs[i];
        return 0;
    }
    return rc;
}

static void client_stop_conn(knet_conn *conn, uint32_t grace_ms);

/* Serves the dialed fd as the client's connection until it ends. Returns 0, or,
 * when it never reached its loop (out of memory, no epoll watch left), the error:
 * a failed dial, so the backoff paces the next one. */
static int serve_one(knet_client *c, int fd, const kn_sockaddr *peer) {
    knet__owner_admit(&c->o); /* a client has no connection limit */
    knet_conn *conn = knet__conn_new(fd, &c->o, peer);
    if (!conn) {
        close(fd);
        knet__owner_conn_done(&c->o);
        return -ENOMEM;
    }
    knet_conn_retain(conn); /* the client's reference, for knet_client_conn */
    /* A stop made before the connection is visible (knet_client_conn) is asked of it
     * first: else a send after knet_client_close returned could be accepted on it. */
    pthread_mutex_lock(&c->o.mu);
    bool closed = c->closed;
    uint32_t grace_ms = c->o.grace_ms;
    pthread_mutex_unlock(&c->o.mu);
    if (closed) client_stop_conn(conn, grace_ms);
    pthread_mutex_lock(&c->o.mu);
    c->conn = conn; /* before connect(true) can run */
    /* A stop made meanwhile (or a close after that shutdown) did not see c->conn. */
    bool again = c->closed && (!closed || c->o.grace_ms != grace_ms);
    grace_ms = c->o.grace_ms;
    pthread_mutex_unlock(&c->o.mu);
    if (again) client_stop_conn(conn, grace_ms);
    knet__conn_start(conn);
    pthread_mutex_lock(&c->o.mu);
    while (c->o.live > 0) pthread_cond_wait(&c->o.cv, &c->o.mu);
    c->conn = NULL;
    pthread_mutex_unlock(&c->o.mu);
    /* attached is the loop's, read after its last write (live fell under o.mu). */
    int rc = conn->attached ? 0 : knet_conn_close_reason(conn);
    knet_conn_release(conn);
    return rc;
}

int knet_client_dial_and_serve(knet_client *c, const knet_handler *handler,
                               const knet_codec *codec) {
    if (!c) return -EINVAL;
    pthread_mutex_lock(&c->o.mu);
    int rc = c->closed ? KNET_ECLIENTCLOSED : c->serving ? KNET_EBUSY : 0;
    /* A loop thread would wait for a connection that loop may be the one to serve. */
    if (rc == 0 && knet__loop_current()) rc = -EDEADLK;
    if (rc == 0 && c->wake_fd < 0) {
        /* Made here, not in knet_client_new: out of descriptors is then an error
         * this call returns. Kept until knet_client_free (a stop may write to it). */
        c->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (c->wake_fd < 0) rc = -errno;
    }
    if (rc == 0) c->serving = true;
    /* A close under way (its task) still uses c: as below, return after it, so the
     * caller may free c (a serve call running meanwhile waits for it itself). */
    else if (rc != KNET_EBUSY) {
        while (c->o.tasks > 0) pthread_cond_wait(&c->o.cv, &c->o.mu);
    }
    pthread_mutex_unlock(&c->o.mu);
    if (rc < 0) return rc;
    knet__owner_set(&c->o, handler, codec);

    uint32_t wait = 0;
    for (;;) {
        pthread_mutex_lock(&c->o.mu);
        bool closed = c->closed;
        pthread_mutex_unlock(&c->o.mu);
        if (closed) {
            rc = KNET_ECLIENTCLOSED;
            break;
        }
        int fd = -1;
        kn_sockaddr peer;
        rc = dial(c, &fd, &peer);
        if (rc == KNET_ECLIENTCLOSED) break;
        /* The loops start with the first connection: dials that fail leave them
         * unstarted, and the loop count settable. Not a failed dial: returned. */
        if (rc == 0 && (rc = knet__owner_start(&c->o)) < 0) {
            close(fd);
            break;
        }
        if (rc == 0) rc = serve_one(c, fd, &peer);
        if (rc == 0) { /* served: dial again at once */
            wait = 0;
            continue;
        }
        /* The settings as they are now that the dial failed: a dial can take long
         * (name lookup, SYN retries), and an enable or disable made meanwhile is
         * for this failure. */
        pthread_mutex_lock(&c->o.mu);
        bool retry = c->retry;
        uint32_t initial = c->backoff_initial, max = c->backoff_max;
        pthread_mutex_unlock(&c->o.mu);
        if (!retry) break;
        wait = wait ? (wait > max / 2 ? max : wait * 2) : initial;
        knet__log(KNET_LOG_WARN, "dial %s: %s; retrying in %u ms", c->addr, knet_strerror(rc),
                  wait);
        if (wait_or_closed(c, -1, 0, (int)wait) == KNET_ECLIENTCLOSED) {
            rc = KNET_ECLIENTCLOSED;
            break;
        }
    }
    pthread_mutex_lock(&c->o.mu);
    while (c->o.live > 0 || c->o.tasks > 0) pthread_cond_wait(&c->o.cv, &c->o.mu);
    /* A close made before the return wins over a failure it raced (a refused dial with
     * retry off): the caller asked for it, and knet.h promises KNET_ECLIENTCLOSED. */
    if (rc < 0 && c->closed) rc = KNET_ECLIENTCLOSED;
    c->serving = false;
    pthread_mutex_unlock(&c->o.mu);
    return rc;
}

/* Ends conn as the client's close or shutdown asked (grace_ms: 0 = at once). */
static void client_stop_conn(knet_conn *conn, uint32_t grace_ms) {
    if (grace_ms) knet_conn_close_with_timeout(conn, grace_ms);
    else knet__conn_close_reason(conn, KNET_ECLIENTCLOSED);
}

static int client_stop(knet_client *c, uint32_t grace_ms) {
    if (!c) return -EINVAL;
    pthread_mutex_lock(&c->o.mu);
    if (c->closed && (grace_ms || c->o.grace_ms == 0)) {
        pthread_mutex_unlock(&c->o.mu);
        return KNET_ECLIENTCLOSED;
    }
    c->closed = true;
    /* No o.closing: that would make the loop drop a connection not yet attached,
     * bytes sent on it included. The close below (or the dialer, seeing closed)
     * asks the connection itself, which its attach honours. */
    c->o.grace_ms = grace_ms;
    knet_conn *conn = c->conn;
    if (conn) knet_conn_retain(conn);
    /* A task until this returns: else the serving thread could see the close,
     * return, and let the caller free c while it is still used here. */
    c->o.tasks++;
    int wake_fd = c->wake_fd; /* -1 before the first serve, which then sees closed */
    pthread_mutex_unlock(&c->o.mu);
    if (wake_fd >= 0) {
        uint64_t one = 1;
        ssize_t n = write(wake_fd, &one, sizeof one);
        (void)n;
    }
    if (conn) {
        client_stop_conn(conn, grace_ms);
        knet_conn_release(conn);
    }
    knet__owner_task_done(&c->o); /* last: c may be freed once it returns */
    return 0;
}

int knet_client_close(knet_client *c) { return client_stop(c, 0); }

int knet_client_shutdown(knet_client *c, uint32_t timeout_ms) {
    return client_stop(c, timeout_ms ? timeout_ms : 1);
}

void knet_client_set_idle_timeout(knet_client *c, uint32_t idle_ms) {
    pthread_mutex_lock(&c->o.mu);
    c->o.idle_ms = idle_ms;
    pthread_mutex_unlock(&c->o.mu);
}

void knet_client_set_max_queued_bytes(knet_client *c, size_t max_queued_bytes) {
    pthread_mutex_lock(&c->o.mu);
    c->o.max_qbytes = max_queued_bytes;
    pthread_mutex_unlock(&c->o.mu);
}

knet_conn *knet_client_conn(knet_client *c) {
    pthread_mutex_lock(&c->o.mu);
    /* live falls to 0 once connect(false) ran; c->conn is cleared only when the
     * dialing thread wakes up, which may be much later. */
    knet_conn *conn = c->o.live ? c->conn : NULL;
    if (conn) knet_conn_retain(conn);
    pthread_mutex_unlock(&c->o.mu);
    return conn;
}
