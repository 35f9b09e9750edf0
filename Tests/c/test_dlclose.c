/* libknet.so loaded with dlopen and unloaded with dlclose once its loop threads started
 * (a plugin that used knet). The loop threads outlive every server and client, asleep in
 * epoll_wait, so the library's code must stay mapped: a stop and continue of the process
 * (Ctrl-Z then fg, kill -STOP/-CONT, a debugger) wakes every epoll_wait with EINTR, and a
 * loop thread returning into unmapped code crashes the process.
 * argv[1] is libknet.so; the program itself does not link knet. */
#include "testutil.h"

#include <dirent.h>
#include <dlfcn.h>
#include <signal.h>
#include <sys/wait.h>

static int passed = 0;

typedef knet_server *(*server_new_fn)(const char *);
typedef int (*serve_fn)(knet_server *, const knet_handler *, const knet_codec *);
typedef int (*server_fn)(knet_server *);
typedef int (*wait_listening_fn)(knet_server *, uint32_t);
typedef void (*server_free_fn)(knet_server *);
typedef int (*set_loop_threads_fn)(unsigned);

static serve_fn serve;
static knet_server *server;

static void *serve_main(void *arg)
{
    (void)arg;
    return (void *)(intptr_t)serve(server, NULL, NULL);
}

static void *sym(void *lib, const char *name)
{
    void *p = dlsym(lib, name);
    if (!p) tu_fail(__FILE__, __LINE__, name);
    return p;
}

/* The thread id of this process's thread named name, or 0. */
static pid_t task_named(pid_t pid, const char *name)
{
    char path[320], comm[32];
    snprintf(path, sizeof path, "/proc/%d/task", (int)pid);
    DIR *d = opendir(path);
    if (!d) return 0;
    pid_t found = 0;
    struct dirent *e;
    while (!found && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        snprintf(path, sizeof path, "/proc/%d/task/%s/comm", (int)pid, e->d_name);
        FILE *f = fopen(path, "r");
        if (!f) continue;
        if (fgets(comm, sizeof comm, f) && strncmp(comm, name, strlen(name)) == 0)
            found = (pid_t)atoi(e->d_name);
        fclose(f);
    }
    closedir(d);
    return found;
}

/* The thread's voluntary context switches (each time it went to sleep), or -1 once gone. */
static long voluntary_switches(pid_t pid, pid_t tid)
{
    char path[64], line[128];
    snprintf(path, sizeof path, "/proc/%d/task/%d/status", (int)pid, (int)tid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    long n = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "voluntary_ctxt_switches: %ld", &n) == 1) break;
    fclose(f);
    return n;
}

/* The child: uses knet from a dlopen'ed libknet.so (one loop thread), unloads it, sends
 * its loop thread's id on sock, then waits for a byte from it. */
static void child(const char *lib_path, int sock)
{
    void *lib = dlopen(lib_path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) tu_fail(__FILE__, __LINE__, dlerror());
    CHECK(((set_loop_threads_fn)sym(lib, "knet_set_loop_threads"))(1) == 0);
    server = ((server_new_fn)sym(lib, "knet_server_new"))("127.0.0.1:0");
    CHECK(server != NULL);
    serve = (serve_fn)sym(lib, "knet_server_listen_and_serve");
    pthread_t t;
    CHECK(pthread_create(&t, NULL, serve_main, NULL) == 0);
    CHECK(((wait_listening_fn)sym(lib, "knet_server_wait_listening"))(server, TU_DEADLINE_MS) > 0);
    CHECK(((server_fn)sym(lib, "knet_server_close"))(server) == 0);
    void *rc;
    CHECK(pthread_join(t, &rc) == 0);
    CHECK((intptr_t)rc == KNET_ESERVERCLOSED);
    ((server_free_fn)sym(lib, "knet_server_free"))(server);
    pid_t loop = task_named(getpid(), "knet-loop-0");
    CHECK(loop > 0);
    CHECK(dlclose(lib) == 0);
    CHECK(write(sock, &loop, sizeof loop) == (ssize_t)sizeof loop);
    char b;
    CHECK(read(sock, &b, 1) == 1);
    _exit(0);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s path/to/libknet.so\n", argv[0]);
        return 2;
    }
    int sp[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sp) == 0);
    struct timeval tv = {TU_DEADLINE_MS / 1000, 0}; /* tu_set_timeouts would need knet linked */
    CHECK(setsockopt(sp[0], SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) == 0);
    fflush(NULL);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        close(sp[0]);
        child(argv[1], sp[1]);
    }
    close(sp[1]);
    pid_t loop = 0;
    CHECK(tu_read_full(sp[0], &loop, sizeof loop) == (ssize_t)sizeof loop);

    /* Stopped, every thread is out of its epoll_wait; continued, the loop thread goes back
     * to sleep in it (one more voluntary switch), or crashes the child. */
    int st;
    CHECK(kill(pid, SIGSTOP) == 0);
    CHECK(waitpid(pid, &st, WUNTRACED) == pid && WIFSTOPPED(st));
    long before = voluntary_switches(pid, loop);
    CHECK(before >= 0);
    CHECK(kill(pid, SIGCONT) == 0);
    pid_t gone = 0;
    WAIT_UNTIL((gone = waitpid(pid, &st, WNOHANG)) != 0 || voluntary_switches(pid, loop) > before);
    if (gone == pid && WIFSIGNALED(st)) {
        fprintf(stderr, "FAILED: continued after dlclose(libknet.so), the loop thread killed the "
                        "process with signal %d (%s)\n",
                WTERMSIG(st), strsignal(WTERMSIG(st)));
        return 1;
    }
    CHECK(gone == 0);
    passed++;
    CHECK(write(sp[0], "x", 1) == 1);
    CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0);
    printf("%d passed, 0 failed\n", passed);
    return 0;
}
