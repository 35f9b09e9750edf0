/* The server: a listening socket on one loop; accepted connections are
 * spread round-robin over all loops. */
#include "internal.h"

#include <errno.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#define BACKOFF_MIN_MS 5u
#define BACKOFF_MAX_MS 1000u

struct knet_server {
    kn_owner o; /* first: loop tasks get &s->o */
    char *addr;
    kn_io lio;
    kn_loop *lloop;
    kn_timer backoff;
    uint32_t backoff_ms;
    kn_task start_node, close_node; /* the listener's tasks: posting them cannot fail */
    /* under o.mu */
    int port; /* 0 before listening, the port once listening, or the listen error */
    bool serving, closed, forced, listener_open;
};

knet_server *knet_server_new(const char *addr) {
    knet_server *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->addr = strdup(addr ? addr : "");
    if (!s->addr) {
        free(s);
        return NULL;
    }
    knet__owner_init(&s->o);
    s->o.close_reason = KNET_ESERVERCLOSED;
    s->lio.fd = -1;
    return s;
}

void knet_server_free(knet_server *s) {
    if (!s) return;
    if (s->lio.fd >= 0) close(s->lio.fd);
    knet__owner_destroy(&s->o);
    free(s->addr);
    free(s);
}

/* A bound socket, not listening yet: knet_server_listen_and_serve listens. */
static int open_listener(kn_sockaddr *sa) {
    int fd = socket(sa->sa.sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    bool wild6 = sa->sa.sa_family == AF_INET6 && IN6_IS_ADDR_UNSPECIFIED(&sa->in6.sin6_addr);
    if (fd < 0 && wild6 && errno == EAFNOSUPPORT) { /* no IPv6 here: every IPv4 interface */
        uint16_t port = sa->in6.sin6_port;
        memset(sa, 0, sizeof *sa);
        sa->in.sin_family = AF_INET;
        sa->in.sin_port = port;
        wild6 = false;
        fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    }
    if (fd < 0) return -errno;
    int one = 1, zero = 0;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (wild6) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
    if (bind(fd, &sa->sa, knet__sockaddr_len(sa)) < 0) {
        int err = -errno;
        close(fd);
        return err;
    }
    return fd;
}

static void on_accept(kn_loop *L, kn_io *io, uint32_t events);

static void backoff_fired(kn_loop *L, kn_timer *t) {
    knet_server *s = (knet_server *)((char *)t - offsetof(knet_server, backoff));
    if (s->lio.fd < 0) return;
    knet__loop_ctl(L, EPOLL_CTL_MOD, &s->lio, EPOLLIN);
    on_accept(L, &s->lio, EPOLLIN);
}

static void on_accept(kn_loop *L, kn_io *io, uint32_t events) {
    (void)events;
    knet_server *s = (knet_server *)((char *)io - offsetof(knet_server, lio));
    for (int i = 0; i < KN_ACCEPT_BUDGET; i++) {
        kn_sockaddr peer;
        socklen_t sl = sizeof peer;
        int fd = accept4(io->fd, &peer.sa, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            int e = errno;
            if (e == EAGAIN || e == EWOULDBLOCK) return;
            /* EINVAL once server_stop took the listener out of LISTEN: its close follows. */
            if (atomic_load_explicit(&s->o.closing, memory_order_relaxed)) return;
            /* Errors of the one pending connection, not of the listener (accept(2)
             * lists the network errors Linux passes on): take the next. Not EPERM:
             * a security module or seccomp refuses before the connection is taken,
             * so it stays queued and retrying at once would spin. */
            if (e == EINTR || e == ECONNABORTED || e == EPROTO || e == ENETDOWN ||
                e == ENOPROTOOPT || e == EHOSTDOWN || e == ENONET || e == EHOSTUNREACH ||
                e == EOPNOTSUPP || e == ENETUNREACH)
                continue;
            /* EMFILE, ENFILE, ENOBUFS, ENOMEM...: pause accepting and retry later
             * (as Go's http server does), keeping every live connection. */
            s->backoff_ms = s->backoff_ms ? s->backoff_ms * 2 : BACKOFF_MIN_MS;
            if (s->backoff_ms > BACKOFF_MAX_MS) s->backoff_ms = BACKOFF_MAX_MS;
            knet__log(KNET_LOG_WARN, "accept error: %s; retrying in %u ms", knet_strerror(-e),
                      s->backoff_ms);
            knet__loop_ctl(L, EPOLL_CTL_MOD, io, 0);
            knet__timer_start(L, &s->backoff, s->backoff_ms);
            return;
        }
        s->backoff_ms = 0;
        if (atomic_load_explicit(&s->o.closing, memory_order_relaxed) ||
            !knet__owner_admit(&s->o)) {
            close(fd); /* stopping, or over the connection limit (counted as refused) */
            continue;
        }
        int one = 1; /* Go's default, and what a request/response protocol wants */
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        knet_conn *c = knet__conn_new(fd, &s->o, &peer);
        if (!c) {
            close(fd);
            knet__owner_conn_done(&s->o);
            continue;
        }
        knet__conn_start(c);
    }
}

/* Watches the listener on its loop and publishes the port, or the error: a
 * listener no loop watches would take connections into its backlog forever. */
static void listener_start(kn_loop *L, void *arg) {
    knet_server *s = arg;
    s->lio.cb = on_accept;
    knet__timer_init(&s->backoff, backoff_fired);
    int rc = knet__timer_reserve(L); /* for the accept backoff */
    if (rc == 0) {
        rc = knet__loop_ctl(L, EPOLL_CTL_ADD, &s->lio, EPOLLIN);
        if (rc < 0) knet__timer_unreserve(L);
    }
    if (rc < 0) knet__log(KNET_LOG_ERROR, "cannot watch the listener: %s", knet_strerror(rc));
    kn_sockaddr bound = {.sa = {.sa_family = AF_UNSPEC}};
    socklen_t sl = sizeof bound;
    if (rc == 0) getsockname(s->lio.fd, &bound.sa, &sl);
    int dead = -1;
    pthread_mutex_lock(&s->o.mu);
    s->port = rc < 0 ? rc : (int)knet__sockaddr_port(&bound);
    if (rc < 0) { /* taken under the lock: a close (server_stop) no longer sees it */
        s->listener_open = false;
        dead = s->lio.fd;
        s->lio.fd = -1;
    }
    pthread_cond_broadcast(&s->o.cv);
    pthread_mutex_unlock(&s->o.mu);
    if (dead >= 0) close(dead); /* its number may be another's at once */
    knet__owner_task_done(&s->o);
}

static void listener_close(kn_loop *L, void *arg) {
    knet_server *s = arg;
    if (s->lio.fd >= 0) {
        knet__timer_stop(L, &s->backoff);
        knet__timer_unreserve(L);
        /* As for a connection: leave epoll before the close, which alone does not
         * while a fork's child keeps the socket open; s may be freed soon. */
        knet__loop_ctl(L, EPOLL_CTL_DEL, &s->lio, 0);
        close(s->lio.fd);
        s->lio.fd = -1;
    }
    pthread_mutex_lock(&s->o.mu);
    s->listener_open = false;
    pthread_mutex_unlock(&s->o.mu);
    knet__owner_task_done(&s->o);
}

int knet_server_listen_and_serve(knet_server *s, const knet_handler *handler,
                                 const knet_codec *codec) {
    if (!s) return -EINVAL;
    pthread_mutex_lock(&s->o.mu);
    int rc = s->closed ? KNET_ESERVERCLOSED : s->serving ? KNET_EBUSY : 0;
    if (rc == 0 && knet__loop_current()) {
        /* A loop thread would wait on work that loop may be the one to do (start
         * the listener, close it): refused, and reported to wait_listening. */
        rc = -EDEADLK;
        s->port = rc;
        pthread_cond_broadcast(&s->o.cv);
    }
    if (rc == 0) {
        s->serving = true;
        s->port = 0;      /* not the error of an earlier call */
        s->lloop = NULL;  /* nor its loop: a stop meanwhile posts work only once this
                           * call listens, and only then does it wait for that work */
    }
    pthread_mutex_unlock(&s->o.mu);
    if (rc < 0) return rc;
    knet__owner_set(&s->o, handler, codec);

    kn_sockaddr sa;
    rc = knet__addr_resolve(s->addr, true, &sa, 1);
    int fd = rc < 0 ? rc : open_listener(&sa);
    if (fd >= 0) {
        /* Listens under the lock, publishing the listener: a close from then on takes
         * it out of LISTEN (server_stop), and one made before keeps the port from ever
         * listening. The port refuses connections once a close has returned. */
        pthread_mutex_lock(&s->o.mu);
        int err = s->closed || listen(fd, 4096) == 0 ? 0 : -errno;
        if (err == 0 && !s->closed) s->lio.fd = fd;
        pthread_mutex_unlock(&s->o.mu);
        if (err < 0) {
            close(fd);
            fd = err;
        }
    }
    /* The loops start once there is something to serve: a listen that fails at once
     * leaves them unstarted, and the loop count settable. */
    if (fd >= 0 && (rc = knet__owner_start(&s->o)) < 0) {
        pthread_mutex_lock(&s->o.mu);
        s->lio.fd = -1; /* before its close: a close (server_stop) may shut it down */
        pthread_mutex_unlock(&s->o.mu);
        close(fd);
        fd = rc;
    }
    kn_loop *lloop = NULL;
    if (fd >= 0) lloop = knet__loop_next();
    else knet__log(KNET_LOG_DEBUG, "listen on \"%s\": %s", s->addr, knet_strerror(fd));

    pthread_mutex_lock(&s->o.mu);
    if (fd < 0) {
        s->port = fd;
        s->serving = false;
        pthread_cond_broadcast(&s->o.cv);
        pthread_mutex_unlock(&s->o.mu);
        return fd;
    }
    s->lio.fd = fd;
    s->lloop = lloop;
    /* Closed already: the port stays 0 (wait_listening reports the close). Else
     * listener_start publishes it, posted under the lock so a concurrent close
     * queues its listener_close after it. */
    if (!s->closed) {
        s->listener_open = true;
        s->o.tasks++;
        knet__loop_post_node(s->lloop, &s->start_node, listener_start, s);
    }
    pthread_cond_broadcast(&s->o.cv);
    /* Until closed, or the listener failed (port < 0: nothing was accepted). */
    while (!((s->closed || s->port < 0) && !s->listener_open && s->o.live == 0 &&
             s->o.tasks == 0))
        pthread_cond_wait(&s->o.cv, &s->o.mu);
    rc = s->port < 0 ? s->port : KNET_ESERVERCLOSED;
    s->serving = false;
    pthread_mutex_unlock(&s->o.mu);
    if (s->lio.fd >= 0) { /* closed before the listener reached its loop, or failed to */
        close(s->lio.fd);
        s->lio.fd = -1;
    }
    return rc;
}

/* Stops accepting, then closes (force) or shuts down (graceful, ms) every
 * connection. A force close may follow a graceful one; nothing else repeats. */
static int server_stop(knet_server *s, bool force, uint32_t ms) {
    if (!s) return -EINVAL;
    pthread_mutex_lock(&s->o.mu);
    if (s->closed && (!force || s->forced)) {
        pthread_mutex_unlock(&s->o.mu);
        return KNET_ESERVERCLOSED;
    }
    bool first = !s->closed;
    s->closed = true;
    s->forced = force;
    /* A close after a shutdown must not turn the shutdown's pending tasks into
     * 0 ms deadlines (their connections would report -ETIMEDOUT). */
    if (!force) s->o.grace_ms = ms;
    atomic_store(&s->o.closing, true);
    bool serving = s->serving && s->lloop;
    /* Reserve the per-loop tasks under the lock, or the serving thread could see
     * no work left, return, and let the caller free s before they run. */
    if (serving) s->o.tasks += knet__loop_count();
    /* The listener, once listening (also before its loop watches it, or while the
     * serving thread has yet to hand it over): out of LISTEN now, from this thread;
     * the fd stays open until listener_close on its loop, or the serving thread
     * closes it. Else a peer re-dialing as its connection ends below could have
     * its handshake completed by the kernel, then dropped silently by the close:
     * connected to nothing, for good. Now such a dial is refused. */
    if (first && s->lio.fd >= 0) shutdown(s->lio.fd, SHUT_RDWR);
    if (first && s->listener_open) {
        s->o.tasks++;
        knet__loop_post_node(s->lloop, &s->close_node, listener_close, s);
    }
    pthread_cond_broadcast(&s->o.cv);
    pthread_mutex_unlock(&s->o.mu);
    if (serving) knet__owner_stop_loops(&s->o, force);

    return 0;
}

int knet_server_close(knet_server *s) { return server_stop(s, true, 0); }

int knet_server_shutdown(knet_server *s, uint32_t timeout_ms) {
    return server_stop(s, false, timeout_ms);
}

static void set_limit(knet_server *s, size_t *field, size_t v) {
    pthread_mutex_lock(&s->o.mu);
    *field = v;
    pthread_mutex_unlock(&s->o.mu);
}

void knet_server_set_max_conns(knet_server *s, size_t max) { set_limit(s, &s->o.max_conns, max); }

void knet_server_set_max_queued_bytes(knet_server *s, size_t max) {
    set_limit(s, &s->o.max_qbytes, max);
}

void knet_server_set_idle_timeout(knet_server *s, uint32_t ms) {
    pthread_mutex_lock(&s->o.mu);
    s->o.idle_ms = ms;
    pthread_mutex_unlock(&s->o.mu);
}

void knet_server_stats(knet_server *s, knet_stats *out) { knet__owner_stats(&s->o, out); }

int knet_server_port(const knet_server *s) {
    knet_server *m = (knet_server *)s;
    pthread_mutex_lock(&m->o.mu);
    int p = m->port;
    pthread_mutex_unlock(&m->o.mu);
    return p;
}

int knet_server_wait_listening(knet_server *s, uint32_t timeout_ms) {
    struct timespec dl;
    clock_gettime(CLOCK_MONOTONIC, &dl);
    dl.tv_sec += timeout_ms / 1000;
    dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (dl.tv_nsec >= 1000000000L) {
        dl.tv_sec++;
        dl.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&s->o.mu);
    int rc = 0;
    while (s->port == 0 && !s->closed && rc == 0)
        rc = pthread_cond_timedwait(&s->o.cv, &s->o.mu, &dl);
    int p = s->port != 0 ? s->port : s->closed ? KNET_ESERVERCLOSED : -ETIMEDOUT;
    pthread_mutex_unlock(&s->o.mu);
    return p;
}
