/* The event loops: N threads, each with an epoll instance, an eventfd for
 * cross-thread wake-ups, a timer heap, a task queue and a ready list of
 * connections that other threads gave work. Read it like Redis's ae.c. */
#include "internal.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#define KN_MAX_EVENTS 256
#define KN_PREFETCH 4 /* events fetched ahead of the one being dispatched */

/* The first 192 bytes of a handle: for a connection, everything its read path
 * touches (kn_io first, then state, queues, buffers, counters). malloc aligns
 * to 16 bytes, so they may straddle four cache lines: the last byte too. */
static inline void prefetch_io(const void *p) {
    __builtin_prefetch(p);
    __builtin_prefetch((const char *)p + 64);
    __builtin_prefetch((const char *)p + 128);
    __builtin_prefetch((const char *)p + 191);
}

static kn_loop *g_loops;
static unsigned g_nloops;
static long g_requested = -1; /* knet_set_loop_threads's n; -1 = not called */
static atomic_bool g_started;
static atomic_uint g_next;
static bool g_starting;  /* under g_cfg_mu: knet__loops_start is making them */
static pthread_mutex_t g_cfg_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t g_start_mu = PTHREAD_MUTEX_INITIALIZER; /* one start at a time */
static _Thread_local kn_loop *tls_loop;

uint64_t knet__now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* ------------------------------------------------------------ timers (min-heap) */

void knet__timer_init(kn_timer *t, kn_timer_cb cb) {
    t->deadline = 0;
    t->idx = SIZE_MAX;
    t->cb = cb;
}

static void heap_swap(kn_loop *L, size_t a, size_t b) {
    kn_timer *t = L->heap[a];
    L->heap[a] = L->heap[b];
    L->heap[b] = t;
    L->heap[a]->idx = a;
    L->heap[b]->idx = b;
}

static void heap_up(kn_loop *L, size_t i) {
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (L->heap[p]->deadline <= L->heap[i]->deadline) break;
        heap_swap(L, p, i);
        i = p;
    }
}

static void heap_down(kn_loop *L, size_t i) {
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < L->heap_len && L->heap[l]->deadline < L->heap[m]->deadline) m = l;
        if (r < L->heap_len && L->heap[r]->deadline < L->heap[m]->deadline) m = r;
        if (m == i) return;
        heap_swap(L, i, m);
        i = m;
    }
}

void knet__timer_stop(kn_loop *L, kn_timer *t) {
    size_t i = t->idx;
    if (i == SIZE_MAX) return;
    t->idx = SIZE_MAX;
    L->heap_len--;
    if (i == L->heap_len) return;
    L->heap[i] = L->heap[L->heap_len];
    L->heap[i]->idx = i;
    heap_up(L, i);
    heap_down(L, i);
}

int knet__timer_reserve(kn_loop *L) {
    if (L->timers == L->heap_cap) {
        size_t cap = L->heap_cap ? L->heap_cap * 2 : 64;
        kn_timer **h = realloc(L->heap, cap * sizeof *h);
        if (!h) return -ENOMEM;
        L->heap = h;
        L->heap_cap = cap;
    }
    L->timers++;
    return 0;
}

void knet__timer_unreserve(kn_loop *L) { L->timers--; }

void knet__timer_start(kn_loop *L, kn_timer *t, uint64_t ms) {
    knet__timer_stop(L, t);
    /* Room was reserved when the timer's owner joined L (knet__timer_reserve). */
    t->deadline = knet__now_ms() + ms;
    t->idx = L->heap_len++;
    L->heap[t->idx] = t;
    heap_up(L, t->idx);
}

static int timers_timeout(kn_loop *L) {
    if (L->heap_len == 0) return -1;
    uint64_t now = knet__now_ms(), d = L->heap[0]->deadline;
    if (d <= now) return 0;
    return d - now > 60000 ? 60000 : (int)(d - now);
}

static void timers_run(kn_loop *L) {
    uint64_t now = L->now;
    while (L->heap_len > 0 && L->heap[0]->deadline <= now) {
        kn_timer *t = L->heap[0];
        knet__timer_stop(L, t);
        t->cb(L, t);
    }
}

/* ------------------------------------------------------------ cross-thread work */

void knet__loop_wake(kn_loop *L) {
    if (!atomic_exchange_explicit(&L->wake_pending, true, memory_order_acq_rel)) {
        uint64_t one = 1;
        ssize_t n;
        do n = write(L->wake.fd, &one, sizeof one);
        while (n < 0 && errno == EINTR);
    }
}

static void post(kn_loop *L, kn_task *t, kn_task_fn fn, void *arg) {
    t->next = NULL;
    t->fn = fn;
    t->arg = arg;
    pthread_mutex_lock(&L->mu);
    if (L->tasks_tail) L->tasks_tail->next = t;
    else L->tasks_head = t;
    L->tasks_tail = t;
    atomic_store_explicit(&L->has_work, true, memory_order_release);
    pthread_mutex_unlock(&L->mu);
    if (tls_loop != L) knet__loop_wake(L);
}

int knet__loop_post(kn_loop *L, kn_task_fn fn, void *arg) {
    kn_task *t = malloc(sizeof *t);
    if (!t) return -ENOMEM;
    t->heap = true;
    post(L, t, fn, arg);
    return 0;
}

void knet__loop_post_node(kn_loop *L, kn_task *t, kn_task_fn fn, void *arg) {
    t->heap = false;
    post(L, t, fn, arg);
}

static void on_wake(kn_loop *L, kn_io *io, uint32_t events) {
    (void)events;
    uint64_t v;
    ssize_t n = read(io->fd, &v, sizeof v);
    (void)n;
    /* Clear before draining, so a post that races with the drain wakes us again.
     * An exchange, not a store: its acquire pairs with the poster's exchange, so
     * the poster's has_work is seen by the drain that follows. */
    (void)atomic_exchange_explicit(&L->wake_pending, false, memory_order_acq_rel);
}

/* Runs posted tasks and services ready connections. The has_work check keeps
 * the mutex off the loop's path when nothing was posted (nearly every
 * iteration): a poster sets it under mu before it wakes the loop. */
static void drain(kn_loop *L) {
    if (!atomic_load_explicit(&L->has_work, memory_order_acquire)) return;
    pthread_mutex_lock(&L->mu);
    atomic_store_explicit(&L->has_work, false, memory_order_relaxed);
    kn_task *t = L->tasks_head;
    knet_conn *c = L->ready_head;
    L->tasks_head = L->tasks_tail = NULL;
    L->ready_head = L->ready_tail = NULL;
    /* The batch gets its own links: once ready is false, another thread may put
     * a conn of this batch on the new ready list, overwriting ready_next. */
    for (knet_conn *r = c; r; r = r->ready_next) {
        r->ready = false;
        r->batch_next = r->ready_next;
    }
    pthread_mutex_unlock(&L->mu);

    while (t) {
        kn_task *next = t->next; /* both read first: fn may free a poster's node */
        bool heap = t->heap;
        t->fn(L, t->arg);
        if (heap) free(t);
        t = next;
    }
    while (c) {
        knet_conn *next = c->batch_next;
        knet__conn_service(L, c);
        knet_conn_release(c); /* the ready list's reference */
        c = next;
    }
}

static void reap(kn_loop *L) {
    while (L->reap) {
        knet_conn *c = L->reap;
        L->reap = c->reap_next;
        knet_conn_release(c); /* the loop's reference */
    }
}

static void *loop_main(void *arg) {
    kn_loop *L = arg;
    tls_loop = L;
    char name[16];
    snprintf(name, sizeof name, "knet-loop-%u", L->index);
    pthread_setname_np(pthread_self(), name);

    struct epoll_event evs[KN_MAX_EVENTS];
    bool more = false;
    for (;;) {
        int timeout = more ? 0 : timers_timeout(L);
        int n = knet__sys_epoll_wait(L->epfd, evs, KN_MAX_EVENTS, timeout);
        if (n < 0) {
            if (errno == EINTR) continue;
            knet__log(KNET_LOG_ERROR, "epoll_wait: %s", strerror(errno));
            abort();
        }
        /* The loop's time is read for its timers and the idle timeouts they check
         * (last_io): with none armed it would go unread, and a server without idle
         * timeouts would pay a clock read per wake-up, per message on one busy
         * connection. A timer armed meanwhile reads the clock itself, as does the
         * attach that sets a connection's first last_io. */
        if (L->heap_len) L->now = knet__now_ms();
        /* With many connections ready their structs are out of cache; fetching
         * a few events ahead overlaps those misses with the current callback. */
        for (int i = 0; i < n && i < KN_PREFETCH; i++) prefetch_io(evs[i].data.ptr);
        for (int i = 0; i < n; i++) {
            if (i + KN_PREFETCH < n) prefetch_io(evs[i + KN_PREFETCH].data.ptr);
            kn_io *io = evs[i].data.ptr;
            if (io->fd >= 0) io->cb(L, io, evs[i].events);
        }
        /* Requests other threads made before this wake-up go before the timers:
         * a close, a graceful close or a send asked for while the loop was busy
         * must not lose to an idle deadline that passed meanwhile. Work the drain
         * or a timer queued on this loop (no wake-up: has_work alone says so) is
         * taken in the next iteration, without waiting. */
        drain(L);
        timers_run(L);
        more = atomic_load_explicit(&L->has_work, memory_order_acquire);
        reap(L);
    }
    return NULL;
}

int knet__loop_ctl(kn_loop *L, int op, kn_io *io, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = io};
    return epoll_ctl(L->epfd, op, io->fd, &ev) < 0 ? -errno : 0;
}

/* The loop count asked for: knet_set_loop_threads's n (requested), else
 * KNET_LOOP_THREADS, else the online CPUs (also for knet_set_loop_threads(0)). */
static unsigned wanted_threads(long requested) {
    if (requested > 0) return (unsigned)requested;
    const char *env = requested < 0 ? getenv("KNET_LOOP_THREADS") : NULL;
    if (env && *env) {
        char *end;
        unsigned long v = strtoul(env, &end, 10);
        if (*end == '\0' && v > 0 && v <= 1024) return (unsigned)v;
        /* Once: a log sink may ask knet_loop_threads, which would warn again, and so on. */
        static atomic_bool warned;
        if (!atomic_exchange(&warned, true))
            knet__log(KNET_LOG_WARN, "ignoring KNET_LOOP_THREADS=%s", env);
    }
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (unsigned)n : 1;
}

/* Makes loop i's epoll, wake-up eventfd and read buffer; 0 or -errno, with
 * nothing left behind on an error. */
static int loop_init(kn_loop *L, unsigned i) {
    L->index = i;
    L->wake.cb = on_wake;
    L->epfd = epoll_create1(EPOLL_CLOEXEC);
    L->wake.fd = L->epfd < 0 ? -1 : eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    L->rbuf = L->wake.fd < 0 ? NULL : malloc(KN_READ_BUF);
    int rc = L->epfd < 0 || L->wake.fd < 0 ? -errno : !L->rbuf ? -ENOMEM : 0;
    if (rc == 0) rc = knet__loop_ctl(L, EPOLL_CTL_ADD, &L->wake, EPOLLIN);
    if (rc < 0) {
        if (L->wake.fd >= 0) close(L->wake.fd);
        if (L->epfd >= 0) close(L->epfd);
        free(L->rbuf);
        return rc;
    }
    pthread_mutex_init(&L->mu, NULL);
    return 0;
}

/* Undoes loop_init for a loop whose thread never ran. */
static void loop_destroy(kn_loop *L) {
    close(L->wake.fd);
    close(L->epfd);
    free(L->rbuf);
    pthread_mutex_destroy(&L->mu);
}

/* Makes every loop, then starts their threads. Out of fds or memory it undoes
 * all and returns -errno (a later call tries again): the caller's listen or
 * dial fails with it, the process goes on. Threads that cannot start leave
 * fewer loops than asked for, or -EAGAIN if none starts. Under g_start_mu. */
static int start_loops(unsigned n) {
    kn_loop *loops = calloc(n, sizeof *loops);
    if (!loops) return -ENOMEM;
    int rc = 0;
    unsigned made = 0, started = 0;
    while (made < n && (rc = loop_init(&loops[made], made)) == 0) made++;
    if (rc == 0) {
        /* Loop threads take no asynchronous signals: those belong to the application.
         * Faults stay unblocked: a crash in a callback must reach the program's handler
         * (a crash reporter, ASan, Swift's backtracer); blocked, the kernel kills the
         * process with the default action instead. */
        sigset_t all, old;
        sigfillset(&all);
        static const int faults[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS};
        for (size_t i = 0; i < sizeof faults / sizeof faults[0]; i++) sigdelset(&all, faults[i]);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        while (started < n && pthread_create(&loops[started].thread, &attr, loop_main,
                                             &loops[started]) == 0)
            started++;
        pthread_attr_destroy(&attr);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (started < n)
            knet__log(started ? KNET_LOG_WARN : KNET_LOG_ERROR,
                      "started %u of %u event loop threads", started, n);
        if (started == 0) rc = -EAGAIN;
    }
    for (unsigned i = started; i < made; i++) loop_destroy(&loops[i]);
    if (rc < 0) {
        knet__log(KNET_LOG_ERROR, "cannot create the event loops: %s", knet_strerror(rc));
        free(loops);
        return rc;
    }
    pthread_mutex_lock(&g_cfg_mu);
    g_loops = loops; /* loops past started stay unused in the array */
    g_nloops = started;
    atomic_store(&g_started, true);
    pthread_mutex_unlock(&g_cfg_mu);
    return 0;
}

int knet__loops_start(void) {
    if (atomic_load(&g_started)) return 0;
    pthread_mutex_lock(&g_start_mu);
    int rc = 0;
    if (!atomic_load(&g_started)) {
        /* The count is fixed from here (knet_set_loop_threads: KNET_EBUSY); the
         * start itself runs outside g_cfg_mu, so a log sink may ask for it. */
        pthread_mutex_lock(&g_cfg_mu);
        g_starting = true;
        long requested = g_requested;
        pthread_mutex_unlock(&g_cfg_mu);
        rc = start_loops(wanted_threads(requested));
        pthread_mutex_lock(&g_cfg_mu);
        g_starting = false;
        pthread_mutex_unlock(&g_cfg_mu);
    }
    pthread_mutex_unlock(&g_start_mu);
    return rc;
}

unsigned knet__loop_count(void) {
    return atomic_load(&g_started) ? g_nloops : 0;
}

kn_loop *knet__loop_at(unsigned i) {
    return &g_loops[i % knet__loop_count()];
}

kn_loop *knet__loop_next(void) {
    unsigned n = knet__loop_count();
    return &g_loops[atomic_fetch_add_explicit(&g_next, 1, memory_order_relaxed) % n];
}

kn_loop *knet__loop_current(void) { return tls_loop; }

int knet_set_loop_threads(unsigned n) {
    pthread_mutex_lock(&g_cfg_mu);
    int rc = atomic_load(&g_started) || g_starting ? KNET_EBUSY : 0;
    if (rc == 0) g_requested = n;
    pthread_mutex_unlock(&g_cfg_mu);
    return rc;
}

unsigned knet_loop_threads(void) {
    pthread_mutex_lock(&g_cfg_mu);
    unsigned n = atomic_load(&g_started) ? g_nloops : 0;
    long requested = g_requested;
    pthread_mutex_unlock(&g_cfg_mu);
    return n ? n : wanted_threads(requested); /* may log: not under the lock */
}
