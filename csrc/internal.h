/* Private state of the knet core. Nothing here is part of the public API.
 * Functions the core's files share are named knet__* (as libuv's uv__*): in libknet.a,
 * and in CKNet inside a Swift program, they are global symbols that hidden visibility does
 * not keep apart from the program's own names (scripts/check-install.sh checks this). */
#ifndef KNET_INTERNAL_H
#define KNET_INTERNAL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include "knet/knet.h"

#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/socket.h>
#include <sys/uio.h>

struct epoll_event;

#define KN_READ_BUF (64u * 1024u)  /* per-loop read buffer */
#define KN_IBUF_SLACK 4096u        /* spare room a kept partial frame may have */
#define KN_CHUNK_MIN (4u * 1024u)  /* a queue's first chunk payload */
#define KN_CHUNK (64u * 1024u)     /* largest chunk payload (a larger message gets its own) */
#define KN_READ_BUDGET 16          /* full reads per readiness event (fairness) */
#define KN_MSG_BUDGET 1024         /* messages per read pass, checked between reads */
#define KN_ACCEPT_BUDGET 64        /* accepts per readiness event */
#define KN_IOV_MAX 64              /* iovecs per sendmsg */
#define KN_DEFAULT_GRACE_MS 3000u

/* The per-message system calls of a loop thread (sys.c): read, send, sendmsg and
 * epoll_wait without glibc's cancellation-point wrappers, which cost two atomic
 * read-modify-writes per call in a multi-threaded process (knet's always is). Only
 * loop threads, which are never cancelled, call them. In their own file so white-box
 * tests can wrap them at link time. */
ssize_t knet__sys_read(int fd, void *buf, size_t n);
ssize_t knet__sys_send(int fd, const void *buf, size_t n, int flags);
ssize_t knet__sys_sendmsg(int fd, const struct msghdr *m, int flags);
int knet__sys_epoll_wait(int epfd, struct epoll_event *evs, int max, int timeout);

typedef struct kn_loop kn_loop;
typedef struct kn_io kn_io;
typedef struct kn_timer kn_timer;
typedef struct kn_owner kn_owner;

/* ------------------------------------------------------------ log / errors */
void knet__log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* ------------------------------------------------------------ addresses */
typedef union kn_sockaddr {
    struct sockaddr sa;
    struct sockaddr_in in;
    struct sockaddr_in6 in6;
} kn_sockaddr;

socklen_t knet__sockaddr_len(const kn_sockaddr *a);
/* The port of an IPv4 or IPv6 address (host order), 0 for any other family. */
unsigned knet__sockaddr_port(const kn_sockaddr *a);
/* Parses addr without resolving: 1 = *out holds a literal or wildcard address;
 * 0 = host names a host to resolve (port set); or KNET_EADDR. */
int knet__addr_parse(const char *addr, bool passive, kn_sockaddr *out, char *host,
                     size_t hostcap, unsigned *port);
/* Resolves addr into at most max addresses, IPv4 first. passive: for bind
 * (empty host = every interface). Returns the count or KNET_EADDR/KNET_ERESOLVE. */
int knet__addr_resolve(const char *addr, bool passive, kn_sockaddr *out, int max);
/* Formats "ip:port" / "[ip]:port" (v4-mapped v6 shown as v4). Returns length or -ENOSPC. */
int knet__addr_format(const kn_sockaddr *a, char *buf, size_t len);

/* ------------------------------------------------------------ event loop */

/* Anything registered with epoll starts with a kn_io: the loop calls cb. */
typedef void (*kn_io_cb)(kn_loop *L, kn_io *io, uint32_t events);
struct kn_io {
    int fd;
    kn_io_cb cb;
};

typedef void (*kn_timer_cb)(kn_loop *L, kn_timer *t);
struct kn_timer {
    uint64_t deadline; /* monotonic ms */
    size_t idx;        /* position in the loop's heap; SIZE_MAX when stopped */
    kn_timer_cb cb;
};

typedef void (*kn_task_fn)(kn_loop *L, void *arg);
typedef struct kn_task {
    struct kn_task *next;
    kn_task_fn fn;
    void *arg;
    bool heap; /* made by knet__loop_post (freed after it ran), else the poster's */
} kn_task;

struct kn_loop {
    kn_io wake; /* eventfd: other threads post work */
    int epfd;
    unsigned index;
    pthread_t thread;

    pthread_mutex_t mu; /* guards tasks and ready */
    kn_task *tasks_head, *tasks_tail;
    knet_conn *ready_head, *ready_tail; /* conns with queued sends or requests */
    atomic_bool wake_pending;           /* coalesces eventfd writes */
    atomic_bool has_work;               /* tasks or ready non-empty; set under mu */

    /* owned by the loop thread */
    char *rbuf;
    uint64_t now;
    kn_timer **heap;
    size_t heap_len, heap_cap;
    size_t timers; /* timers that may run here (reserved): heap_cap never falls short */
    knet_conn *conns; /* live connections (doubly linked) */
    knet_conn *reap;  /* finished conns; the loop's reference drops at the end of the iteration */
};

int knet__loops_start(void);      /* starts the loop threads once: 0 or -errno */
kn_loop *knet__loop_next(void);   /* round-robin pick (after knet__loops_start) */
kn_loop *knet__loop_at(unsigned i);
unsigned knet__loop_count(void);  /* 0 before knet__loops_start succeeded */
kn_loop *knet__loop_current(void); /* the loop of the calling thread, or NULL */
/* Runs fn(L, arg) on L's thread, after what is already queued (never inline). */
int knet__loop_post(kn_loop *L, kn_task_fn fn, void *arg);
/* The same with a node the caller owns (no allocation, cannot fail); t must stay
 * valid and unposted elsewhere until fn runs (fn may free it). */
void knet__loop_post_node(kn_loop *L, kn_task *t, kn_task_fn fn, void *arg);
void knet__loop_wake(kn_loop *L);
int knet__loop_ctl(kn_loop *L, int op, kn_io *io, uint32_t events);
void knet__timer_init(kn_timer *t, kn_timer_cb cb);
/* Makes room in L's heap for one more timer owner (a connection, a listener), so
 * knet__timer_start never allocates: a graceful close or shutdown cannot fail for
 * memory. 0 or -ENOMEM. knet__timer_unreserve when the owner leaves L. */
int knet__timer_reserve(kn_loop *L);
void knet__timer_unreserve(kn_loop *L);
void knet__timer_start(kn_loop *L, kn_timer *t, uint64_t ms);
void knet__timer_stop(kn_loop *L, kn_timer *t);
uint64_t knet__now_ms(void);

/* ------------------------------------------------------------ owner */

/* What a server or client shares with its connections: handler, codec and
 * the count the serving thread waits on. */
/* Byte counters of one owner on one loop: written by that loop thread only
 * (a plain load+store, no read-modify-write), summed by readers. */
typedef struct kn_slot {
    _Alignas(64) atomic_uint_least64_t bytes_in;
    atomic_uint_least64_t bytes_out;
} kn_slot;

struct kn_owner {
    knet_handler handler;
    knet_codec codec;
    size_t max_frame;
    kn_slot *slots; /* one per loop, while serving */
    kn_task *stop_nodes; /* 2 per loop, for knet__owner_stop_loops: a stop allocates nothing */
    /* limits given to new connections (under mu) */
    size_t max_conns, max_qbytes;
    uint32_t idle_ms;
    /* counters (under mu) */
    uint64_t accepted, refused, idle_closed;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    size_t live;          /* connections created and not yet finished */
    size_t tasks;         /* loop tasks that still reference this owner */
    atomic_bool closing;  /* a server's: no new connections, no sends; attach closes them (set under mu) */
    bool serves_one;      /* a client: its serving thread waits out every connection */
    int close_reason;     /* what connections closed by the owner report */
    uint32_t grace_ms;    /* for a graceful knet__owner_stop_loops */
};

void knet__owner_init(kn_owner *o);
void knet__owner_destroy(kn_owner *o);
void knet__owner_set(kn_owner *o, const knet_handler *h, const knet_codec *c);
void knet__owner_conn_done(kn_owner *o); /* live--; wakes the serving thread if it waits for 0 */
/* Counts a new connection in (live++), unless max_conns is reached: refused++, false. */
bool knet__owner_admit(kn_owner *o);
/* Allocates the per-loop byte counters (starts the loops); 0 or -ENOMEM. */
int knet__owner_start(kn_owner *o);
void knet__owner_stats(kn_owner *o, knet_stats *out);
/* Has every loop close o's connections (force: at once, with o->close_reason) or
 * shut them down gracefully (with o->grace_ms), through o's stop nodes: each kind
 * is posted at most once. The caller already added knet__loop_count() to o->tasks
 * under o->mu (in the same critical section that made the work due). */
void knet__owner_stop_loops(kn_owner *o, bool force);
void knet__owner_task_done(kn_owner *o);
/* Closes (reason) every connection of o on loop L. */
void knet__owner_close_conns(kn_loop *L, kn_owner *o, int reason);

/* ------------------------------------------------------------ send queue */
typedef struct kn_chunk {
    struct kn_chunk *next;
    size_t len, off, cap;
    size_t nmsgs; /* messages that end in this chunk */
    char data[];
} kn_chunk;

typedef struct kn_queue {
    kn_chunk *head, *tail;
} kn_queue;

/* One framed message: pieces referencing the caller's buffer or the writer's
 * scratch (offsets, resolved once the codec is done, so scratch may grow). */
typedef struct kn_piece {
    const char *base; /* NULL: offset into scratch */
    size_t off, len;
} kn_piece;

struct knet_writer {
    const char *msg;
    size_t msg_len; /* the message being framed: referencing it needs no copy */
    kn_piece *pieces;
    size_t npieces, cap_pieces;
    char *scratch;
    size_t scratch_len, scratch_cap;
    size_t total;
    kn_piece inline_pieces[4];
    char inline_scratch[64];
};

void knet__writer_init(knet_writer *w, const void *msg, size_t len);
void knet__writer_free(knet_writer *w);
/* The framed message as iovecs: into stack (cap entries) when it fits, else a
 * malloc'd array the caller frees; NULL when out of memory. */
struct iovec *knet__writer_iov(knet_writer *w, struct iovec *stack, size_t cap, size_t *n);

/* ------------------------------------------------------------ connection */
enum { KN_OPEN = 0, KN_CLOSING = 1, KN_CLOSED = 2 };
/* Requests for the loop; KN_REQ_PAUSED is a state, set while reading is paused: the read
 * pass's one per-message load of req sees a close and a pause together. */
enum { KN_REQ_CLOSE = 1u, KN_REQ_GRACEFUL = 2u, KN_REQ_READ = 4u /* resume reading */,
       KN_REQ_PAUSED = 8u };

struct knet_conn {
    kn_io io; /* first: epoll hands back &conn->io */
    kn_loop *loop;
    kn_owner *owner;
    atomic_int refs;
    atomic_int state;  /* KN_OPEN / KN_CLOSING (sends refused) / KN_CLOSED */
    atomic_int reason; /* 1 while open, then why it closed */
    atomic_uint req;   /* KN_REQ_* for the loop */
    atomic_bool inbox_full; /* inbox non-empty: the loop must not write around it
                               (read per send: kept in the first cache lines) */
    atomic_size_t npending;
    atomic_size_t max_pending;
    atomic_size_t qbytes; /* bytes in outq + inbox */
    atomic_size_t max_qbytes;
    _Atomic(void *) userdata;
    atomic_bool drain_wanted; /* a knet_conn_notify_drained request waits (fn under mu) */

    /* owned by the loop thread */
    kn_queue outq;
    knet_alloc_fn alloc; /* where reads go, when not into the loop's buffer */
    void *alloc_ud;
    char *ibuf; /* unconsumed partial frame */
    size_t ilen, icap;
    uint32_t events; /* epoll interest (always with EPOLLET) */
    bool read_more;  /* input left when the read budget ran out: the ready list reads on */
    bool in_read;    /* a read pass is delivering messages */
    bool pass_sent;  /* receive wrote directly in this pass: its later sends are queued */
    bool read_to_end; /* FIN, reset, error or urgent data seen: a short read no longer
                         means drained (kept: urgent data once costs a read per event) */
    bool held;       /* ibuf may hold whole messages a pause kept back: decode it first */
    bool graceful;   /* flushing before close */
    int close_as;    /* the reason a graceful close ends with */
    uint64_t grace_end; /* a graceful close's deadline (the timer may fire sooner, for the
                           idle timeout of a drain after the peer's EOF) */
    bool peer_eof;   /* the peer finished sending */
    bool wr_shut;    /* SHUT_WR done */
    bool attached;
    uint32_t idle_ms;
    uint64_t last_io; /* loop time of the last read or write */
    int outq_seen;    /* bytes in the kernel's send queue at the last idle expiry */
    kn_slot *slot;    /* the owner's counters on this loop */
    kn_timer timer;   /* the idle timeout, then the graceful-close deadline */
    knet_conn *prev, *next; /* loop's live list */
    knet_conn *ready_next;  /* loop's ready list (under loop mu) */
    knet_conn *batch_next;  /* the ready list a drain took (loop thread): a conn
                               re-queued while in it must not relink it */
    bool ready;             /* on the ready list (under loop mu) */
    knet_conn *reap_next;

    /* shared with senders, under mu */
    pthread_mutex_t mu;
    kn_queue inbox;
    bool inbox_sched;         /* a service of the inbox is scheduled */
    int req_reason;
    uint32_t grace_ms;
    knet_drain_fn drain_fn;
    void *drain_ud;
    bool has_local;
    kn_sockaddr local, peer;
};

/* Creates a connection for a connected non-blocking fd (the caller counted it in with
 * knet__owner_admit). */
knet_conn *knet__conn_new(int fd, kn_owner *o, const kn_sockaddr *peer);
/* Registers c on loop L and delivers connect(true); runs on L. */
void knet__conn_attach(kn_loop *L, knet_conn *c);
/* Posts the attach to c->loop (inline when called on it). */
void knet__conn_start(knet_conn *c);
/* Closes at once with reason (loop thread only); delivers connect(false). */
void knet__conn_finish(knet_conn *c, int reason);
/* Requests a close with reason from any thread. */
void knet__conn_close_reason(knet_conn *c, int reason);
/* Starts a graceful close with a deadline of ms on the loop thread. */
void knet__conn_graceful(kn_loop *L, knet_conn *c, uint32_t ms);
/* Services a conn taken from the ready list (loop thread). */
void knet__conn_service(kn_loop *L, knet_conn *c);

#endif
