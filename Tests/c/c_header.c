/* The public header as a C program sees it: self-contained, included twice and beside the
 * socket headers, every macro used. Built as C99, C11, C17 and C23 with -pedantic -Wall
 * -Wextra -Wshadow -Wstrict-prototypes -Wconversion -Wsign-conversion -Werror
 * (Tests/c/CMakeLists.txt); knet.h promises nothing newer than C99 to its users. */
#include <knet/knet.h>
#include <knet/knet.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

static int passed = 0;

#define CHECK(cond)                                                                    \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            fprintf(stderr, "%s:%d: FAILED: %s\n", __FILE__, __LINE__, #cond);         \
            return 1;                                                                  \
        }                                                                              \
        passed++;                                                                      \
    } while (0)

static void on_log(int level, const char *msg, void *ud) {
    (void)level, (void)msg, (void)ud;
}

int main(void) {
    size_t frame = KNET_DEFAULT_MAX_FRAME, queued = KNET_DEFAULT_MAX_QUEUED;
    char addr[KNET_ADDRSTRLEN] = {0};
    int codes[] = {KNET_ESERVERCLOSED, KNET_ECLIENTCLOSED, KNET_EPENDINGFULL, KNET_ECLOSED,
                   KNET_EADDR,         KNET_ECODEC,        KNET_ERESOLVE,     KNET_EOF,
                   KNET_EBUSY};
    unsigned i;
    int level = KNET_LOG_WARN;
    knet_length_field lf = {4, false, KNET_DEFAULT_MAX_FRAME};
    knet_codec codec = knet_std_codec;
    knet_handler h = knet_default_handler;
    knet_server *s;

    CHECK(frame == (size_t)16 << 20 && queued == (size_t)64 << 20);
    CHECK(sizeof addr >= INET6_ADDRSTRLEN + 8 && addr[0] == 0);
    CHECK(KNET_VERSION_MAJOR * 10000 + KNET_VERSION_MINOR * 100 + KNET_VERSION_PATCH >= 100);
    for (i = 0; i < sizeof codes / sizeof codes[0]; i++)
        CHECK(codes[i] < 0 && strlen(knet_strerror(codes[i])) > 0);
    knet_set_log(on_log, level, NULL);
    knet_set_log(NULL, KNET_LOG_ERROR, NULL);
    CHECK(codec.read != NULL && knet_default_codec.read == NULL && h.receive == NULL);
    CHECK(knet_length_codec(&codec, &lf) == 0);
    s = knet_server_new("127.0.0.1:0");
    CHECK(s != NULL);
    CHECK(knet_server_close(s) == 0);
    CHECK(knet_server_listen_and_serve(s, &h, &codec) == KNET_ESERVERCLOSED);
    knet_server_free(s);
    printf("%d passed, 0 failed\n", passed);
    return 0;
}
