// The echo round trip of consumer.c from C++ (check-install.sh builds it as C++11 and
// C++17 with -Wall -Wextra -Werror -pedantic): the header is valid C++ and links.
#include <knet/knet.h>

#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <string>
#include <thread>

namespace {
const std::string greeting = "hello from C++";
std::mutex mu;
std::condition_variable cv;
std::string echoed;

void echo(knet_conn *c, const void *buf, size_t len, void *) { knet_conn_send(c, buf, len); }

void greet(knet_conn *c, bool connected, void *) {
    if (connected) knet_conn_send(c, greeting.data(), greeting.size());
}

void check(knet_conn *, const void *buf, size_t len, void *) {
    std::lock_guard<std::mutex> g(mu);
    echoed.assign(static_cast<const char *>(buf), len);
    cv.notify_all();
}
} // namespace

int main() {
    knet_server *s = knet_server_new("127.0.0.1:0");
    int src = 0, crc = 0;
    std::thread st([&] {
        knet_handler h = {nullptr, echo, nullptr};
        src = knet_server_listen_and_serve(s, &h, &knet_std_codec);
    });
    int port = knet_server_wait_listening(s, 10000);
    if (port <= 0) {
        std::fprintf(stderr, "listen: %s\n", knet_strerror(port));
        return 1;
    }
    knet_client *c = knet_client_new(("127.0.0.1:" + std::to_string(port)).c_str());
    std::thread ct([&] {
        knet_handler h = {greet, check, nullptr};
        crc = knet_client_dial_and_serve(c, &h, &knet_std_codec);
    });
    {
        std::unique_lock<std::mutex> l(mu);
        cv.wait(l, [] { return !echoed.empty(); });
    }
    knet_client_close(c);
    knet_server_close(s);
    ct.join();
    st.join();
    knet_client_free(c);
    knet_server_free(s);
    bool ok = echoed == greeting && crc == KNET_ECLIENTCLOSED && src == KNET_ESERVERCLOSED;
    std::printf("C++ consumer echo round trip: %s\n", ok ? "ok" : "FAILED");
    return ok ? 0 : 1;
}
