/* Error strings and the log sink. */
#include "internal.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

const char *knet_strerror(int err) {
    switch (err) {
    case 0: return "success";
    case KNET_ESERVERCLOSED: return "server closed";
    case KNET_ECLIENTCLOSED: return "client closed";
    case KNET_EPENDINGFULL: return "pending send queue full";
    case KNET_ECLOSED: return "connection closed";
    case KNET_EADDR: return "invalid address";
    case KNET_ECODEC: return "codec error (bad or oversized frame)";
    case KNET_ERESOLVE: return "cannot resolve host name";
    case KNET_EOF: return "connection closed by peer";
    case KNET_EBUSY: return "busy (already serving or started)";
    default: break;
    }
    if (err < 0 && err > -4096) {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 32))
        const char *s = strerrordesc_np(-err); /* static and thread-safe, unlike strerror */
        if (s) return s;
#else
        return strerror(-err);
#endif
    }
    return "unknown error";
}

static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;
static knet_log_fn log_fn;
static void *log_ud;
static int log_min = KNET_LOG_WARN;

void knet_set_log(knet_log_fn fn, int min_level, void *ud) {
    pthread_mutex_lock(&log_mu);
    log_fn = fn;
    log_ud = ud;
    log_min = min_level;
    pthread_mutex_unlock(&log_mu);
}

void knet__log(int level, const char *fmt, ...) {
    pthread_mutex_lock(&log_mu);
    knet_log_fn fn = log_fn;
    void *ud = log_ud;
    int min = log_min;
    pthread_mutex_unlock(&log_mu);
    if (level < min) return;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (fn) {
        fn(level, msg, ud);
    } else {
        static const char *names[] = {"debug", "info", "warning", "error"};
        fprintf(stderr, "knet: %s: %s\n", names[level < 0 ? 0 : level > 3 ? 3 : level], msg);
    }
}
