// The public header compiles as C++ (extern "C", no C-only constructs) and links. Built
// as C++11, 14, 17 and 20 with -pedantic -Wold-style-cast -Wzero-as-null-pointer-constant
// -Wconversion -Werror (Tests/c/CMakeLists.txt): the header's macros expand in this file,
// so a C-only construct in one (a C cast) fails the build of a strict C++ program.
#include <sys/socket.h>
#include <netinet/in.h>
#include <knet/knet.h>
#include <knet/knet.h> // a second include is harmless

#include <cstdio>
#include <cstring>
#include <type_traits>

static_assert(KNET_ESERVERCLOSED < 0 && KNET_EBUSY < 0, "errors are negative");
// Every value-like macro of the header, used as C++ uses constants.
static_assert(KNET_DEFAULT_MAX_FRAME == 16u * 1024u * 1024u, "max frame");
static_assert(KNET_DEFAULT_MAX_QUEUED == 64u * 1024u * 1024u, "max queued");
static_assert(std::is_same<decltype(KNET_DEFAULT_MAX_FRAME), size_t>::value, "a size_t");
static_assert(std::is_same<decltype(KNET_DEFAULT_MAX_QUEUED), size_t>::value, "a size_t");
static_assert(KNET_ADDRSTRLEN >= INET6_ADDRSTRLEN + 8, "room for [v6]:port");
static_assert(KNET_VERSION_MAJOR * 10000 + KNET_VERSION_MINOR * 100 + KNET_VERSION_PATCH >= 100,
              "version 0.1.0 or later");
static_assert(KNET_EOF != KNET_ECLOSED && KNET_EADDR != KNET_ECODEC && KNET_ERESOLVE != KNET_EPENDINGFULL &&
                  KNET_ECLIENTCLOSED != KNET_ESERVERCLOSED,
              "distinct codes");
static_assert(KNET_LOG_DEBUG < KNET_LOG_INFO && KNET_LOG_WARN < KNET_LOG_ERROR, "levels ordered");
static_assert(std::is_same<decltype(&knet_conn_send), int (*)(knet_conn *, const void *, size_t)>::value,
              "C linkage signature");

static int passed = 0;

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            std::fprintf(stderr, "%s:%d: FAILED: %s\n", __FILE__, __LINE__, #cond);                \
            return 1;                                                                              \
        }                                                                                          \
        passed++;                                                                                  \
    } while (0)

int main()
{
    CHECK(std::strlen(knet_strerror(KNET_ECLOSED)) > 0);
    size_t frame = KNET_DEFAULT_MAX_FRAME, queued = KNET_DEFAULT_MAX_QUEUED;
    CHECK(frame < queued);
    char addr[KNET_ADDRSTRLEN] = {};
    CHECK(sizeof addr == KNET_ADDRSTRLEN && addr[0] == 0);
    knet_length_field lf = {4, false, 1024};
    knet_codec codec{};
    CHECK(knet_length_codec(&codec, &lf) == 0);
    CHECK(codec.read != nullptr);
    knet_handler h = knet_default_handler;
    CHECK(h.connect == nullptr);
    knet_server *s = knet_server_new("127.0.0.1:0");
    CHECK(s != nullptr);
    CHECK(knet_server_port(s) == 0);
    CHECK(knet_server_close(s) == 0);
    CHECK(knet_server_listen_and_serve(s, &h, &codec) == KNET_ESERVERCLOSED);
    knet_server_free(s);
    std::printf("%d passed, 0 failed\n", passed);
    return 0;
}
