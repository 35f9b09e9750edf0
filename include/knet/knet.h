/*
 * knet — a TCP networking library: event loops, servers, persistent clients,
 * framed connections with a thread-safe send queue and graceful half-close.
 *
 * Conventions (as in libuv):
 *  - every call is prefixed knet_; calls that can fail return 0 (or a
 *    non-negative value) on success and a negative error code otherwise;
 *    system errors are returned as -errno; knet_strerror() names every code.
 *  - handles (server, client, conn) own their memory; the library never frees
 *    what the caller passed in, and copies what it needs to keep.
 *
 * Threading (the contract every caller relies on):
 *  - knet runs N event-loop threads (default: online CPUs; see
 *    knet_set_loop_threads). Every connection belongs to one loop for its whole
 *    life; all of its handler callbacks — connect(true), every receive,
 *    connect(false) — run on that loop thread, in that order, never
 *    concurrently and never nested. connect(false) runs exactly once for every
 *    connection that got connect(true). A callback that blocks stalls every
 *    connection of its loop.
 *  - fork: the loop threads start with the first server or client and do not
 *    exist in a child forked after that, so such a child must not call knet (it
 *    may exec; knet's descriptors are close-on-exec). Fork before that first
 *    start and each process gets its own loops; its servers listen on ports of
 *    their own (no SO_REUSEPORT: processes cannot share one port, -EADDRINUSE).
 *  - knet_conn_* calls may be made from any thread, including from inside any
 *    callback (but knet_conn_set_alloc: on the connection's loop thread only).
 *    A close requested inside a callback takes effect (and delivers
 *    connect(false)) after that callback returns.
 *  - codec callbacks: read runs on the connection's loop thread; write runs on
 *    the thread that called knet_conn_send (holding that connection's lock
 *    when it is not the loop thread), and must not call back into knet.
 */
#ifndef KNET_KNET_H
#define KNET_KNET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The library builds with hidden visibility; everything declared here is exported. */
#if defined(__GNUC__)
#pragma GCC visibility push(default)
#endif

/* Version of this header (major.minor.patch). */
#define KNET_VERSION_MAJOR 0
#define KNET_VERSION_MINOR 1
#define KNET_VERSION_PATCH 0

/* ---------------------------------------------------------------- errors */

/* knet's own error codes; everything else negative is -errno. */
#define KNET_ESERVERCLOSED (-20001) /* the server was closed on purpose */
#define KNET_ECLIENTCLOSED (-20002) /* the client was closed on purpose */
#define KNET_EPENDINGFULL  (-20003) /* the connection's pending-send limit is reached */
#define KNET_ECLOSED       (-20004) /* the connection is closed or shutting down */
#define KNET_EADDR         (-20005) /* the address string cannot be parsed */
#define KNET_ECODEC        (-20006) /* the codec rejected a frame (bad or oversized) */
#define KNET_ERESOLVE      (-20007) /* the host name could not be resolved */
#define KNET_EOF           (-20008) /* the peer closed the connection */
#define KNET_EBUSY         (-20009) /* already serving, or too late to change this */

/* Returns a static, human-readable description of any knet error code or -errno. */
const char *knet_strerror(int err);

/* ---------------------------------------------------------------- logging */

/* Log levels: what knet_log_fn gets and knet_set_log's min_level. */
enum knet_log_level { KNET_LOG_DEBUG = 0, KNET_LOG_INFO = 1, KNET_LOG_WARN = 2, KNET_LOG_ERROR = 3 };

/* A log sink: called on whichever thread logs (loop, serving or dialing thread). */
typedef void (*knet_log_fn)(int level, const char *msg, void *ud);

/* Routes knet's log lines at or above min_level to fn (NULL = the default: stderr).
 * fn runs on the thread that logs (a loop thread or a caller's), maybe while a server,
 * client or the loops start or stop: it must not start, stop or free one itself. Once
 * this returns, the sink it replaced runs no more (it waits for calls under way), so its
 * ud may be freed; called from inside a sink it does not wait. So do not call it while
 * holding a lock the old sink takes. */
void knet_set_log(knet_log_fn fn, int min_level, void *ud);

/* ---------------------------------------------------------------- event loops */

/* Sets the number of loop threads (0 = online CPUs); returns KNET_EBUSY once the
 * loops have started (they start when the first server listens or client connects: a
 * listen or dial that fails leaves them unstarted). The environment variable
 * KNET_LOOP_THREADS is read when this was not called. */
int knet_set_loop_threads(unsigned n);

/* Returns the number of loop threads that run, or will run once started. */
unsigned knet_loop_threads(void);

/* ---------------------------------------------------------------- handles */

typedef struct knet_conn knet_conn;     /* one TCP connection, reference counted */
typedef struct knet_server knet_server; /* a listening server */
typedef struct knet_client knet_client; /* a persistent dialing client */
typedef struct knet_writer knet_writer; /* where a codec writes one framed message */

/* ---------------------------------------------------------------- handler */

/* Connection events; NULL members are ignored. Both callbacks run on the
 * connection's loop thread. buf in receive is valid only during the call. */
typedef struct knet_handler {
    void (*connect)(knet_conn *conn, bool connected, void *ud);
    void (*receive)(knet_conn *conn, const void *buf, size_t len, void *ud);
    void *ud;
} knet_handler;

/* The handler that ignores every event (knet's DefaultTCPHandler). */
extern const knet_handler knet_default_handler;

/* ---------------------------------------------------------------- codec */

/* Decodes one message from the buffered input in[0..in_len) (in_len > 0).
 * Returns the bytes consumed (> 0) and sets *msg and *msg_len (inside in, or
 * codec-owned storage valid until the next call); 0 when more bytes are
 * needed; a negative code to close the connection with that error.
 * Runs on the connection's loop thread. */
typedef ptrdiff_t (*knet_codec_read_fn)(const void *in, size_t in_len, const void **msg,
                                        size_t *msg_len, void *ud);

/* Frames one message into w (knet_writer_write / knet_writer_reserve).
 * Returns 0 or a negative code (which knet_conn_send then returns).
 * Runs on the sending thread; must not call knet functions. */
typedef int (*knet_codec_write_fn)(knet_writer *w, const void *msg, size_t len, void *ud);

/* Default bound on one buffered partial frame when a codec sets max_frame = 0. */
#ifdef __cplusplus /* a C cast trips -Wold-style-cast in the C++ program that expands it */
#define KNET_DEFAULT_MAX_FRAME (static_cast<size_t>(16) << 20)
#else
#define KNET_DEFAULT_MAX_FRAME ((size_t)16 << 20)
#endif

/* A frame reader/writer. NULL read = raw stream; NULL write = raw bytes.
 * max_frame bounds one frame and the unconsumed input knet buffers for one
 * connection (0 = KNET_DEFAULT_MAX_FRAME); exceeding it closes that connection
 * with KNET_ECODEC. A raw stream has no frames (its messages are reads, never
 * buffered): max_frame does not apply to it. */
typedef struct knet_codec {
    knet_codec_read_fn read;
    knet_codec_write_fn write;
    void *ud;
    size_t max_frame;
} knet_codec;

/* Raw stream: a message is whatever bytes are buffered (knet's DefaultCodec);
 * both callbacks are NULL, so sends skip framing altogether. */
extern const knet_codec knet_default_codec;

/* 2-byte big-endian length prefix, frames up to 65535 bytes (knet's StdCodec). */
extern const knet_codec knet_std_codec;

/* Configuration of a length-prefixed codec (see knet_length_codec). */
typedef struct knet_length_field {
    unsigned length_bytes; /* 1, 2, 4 or 8 */
    bool little_endian;    /* false = network byte order */
    uint64_t max_frame;    /* largest body accepted or sent; 0 = KNET_DEFAULT_MAX_FRAME */
} knet_length_field;

/* Fills *codec with a length-prefixed codec described by *lf, which must stay
 * valid (and unchanged) for as long as the codec is used. Returns 0 or
 * -EINVAL for an unsupported length_bytes. An incoming length above
 * max_frame closes that connection with KNET_ECODEC; a larger outgoing
 * message makes knet_conn_send return KNET_ECODEC. */
int knet_length_codec(knet_codec *codec, const knet_length_field *lf);

/* Appends len bytes to the frame being written; returns 0, -ENOMEM, or -EINVAL
 * for a NULL writer or a NULL buf with len > 0. */
int knet_writer_write(knet_writer *w, const void *buf, size_t len);

/* Appends len uninitialised bytes and returns where to fill them (valid until
 * the next writer call), or NULL when out of memory. */
void *knet_writer_reserve(knet_writer *w, size_t len);

/* ---------------------------------------------------------------- server */

/* Creates a server for addr: "host:port", "[v6]:port" (with a zone too:
 * "[fe80::1%eth0]:port", a name or index), ":port" (every interface) or "" (= ":0",
 * a kernel-chosen port). The address is checked by
 * knet_server_listen_and_serve. Returns NULL only when out of memory. */
knet_server *knet_server_new(const char *addr);

/* Listens and serves every accepted connection with handler and codec (NULL =
 * defaults; both are copied). Blocks until the server is closed and every one
 * of its connections has delivered connect(false); then returns
 * KNET_ESERVERCLOSED. Returns another negative code at once on an
 * unrecoverable error: KNET_EADDR, KNET_ERESOLVE, -EADDRINUSE, -EACCES,
 * -EMFILE, -ENFILE, -ENOMEM (also when the loop threads could not start, or
 * -EAGAIN when no loop thread could; a later call tries again)...; KNET_EBUSY
 * while another call serves this server, KNET_ESERVERCLOSED at once if it was
 * closed, -EDEADLK on a loop thread (in a callback: call it from a thread of
 * your own), -EINVAL for NULL. Callbacks run on loop threads, never on the
 * calling thread. */
int knet_server_listen_and_serve(knet_server *s, const knet_handler *handler,
                                 const knet_codec *codec);

/* Stops accepting and closes every connection at once (thread-safe, does not
 * block, callable from callbacks, allocates nothing: it works out of memory);
 * each connect(false) runs on its loop thread. From its return on, the port refuses
 * new connections, and sends on the server's connections fail with KNET_ECLOSED
 * (also after knet_server_shutdown). Returns 0 (also when it force-closes what a
 * knet_server_shutdown still drains), KNET_ESERVERCLOSED if already closed, or
 * -EINVAL for NULL. */
int knet_server_close(knet_server *s);

/* Graceful shutdown: stop accepting (at once, as knet_server_close), shut every
 * connection down gracefully (queued bytes written, FIN, wait for the peer to
 * close), force-close what
 * remains after timeout_ms; then knet_server_listen_and_serve returns
 * KNET_ESERVERCLOSED. Thread-safe, does not block, allocates nothing (nor do the
 * connections' graceful closes: each has its timer's room from its start, and
 * one that cannot get it is closed at once, with no callbacks); receive and
 * connect(false) keep running on the loop threads meanwhile. A later knet_server_close
 * force-closes at once. A connection already closing gracefully keeps its close
 * reason, and its deadline when that is earlier. Returns 0, KNET_ESERVERCLOSED if
 * already stopping, or -EINVAL for NULL. */
int knet_server_shutdown(knet_server *s, uint32_t timeout_ms);

/* Default bound on the bytes queued per connection (knet_conn_set_max_queued_bytes). */
#ifdef __cplusplus /* as KNET_DEFAULT_MAX_FRAME */
#define KNET_DEFAULT_MAX_QUEUED (static_cast<size_t>(64) << 20)
#else
#define KNET_DEFAULT_MAX_QUEUED ((size_t)64 << 20)
#endif

/* The three limits below apply to the connections a server accepts from now
 * on (thread-safe; set them before knet_server_listen_and_serve). */

/* Caps open connections: beyond max_conns a new connection is closed at once,
 * with no callbacks, and counted as refused (0 = unlimited, the default). */
void knet_server_set_max_conns(knet_server *s, size_t max_conns);

/* Closes a connection with no bytes either way for idle_ms with -ETIMEDOUT;
 * connect(false) runs on its loop thread (0 = off, the default). Bytes the
 * kernel sends from the socket's buffer count (a slow reader is not idle); a
 * peer that stops reading with bytes queued is closed within 2 x idle_ms. A
 * graceful close asked for (knet_conn_close_with_timeout, a server's or client's
 * shutdown) is bounded by its own timeout instead; the drain knet begins on the
 * peer's EOF by both. Time is the loop's, read once per iteration (as libuv's uv_now). */
void knet_server_set_idle_timeout(knet_server *s, uint32_t idle_ms);

/* Sets each new connection's knet_conn_set_max_queued_bytes (default
 * KNET_DEFAULT_MAX_QUEUED; 0 = unlimited). */
void knet_server_set_max_queued_bytes(knet_server *s, size_t max_queued_bytes);

/* A server's counters (monotonic totals except live). */
typedef struct knet_stats {
    uint64_t live;        /* connections open now */
    uint64_t accepted;    /* connections accepted in total */
    uint64_t refused;     /* closed at once by the max_conns limit */
    uint64_t idle_closed; /* closed by the idle timeout */
    uint64_t bytes_in;    /* bytes read from all connections */
    uint64_t bytes_out;   /* bytes written to all connections */
} knet_stats;

/* Fills *out with the server's counters (thread-safe). */
void knet_server_stats(knet_server *s, knet_stats *out);

/* Returns the bound port once listening (still after the server closed), 0
 * before, or a negative listen error. */
int knet_server_port(const knet_server *s);

/* Blocks until the server listens (returns its port), failed to listen
 * (returns the error; after a failed call that error stands until the next
 * knet_server_listen_and_serve call begins, so a wait for a retry started on
 * another thread may see it: poll knet_server_port for > 0 instead), was closed
 * before it listened (KNET_ESERVERCLOSED), or
 * timeout_ms passed (-ETIMEDOUT; in a callback it may only time out, as the
 * listener may be waiting for that very loop). */
int knet_server_wait_listening(knet_server *s, uint32_t timeout_ms);

/* Frees the server; only after knet_server_listen_and_serve has returned (or
 * was never called). */
void knet_server_free(knet_server *s);

/* ---------------------------------------------------------------- client */

/* Creates a client that dials addr ("host:port", "[v6]:port", also with a zone as
 * for knet_server_new, or ":port" = this host). Retry is off. Opens no descriptor
 * (knet_client_dial_and_serve does); returns NULL only when out of memory. */
knet_client *knet_client_new(const char *addr);

/* Retries failed dials with exponential backoff (thread-safe). */
void knet_client_enable_retry(knet_client *c);

/* Makes a failed dial return its error from knet_client_dial_and_serve (thread-safe). */
void knet_client_disable_retry(knet_client *c);

/* Sets the retry backoff: first wait initial_ms, doubling up to max_ms
 * (defaults 1000 and 60000). initial_ms 0 counts as 1, a max_ms below
 * initial_ms as initial_ms; both are capped at INT_MAX. Read when a dial
 * fails, so a change made during a dial applies to it (so do enable/disable). */
void knet_client_set_retry_backoff(knet_client *c, uint32_t initial_ms, uint32_t max_ms);

/* Dials, serves the connection until it closes, then dials again at once
 * (knet's persistent client; the backoff paces failed dials only; a connection
 * its loop could not take, out of memory or epoll watches, is a failed dial).
 * A dial has no timeout of its own (as in Go's knet): one that gets no answer
 * waits out the kernel's SYN retries (about 2 minutes by default), and
 * knet_client_close or _shutdown ends it at once.
 * Blocks. Returns KNET_ECLIENTCLOSED after
 * knet_client_close, a dial error when retry is off, KNET_EBUSY while another
 * call serves this client, -EDEADLK on a loop thread (in a callback: call it
 * from a thread of your own), -EINVAL for NULL, or -EMFILE, -ENFILE, -ENOMEM,
 * -EAGAIN when the client's wake-up eventfd or the loop threads could not be
 * made (a later call tries again). Callbacks run on a
 * loop thread. handler and codec (NULL = defaults) are copied. */
int knet_client_dial_and_serve(knet_client *c, const knet_handler *handler,
                               const knet_codec *codec);

/* Closes the current connection and stops dialing; interrupts a backoff wait
 * at once (thread-safe, does not block); connect(false) runs on the loop
 * thread. Returns 0, KNET_ECLIENTCLOSED if already closed, or -EINVAL for NULL. */
int knet_client_close(knet_client *c);

/* Graceful stop: no more dialing; the current connection is shut down as
 * with knet_conn_close_with_timeout(conn, timeout_ms) (its callbacks keep
 * running on the loop thread); then knet_client_dial_and_serve returns
 * KNET_ECLIENTCLOSED. Thread-safe, does not block. timeout_ms 0 counts as 1. A
 * later knet_client_close force-closes at once (and returns 0). Returns 0, or
 * KNET_ECLIENTCLOSED if already stopping, or -EINVAL for NULL. */
int knet_client_shutdown(knet_client *c, uint32_t timeout_ms);

/* Closes the client's connections dialed from now on after idle_ms with no bytes
 * either way, as knet_server_set_idle_timeout does (0 = off, the default; thread-safe). */
void knet_client_set_idle_timeout(knet_client *c, uint32_t idle_ms);

/* Sets the queue bound of the client's next connections, as
 * knet_server_set_max_queued_bytes does (default KNET_DEFAULT_MAX_QUEUED; thread-safe). */
void knet_client_set_max_queued_bytes(knet_client *c, size_t max_queued_bytes);

/* Returns the current connection, retained (knet_conn_release it), or NULL. A closing
 * connection stays current until its connect(false) ran (Go's GetConnection returned
 * nil from Close on). */
knet_conn *knet_client_conn(knet_client *c);

/* Frees the client; only after knet_client_dial_and_serve has returned (or was
 * never called). */
void knet_client_free(knet_client *c);

/* ---------------------------------------------------------------- connection */

/* Frames buf with the connection's codec (its write runs on this calling
 * thread) and queues a copy for sending (thread-safe; on the connection's own
 * loop with nothing queued it writes at once, but in receive only the first send
 * of a read pass: later ones go out together at the pass's end). Returns 0,
 * -EINVAL for a NULL conn, a NULL buf with len > 0 or len > PTRDIFF_MAX,
 * KNET_EPENDINGFULL at the pending-send or queued-bytes limit,
 * KNET_ECLOSED after close or shutdown began, the codec's error, or -errno
 * (-EPIPE, -ECONNRESET...) when that direct write failed: the connection then
 * closes with that reason after the current callback. */
int knet_conn_send(knet_conn *conn, const void *buf, size_t len);

/* Limits the messages queued and not yet written (0 = unlimited, the default;
 * thread-safe). On the loop thread a send at this limit or the byte bound first
 * writes what the socket takes (a read pass's batched sends too), so the limits
 * count what the socket did not take. A send on the loop thread and one from
 * another thread racing at the limit may each add one message past it. A message
 * leaves the count when the queue block holding its last byte (4 to 64 KiB) is
 * written, so a written message may count until the rest of its block went out too. */
void knet_conn_set_pending_send(knet_conn *conn, size_t max_messages);

/* Bounds the bytes queued and not yet written (thread-safe): a send that would
 * go beyond returns KNET_EPENDINGFULL (one message is always accepted into an
 * empty queue). 0 = unlimited; the default comes from the server or client. */
void knet_conn_set_max_queued_bytes(knet_conn *conn, size_t max_bytes);

/* Sets TCP_NODELAY (on by default, as in Go; thread-safe). Returns 0,
 * KNET_ECLOSED, -EINVAL for a NULL conn, or -errno. */
int knet_conn_set_nodelay(knet_conn *conn, bool on);

/* Graceful close with the default timeout: knet_conn_close_with_timeout(conn, 3000)
 * (thread-safe). */
void knet_conn_shutdown(knet_conn *conn);

/* Graceful close (thread-safe): refuse new sends, write every queued byte,
 * shutdown(SHUT_WR), keep delivering receive until the peer closes, force-close
 * after ms; receive and connect(false) run on the loop thread. Asked again (or by
 * a server or client shutdown) while under way, it keeps the earlier deadline. */
void knet_conn_close_with_timeout(knet_conn *conn, uint32_t ms);

/* Stops reading conn (thread-safe; libuv's uv_read_stop): knet takes no more from the
 * socket, so once the kernel's buffers fill, TCP flow control holds the peer back. Called
 * in receive, no later message of that read is delivered until knet_conn_resume_read:
 * messages already read are kept, never dropped. While paused the peer's FIN or reset is
 * seen only once reading resumes, the idle timeout still runs, and a graceful close
 * reads on regardless (it ends on the peer's FIN). Returns 0, -EINVAL for a NULL conn,
 * or KNET_ECLOSED. */
int knet_conn_pause_read(knet_conn *conn);

/* Reads conn again after knet_conn_pause_read (thread-safe): the messages it kept back
 * come first, then what the socket holds, in receive on the loop thread. Returns 0,
 * -EINVAL for a NULL conn, or KNET_ECLOSED. */
int knet_conn_resume_read(knet_conn *conn);

/* Runs once on conn's loop thread when everything queued for conn has been written to
 * the socket (see knet_conn_notify_drained). */
typedef void (*knet_drain_fn)(knet_conn *conn, void *ud);

/* Asks for fn(conn, ud) to run once, on the connection's loop thread, when its send
 * queue is empty: at the loop's next turn if it is empty now, else once the socket took
 * the last queued byte (thread-safe). With knet_conn_pause_read this is how a relay slows
 * its source to its reader: pause the source when a send is refused, resume it here.
 * One request at a time: a later call replaces one not yet run, fn = NULL cancels it.
 * Not run once a close or graceful close began, the connection's or its server's
 * (connect(false) follows instead).
 * Returns 0, -EINVAL for a NULL conn, or KNET_ECLOSED. */
int knet_conn_notify_drained(knet_conn *conn, knet_drain_fn fn, void *ud);

/* Closes at once: queued and unread bytes are dropped. connect(false) follows
 * on the loop thread (after the current callback, when called from one). */
void knet_conn_close(knet_conn *conn);

/* Attaches a caller pointer to the connection (thread-safe; knet never
 * dereferences it, but prefetches the 128 bytes at it before each read). */
void knet_conn_set_userdata(knet_conn *conn, void *ud);

/* Returns the pointer given to knet_conn_set_userdata, or NULL (thread-safe). */
void *knet_conn_userdata(const knet_conn *conn);

/* Supplies the memory a read goes into (libuv's alloc_cb): returns at least 1 byte and
 * sets *cap, or NULL for the loop's shared buffer. suggested is that buffer's size.
 * Runs on the connection's loop thread, before each read. */
typedef void *(*knet_alloc_fn)(knet_conn *conn, size_t suggested, size_t *cap, void *ud);

/* Makes every later read of conn go into memory from fn (NULL = the loop's buffer, the
 * default), so a binding can keep what it received without copying it. The memory stays
 * the caller's: knet writes the read into it, passes receive pointers into it and keeps
 * no pointer after those receives (a leftover partial frame is copied). A partial frame
 * over half of suggested is read on in knet's own buffer instead (fn is not called):
 * receive then gets a pointer valid only during the call, as without fn. fn runs on the
 * loop thread before each read. Call on the connection's loop thread (in connect(true)
 * or receive); returns 0, or -EINVAL from any other thread. */
int knet_conn_set_alloc(knet_conn *conn, knet_alloc_fn fn, void *ud);

/* Longest address string knet writes, with its terminating NUL. */
#define KNET_ADDRSTRLEN 64

/* Writes the local address as "ip:port" ("[v6]:port", "[v6%zone]:port" when scoped, as
 * Go writes it) into buf. Returns the string length, -ENOSPC when buf is too small, or
 * KNET_ECLOSED if it was never asked for while the connection was open. */
int knet_conn_local_addr(knet_conn *conn, char *buf, size_t len);

/* Writes the peer address as "ip:port" ("[v6]:port", "[v6%zone]:port" when scoped) into
 * buf. Returns the string length or -ENOSPC. */
int knet_conn_remote_addr(knet_conn *conn, char *buf, size_t len);

/* Why the connection closed: 1 while it is open; 0 after a local close or
 * shutdown; KNET_EOF, KNET_ECODEC, -ECONNRESET, -ETIMEDOUT (graceful close
 * timed out), KNET_ESERVERCLOSED, KNET_ECLIENTCLOSED, ... after others. */
int knet_conn_close_reason(const knet_conn *conn);

/* Takes a reference, so the handle stays valid past connect(false). */
void knet_conn_retain(knet_conn *conn);

/* Drops a reference taken with knet_conn_retain (or given by knet_client_conn). */
void knet_conn_release(knet_conn *conn);

#if defined(__GNUC__)
#pragma GCC visibility pop
#endif

#ifdef __cplusplus
}
#endif

#endif /* KNET_KNET_H */
