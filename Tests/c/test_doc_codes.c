/*
 * test_doc_codes.c — the return codes knet.h documents for each stop call, in
 * every order: close/shutdown twice, one after the other, before serving.
 */
#include "testutil.h"

/* knet_server_close / knet_server_shutdown in every order on a serving server. */
static void test_server_stop_codes(void)
{
    tu_server ts;
    CHECK_GT(tu_server_start(&ts, "127.0.0.1:0", NULL, NULL), 0);
    CHECK_EQ(knet_server_shutdown(ts.srv, 1000), 0);
    CHECK_EQ(knet_server_shutdown(ts.srv, 1000), KNET_ESERVERCLOSED); /* already stopping */
    /* "a later knet_server_close force-closes at once", and returns 0 */
    CHECK_EQ(knet_server_close(ts.srv), 0);
    CHECK_EQ(knet_server_close(ts.srv), KNET_ESERVERCLOSED);
    CHECK_EQ(tu_server_join(&ts), KNET_ESERVERCLOSED);

    CHECK_GT(tu_server_start(&ts, "127.0.0.1:0", NULL, NULL), 0);
    CHECK_EQ(knet_server_close(ts.srv), 0);
    CHECK_EQ(knet_server_close(ts.srv), KNET_ESERVERCLOSED);
    CHECK_EQ(knet_server_shutdown(ts.srv, 1000), KNET_ESERVERCLOSED);
    CHECK_EQ(tu_server_join(&ts), KNET_ESERVERCLOSED);
    CHECK_EQ(knet_server_close(NULL), -EINVAL);
    CHECK_EQ(knet_server_shutdown(NULL, 1), -EINVAL);
}

/* A server closed before it listens: wait_listening says KNET_ESERVERCLOSED, and so does
 * listen_and_serve, at once. */
static void test_server_closed_before_listening(void)
{
    knet_server *s = knet_server_new("127.0.0.1:0");
    CHECK(s != NULL);
    CHECK_EQ(knet_server_port(s), 0);
    CHECK_EQ(knet_server_wait_listening(s, 1), -ETIMEDOUT);
    CHECK_EQ(knet_server_close(s), 0);
    CHECK_EQ(knet_server_wait_listening(s, 1000), KNET_ESERVERCLOSED);
    CHECK_EQ(knet_server_listen_and_serve(s, NULL, NULL), KNET_ESERVERCLOSED);
    CHECK_EQ(knet_server_port(s), 0);
    knet_server_free(s);
}

/* knet_client_close / knet_client_shutdown in every order on a serving client. */
static void test_client_stop_codes(void)
{
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", NULL, NULL);
    CHECK_GT(port, 0);
    for (int order = 0; order < 2; order++) {
        tu_tracker *t = tu_tracker_new();
        knet_handler h = tu_tracker_handler(t);
        tu_client tc;
        knet_client *c = tu_client_for_port(port);
        tu_client_start(&tc, c, &h, NULL);
        WAIT_GE(&t->connects, 1);
        if (order == 0) {
            CHECK_EQ(knet_client_shutdown(c, 10000), 0);
            CHECK_EQ(knet_client_shutdown(c, 10000), KNET_ECLIENTCLOSED);
            CHECK_EQ(knet_client_close(c), 0); /* documented: force-closes, returns 0 */
            CHECK_EQ(knet_client_close(c), KNET_ECLIENTCLOSED);
        } else {
            CHECK_EQ(knet_client_close(c), 0);
            CHECK_EQ(knet_client_close(c), KNET_ECLIENTCLOSED);
            CHECK_EQ(knet_client_shutdown(c, 10000), KNET_ECLIENTCLOSED);
        }
        CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
        WAIT_GE(&t->disconnects, 1);
        CHECK_EQ(knet_client_dial_and_serve(c, NULL, NULL), KNET_ECLIENTCLOSED);
        knet_client_free(c);
        tu_tracker_free(t);
    }
    CHECK_EQ(knet_client_close(NULL), -EINVAL);
    CHECK_EQ(knet_client_shutdown(NULL, 1), -EINVAL);
    CHECK_EQ(knet_client_dial_and_serve(NULL, NULL, NULL), -EINVAL);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
}

/* Connection calls after the close: the documented codes. */
static void test_conn_codes_after_close(void)
{
    tu_tracker *t = tu_tracker_new();
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, &knet_std_codec);
    int fd = tu_connect(port);
    tu_rec *r = tu_tracker_rec(t, 0);
    knet_conn *c = r->conn;
    char big[65536];
    memset(big, 1, sizeof big);
    CHECK_EQ(knet_conn_send(c, big, 65536), KNET_ECODEC);
    CHECK_EQ(knet_conn_send(c, big, 65535), 0);
    CHECK_EQ(knet_conn_send(c, NULL, 1), -EINVAL);
    CHECK_EQ(knet_conn_send(NULL, big, 1), -EINVAL);
    CHECK_EQ(knet_conn_close_reason(c), 1);
    char addr[KNET_ADDRSTRLEN];
    CHECK_EQ(knet_conn_remote_addr(c, addr, 4), -ENOSPC);
    CHECK_EQ(knet_conn_set_alloc(c, NULL, NULL), -EINVAL); /* not on its loop thread */
    knet_conn_close(c);
    WAIT_GE(&t->disconnects, 1);
    CHECK_EQ(knet_conn_close_reason(c), 0);
    CHECK_EQ(knet_conn_send(c, big, 1), KNET_ECLOSED);
    CHECK_EQ(knet_conn_set_nodelay(c, true), KNET_ECLOSED);
    CHECK_EQ(knet_conn_local_addr(c, addr, sizeof addr), KNET_ECLOSED); /* never asked */
    CHECK_GT(knet_conn_remote_addr(c, addr, sizeof addr), 0);
    close(fd);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

int main(void)
{
    tu_begin();
    RUN(test_server_stop_codes);
    RUN(test_server_closed_before_listening);
    RUN(test_client_stop_codes);
    RUN(test_conn_codes_after_close);
    printf("%d passed, 0 failed\n", tu_passed_count);
    return 0;
}
