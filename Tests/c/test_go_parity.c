/* Behaviours a user of Go's knet relies on, checked against the C core: where knet
 * does the same, and where it deliberately differs (README, "Choices where knet's
 * contract is silent"). Peers are plain sockets so the wire bytes are exact. */
#include "testutil.h"

/* ------------------------------------------------------------------ empty messages */

/* Go's Send drops an empty message (`if len(b) == 0 { return nil }`): nothing reaches
 * the wire, whatever the codec. knet: the raw codec sends nothing either; StdCodec sends
 * an empty frame (2 zero bytes), which the peer receives as an empty message. */
static void empty_send_on_connect(tu_rec *r, bool connected)
{
    if (!connected)
        return;
    atomic_store(&r->flag, knet_conn_send(r->conn, "", 0) + 100000);
    CHECK_EQ(knet_conn_send(r->conn, "x", 1), 0); /* a marker after it */
}

static void empty_send(const knet_codec *codec, const uint8_t *want, size_t want_len)
{
    tu_tracker *st = tu_tracker_new();
    st->on_connect = empty_send_on_connect;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, st, codec);
    int fd = tu_connect(port);
    tu_rec *r = tu_tracker_rec(st, 0);
    WAIT_UNTIL(atomic_load(&r->flag) != 0);
    CHECK_EQ(atomic_load(&r->flag) - 100000, 0); /* accepted */
    uint8_t got[8];
    READ_EXACT(fd, got, want_len);
    CHECK(memcmp(got, want, want_len) == 0);
    close(fd);
    WAIT_GE(&st->disconnects, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(st);
}

static void test_empty_send(void)
{
    static const uint8_t raw_wire[] = {'x'};
    empty_send(NULL, raw_wire, sizeof raw_wire); /* as Go: nothing for the empty one */
    static const uint8_t std_wire[] = {0, 0, 0, 1, 'x'};
    empty_send(&knet_std_codec, std_wire, sizeof std_wire); /* Go would send only 0 1 'x' */
}

/* Go's StdCodec.Read (io.ReadFull of a 0-byte body) returns an empty message, and
 * Receive runs with it. knet: receive runs with len 0 too. */
static void test_empty_frame_is_received(void)
{
    tu_tracker *st = tu_tracker_new();
    st->capture = true;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, st, &knet_std_codec);
    int fd = tu_connect(port);
    static const uint8_t wire[] = {0, 0, 0, 2, 'h', 'i'};
    tu_write_all(fd, wire, sizeof wire);
    WAIT_GE(&st->msgs, 2);
    tu_rec *r = tu_tracker_rec(st, 0);
    size_t off = 0, len;
    const uint8_t *m;
    CHECK(tu_rec_next_msg(r, &off, &m, &len));
    CHECK_EQ(len, 0);
    CHECK(tu_rec_next_msg(r, &off, &m, &len));
    CHECK_EQ(len, 2);
    CHECK(memcmp(m, "hi", 2) == 0);
    close(fd);
    WAIT_GE(&st->disconnects, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(st);
}

/* ------------------------------------------------------------------ raw codec read size */

/* Go's DefaultCodec returns what its 4096-byte bufio.Reader holds: a Receive never has
 * more than 4096 bytes (hence "4096 average message size" in knet's ping-pong output).
 * knet's raw codec gives one read (up to the loop's 64 KiB buffer): 16 KiB already
 * buffered arrive as one message. The server's connect(true) holds the loop until the
 * peer wrote everything, so the first read finds all of it. */
static tu_counter written;

static void hold_until_written(tu_rec *r, bool connected)
{
    (void)r;
    if (connected)
        WAIT_GE(&written, 1);
}

static void test_raw_message_larger_than_go_bufio(void)
{
    tu_counter_init(&written);
    tu_tracker *st = tu_tracker_new();
    st->on_connect = hold_until_written;
    st->capture = true;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, st, NULL);
    int fd = tu_connect(port);
    static uint8_t block[16384];
    tu_pattern_fill(block, sizeof block, 0, 7);
    tu_write_all(fd, block, sizeof block);
    tu_counter_add(&written, 1);
    WAIT_GE(&st->bytes, (long)sizeof block);
    tu_rec *r = tu_tracker_rec(st, 0);
    size_t off = 0, len;
    const uint8_t *m;
    CHECK(tu_rec_next_msg(r, &off, &m, &len));
    CHECK_EQ(len, sizeof block); /* Go: 4096 */
    CHECK_EQ(atomic_load(&r->rx_msgs), 1);
    close(fd);
    WAIT_GE(&st->disconnects, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(st);
    tu_counter_destroy(&written);
}

/* ------------------------------------------------------------------ addresses */

/* Go's net.Addr.String() of an IPv4 peer on a dual-stack ":port" listener is
 * "127.0.0.1:port", not "[::ffff:127.0.0.1]:port". knet: the same. */
static void test_dual_stack_addresses_look_like_go(void)
{
    tu_tracker *st = tu_tracker_new();
    knet_handler sh = tu_tracker_handler(st);
    tu_server ts;
    int port = tu_server_start(&ts, ":0", &sh, NULL);
    CHECK_GT(port, 0);
    int fd = tu_connect(port);
    tu_rec *r = tu_tracker_rec(st, 0);
    char got[KNET_ADDRSTRLEN], want[KNET_ADDRSTRLEN];
    snprintf(want, sizeof want, "127.0.0.1:%d", tu_sock_port(fd));
    CHECK_GT(knet_conn_remote_addr(r->conn, got, sizeof got), 0);
    CHECK(strcmp(got, want) == 0);
    snprintf(want, sizeof want, "127.0.0.1:%d", port);
    CHECK_GT(knet_conn_local_addr(r->conn, got, sizeof got), 0);
    CHECK(strcmp(got, want) == 0);
    close(fd);
    WAIT_GE(&st->disconnects, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(st);
}

/* ------------------------------------------------------------------ send in connect(true) */

/* Go starts the writer before Connect(true), so a Send there goes out; and an empty
 * pending-send limit (0) is unlimited. knet: the same. */
static void greet(tu_rec *r, bool connected)
{
    if (connected)
        CHECK_EQ(knet_conn_send(r->conn, "hello", 5), 0);
}

static void test_send_in_connect(void)
{
    tu_tracker *st = tu_tracker_new();
    st->on_connect = greet;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, st, NULL);
    int fd = tu_connect(port);
    char got[5];
    READ_EXACT(fd, got, 5);
    CHECK(memcmp(got, "hello", 5) == 0);
    close(fd);
    WAIT_GE(&st->disconnects, 1);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(st);
}

/* ------------------------------------------------------------------ server close before serve */

/* Go: ListenAndServe after Close returns ErrServerClosed at once; DialAndServe after
 * Close returns ErrClientClosed at once. knet: the same codes. */
static void test_serve_after_close(void)
{
    knet_server *s = knet_server_new("127.0.0.1:0");
    CHECK_EQ(knet_server_close(s), 0);
    CHECK_EQ(knet_server_listen_and_serve(s, NULL, NULL), KNET_ESERVERCLOSED);
    knet_server_free(s);
    knet_client *c = knet_client_new("127.0.0.1:1");
    CHECK_EQ(knet_client_close(c), 0);
    CHECK_EQ(knet_client_dial_and_serve(c, NULL, NULL), KNET_ECLIENTCLOSED);
    knet_client_free(c);
}

/* ------------------------------------------------------------------ client connection after close */

/* Go's TCPClient.Close sets its connection to nil at once: GetConnection returns nil
 * from then on. knet_client_conn returns the connection until its connect(false) ran:
 * inside connect(true), after knet_client_close, it is still there (sends on it fail
 * with KNET_ECLOSED). */
static knet_client *conn_after_close_client;

static void close_client_then_ask(tu_rec *r, bool connected)
{
    if (!connected)
        return;
    CHECK_EQ(knet_client_close(conn_after_close_client), 0);
    knet_conn *still = knet_client_conn(conn_after_close_client);
    atomic_store(&r->flag, still == r->conn ? 1 : still == NULL ? 2 : 3);
    if (still) {
        CHECK_EQ(knet_conn_send(still, "x", 1), KNET_ECLOSED);
        knet_conn_release(still);
    }
}

static void test_client_conn_after_close(void)
{
    tu_server ts;
    tu_tracker *st = tu_tracker_new();
    int port = tu_tracked_server_start(&ts, st, NULL);
    tu_tracker *ct = tu_tracker_new();
    ct->on_connect = close_client_then_ask;
    knet_handler ch = tu_tracker_handler(ct);
    knet_client *c = tu_client_for_port(port);
    conn_after_close_client = c;
    tu_client tc;
    tu_client_start(&tc, c, &ch, NULL);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    CHECK_EQ(atomic_load(&ct->recs[0].flag), 1); /* Go: nil (2) */
    CHECK(knet_client_conn(c) == NULL);        /* after connect(false): as Go */
    knet_client_free(c);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(ct);
    tu_tracker_free(st);
}

int main(void)
{
    int passed = 0;
    test_empty_send(), passed++;
    test_empty_frame_is_received(), passed++;
    test_raw_message_larger_than_go_bufio(), passed++;
    test_dual_stack_addresses_look_like_go(), passed++;
    test_send_in_connect(), passed++;
    test_serve_after_close(), passed++;
    test_client_conn_after_close(), passed++;
    printf("%d passed, 0 failed\n", passed);
    return 0;
}
