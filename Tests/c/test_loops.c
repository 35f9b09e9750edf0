/* Several loop threads (the count is argv[1]; ctest runs 2, 3 and 8, more loops
 * than a 2-core machine has): consecutive connections, a server's and its clients'
 * alike, are spread round-robin over every loop; each connection's callbacks run on
 * one loop thread; a chat-style broadcast from every loop to every other, with and
 * without pending-send limits, delivers every accepted send in order and never
 * deadlocks; closing one server leaves another server's (and the clients') connections
 * on the same loops alone; a loop held in a callback stalls only its own connections. */
#include "testutil.h"

static unsigned g_loops;

/* Index of thread th among seen[0..*n), added when new. */
static int thread_index(pthread_t *seen, int *n, pthread_t th)
{
    for (int i = 0; i < *n; i++)
        if (pthread_equal(seen[i], th))
            return i;
    seen[*n] = th;
    return (*n)++;
}

/* ------------------------------------------------------------------ set_loop_threads */

/* Listens and dials that fail at once (a bad address, a port in use, a refused dial)
 * serve nothing: the loops do not start for them, and the count stays settable (the
 * loops "start when the first server or client starts serving"). Before: each of these
 * started them, and knet_set_loop_threads then returned KNET_EBUSY. */
static void test_failed_listen_and_dial_start_no_loops(void)
{
    knet_server *s = knet_server_new("127.0.0.1:port");
    CHECK(s != NULL);
    CHECK_EQ(knet_server_listen_and_serve(s, NULL, NULL), KNET_EADDR);
    knet_server_free(s);
    int lport, lfd = tu_listen(&lport, 0);
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", lport);
    s = knet_server_new(addr);
    CHECK(s != NULL);
    CHECK_EQ(knet_server_listen_and_serve(s, NULL, NULL), -EADDRINUSE);
    knet_server_free(s);
    close(lfd);
    int holder, rport = tu_reserve_port(&holder);
    knet_client *c = tu_client_for_port(rport); /* retry off */
    CHECK_EQ(knet_client_dial_and_serve(c, NULL, NULL), -ECONNREFUSED);
    knet_client_free(c);
    close(holder);
    CHECK_EQ(knet_set_loop_threads(g_loops), 0);
}

/* Before any start the count is settable and reported; once a server serves it is not. */
static void test_set_before_and_after_start(void)
{
    CHECK_EQ(knet_set_loop_threads(g_loops + 1), 0);
    CHECK_EQ(knet_loop_threads(), g_loops + 1);
    CHECK_EQ(knet_set_loop_threads(g_loops), 0); /* the last call counts */
    CHECK_EQ(knet_loop_threads(), g_loops);
    tu_server ts;
    CHECK_GT(tu_server_start(&ts, "127.0.0.1:0", NULL, NULL), 0);
    CHECK_EQ(knet_set_loop_threads(g_loops + 1), KNET_EBUSY);
    CHECK_EQ(knet_set_loop_threads(0), KNET_EBUSY);
    CHECK_EQ(knet_loop_threads(), g_loops);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    CHECK_EQ(knet_set_loop_threads(g_loops + 1), KNET_EBUSY); /* for the process's life */
    CHECK_EQ(knet_loop_threads(), g_loops);
}

/* ------------------------------------------------------------------ spread */

/* 4 x loops connections accepted one after another: exactly 4 on each loop; every
 * callback of each on the thread of its connect(true) (the tracker checks). */
static void test_accepts_spread_round_robin(void)
{
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int n = 4 * (int)g_loops;
    int fds[4 * 8];
    CHECK_LE(n, 32);
    for (int i = 0; i < n; i++) {
        fds[i] = tu_connect(port);
        (void)tu_tracker_rec(t, i);
    }
    pthread_t seen[32];
    int nseen = 0, per[32] = {0};
    for (int i = 0; i < n; i++)
        per[thread_index(seen, &nseen, t->recs[i].thread)]++;
    CHECK_EQ(nseen, (int)g_loops);
    for (int i = 0; i < nseen; i++)
        CHECK_EQ(per[i], 4);
    for (int i = 0; i < n; i++) {
        char b[3] = {'a', (char)i, 'z'}, r[3];
        tu_write_all(fds[i], b, 3);
        READ_EXACT(fds[i], r, 3);
        CHECK(memcmp(b, r, 3) == 0);
    }
    for (int i = 0; i < n; i++)
        close(fds[i]);
    WAIT_GE(&t->disconnects, n);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
}

/* knet clients of a knet server in this process, dialed one after another: the 2 x
 * loops connections (a client's and its accepted one each) take 2 of each loop. */
static void test_clients_and_server_share_loops(void)
{
    tu_tracker *st = tu_tracker_new(), *ct = tu_tracker_new();
    tu_server ts;
    int port = tu_tracked_server_start(&ts, st, NULL);
    int k = (int)g_loops;
    tu_client tc[8];
    knet_client *cli[8];
    knet_handler ch = tu_tracker_handler(ct);
    for (int i = 0; i < k; i++) {
        cli[i] = tu_client_for_port(port);
        tu_client_start(&tc[i], cli[i], &ch, NULL);
        WAIT_GE(&ct->connects, i + 1);
        WAIT_GE(&st->connects, i + 1);
    }
    pthread_t seen[32];
    int nseen = 0, per[32] = {0};
    for (int i = 0; i < k; i++) {
        per[thread_index(seen, &nseen, tu_tracker_rec(ct, i)->thread)]++;
        per[thread_index(seen, &nseen, tu_tracker_rec(st, i)->thread)]++;
    }
    CHECK_EQ(nseen, (int)g_loops);
    for (int i = 0; i < nseen; i++)
        CHECK_EQ(per[i], 2);
    for (int i = 0; i < k; i++) {
        CHECK_EQ(knet_client_close(cli[i]), 0);
        CHECK_EQ(tu_client_join(&tc[i]), KNET_ECLIENTCLOSED);
        knet_client_free(cli[i]);
    }
    WAIT_GE(&st->disconnects, k);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(st);
    tu_tracker_free(ct);
}

/* ------------------------------------------------------------------ broadcast */

enum { BC_MAX = 16, BC_MSGS = 200 };

/* One broadcast round: K knet clients of one knet server; each sends "hello" with its
 * id, then BC_MSGS [id][seq BE32] frames; the server's receive sends every frame to
 * every other client's connection (most of them on other loops). */
typedef struct bc_conn {
    pthread_t thread; /* of connect(true) */
    atomic_int in_cb;
    int id;           /* -1 until its hello */
} bc_conn;

typedef struct bc {
    int k;
    size_t limit; /* pending-send limit of the server's connections (0 = none) */
    pthread_mutex_t mu;
    knet_conn *by_id[BC_MAX]; /* registered server connections (under mu) */
    atomic_int registered;
    atomic_long ok[BC_MAX][BC_MAX];  /* sends from src to dst that returned 0 */
    atomic_long full;                /* KNET_EPENDINGFULL */
    atomic_long closed;              /* KNET_ECLOSED (only once the server stops) */
    bool stopping;                   /* the round shuts the server down midway */
    atomic_long other_err;
    atomic_int server_disc;
    atomic_int bad_thread;
} bc;

typedef struct bc_client {
    bc *b;
    int id;
    pthread_t thread;
    bool have_thread;
    atomic_int in_cb;
    long next[BC_MAX]; /* lowest acceptable seq per source (loop thread only) */
    atomic_long got[BC_MAX];
    atomic_int bad_order, connected;
} bc_client;

static void bc_enter(atomic_int *in_cb, pthread_t th)
{
    if (atomic_exchange(in_cb, 1) != 0)
        tu_fail(__FILE__, __LINE__, "callbacks nested or concurrent");
    if (!pthread_equal(th, pthread_self()))
        tu_fail(__FILE__, __LINE__, "callback on another thread than connect(true)");
}

static void bc_srv_connect(knet_conn *c, bool connected, void *ud)
{
    bc *b = ud;
    if (connected) {
        bc_conn *s = calloc(1, sizeof *s);
        CHECK(s != NULL);
        s->thread = pthread_self();
        s->id = -1;
        if (b->limit)
            knet_conn_set_pending_send(c, b->limit);
        knet_conn_set_userdata(c, s);
        return;
    }
    bc_conn *s = knet_conn_userdata(c);
    bc_enter(&s->in_cb, s->thread);
    pthread_mutex_lock(&b->mu);
    if (s->id >= 0 && b->by_id[s->id] == c)
        b->by_id[s->id] = NULL;
    pthread_mutex_unlock(&b->mu);
    atomic_store(&s->in_cb, 0);
    knet_conn_set_userdata(c, NULL);
    free(s);
    atomic_fetch_add(&b->server_disc, 1);
}

static void bc_srv_receive(knet_conn *c, const void *buf, size_t len, void *ud)
{
    bc *b = ud;
    bc_conn *s = knet_conn_userdata(c);
    bc_enter(&s->in_cb, s->thread);
    const uint8_t *m = buf;
    CHECK_GE(len, 1);
    int src = m[0];
    CHECK_LT(src, b->k);
    if (len == 1) { /* hello */
        s->id = src;
        pthread_mutex_lock(&b->mu);
        b->by_id[src] = c;
        pthread_mutex_unlock(&b->mu);
        atomic_fetch_add(&b->registered, 1);
    } else {
        CHECK_EQ(s->id, src);
        /* Under the registry's lock, as a chat server would: every other loop does the
         * same at the same time, so a send that waited for its connection's loop would
         * deadlock here. */
        pthread_mutex_lock(&b->mu);
        for (int d = 0; d < b->k; d++) {
            if (d == src || !b->by_id[d])
                continue;
            int rc = knet_conn_send(b->by_id[d], buf, len);
            if (rc == 0)
                atomic_fetch_add(&b->ok[src][d], 1);
            else if (rc == KNET_EPENDINGFULL)
                atomic_fetch_add(&b->full, 1);
            else if (rc == KNET_ECLOSED)
                atomic_fetch_add(&b->closed, 1);
            else
                atomic_fetch_add(&b->other_err, 1);
        }
        pthread_mutex_unlock(&b->mu);
    }
    atomic_store(&s->in_cb, 0);
}

static void bc_cli_connect(knet_conn *c, bool connected, void *ud)
{
    bc_client *cl = ud;
    if (knet_conn_userdata(c) == &cl->have_thread)
        return; /* a redial's connect(false) */
    if (connected && cl->have_thread) {
        /* A redial after the server's FIN: refused, as the listener leaves LISTEN
         * first; were it accepted, its loop would close it, no bytes. Its callbacks are
         * told apart by their userdata. */
        CHECK(cl->b->stopping);
        knet_conn_set_userdata(c, &cl->have_thread);
        return;
    }
    if (connected) {
        cl->thread = pthread_self();
        cl->have_thread = true;
        bc_enter(&cl->in_cb, cl->thread);
        uint8_t hello = (uint8_t)cl->id;
        CHECK_EQ(knet_conn_send(c, &hello, 1), 0); /* on its own loop */
        atomic_store(&cl->in_cb, 0);
        atomic_store(&cl->connected, 1);
        return;
    }
    bc_enter(&cl->in_cb, cl->thread);
    atomic_store(&cl->in_cb, 0);
}

static void bc_cli_receive(knet_conn *c, const void *buf, size_t len, void *ud)
{
    bc_client *cl = ud;
    CHECK(knet_conn_userdata(c) != &cl->have_thread); /* nothing on a redial */
    bc_enter(&cl->in_cb, cl->thread);
    const uint8_t *m = buf;
    CHECK_EQ(len, 5);
    int src = m[0];
    CHECK_LT(src, cl->b->k);
    CHECK_NE(src, cl->id);
    long seq = (long)tu_get_len(m + 1, 4, false);
    /* Strictly increasing per source: in order, no duplicate; gaps only where the
     * server's send met the limit. */
    if (seq < cl->next[src] || (!cl->b->limit && seq != cl->next[src]))
        atomic_fetch_add(&cl->bad_order, 1);
    cl->next[src] = seq + 1;
    atomic_fetch_add(&cl->got[src], 1);
    atomic_store(&cl->in_cb, 0);
}

typedef struct bc_sender {
    bc_client *cl;
    knet_client *cli;
    pthread_barrier_t *go;
} bc_sender;

static void *bc_sender_main(void *arg)
{
    bc_sender *s = arg;
    knet_conn *c = knet_client_conn(s->cli);
    CHECK(c != NULL);
    pthread_barrier_wait(s->go);
    for (uint32_t seq = 0; seq < BC_MSGS; seq++) {
        uint8_t m[5];
        m[0] = (uint8_t)s->cl->id;
        tu_put_len(m + 1, seq, 4, false);
        int rc = knet_conn_send(c, m, 5);
        if (rc == KNET_ECLOSED && s->cl->b->stopping)
            break; /* the server's FIN came: this client's connection closed */
        CHECK_EQ(rc, 0);
    }
    knet_conn_release(c);
    return NULL;
}

/* Sends the server's receive made so far, whatever they returned. */
static long bc_sends_done(bc *b)
{
    long s = atomic_load(&b->full) + atomic_load(&b->other_err) + atomic_load(&b->closed);
    for (int i = 0; i < b->k; i++)
        for (int j = 0; j < b->k; j++)
            s += atomic_load(&b->ok[i][j]);
    return s;
}

/* One chat: the server, 2 clients per loop (all registered), and a sender thread per
 * client, started together. Static: too large for a test thread's stack. */
typedef struct bc_run {
    bc b;
    bc_client cls[BC_MAX];
    tu_server ts;
    tu_client tc[BC_MAX];
    knet_client *cli[BC_MAX];
    pthread_barrier_t go;
    pthread_t th[BC_MAX];
    bc_sender snd[BC_MAX];
} bc_run;

static bc_run *bc_start(size_t limit, bool stopping)
{
    static bc_run r;
    memset(&r, 0, sizeof r);
    bc *b = &r.b;
    b->k = 2 * (int)g_loops;
    CHECK_LE(b->k, BC_MAX);
    b->limit = limit;
    b->stopping = stopping;
    pthread_mutex_init(&b->mu, NULL);
    knet_handler sh = {bc_srv_connect, bc_srv_receive, b};
    int port = tu_server_start(&r.ts, "127.0.0.1:0", &sh, &knet_std_codec);
    CHECK_GT(port, 0);
    for (int i = 0; i < b->k; i++) {
        r.cls[i].b = b;
        r.cls[i].id = i;
        knet_handler ch = {bc_cli_connect, bc_cli_receive, &r.cls[i]};
        r.cli[i] = tu_client_for_port(port);
        tu_client_start(&r.tc[i], r.cli[i], &ch, &knet_std_codec);
    }
    WAIT_UNTIL(atomic_load(&b->registered) == b->k);
    CHECK_EQ(pthread_barrier_init(&r.go, NULL, (unsigned)b->k), 0);
    for (int i = 0; i < b->k; i++) {
        r.snd[i] = (bc_sender){&r.cls[i], r.cli[i], &r.go};
        CHECK_EQ(pthread_create(&r.th[i], NULL, bc_sender_main, &r.snd[i]), 0);
    }
    return &r;
}

/* Joins the sender threads. */
static void bc_join_senders(bc_run *r)
{
    for (int i = 0; i < r->b.k; i++)
        CHECK_EQ(pthread_join(r->th[i], NULL), 0);
    pthread_barrier_destroy(&r->go);
}

/* What arrived: checks that every send that returned 0 arrived, in order per source;
 * returns the frames delivered. */
static long bc_delivered(bc_run *r)
{
    long delivered = 0;
    for (int d = 0; d < r->b.k; d++) {
        CHECK_EQ(atomic_load(&r->cls[d].bad_order), 0);
        for (int s = 0; s < r->b.k; s++) {
            CHECK_EQ(atomic_load(&r->cls[d].got[s]), atomic_load(&r->b.ok[s][d]));
            delivered += atomic_load(&r->cls[d].got[s]);
        }
    }
    return delivered;
}

static void broadcast_round(size_t limit)
{
    bc_run *r = bc_start(limit, false);
    bc *b = &r->b;
    bc_join_senders(r);

    /* Every frame reached the server and was broadcast: (k - 1) sends each. */
    long want = (long)b->k * BC_MSGS * (b->k - 1);
    WAIT_UNTIL(bc_sends_done(b) == want);
    CHECK_EQ(atomic_load(&b->other_err), 0);
    CHECK_EQ(atomic_load(&b->closed), 0);
    /* Every send that returned 0 arrives, in order. */
    for (int d = 0; d < b->k; d++)
        for (int s = 0; s < b->k; s++)
            WAIT_UNTIL(atomic_load(&r->cls[d].got[s]) == atomic_load(&b->ok[s][d]));
    long delivered = bc_delivered(r);
    if (!limit)
        CHECK_EQ(delivered, want);
    CHECK_GT(delivered, 0);
    printf("    %d conns on %u loops, limit %zu: %ld delivered, %ld refused (pending full)\n", b->k,
           g_loops, limit, delivered, atomic_load(&b->full));

    for (int i = 0; i < b->k; i++) {
        CHECK_EQ(knet_client_close(r->cli[i]), 0);
        CHECK_EQ(tu_client_join(&r->tc[i]), KNET_ECLIENTCLOSED);
        knet_client_free(r->cli[i]);
    }
    WAIT_UNTIL(atomic_load(&b->server_disc) == b->k);
    CHECK_EQ(tu_server_stop(&r->ts), KNET_ESERVERCLOSED);
    pthread_mutex_destroy(&b->mu);
}

/* The chat of broadcast_round while knet_server_shutdown comes midway: every broadcast
 * send that returned 0 — made on any loop, to a connection of any loop, before the
 * shutdown or racing it — reaches its client before the server's FIN, in order; later
 * ones return KNET_ECLOSED. */
static void test_broadcast_races_server_shutdown(void)
{
    bc_run *r = bc_start(0, true);
    bc *b = &r->b;
    long want = (long)b->k * BC_MSGS * (b->k - 1);
    WAIT_UNTIL(bc_sends_done(b) >= want / 4);
    CHECK_EQ(knet_server_shutdown(r->ts.srv, 10000), 0);
    bc_join_senders(r);
    /* Each client reads to the server's FIN, then its connection ends; the redial is refused. */
    for (int i = 0; i < b->k; i++) {
        int rc = tu_client_join(&r->tc[i]);
        CHECK(rc == -ECONNREFUSED || rc == -ECONNRESET);
        knet_client_free(r->cli[i]);
    }
    CHECK_EQ(tu_server_join(&r->ts), KNET_ESERVERCLOSED);
    CHECK_EQ(atomic_load(&b->other_err), 0);
    long delivered = bc_delivered(r);
    CHECK_GE(delivered, want / 4);
    printf("    %d conns on %u loops: %ld delivered, %ld refused after the shutdown\n", b->k, g_loops,
           delivered, atomic_load(&b->closed));
    pthread_mutex_destroy(&b->mu);
}

static void test_broadcast_every_loop(void)
{
    broadcast_round(0);
}

static void test_broadcast_every_loop_pending_limit(void)
{
    broadcast_round(2);
}

/* ------------------------------------------------------------------ two servers */

/* Two servers with knet clients, all on the same loops: closing one closes only its
 * own connections (reason KNET_ESERVERCLOSED); the other's keep echoing; then a
 * graceful shutdown of the other delivers what it queued before its FIN. */
static void test_close_one_server_of_two(void)
{
    tu_tracker *s1 = tu_tracker_new(), *s2 = tu_tracker_new(), *c2 = tu_tracker_new();
    s2->echo = true;
    tu_server ts1, ts2;
    int p1 = tu_tracked_server_start(&ts1, s1, NULL);
    int p2 = tu_tracked_server_start(&ts2, s2, NULL);
    int k = (int)g_loops;
    int fds1[8];
    tu_client tc[8];
    knet_client *cli[8];
    knet_handler ch = tu_tracker_handler(c2);
    for (int i = 0; i < k; i++) {
        fds1[i] = tu_connect(p1);
        cli[i] = tu_client_for_port(p2);
        tu_client_start(&tc[i], cli[i], &ch, NULL);
    }
    WAIT_GE(&s1->connects, k);
    WAIT_GE(&s2->connects, k);
    WAIT_GE(&c2->connects, k);
    CHECK_EQ(knet_server_close(ts1.srv), 0);
    for (int i = 0; i < k; i++)
        EXPECT_PEER_CLOSED(fds1[i]);
    WAIT_GE(&s1->disconnects, k);
    for (int i = 0; i < k; i++)
        CHECK_EQ(atomic_load(&s1->recs[i].reason), KNET_ESERVERCLOSED);
    CHECK_EQ(tu_server_join(&ts1), KNET_ESERVERCLOSED);
    /* The other server's connections and its clients' are untouched. */
    CHECK_EQ(tu_counter_get(&s2->disconnects), 0);
    CHECK_EQ(tu_counter_get(&c2->disconnects), 0);
    for (int i = 0; i < k; i++) {
        knet_conn *c = knet_client_conn(cli[i]);
        CHECK(c != NULL);
        CHECK_EQ(knet_conn_send(c, "ping", 4), 0);
        knet_conn_release(c);
    }
    WAIT_GE(&c2->bytes, 4 * k); /* echoed */
    CHECK_EQ(knet_server_shutdown(ts2.srv, 10000), 0);
    /* Each client sees the FIN; its connection ends; with retry off the redial is refused. */
    for (int i = 0; i < k; i++) {
        int rc = tu_client_join(&tc[i]);
        CHECK(rc == -ECONNREFUSED || rc == -ECONNRESET || rc == KNET_ESERVERCLOSED);
        knet_client_free(cli[i]);
    }
    CHECK_EQ(tu_server_join(&ts2), KNET_ESERVERCLOSED);
    for (int i = 0; i < k; i++)
        close(fds1[i]);
    tu_tracker_free(s1);
    tu_tracker_free(s2);
    tu_tracker_free(c2);
}

/* ------------------------------------------------------------------ a held loop */

static tu_counter hold_release; /* 1: let go */
static tu_counter held;         /* loops held */

/* On "H": holds its loop until the test lets go (bounded). */
static void hook_hold(tu_rec *r, const void *buf, size_t len)
{
    (void)r;
    if (len != 1 || ((const char *)buf)[0] != 'H')
        return;
    tu_counter_add(&held, 1);
    CHECK(tu_counter_wait_ge(&hold_release, 1, TU_DEADLINE_MS));
}

/* A loop held in a callback stalls its own connections only: another loop's
 * connection goes on echoing, sends to a connection of the held loop return at once,
 * and its bytes go out once the loop is let go. */
static void test_held_loop_stalls_only_itself(void)
{
    tu_tracker *t = tu_tracker_new();
    t->echo = true;
    t->on_receive = hook_hold;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int n = 2 * (int)g_loops;
    int fds[16];
    for (int i = 0; i < n; i++) {
        fds[i] = tu_connect(port);
        (void)tu_tracker_rec(t, i);
    }
    /* The held connection is 0; a connection on the same loop, and one on another. */
    int same = -1, other = -1;
    for (int i = 1; i < n; i++) {
        bool eq = pthread_equal(t->recs[i].thread, t->recs[0].thread);
        if (eq && same < 0)
            same = i;
        if (!eq && other < 0)
            other = i;
    }
    CHECK_GT(same, 0);
    CHECK_GT(other, 0);
    tu_counter_init(&hold_release);
    tu_counter_init(&held);
    char hb = 'H';
    tu_write_all(fds[0], &hb, 1);
    WAIT_GE(&held, 1);
    for (int r = 0; r < 50; r++) {
        char b[2] = {'q', (char)r}, got[2];
        tu_write_all(fds[other], b, 2);
        READ_EXACT(fds[other], got, 2);
        CHECK(memcmp(b, got, 2) == 0);
    }
    for (int r = 0; r < 100; r++)
        CHECK_EQ(knet_conn_send(t->recs[same].conn, "s", 1), 0);
    CHECK_EQ(atomic_load(&t->recs[same].rx_msgs), 0);
    tu_counter_add(&hold_release, 1);
    char buf[101];
    READ_EXACT(fds[0], buf, 1); /* the echo of 'H' */
    READ_EXACT(fds[same], buf, 100);
    for (int i = 0; i < n; i++)
        close(fds[i]);
    WAIT_GE(&t->disconnects, n);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
    tu_counter_destroy(&hold_release);
    tu_counter_destroy(&held);
}

/* knet_server_close and _shutdown take the port out of LISTEN before they return,
 * before any connection closes: a client that re-dials as its connection ends is
 * refused. Were the listener still open (its close waits for its loop), the kernel
 * could complete that dial and the listener's close then drop it silently, leaving the
 * client connected to nothing for good (seen: a knet client's re-dial hanging a test).
 * Here every loop is held, so nothing of the stop has run on a loop yet. */
static void stop_stops_listening_at_once(bool graceful)
{
    tu_tracker *t = tu_tracker_new();
    t->on_receive = hook_hold;
    tu_counter_init(&hold_release);
    tu_counter_init(&held);
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    int n = (int)g_loops; /* one per loop: accepts go round-robin */
    int fds[8];
    for (int i = 0; i < n; i++)
        fds[i] = tu_connect(port);
    WAIT_GE(&t->connects, n);
    for (int i = 0; i < n; i++)
        tu_write_all(fds[i], "H", 1);
    WAIT_GE(&held, n);
    CHECK_EQ(graceful ? knet_server_shutdown(ts.srv, 10000) : knet_server_close(ts.srv), 0);
    int fd = tu_try_connect_ex(port, 0);
    if (fd >= 0)
        close(fd);
    CHECK_EQ(fd, -ECONNREFUSED);
    tu_counter_add(&hold_release, 1);
    for (int i = 0; i < n; i++) /* a graceful close waits for its peer's */
        close(fds[i]);
    WAIT_GE(&t->disconnects, n);
    CHECK_EQ(tu_server_join(&ts), KNET_ESERVERCLOSED);
    tu_tracker_free(t);
    tu_counter_destroy(&hold_release);
    tu_counter_destroy(&held);
}

static void test_close_stops_listening_at_once(void)
{
    stop_stops_listening_at_once(false);
}

static void test_shutdown_stops_listening_at_once(void)
{
    stop_stops_listening_at_once(true);
}

/* ------------------------------------------------------------------ chat churn */

/* A raw chat server (each read goes to every other connection) while peers on 8
 * threads connect, write, read a little and close (some with a reset), then a server
 * close with connections on every loop: every send returns 0, KNET_EPENDINGFULL,
 * KNET_ECLOSED, or (a direct write on its own loop to a peer that reset) -EPIPE or
 * -ECONNRESET; every connect(true) gets its connect(false) (the tracker checks thread
 * and order); nothing is left. TSan-clean. */
enum { CH_MAX = 64 };
static pthread_mutex_t ch_mu = PTHREAD_MUTEX_INITIALIZER;
static knet_conn *ch_members[CH_MAX];
static atomic_long ch_bad_rc, ch_sent;

static void ch_connect(tu_rec *r, bool connected)
{
    pthread_mutex_lock(&ch_mu);
    for (int i = 0; i < CH_MAX; i++) {
        if (connected && !ch_members[i]) {
            ch_members[i] = r->conn;
            knet_conn_set_pending_send(r->conn, 8);
            break;
        }
        if (!connected && ch_members[i] == r->conn) {
            ch_members[i] = NULL;
            break;
        }
    }
    pthread_mutex_unlock(&ch_mu);
}

static void ch_receive(tu_rec *r, const void *buf, size_t len)
{
    pthread_mutex_lock(&ch_mu);
    for (int i = 0; i < CH_MAX; i++) {
        if (!ch_members[i] || ch_members[i] == r->conn)
            continue;
        int rc = knet_conn_send(ch_members[i], buf, len);
        if (rc == 0)
            atomic_fetch_add(&ch_sent, 1);
        else if (rc != KNET_EPENDINGFULL && rc != KNET_ECLOSED && rc != -EPIPE && rc != -ECONNRESET) {
            fprintf(stderr, "broadcast send: %d (%s)\n", rc, knet_strerror(rc));
            atomic_fetch_add(&ch_bad_rc, 1);
        }
    }
    pthread_mutex_unlock(&ch_mu);
}

typedef struct ch_peer {
    int port, id;
    int kept; /* a connection left open for the server close */
} ch_peer;

static void *ch_peer_main(void *arg)
{
    ch_peer *p = arg;
    for (int round = 0; round < 6; round++) {
        int fd = tu_connect(p->port);
        char msg[32];
        int n = snprintf(msg, sizeof msg, "peer %d round %d;", p->id, round);
        for (int i = 0; i < 20; i++)
            tu_write_all(fd, msg, (size_t)n);
        char buf[4096];
        struct timeval tv = {0, 20000}; /* read what came within 20 ms: any amount will do */
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        (void)recv(fd, buf, sizeof buf, 0);
        if ((round + p->id) % 3 == 0)
            tu_set_linger0(fd); /* a reset */
        if (round == 5) {
            p->kept = fd;
            break;
        }
        close(fd);
    }
    return NULL;
}

static void test_chat_churn_then_server_close(void)
{
    tu_tracker *t = tu_tracker_new();
    t->on_connect = ch_connect;
    t->on_receive = ch_receive;
    tu_server ts;
    int port = tu_tracked_server_start(&ts, t, NULL);
    enum { PEERS = 8 };
    pthread_t th[PEERS];
    ch_peer peers[PEERS];
    for (int i = 0; i < PEERS; i++) {
        peers[i] = (ch_peer){port, i, -1};
        CHECK_EQ(pthread_create(&th[i], NULL, ch_peer_main, &peers[i]), 0);
    }
    for (int i = 0; i < PEERS; i++)
        CHECK_EQ(pthread_join(th[i], NULL), 0);
    WAIT_GE(&t->connects, PEERS * 6);
    WAIT_GE(&t->disconnects, PEERS * 5);
    CHECK_EQ(tu_server_stop(&ts), KNET_ESERVERCLOSED);
    CHECK_EQ(tu_counter_get(&t->disconnects), tu_counter_get(&t->connects));
    CHECK_EQ(atomic_load(&ch_bad_rc), 0);
    for (int i = 0; i < PEERS * 6; i++)
        CHECK_EQ(atomic_load(&t->recs[i].disconnected), 1);
    printf("    %ld broadcast sends accepted\n", atomic_load(&ch_sent));
    for (int i = 0; i < PEERS; i++)
        close(peers[i].kept);
    for (int i = 0; i < CH_MAX; i++)
        CHECK(ch_members[i] == NULL);
    tu_tracker_free(t);
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    g_loops = argc > 1 ? (unsigned)atoi(argv[1]) : 2;
    CHECK(g_loops >= 2 && g_loops <= 8);
    RUN(test_failed_listen_and_dial_start_no_loops); /* before anything starts the loops */
    RUN(test_set_before_and_after_start); /* before tu_begin, whose warm-up starts the loops */
    tu_begin();
    RUN(test_accepts_spread_round_robin);
    RUN(test_clients_and_server_share_loops);
    RUN(test_broadcast_every_loop);
    RUN(test_broadcast_every_loop_pending_limit);
    RUN(test_broadcast_races_server_shutdown);
    RUN(test_close_one_server_of_two);
    RUN(test_held_loop_stalls_only_itself);
    RUN(test_close_stops_listening_at_once);
    RUN(test_shutdown_stops_listening_at_once);
    RUN(test_chat_churn_then_server_close);
    return tu_end();
}
