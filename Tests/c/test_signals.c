/*
 * Signals and processes: faults in callbacks reach the program's handlers; a storm
 * of handled signals (no SA_RESTART) on every thread loses no byte and moves no
 * deadline; SIGPIPE at its default disposition never fires; the caller's mask and
 * dispositions are left alone; an exec'd child inherits none of knet's descriptors.
 * Some checks run in a child: this program exec'd with a mode argument.
 */
#include "testutil.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>

static char g_self[4096]; /* this program, for the exec'd children */
static bool g_inherited[1024]; /* descriptors this program was started with (not knet's) */

/* Notes the descriptors open before knet ran: a child inherits them too. */
static void note_inherited_fds(void)
{
    for (int fd = 3; fd < 1024; fd++)
        g_inherited[fd] = fcntl(fd, F_GETFD) >= 0;
}

/* Runs this program with mode as its argument; *out_fd (if not NULL) gets a pipe
 * from its stdout. Returns the pid. */
static pid_t spawn_self(const char *mode, int *out_fd)
{
    int p[2] = {-1, -1};
    if (out_fd)
        CHECK_EQ(pipe2(p, O_CLOEXEC), 0);
    pid_t pid = fork();
    CHECK_GE(pid, 0);
    if (pid == 0) {
        /* Only async-signal-safe calls until exec. dup2 clears O_CLOEXEC. */
        if (out_fd && dup2(p[1], 1) < 0)
            _exit(126);
        char *argv[] = {g_self, (char *)mode, NULL};
        execv(g_self, argv);
        _exit(127);
    }
    if (out_fd) {
        close(p[1]);
        *out_fd = p[0];
    }
    return pid;
}

/* Waits (bounded) for pid to end; returns its wait status. */
static int wait_child(pid_t pid)
{
    int status = 0;
    pid_t r;
    int64_t end = tu_now_ms() + TU_DEADLINE_MS;
    while ((r = waitpid(pid, &status, WNOHANG)) == 0) {
        if (tu_now_ms() > end) {
            kill(pid, SIGKILL);
            tu_fail(__FILE__, __LINE__, "child did not end");
        }
        tu_sleep_ms(2);
    }
    CHECK_EQ(r, pid);
    return status;
}

/* ------------------------------------------------------------------ faults in callbacks */

#define FAULT_CAUGHT 42

static void fault_handler(int sig)
{
    (void)sig;
    static const char m[] = "fault handler ran\n";
    ssize_t n = write(2, m, sizeof m - 1);
    (void)n;
    _exit(FAULT_CAUGHT);
}

static atomic_int fault_kind; /* 0: SIGSEGV (a write to a PROT_NONE page), 1: SIGILL (a trap) */
static void *fault_page;

static void fault_receive(knet_conn *c, const void *buf, size_t len, void *ud)
{
    (void)c, (void)buf, (void)len, (void)ud;
    if (atomic_load(&fault_kind) == 0)
        *(volatile char *)fault_page = 1;
    else
        __builtin_trap(); /* ud2: what a Swift precondition failure runs */
}

/* Child: a receive callback faults; the program's handler for it must run. */
static int child_fault(int kind)
{
    atomic_store(&fault_kind, kind);
    fault_page = mmap(NULL, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(fault_page != MAP_FAILED);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = fault_handler;
    sigemptyset(&sa.sa_mask);
    CHECK_EQ(sigaction(SIGSEGV, &sa, NULL), 0);
    CHECK_EQ(sigaction(SIGILL, &sa, NULL), 0);
    knet_handler h = {NULL, fault_receive, NULL};
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, NULL);
    CHECK_GT(port, 0);
    int fd = tu_connect(port);
    tu_write_str(fd, "x");
    char b;
    tu_read_some(fd, &b, 1); /* the fault ends the process */
    fprintf(stderr, "child: the fault did not end the process\n");
    return 3;
}

/* A fault inside a callback (a crash bug in a handler) runs the program's handler
 * for it, as on any other thread: crash reporters, ASan's SEGV report and Swift's
 * backtracer rely on it. Loop threads block only asynchronous signals. */
static void fault_in_callback(const char *mode, int sig)
{
    int status = wait_child(spawn_self(mode, NULL));
    if (WIFSIGNALED(status))
        fprintf(stderr, "child killed by signal %d (%s): the handler never ran\n",
                WTERMSIG(status), strsignal(WTERMSIG(status)));
    CHECK(!WIFSIGNALED(status) || WTERMSIG(status) != sig);
    CHECK(WIFEXITED(status));
    CHECK_EQ(WEXITSTATUS(status), FAULT_CAUGHT);
}

static void test_segv_in_callback_reaches_handler(void)
{
    fault_in_callback("fault-segv", SIGSEGV);
}

static void test_trap_in_callback_reaches_handler(void)
{
    fault_in_callback("fault-ill", SIGILL);
}

/* ------------------------------------------------------------------ exec'd child's fds */

/* Child: prints every descriptor above 2 it was given (what it points at). */
static int child_list_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    if (!d)
        return 2;
    int self = dirfd(d);
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        int fd = atoi(e->d_name);
        if (fd <= 2 || fd == self)
            continue;
        char path[300], target[256];
        snprintf(path, sizeof path, "/proc/self/fd/%s", e->d_name);
        ssize_t n = readlink(path, target, sizeof target - 1);
        target[n > 0 ? n : 0] = '\0';
        printf("%d %s\n", fd, target);
    }
    closedir(d);
    return 0;
}

/* Every descriptor knet makes is close-on-exec: epolls, eventfds (loops' and a
 * client's), the listener, accepted and dialed sockets. A child exec'd while all
 * of them are open gets none. */
static void test_exec_child_inherits_no_knet_fds(void)
{
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int peer = tu_connect(port);
    tu_write_str(peer, "a");
    char b;
    READ_EXACT(peer, &b, 1);
    tu_tracker *ct = tu_tracker_new();
    knet_handler ch = tu_tracker_handler(ct);
    tu_client tc;
    knet_client *cli = tu_client_for_port(port);
    tu_client_start(&tc, cli, &ch, NULL);
    WAIT_GE(&ct->connects, 1);
    WAIT_GE(&t->connects, 2);
    CHECK_GE(tu_fds_like("eventpoll", false), 1);
    CHECK_GE(tu_fds_like("eventfd", false), 2); /* a loop's and the client's */
    CHECK_GE(tu_fds_like("socket:", false), 4); /* listener, 2 accepted, 1 dialed (+ peer) */

    int out;
    pid_t pid = spawn_self("list-fds", &out);
    char listing[4096];
    size_t got = 0;
    for (;;) {
        ssize_t r = read(out, listing + got, sizeof listing - 1 - got);
        if (r < 0 && errno == EINTR)
            continue;
        CHECK_GE(r, 0);
        if (r == 0)
            break;
        got += (size_t)r;
        CHECK_LT(got, sizeof listing - 1);
    }
    listing[got] = '\0';
    close(out);
    int status = wait_child(pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    /* What this program was started with (the test runner's) is not knet's. */
    int knet_fds = 0;
    for (char *line = strtok(listing, "\n"); line; line = strtok(NULL, "\n")) {
        int fd = atoi(line);
        if (fd >= 0 && fd < 1024 && g_inherited[fd])
            continue;
        fprintf(stderr, "the exec'd child inherited fd %s\n", line);
        knet_fds++;
    }
    CHECK_EQ(knet_fds, 0);

    CHECK_EQ(knet_client_close(cli), 0);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    knet_client_free(cli);
    close(peer);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
    tu_tracker_free(ct);
}

/* ------------------------------------------------------------------ EINTR storm */

static atomic_long storm_hits;
static atomic_bool storm_on;

static void storm_handler(int sig)
{
    (void)sig;
    atomic_fetch_add_explicit(&storm_hits, 1, memory_order_relaxed);
}

/* Sends SIGUSR1 to every thread of the process, over and over, until storm_on clears. */
static void *storm_main(void *arg)
{
    (void)arg;
    pid_t pid = getpid(), me = (pid_t)syscall(SYS_gettid);
    while (atomic_load(&storm_on)) {
        DIR *d = opendir("/proc/self/task");
        CHECK(d != NULL);
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            if (e->d_name[0] == '.')
                continue;
            pid_t tid = (pid_t)atoi(e->d_name);
            if (tid != me)
                syscall(SYS_tgkill, pid, tid, SIGUSR1);
        }
        closedir(d);
        struct timespec ts = {0, 200000}; /* 0.2 ms */
        nanosleep(&ts, NULL);
    }
    return NULL;
}

static pthread_t storm_start(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = storm_handler;
    sa.sa_flags = 0; /* no SA_RESTART: every blocking call sees EINTR */
    sigemptyset(&sa.sa_mask);
    CHECK_EQ(sigaction(SIGUSR1, &sa, NULL), 0);
    atomic_store(&storm_on, true);
    pthread_t th;
    CHECK_EQ(pthread_create(&th, NULL, storm_main, NULL), 0);
    return th;
}

static void storm_stop(pthread_t th)
{
    atomic_store(&storm_on, false);
    CHECK_EQ(pthread_join(th, NULL), 0);
}

/* tu_connect_ex for a thread that takes the storm: a connect interrupted by a
 * handled signal goes on in the background (connect(2)), so wait for it. */
static int storm_connect(int port, int rcvbuf)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK_GE(fd, 0);
    if (rcvbuf > 0)
        CHECK_EQ(setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf), 0);
    tu_set_timeouts(fd);
    struct sockaddr_in a = tu_loopback(port);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        CHECK_EQ(errno, EINTR);
        struct pollfd p = {fd, POLLOUT, 0};
        int n;
        while ((n = poll(&p, 1, TU_DEADLINE_MS)) < 0 && errno == EINTR) {
        }
        CHECK_EQ(n, 1);
        int err = 0;
        socklen_t sl = sizeof err;
        CHECK_EQ(getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &sl), 0);
        CHECK_EQ(err, 0);
    }
    return fd;
}

/* A client thread's connect(false) time and reason. */
static atomic_llong idle_opened_at, idle_closed_at;

static void idle_connect(tu_rec *r, bool connected)
{
    (void)r;
    atomic_store(connected ? &idle_opened_at : &idle_closed_at, tu_now_ms());
}

/* Under a storm of handled signals on every thread: an echo of 4 MiB through a knet
 * server and a knet client arrives whole and in order; the serving and dialing calls
 * neither fail nor return early; an idle timeout and a shutdown deadline fire on
 * time (not restarted by each signal). */
static void test_eintr_storm(void)
{
    atomic_store(&storm_hits, 0);
    pthread_t storm = storm_start();

    /* Echo server (raw) and a raw peer streaming through it. */
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    CHECK_EQ(knet_server_wait_listening(ts.srv, 100), port);

    /* A knet client whose every message is echoed by the server; it echoes back
     * nothing (the tracker counts what it gets). */
    tu_tracker *ct = tu_tracker_new();
    knet_handler ch = tu_tracker_handler(ct);
    tu_client tc;
    ct->capture = true;
    knet_client *cli = tu_client_for_port(port);
    tu_client_start(&tc, cli, &ch, &knet_std_codec);

    const size_t total = (size_t)4 << 20, step = 16384;
    uint8_t *buf = malloc(step), *back = malloc(step);
    CHECK(buf && back);
    int fd = storm_connect(port, 0);
    size_t sent = 0, rcvd = 0;
    while (rcvd < total) {
        if (sent < total) {
            tu_pattern_fill(buf, step, sent, 7);
            tu_write_all(fd, buf, step);
            sent += step;
        }
        while (rcvd + step <= sent) {
            ssize_t r = tu_read_some(fd, back, sent - rcvd < step ? sent - rcvd : step);
            CHECK_GT(r, 0);
            CHECK_EQ(tu_pattern_mismatch(back, (size_t)r, rcvd, 7), (size_t)r);
            rcvd += (size_t)r;
        }
    }
    close(fd);

    /* The client's messages: std frames from another thread, every one echoed. */
    WAIT_GE(&ct->connects, 1);
    knet_conn *cc = knet_client_conn(cli);
    CHECK(cc != NULL);
    for (int i = 0; i < 2000; i++) {
        uint8_t m[64];
        tu_pattern_fill(m, sizeof m, (uint64_t)i * sizeof m, 9);
        int rc;
        while ((rc = knet_conn_send(cc, m, sizeof m)) == KNET_EPENDINGFULL) {
        }
        CHECK_EQ(rc, 0);
    }
    knet_conn_release(cc);
    WAIT_GE(&ct->msgs, 2000);
    CHECK_EQ(knet_client_close(cli), 0);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    knet_client_free(cli);
    CHECK_EQ(atomic_load(&ct->recs[0].rx_bytes), 2000 * 64);
    size_t off = 0, len;
    const uint8_t *msg;
    for (int i = 0; i < 2000; i++) {
        CHECK(tu_rec_next_msg(&ct->recs[0], &off, &msg, &len));
        CHECK_EQ(len, 64);
        CHECK_EQ(tu_pattern_mismatch(msg, len, (uint64_t)i * 64, 9), len);
    }

    /* A dial that resolves a name ("localhost") under the storm: connected, 20 times. */
    char addr[64];
    snprintf(addr, sizeof addr, "localhost:%d", port);
    for (int i = 0; i < 20; i++) {
        tu_tracker *lt = tu_tracker_new();
        knet_handler lh = tu_tracker_handler(lt);
        cli = knet_client_new(addr);
        CHECK(cli != NULL);
        tu_client_start(&tc, cli, &lh, NULL);
        WAIT_GE(&lt->connects, 1);
        CHECK_EQ(knet_client_close(cli), 0);
        CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
        knet_client_free(cli);
        tu_tracker_free(lt);
    }

    CHECK_EQ(knet_server_close(ts.srv), 0);
    CHECK_EQ(tu_server_join(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
    tu_tracker_free(ct);

    /* Idle timeout: 300 ms, the storm going on. */
    tu_tracker *it = tu_tracker_new();
    it->on_connect = idle_connect;
    knet_handler ih = tu_tracker_handler(it);
    tu_server_init(&ts, "127.0.0.1:0", &ih, NULL);
    knet_server_set_idle_timeout(ts.srv, 300);
    port = tu_server_run(&ts);
    CHECK_GT(port, 0);
    fd = storm_connect(port, 0);
    WAIT_GE(&it->disconnects, 1);
    int64_t idle = atomic_load(&idle_closed_at) - atomic_load(&idle_opened_at);
    CHECK_EQ(atomic_load(&it->recs[0].reason), -ETIMEDOUT);
    CHECK_GE(idle, 250);
    CHECK_LT(idle, 5000);
    close(fd);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(it);

    /* Shutdown deadline: a peer that never reads, 8 MiB queued, 300 ms. */
    it = tu_tracker_new();
    port = tu_tracked_server_start(&ts, it, NULL);
    fd = storm_connect(port, 4096);
    WAIT_GE(&it->connects, 1);
    knet_conn *sc = it->recs[0].conn;
    uint8_t *big = calloc(1, (size_t)8 << 20);
    CHECK(big != NULL);
    CHECK_EQ(knet_conn_send(sc, big, (size_t)8 << 20), 0);
    free(big);
    int64_t t0 = tu_now_ms();
    CHECK_EQ(knet_server_shutdown(ts.srv, 300), 0);
    CHECK_EQ(tu_server_join(&ts), KNET_ESERVERCLOSED);
    int64_t took = tu_now_ms() - t0;
    CHECK_EQ(atomic_load(&it->recs[0].reason), -ETIMEDOUT);
    CHECK_GE(took, 250);
    CHECK_LT(took, 5000);
    close(fd);
    tu_tracker_free(it);

    storm_stop(storm);
    free(buf);
    free(back);
    printf("  %ld signals handled\n", atomic_load(&storm_hits));
    CHECK_GT(atomic_load(&storm_hits), 100);
}

/* ------------------------------------------------------------------ SIGPIPE */

static void reset_on_receive(tu_rec *r, const void *buf, size_t len)
{
    (void)buf, (void)len;
    /* The direct fast path and then queued writes, onto a peer that resets. */
    static uint8_t blk[65536];
    for (int i = 0; i < 64; i++)
        if (knet_conn_send(r->conn, blk, sizeof blk) != 0)
            break;
}

/* SIGPIPE at its default disposition (this test never ignores it): peers that
 * reset while knet writes — the direct send, queued writes, a graceful shutdown's
 * drain, a client's connection — end those connections, never the process. */
static void test_sigpipe_default_never_fires(void)
{
    struct sigaction cur;
    CHECK_EQ(sigaction(SIGPIPE, NULL, &cur), 0);
    CHECK(cur.sa_handler == SIG_DFL);

    tu_tracker *t = tu_tracker_new();
    t->on_receive = reset_on_receive;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    for (int i = 0; i < 20; i++) {
        int fd = tu_connect_ex(port, 4096);
        tu_set_linger0(fd);
        tu_write_str(fd, "go");
        WAIT_GE(&t->msgs, i + 1);
        close(fd); /* RST while the loop writes */
    }
    WAIT_GE(&t->disconnects, 20);

    /* Off-loop sends and a graceful shutdown draining onto peers that reset. */
    int fds[10];
    for (int i = 0; i < 10; i++) {
        fds[i] = tu_connect_ex(port, 4096);
        tu_set_linger0(fds[i]);
    }
    WAIT_GE(&t->connects, 30);
    static uint8_t blk[1 << 20];
    for (int i = 20; i < 30; i++)
        CHECK_EQ(knet_conn_send(t->recs[i].conn, blk, sizeof blk), 0);
    CHECK_EQ(knet_server_shutdown(ts.srv, 10000), 0);
    for (int i = 0; i < 10; i++)
        close(fds[i]);
    CHECK_EQ(tu_server_join(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);

    /* A client whose server resets while it writes. */
    int lfd, peer;
    tu_tracker *ct = tu_tracker_new();
    tu_client tc;
    knet_client *cli = tu_client_to_plain(&tc, ct, 4096, &lfd, &peer);
    knet_conn *cc = knet_client_conn(cli);
    CHECK(cc != NULL);
    for (int i = 0; i < 8; i++)
        CHECK_EQ(knet_conn_send(cc, blk, sizeof blk), 0);
    tu_set_linger0(peer);
    close(peer);
    WAIT_GE(&ct->disconnects, 1);
    for (int i = 0; i < 4; i++)
        knet_conn_send(cc, blk, sizeof blk); /* fails now: no write, no signal */
    knet_conn_release(cc);
    CHECK_EQ(knet_client_close(cli), 0);
    CHECK_EQ(tu_client_join(&tc), KNET_ECLIENTCLOSED);
    knet_client_free(cli);
    close(lfd);
    tu_tracker_free(ct);
}

/* ------------------------------------------------------------------ caller's mask and dispositions */

static sigset_t g_mask0;
static struct sigaction g_act0[NSIG];

static void snapshot_signals(sigset_t *mask, struct sigaction *act)
{
    CHECK_EQ(pthread_sigmask(SIG_BLOCK, NULL, mask), 0);
    for (int s = 1; s < NSIG; s++)
        if (sigaction(s, NULL, &act[s]) != 0)
            memset(&act[s], 0, sizeof act[s]);
}

/* knet changes no disposition and leaves the mask of a thread that called it as
 * it was (the loops' start blocks signals only while it creates them). */
static void test_caller_signals_untouched(void)
{
    sigset_t mask;
    static struct sigaction act[NSIG];
    snapshot_signals(&mask, act);
    for (int s = 1; s < NSIG; s++) {
        if (s == SIGUSR1 || s == SIGSEGV || s == SIGILL)
            continue; /* this program's own */
        if (act[s].sa_handler != g_act0[s].sa_handler || act[s].sa_flags != g_act0[s].sa_flags)
            fprintf(stderr, "disposition of %s changed\n", strsignal(s));
        CHECK(act[s].sa_handler == g_act0[s].sa_handler);
    }
    for (int s = 1; s < NSIG; s++)
        CHECK_EQ(sigismember(&mask, s), sigismember(&g_mask0, s));
}

/* ------------------------------------------------------------------ fork before knet starts */

static void echo_receive(knet_conn *c, const void *buf, size_t len, void *ud)
{
    (void)ud;
    CHECK_EQ(knet_conn_send(c, buf, len), 0);
}

/* One echo round trip through a knet server of this process; returns 0. */
static int prefork_echo_once(const char *who)
{
    knet_handler h = {NULL, echo_receive, NULL};
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, NULL);
    CHECK_GT(port, 0);
    int fd = tu_connect(port);
    tu_write_str(fd, who);
    char b[16] = {0};
    CHECK_EQ(tu_read_full(fd, b, strlen(who)), (ssize_t)strlen(who));
    CHECK_EQ(memcmp(b, who, strlen(who)), 0);
    close(fd);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    return 0;
}

/* Child: forks before its first knet call, each process
 * then starts its own loops and serves. */
static int child_prefork(void)
{
    pid_t pid = fork();
    CHECK_GE(pid, 0);
    if (pid == 0)
        _exit(prefork_echo_once("grandchild") == 0 ? 0 : 1);
    CHECK_EQ(prefork_echo_once("child"), 0);
    int status = wait_child(pid);
    CHECK(WIFEXITED(status));
    return WEXITSTATUS(status);
}

/* Child: forks before its first knet call, then both processes serve one port, as the
 * workers of a classic pre-fork server share their listener. The grandchild listens
 * once the child does, on the child's port. Exits with the grandchild's listen result
 * negated (0: it served the port too). */
static int child_prefork_one_port(void)
{
    int p[2];
    CHECK_EQ(pipe2(p, O_CLOEXEC), 0);
    pid_t pid = fork();
    CHECK_GE(pid, 0);
    if (pid == 0) {
        int port = 0;
        if (read(p[0], &port, sizeof port) != (ssize_t)sizeof port) _exit(100);
        char addr[32];
        snprintf(addr, sizeof addr, "127.0.0.1:%d", port);
        knet_server *s = knet_server_new(addr);
        int rc = knet_server_listen_and_serve(s, NULL, NULL); /* a failure returns at once */
        knet_server_free(s);
        _exit(rc == KNET_ESERVERCLOSED ? 0 : rc < 0 && rc > -100 ? -rc : 101);
    }
    knet_handler h = {NULL, echo_receive, NULL};
    tu_server ts;
    int port = tu_server_start(&ts, "127.0.0.1:0", &h, NULL);
    CHECK_GT(port, 0);
    CHECK_EQ(write(p[1], &port, sizeof port), (ssize_t)sizeof port);
    int status = wait_child(pid);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    CHECK(WIFEXITED(status));
    return WEXITSTATUS(status);
}

/* README, knet.h: processes forked before the first start each have their own loops and
 * servers, but cannot share a port as a classic pre-fork server's workers share its
 * listener: knet sets no SO_REUSEPORT, so the second listen is -EADDRINUSE (before, the
 * docs called this "a pre-fork server" with no word of it). */
static void test_prefork_processes_cannot_share_a_port(void)
{
    int status = wait_child(spawn_self("prefork-one-port", NULL));
    CHECK(WIFEXITED(status));
    CHECK_EQ(WEXITSTATUS(status), EADDRINUSE);
}

/* README: a process that forks before its first server or client starts gets its
 * own loops in each process (knet starts them lazily, per process). */
static void test_fork_before_start_serves_in_both(void)
{
    int status = wait_child(spawn_self("prefork", NULL));
    CHECK(WIFEXITED(status));
    CHECK_EQ(WEXITSTATUS(status), 0);
}

int main(int argc, char **argv)
{
    ssize_t n = readlink("/proc/self/exe", g_self, sizeof g_self - 1);
    CHECK_GT(n, 0);
    g_self[n] = '\0';
    if (argc > 1 && strcmp(argv[1], "fault-segv") == 0)
        return child_fault(0);
    if (argc > 1 && strcmp(argv[1], "fault-ill") == 0)
        return child_fault(1);
    if (argc > 1 && strcmp(argv[1], "list-fds") == 0)
        return child_list_fds();
    if (argc > 1 && strcmp(argv[1], "prefork") == 0)
        return child_prefork();
    if (argc > 1 && strcmp(argv[1], "prefork-one-port") == 0)
        return child_prefork_one_port();
    note_inherited_fds();

    snapshot_signals(&g_mask0, g_act0); /* before knet runs anything */
    tu_begin();
    RUN(test_caller_signals_untouched);
    RUN(test_exec_child_inherits_no_knet_fds);
    RUN(test_sigpipe_default_never_fires);
    RUN(test_eintr_storm);
    RUN(test_segv_in_callback_reaches_handler);
    RUN(test_trap_in_callback_reaches_handler);
    RUN(test_fork_before_start_serves_in_both);
    RUN(test_prefork_processes_cannot_share_a_port);
    RUN(test_caller_signals_untouched);
    return tu_end();
}
