/* A knet echo server: every message a client sends comes back, framed with
 * knet's StdCodec (2-byte big-endian length) or raw with --raw.
 *   echo_server [--raw] [ADDR]     (default ADDR 127.0.0.1:8000)
 * Stops on SIGINT/SIGTERM: the signal thread calls knet_server_close. */
#define _POSIX_C_SOURCE 200809L
#include <knet/knet.h>

#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

static void on_connect(knet_conn *conn, bool connected, void *ud) {
    (void)ud;
    char addr[KNET_ADDRSTRLEN];
    if (knet_conn_remote_addr(conn, addr, sizeof addr) < 0) strcpy(addr, "?");
    printf("%s %s\n", connected ? "connected" : "disconnected", addr);
    fflush(stdout);
}

static void on_receive(knet_conn *conn, const void *buf, size_t len, void *ud) {
    (void)ud;
    int rc = knet_conn_send(conn, buf, len); /* on the loop thread: written at once */
    if (rc < 0) fprintf(stderr, "send: %s\n", knet_strerror(rc));
}

struct stop {
    sigset_t set;
    knet_server *server;
};

static void *wait_signal(void *arg) {
    struct stop *stop = arg;
    int sig;
    sigwait(&stop->set, &sig);
    knet_server_close(stop->server); /* listen_and_serve returns KNET_ESERVERCLOSED */
    return NULL;
}

int main(int argc, char **argv) {
    bool raw = false;
    const char *addr = "127.0.0.1:8000";
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--raw") == 0) raw = true;
        else addr = argv[i];
    }
    /* Block the stop signals everywhere; one thread waits for them. */
    struct stop stop;
    sigemptyset(&stop.set);
    sigaddset(&stop.set, SIGINT);
    sigaddset(&stop.set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &stop.set, NULL);

    stop.server = knet_server_new(addr);
    if (!stop.server) return 1;
    pthread_t waiter;
    pthread_create(&waiter, NULL, wait_signal, &stop);
    pthread_detach(waiter);

    knet_handler handler = {on_connect, on_receive, NULL};
    printf("echo server on %s (%s)\n", addr, raw ? "raw" : "std codec");
    fflush(stdout);
    int rc = knet_server_listen_and_serve(stop.server, &handler, raw ? &knet_default_codec : &knet_std_codec);
    knet_server_free(stop.server);
    if (rc != KNET_ESERVERCLOSED) {
        fprintf(stderr, "listen_and_serve %s: %s\n", addr, knet_strerror(rc));
        return 1;
    }
    return 0;
}
