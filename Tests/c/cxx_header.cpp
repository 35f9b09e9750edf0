// The public header compiles as C++ (extern "C", no C-only constructs) and links.
#include <knet/knet.h>

#include <cstdio>
#include <cstring>
#include <type_traits>

static_assert(KNET_ESERVERCLOSED < 0 && KNET_EBUSY < 0, "errors are negative");
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
