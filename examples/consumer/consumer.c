/* Echo round trip through an installed knet: a server with StdCodec echoes,
 * a client sends one message and checks it comes back intact. */
#define _POSIX_C_SOURCE 200809L
#include <knet/knet.h>

#include <pthread.h>
#include <stdio.h>
#include <string.h>

static const char greeting[] = "hello from an installed knet";
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int echoed; /* 1 = intact, -1 = mismatch */

static void echo(knet_conn *c, const void *buf, size_t len, void *ud) {
    (void)ud;
    knet_conn_send(c, buf, len);
}

static void greet(knet_conn *c, bool connected, void *ud) {
    (void)ud;
    if (connected) knet_conn_send(c, greeting, sizeof greeting);
}

static void check(knet_conn *c, const void *buf, size_t len, void *ud) {
    (void)c;
    (void)ud;
    pthread_mutex_lock(&mu);
    echoed = len == sizeof greeting && memcmp(buf, greeting, len) == 0 ? 1 : -1;
    pthread_cond_signal(&cv);
    pthread_mutex_unlock(&mu);
}

static void *serve(void *arg) {
    knet_handler h = {NULL, echo, NULL};
    return (void *)(intptr_t)knet_server_listen_and_serve(arg, &h, &knet_std_codec);
}

static void *dial(void *arg) {
    knet_handler h = {greet, check, NULL};
    return (void *)(intptr_t)knet_client_dial_and_serve(arg, &h, &knet_std_codec);
}

int main(void) {
    knet_server *s = knet_server_new("127.0.0.1:0");
    pthread_t st, ct;
    pthread_create(&st, NULL, serve, s);
    int port = knet_server_wait_listening(s, 10000);
    if (port <= 0) {
        fprintf(stderr, "listen: %s\n", knet_strerror(port));
        return 1;
    }
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
    knet_client *c = knet_client_new(addr);
    pthread_create(&ct, NULL, dial, c);
    pthread_mutex_lock(&mu);
    while (!echoed) pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
    knet_client_close(c);
    knet_server_close(s);
    void *crc, *src;
    pthread_join(ct, &crc);
    pthread_join(st, &src);
    knet_client_free(c);
    knet_server_free(s);
    bool ok = echoed == 1 && (intptr_t)crc == KNET_ECLIENTCLOSED && (intptr_t)src == KNET_ESERVERCLOSED;
    printf("consumer echo round trip: %s\n", ok ? "ok" : "FAILED");
    return ok ? 0 : 1;
}
