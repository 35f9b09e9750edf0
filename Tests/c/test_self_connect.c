/* A dial that connects to itself counts as refused. The kernel can give a
 * dialing socket, as its own source port, the very port it dials (one of this
 * host's ephemeral range with nothing listening): the simultaneous open then
 * succeeds with itself. The test makes that happen on demand: connect is
 * wrapped at link time to bind the socket to its destination first. */
#include "testutil.h"

int __real_connect(int fd, const struct sockaddr *addr, socklen_t len);
int __wrap_connect(int fd, const struct sockaddr *addr, socklen_t len);

static _Atomic int self_dials; /* dials to turn into self-connects */

int __wrap_connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    if (atomic_load(&self_dials) > 0) {
        atomic_fetch_sub(&self_dials, 1);
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        CHECK_EQ(bind(fd, addr, len), 0);
    }
    return __real_connect(fd, addr, len);
}

static void test_self_connect_is_refused(void)
{
    tu_tracker *t = tu_tracker_new();
    int holder;
    int port = tu_reserve_port(&holder);
    close(holder); /* free again: the wrapped connect binds the dial to it */
    knet_client *cli = tu_client_for_port(port); /* retry off */
    knet_handler h = tu_tracker_handler(t);
    atomic_store(&self_dials, 1);
    tu_client tc;
    tu_client_start(&tc, cli, &h, NULL);
    CHECK_EQ(tu_client_join(&tc), -ECONNREFUSED);
    CHECK_EQ(atomic_load(&self_dials), 0);           /* the dial did connect to itself */
    CHECK_EQ(tu_counter_get(&t->connects), 0);       /* and was never served */
    knet_client_free(cli);
    tu_tracker_free(t);
}

int main(void)
{
    tu_begin();
    RUN(test_self_connect_is_refused);
    return tu_end();
}
