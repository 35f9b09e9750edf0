/* What servers and clients share: the handler and codec their connections
 * use, and the counts their serving thread waits on before it returns. */
#include "internal.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

const knet_handler knet_default_handler = {NULL, NULL, NULL};

void knet__owner_init(kn_owner *o) {
    memset(o, 0, sizeof *o);
    pthread_mutex_init(&o->mu, NULL);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&o->cv, &attr);
    pthread_condattr_destroy(&attr);
    atomic_init(&o->closing, false);
    o->max_qbytes = KNET_DEFAULT_MAX_QUEUED;
    knet__owner_set(o, NULL, NULL);
}

int knet__owner_start(kn_owner *o) {
    if (o->slots) return 0;
    int rc = knet__loops_start();
    if (rc < 0) return rc;
    unsigned n = knet__loop_count();
    kn_slot *s = aligned_alloc(_Alignof(kn_slot), n * sizeof *s);
    kn_task *nodes = calloc(2 * (size_t)n, sizeof *nodes);
    if (!s || !nodes) {
        free(s);
        free(nodes);
        return -ENOMEM;
    }
    for (unsigned i = 0; i < n; i++) {
        atomic_init(&s[i].bytes_in, 0);
        atomic_init(&s[i].bytes_out, 0);
    }
    pthread_mutex_lock(&o->mu);
    o->slots = s;
    o->stop_nodes = nodes;
    pthread_mutex_unlock(&o->mu);
    return 0;
}

bool knet__owner_admit(kn_owner *o) {
    pthread_mutex_lock(&o->mu);
    bool ok = !o->max_conns || o->live < o->max_conns;
    if (ok) {
        o->live++;
        o->accepted++;
    } else {
        o->refused++;
    }
    pthread_mutex_unlock(&o->mu);
    return ok;
}

void knet__owner_stats(kn_owner *o, knet_stats *out) {
    memset(out, 0, sizeof *out);
    pthread_mutex_lock(&o->mu);
    out->live = o->live;
    out->accepted = o->accepted;
    out->refused = o->refused;
    out->idle_closed = o->idle_closed;
    kn_slot *s = o->slots;
    pthread_mutex_unlock(&o->mu);
    if (!s) return;
    for (unsigned i = 0, n = knet__loop_count(); i < n; i++) {
        out->bytes_in += atomic_load_explicit(&s[i].bytes_in, memory_order_relaxed);
        out->bytes_out += atomic_load_explicit(&s[i].bytes_out, memory_order_relaxed);
    }
}

void knet__owner_destroy(kn_owner *o) {
    free(o->slots);
    free(o->stop_nodes);
    pthread_cond_destroy(&o->cv);
    pthread_mutex_destroy(&o->mu);
}

void knet__owner_set(kn_owner *o, const knet_handler *h, const knet_codec *c) {
    o->handler = h ? *h : knet_default_handler;
    o->codec = c ? *c : knet_default_codec;
    o->max_frame = o->codec.max_frame ? o->codec.max_frame : KNET_DEFAULT_MAX_FRAME;
}

/* Waiters on cv wait for live (or tasks) to reach 0: a client's serving thread
 * after each connection, a server's only once it is closing. Waking a server's
 * thread at every close would cost it three futex calls and two context
 * switches per connection for nothing. */
void knet__owner_conn_done(kn_owner *o) {
    pthread_mutex_lock(&o->mu);
    if (--o->live == 0 && (o->serves_one || atomic_load_explicit(&o->closing, memory_order_relaxed)))
        pthread_cond_broadcast(&o->cv);
    pthread_mutex_unlock(&o->mu);
}

void knet__owner_task_done(kn_owner *o) {
    pthread_mutex_lock(&o->mu);
    if (--o->tasks == 0) pthread_cond_broadcast(&o->cv);
    pthread_mutex_unlock(&o->mu);
}

void knet__owner_close_conns(kn_loop *L, kn_owner *o, int reason) {
    knet_conn *c = L->conns;
    while (c) {
        knet_conn *next = c->next;
        /* A close asked for earlier keeps its reason: c is on the ready list, which
         * finishes it with that reason (as knet__conn_graceful leaves it). */
        if (c->owner == o && !(atomic_load(&c->req) & KN_REQ_CLOSE)) knet__conn_finish(c, reason);
        c = next;
    }
}

static void close_task(kn_loop *L, void *arg) {
    kn_owner *o = arg;
    knet__owner_close_conns(L, o, o->close_reason);
    knet__owner_task_done(o);
}

static void shutdown_task(kn_loop *L, void *arg) {
    kn_owner *o = arg;
    pthread_mutex_lock(&o->mu);
    uint32_t ms = o->grace_ms;
    pthread_mutex_unlock(&o->mu);
    knet_conn *c = L->conns;
    while (c) {
        knet_conn *next = c->next; /* c may finish at once when nothing is queued */
        if (c->owner == o) knet__conn_graceful(L, c, ms);
        c = next;
    }
    knet__owner_task_done(o);
}

void knet__owner_stop_loops(kn_owner *o, bool force) {
    unsigned n = knet__loop_count();
    kn_task *nodes = o->stop_nodes + (force ? n : 0);
    for (unsigned i = 0; i < n; i++)
        knet__loop_post_node(knet__loop_at(i), &nodes[i], force ? close_task : shutdown_task, o);
}
