/* The loop threads' per-message system calls, made without glibc's cancellation-point
 * wrappers. In a multi-threaded process each wrapped read, send or epoll_wait enables
 * and disables asynchronous cancellation around the call: two atomic read-modify-writes
 * (lock cmpxchg) and about 30 instructions, six and about 90 per echoed message on one
 * connection, where a single-threaded server pays none. A loop thread is never
 * cancelled, so the wrappers buy it nothing. Sanitizer builds keep the libc calls,
 * which the sanitizers intercept (buffer checks, fd synchronisation). */
#include "internal.h"

#include <sys/epoll.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || \
    __has_feature(memory_sanitizer)
#define KN_LIBC_IO 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define KN_LIBC_IO 1
#endif

#ifdef KN_LIBC_IO

ssize_t knet__sys_read(int fd, void *buf, size_t n) { return read(fd, buf, n); }

ssize_t knet__sys_send(int fd, const void *buf, size_t n, int flags) {
    return send(fd, buf, n, flags);
}

ssize_t knet__sys_sendmsg(int fd, const struct msghdr *m, int flags) {
    return sendmsg(fd, m, flags);
}

int knet__sys_epoll_wait(int epfd, struct epoll_event *evs, int max, int timeout) {
    return epoll_wait(epfd, evs, max, timeout);
}

#else

/* syscall() reads its arguments as longs: every one is passed as one. */

ssize_t knet__sys_read(int fd, void *buf, size_t n) {
    return (ssize_t)syscall(SYS_read, (long)fd, buf, n);
}

ssize_t knet__sys_send(int fd, const void *buf, size_t n, int flags) {
    return (ssize_t)syscall(SYS_sendto, (long)fd, buf, n, (long)flags, NULL, 0L);
}

ssize_t knet__sys_sendmsg(int fd, const struct msghdr *m, int flags) {
    return (ssize_t)syscall(SYS_sendmsg, (long)fd, m, (long)flags);
}

/* The call glibc's epoll_wait makes: epoll_wait, or on architectures without it
 * epoll_pwait with no signal mask (seccomp filters and strace see the same). */
int knet__sys_epoll_wait(int epfd, struct epoll_event *evs, int max, int timeout) {
#ifdef SYS_epoll_wait
    return (int)syscall(SYS_epoll_wait, (long)epfd, evs, (long)max, (long)timeout);
#else
    return (int)syscall(SYS_epoll_pwait, (long)epfd, evs, (long)max, (long)timeout, NULL, 0L);
#endif
}

#endif
