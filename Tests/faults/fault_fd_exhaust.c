/* Fault: descriptor exhaustion. A child process (this program, re-executed
 * with "child") lowers RLIMIT_NOFILE to 64 and runs an echo server; the parent
 * floods it with more connections than it can hold. Promise: the server logs
 * its accept back-off (accept error ... retrying in N ms) instead of spinning
 * or dying, keeps serving the connections it has, and accepts again once
 * descriptors free up. The child reports through a pipe; its exit code says
 * whether the back-off was logged. */
#include "faultutil.h"

#include <sys/wait.h>

#define CHILD_NOFILE 64
#define KEEPERS 4
#define FLOOD 120 /* well over what CHILD_NOFILE leaves for connections */
#define REPORT_FD 3  /* child -> parent: "P port", "B", "S live accepted" lines */
#define CONTROL_FD 4 /* parent -> child: 'S' = report stats; EOF = stop */

/* ------------------------------------------------------------------ child */

static atomic_int child_backoffs;

/* Writes one line to the report pipe (one write: atomic for a pipe). */
static void report(const char *line)
{
    size_t n = strlen(line);
    CHECK_EQ(write(REPORT_FD, line, n), (ssize_t)n);
}

/* Log sink of the child: reports the first accept back-off. */
static void child_log(int level, const char *msg, void *ud)
{
    (void)level;
    (void)ud;
    if (strstr(msg, "accept") && strstr(msg, "retrying")) {
        if (atomic_fetch_add(&child_backoffs, 1) == 0)
            report("B\n");
    }
}

/* Echo handler of the child's server. */
static void child_receive(knet_conn *c, const void *buf, size_t len, void *ud)
{
    (void)ud;
    (void)knet_conn_send(c, buf, len);
}

/* Thread of the child: reports the port, answers stats requests, closes the
 * server when the parent closes the control pipe. */
static void *child_control(void *arg)
{
    knet_server *s = (knet_server *)arg;
    int port = knet_server_wait_listening(s, TU_DEADLINE_MS);
    char line[128];
    snprintf(line, sizeof line, "P %d\n", port);
    report(line);
    for (;;) {
        char cmd;
        ssize_t n = read(CONTROL_FD, &cmd, 1);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        knet_stats st;
        knet_server_stats(s, &st);
        snprintf(line, sizeof line, "S %llu %llu\n", (unsigned long long)st.live,
                 (unsigned long long)st.accepted);
        report(line);
    }
    knet_server_close(s);
    return NULL;
}

static int child_main(void)
{
    struct rlimit rl;
    CHECK_EQ(getrlimit(RLIMIT_NOFILE, &rl), 0);
    rl.rlim_cur = CHILD_NOFILE;
    CHECK_EQ(setrlimit(RLIMIT_NOFILE, &rl), 0);
    knet_set_log(child_log, KNET_LOG_WARN, NULL);
    knet_server *s = knet_server_new("127.0.0.1:0");
    CHECK(s != NULL);
    pthread_t th;
    CHECK_EQ(pthread_create(&th, NULL, child_control, s), 0);
    knet_handler h = {NULL, child_receive, NULL};
    int rc = knet_server_listen_and_serve(s, &h, NULL);
    CHECK_EQ(pthread_join(th, NULL), 0);
    knet_server_free(s);
    if (rc != KNET_ESERVERCLOSED)
        return 2;
    return atomic_load(&child_backoffs) > 0 ? 0 : 3;
}

/* ------------------------------------------------------------------ parent */

static pid_t child_pid = -1;
static int report_rd = -1, control_wr = -1;

/* Reads one line from the child (bounded by the suite's deadline). */
static void read_line(char *buf, size_t cap)
{
    size_t n = 0;
    int64_t end = tu_now_ms() + TU_DEADLINE_MS;
    while (n + 1 < cap) {
        struct pollfd p = {report_rd, POLLIN, 0};
        int left = (int)(end - tu_now_ms());
        CHECK_GT(left, 0);
        int pr = poll(&p, 1, left);
        if (pr < 0 && errno == EINTR)
            continue;
        CHECK_EQ(pr, 1);
        char ch;
        ssize_t r = read(report_rd, &ch, 1);
        CHECK_EQ(r, 1);
        if (ch == '\n')
            break;
        buf[n++] = ch;
    }
    buf[n] = '\0';
}

/* Asks the child for its counters. */
static void child_stats(unsigned long long *live, unsigned long long *accepted)
{
    CHECK_EQ(write(control_wr, "S", 1), 1);
    char line[128];
    read_line(line, sizeof line);
    CHECK_EQ(sscanf(line, "S %llu %llu", live, accepted), 2);
}

/* Starts the child: this program re-executed with "child", pipes on fds 3 and 4. */
static int start_child(void)
{
    int rep[2], ctl[2];
    CHECK_EQ(pipe2(rep, O_CLOEXEC), 0);
    CHECK_EQ(pipe2(ctl, O_CLOEXEC), 0);
    char self[4096];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    CHECK_GT(n, 0);
    self[n] = '\0';
    child_pid = fork();
    CHECK_GE(child_pid, 0);
    if (child_pid == 0) {
        /* Only async-signal-safe calls until exec. dup2 clears O_CLOEXEC. */
        if (dup2(rep[1], REPORT_FD) < 0 || dup2(ctl[0], CONTROL_FD) < 0)
            _exit(126);
        char *argv[] = {self, (char *)"child", NULL};
        execv(self, argv);
        _exit(127);
    }
    close(rep[1]);
    close(ctl[0]);
    report_rd = rep[0];
    control_wr = ctl[1];
    char line[128];
    read_line(line, sizeof line);
    int port = 0;
    CHECK_EQ(sscanf(line, "P %d", &port), 1);
    CHECK_GT(port, 0);
    return port;
}

/* Waits (bounded) for the child to exit; returns its exit status. */
static int wait_child(void)
{
    int64_t end = tu_now_ms() + TU_DEADLINE_MS;
    for (;;) {
        int st;
        pid_t p = waitpid(child_pid, &st, WNOHANG);
        CHECK_GE(p, 0);
        if (p == child_pid) {
            if (WIFSIGNALED(st)) {
                fprintf(stderr, "child killed by signal %d\n", WTERMSIG(st));
                CHECK(!WIFSIGNALED(st));
            }
            CHECK(WIFEXITED(st));
            return WEXITSTATUS(st);
        }
        if (tu_now_ms() > end) {
            kill(child_pid, SIGKILL);
            tu_fail(__FILE__, __LINE__, "child did not exit");
        }
        tu_sleep_ms(5);
    }
}

/* Writes a short message and reads the same bytes back. */
static void echo_check(int fd, int i)
{
    char out[64], in[64];
    int n = snprintf(out, sizeof out, "echo %d", i);
    tu_write_all(fd, out, (size_t)n);
    READ_EXACT(fd, in, (size_t)n);
    CHECK_EQ(memcmp(in, out, (size_t)n), 0);
}

static void test_accept_backoff_and_recovery(void)
{
    int port = start_child();

    int keepers[KEEPERS];
    for (int i = 0; i < KEEPERS; i++) {
        keepers[i] = tu_connect(port);
        echo_check(keepers[i], i);
    }

    /* The flood: every connect completes in the kernel's backlog; the child can
     * accept only until it runs out of descriptors. */
    int flood[FLOOD];
    for (int i = 0; i < FLOOD; i++)
        flood[i] = tu_connect(port);

    char line[128];
    read_line(line, sizeof line);
    CHECK_EQ(strcmp(line, "B"), 0); /* the back-off was logged */
    unsigned long long live, accepted;
    child_stats(&live, &accepted);
    printf("  child at its limit: %llu live, %llu accepted of %d\n", live, accepted,
           KEEPERS + FLOOD);
    CHECK_LT(live, (unsigned long long)CHILD_NOFILE);
    CHECK_LT(accepted, (unsigned long long)(KEEPERS + FLOOD));

    /* Existing connections keep working while the server cannot accept. */
    for (int i = 0; i < KEEPERS; i++)
        echo_check(keepers[i], 100 + i);

    /* Descriptors free up: the server accepts again (within its back-off). */
    for (int i = 0; i < FLOOD; i++)
        close(flood[i]);
    int64_t t0 = tu_now_ms();
    int fresh[8];
    for (int i = 0; i < 8; i++) {
        fresh[i] = tu_connect(port);
        echo_check(fresh[i], 200 + i);
    }
    printf("  accepting again %lld ms after the flood closed\n", (long long)(tu_now_ms() - t0));
    for (int i = 0; i < KEEPERS; i++)
        echo_check(keepers[i], 300 + i);
    child_stats(&live, &accepted);
    CHECK_EQ(accepted, (unsigned long long)(KEEPERS + FLOOD + 8));

    for (int i = 0; i < 8; i++)
        close(fresh[i]);
    for (int i = 0; i < KEEPERS; i++)
        close(keepers[i]);
    close(control_wr); /* the child closes its server and exits */
    CHECK_EQ(wait_child(), 0);
    close(report_rd);
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "child") == 0)
        return child_main();
    setvbuf(stdout, NULL, _IOLBF, 0);
    /* No tu_begin: the parent uses plain sockets only (no knet threads to fork). */
    RUN(test_accept_backoff_and_recovery);
    return tu_end();
}
