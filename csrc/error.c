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
static pthread_cond_t log_cv = PTHREAD_COND_INITIALIZER;
static knet_log_fn log_fn;
static void *log_ud;
static int log_min = KNET_LOG_WARN;
/* Calls into a sink under way (under log_mu): of the sink set now (log_gen), and of
 * sinks replaced since, which knet_set_log waits out so their ud may be freed. */
static unsigned long log_gen;
static size_t log_calls_cur, log_calls_old;
static _Thread_local bool tls_in_sink;

void knet_set_log(knet_log_fn fn, int min_level, void *ud) {
    pthread_mutex_lock(&log_mu);
    log_fn = fn;
    log_ud = ud;
    log_min = min_level;
    log_gen++;
    log_calls_old += log_calls_cur;
    log_calls_cur = 0;
    /* Once this returns the replaced sink runs no more, so its ud may be freed at
     * once. Not from inside a sink: it would wait for itself (or for another
     * thread's sink doing the same). */
    while (!tls_in_sink && log_calls_old > 0) pthread_cond_wait(&log_cv, &log_mu);
    pthread_mutex_unlock(&log_mu);
}

void knet__log(int level, const char *fmt, ...) {
    pthread_mutex_lock(&log_mu);
    knet_log_fn fn = log_fn;
    void *ud = log_ud;
    int min = log_min;
    unsigned long gen = log_gen;
    bool call = fn && level >= min;
    if (call) log_calls_cur++;
    pthread_mutex_unlock(&log_mu);
    if (level < min) return;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (call) {
        bool nested = tls_in_sink;
        tls_in_sink = true;
        fn(level, msg, ud);
        tls_in_sink = nested;
        pthread_mutex_lock(&log_mu);
        if (gen == log_gen) log_calls_cur--;
        else if (--log_calls_old == 0) pthread_cond_broadcast(&log_cv);
        pthread_mutex_unlock(&log_mu);
    } else {
        static const char *names[] = {"debug", "info", "warning", "error"};
        fprintf(stderr, "knet: %s: %s\n", names[level < 0 ? 0 : level > 3 ? 3 : level], msg);
    }
}
