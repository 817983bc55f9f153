/* A queue engine's thread, its hand-off to Python and its interrupts: see engine.h. */
#define _GNU_SOURCE
#include "engine.h"
#include "irq.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

struct deferred {               /* a chain Python handles */
    struct deferred *next;
    struct kvq_chain chain;     /* bufs point just past this struct */
};

struct kveng {
    struct kvq *q;
    kveng_serve_fn serve;
    kveng_drop_fn drop;
    void *dev;
    int kick_fd;                /* the queue's ioeventfd */
    pthread_t thread;
    pthread_mutex_t lock;       /* everything below but irq, and the device's counters (engine.h) */
    pthread_cond_t cond;        /* pause_req, paused and stop changed */
    int ctl_fd;                 /* eventfd: wakes the thread to pause or stop */
    int event_fd;               /* eventfd: Python has work */
    int stop, pause_req, paused;
    uint64_t poll_ns;           /* adaptive polling bound, 0: off (atomic) */
    uint64_t poll_window;       /* the thread's current polling time, 0..poll_ns */
    struct kvirq irq;           /* the interrupt (irq.c): atomics, no lock */
    struct deferred *waiting;   /* popped, not yet taken by Python (oldest first) */
    struct deferred **waiting_tail;
    struct deferred *taken;     /* taken by Python, not yet completed */
    uint32_t outstanding;       /* waiting + taken, at most the queue size */
    struct kvq_chain chain;     /* the thread's scratch chain */
    struct kveng_stats stats;
    char broken[KVQ_ERROR_LEN];
};

static void interrupt(struct kveng *e)
{
    if (kvirq_raise(&e->irq))
        e->stats.interrupts++;
}

void kveng_set_masked(struct kveng *e, int masked)
{
    kvirq_set_masked(&e->irq, masked);
}

uint32_t kveng_take_isr(struct kveng *e)
{
    return kvirq_take_isr(&e->irq);
}

/* -- serving the queue (the thread, lock held) -------------------------------------------- */

static void defer(struct kveng *e, const struct kvq_chain *c)
{
    uint32_t n = c->nread + c->nwrite;
    /* A driver has at most ``size`` chains in flight; more is a driver
     * resubmitting heads, and is failed rather than queued without bound. */
    struct deferred *d = e->outstanding < e->q->size
        ? malloc(sizeof *d + n * sizeof(struct kvq_buf)) : NULL;
    if (!d) {
        e->stats.dropped++;
        kvq_push(e->q, c->head, e->drop ? e->drop(e, c) : 0);
        return;
    }
    d->chain = *c;
    d->chain.bufs = (struct kvq_buf *)(d + 1);
    memcpy(d->chain.bufs, c->bufs, n * sizeof(struct kvq_buf));
    d->next = NULL;
    *e->waiting_tail = d;
    e->waiting_tail = &d->next;
    e->outstanding++;
    e->stats.deferred++;
    kvirq_signal_fd(e->event_fd);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Serve everything available. */
static void process(struct kveng *e)
{
    struct kvq *q = e->q;
    int rc = 0;
    uint64_t start = now_ns();
    do {
        kvq_disable_notifications(q);
        uint32_t written;
        while ((rc = kvq_pop(q, &e->chain)) == 1) {
            if (e->serve(e, &e->chain, &written) == KVENG_DEFER)
                defer(e, &e->chain);
            else
                kvq_push(q, e->chain.head, written);
        }
    } while (rc == 0 && kvq_enable_notifications(q));
    if (kvq_should_notify(q))
        interrupt(e);
    if (rc < 0 && !e->broken[0]) {
        snprintf(e->broken, sizeof e->broken, "%s", q->error[0] ? q->error : "queue broken");
        kvirq_signal_fd(e->event_fd);
    }
    e->stats.busy_ns += now_ns() - start;
}

static void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Adaptive polling (kveng_set_poll_ns).  The thread polls for a window of
 * 0..poll_ns that follows what the driver does, much as QEMU's
 * aio-poll-grow/shrink: a kick that comes sooner after the thread went to
 * sleep than the bound would have been caught by polling, so the window
 * doubles (from bound/8 when it was 0, up to the bound); a window that ends
 * with nothing found halves (to 0, no polling, below 1 µs).  A driver that
 * keeps the queue busy gets polled; one that does not costs nothing. */
static void adapt_to_sleep(struct kveng *e, uint64_t slept)
{
    uint64_t bound = __atomic_load_n(&e->poll_ns, __ATOMIC_RELAXED);
    if (e->poll_window > bound)
        e->poll_window = bound;
    if (bound && slept < bound) {
        uint64_t w = e->poll_window ? 2 * e->poll_window : bound / 8;
        e->poll_window = w < bound ? (w ? w : 1) : bound;
    }
}

/* After process(), lock held: spin on avail.idx for the window with
 * notifications off and the lock released (Python's hand-off and completions
 * go on meanwhile), serve what turns up and start the window again; at the
 * end, notifications go back on through process(), which serves anything
 * that raced in.  A pause or stop ends the polling: a chain that arrived
 * unkicked then gets a kick of our own, so it is served once the thread runs
 * again. */
static void poll_queue(struct kveng *e)
{
    uint64_t window = e->poll_window;
    if (!window || e->broken[0] || e->stop || e->pause_req)
        return;
    struct kvq *q = e->q;
    uint64_t start = now_ns(), deadline = start + window;
    kvq_disable_notifications(q);
    for (;;) {
        int found;
        pthread_mutex_unlock(&e->lock);
        while (!(found = kvq_has_available(q)) && now_ns() < deadline
               && !__atomic_load_n(&e->stop, __ATOMIC_RELAXED)
               && !__atomic_load_n(&e->pause_req, __ATOMIC_RELAXED))
            cpu_relax();
        pthread_mutex_lock(&e->lock);
        if (!found || e->stop || e->pause_req || e->broken[0])
            break;
        e->stats.polled++;
        e->stats.poll_ns += now_ns() - start;
        process(e);                             /* ends with notifications on */
        start = now_ns();
        deadline = start + window;
        kvq_disable_notifications(q);
    }
    uint64_t end = now_ns();
    e->stats.poll_ns += end - start;
    if (end >= deadline)                        /* a whole window for nothing: shrink */
        e->poll_window = window / 2 >= 1000 ? window / 2 : 0;
    if (e->stop || e->pause_req) {
        if (kvq_enable_notifications(q))
            kvirq_signal_fd(e->kick_fd);
    } else if (!e->broken[0]) {
        process(e);
    }
}

/* The thread holds the lock except in poll(), while polling the avail ring,
 * and (paused) in pthread_cond_wait(). */
static void *run(void *arg)
{
    struct kveng *e = arg;
    struct pollfd fds[3] = {
        {.fd = e->ctl_fd, .events = POLLIN},
        {.fd = e->kick_fd, .events = POLLIN},
        {.fd = e->irq.resample_fd, .events = POLLIN},  /* poll ignores a negative fd */
    };
    pthread_mutex_lock(&e->lock);
    process(e);                                 /* chains made available before we started */
    for (;;) {
        while (e->pause_req && !e->stop) {
            e->paused = 1;
            pthread_cond_broadcast(&e->cond);
            pthread_cond_wait(&e->cond, &e->lock);
        }
        e->paused = 0;
        if (e->stop)
            break;
        pthread_mutex_unlock(&e->lock);
        uint64_t slept = now_ns();
        int n = poll(fds, 3, -1);
        slept = now_ns() - slept;
        pthread_mutex_lock(&e->lock);
        if (n < 0)
            continue;                           /* EINTR */
        if (fds[0].revents)
            kvirq_drain_fd(e->ctl_fd);
        if (e->stop || e->pause_req)
            continue;                           /* the kick stays counted in its eventfd */
        if (fds[2].revents & POLLIN)            /* INTx EOI: still pending? assert again */
            kvirq_resample(&e->irq);
        if (fds[1].revents & POLLIN) {
            kvirq_drain_fd(e->kick_fd);
            if (!e->broken[0]) {
                process(e);
                adapt_to_sleep(e, slept);
                poll_queue(e);
            }
        }
    }
    e->paused = 0;
    pthread_mutex_unlock(&e->lock);
    return NULL;
}

/* -- starting and stopping ----------------------------------------------------------------- */

static void free_list(struct deferred *d)
{
    while (d) {
        struct deferred *next = d->next;
        free(d);
        d = next;
    }
}

static void free_engine(struct kveng *e)
{
    if (e->ctl_fd >= 0)
        close(e->ctl_fd);
    if (e->event_fd >= 0)
        close(e->event_fd);
    free_list(e->waiting);
    free_list(e->taken);
    free(e->chain.bufs);
    free(e->dev);
    free(e);
}

struct kveng *kveng_start(struct kvq *q, int kick_fd, int irq_fd, int resample_fd,
                          kveng_serve_fn serve, kveng_drop_fn drop, void *dev,
                          const char *name, const char *what, char *err, size_t errlen)
{
    struct kveng *e = dev ? calloc(1, sizeof *e) : NULL;
    if (!e) {
        snprintf(err, errlen, "out of memory");
        free(dev);
        return NULL;
    }
    e->q = q;
    e->serve = serve;
    e->drop = drop;
    e->dev = dev;
    e->kick_fd = kick_fd;
    e->irq.irq_fd = irq_fd;
    e->irq.resample_fd = resample_fd;
    e->waiting_tail = &e->waiting;
    e->chain.bufs = calloc(q->size, sizeof(struct kvq_buf));
    e->ctl_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    e->event_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (!e->chain.bufs || e->ctl_fd < 0 || e->event_fd < 0) {
        snprintf(err, errlen, "cannot set up the %s engine: %s", what, strerror(errno));
        free_engine(e);
        return NULL;
    }
    pthread_mutex_init(&e->lock, NULL);
    pthread_cond_init(&e->cond, NULL);
    int rc = pthread_create(&e->thread, NULL, run, e);
    if (rc) {
        snprintf(err, errlen, "cannot start the %s thread: %s", what, strerror(rc));
        pthread_cond_destroy(&e->cond);
        pthread_mutex_destroy(&e->lock);
        free_engine(e);
        return NULL;
    }
    pthread_setname_np(e->thread, name);
    return e;
}

void kveng_stop(struct kveng *e)
{
    pthread_mutex_lock(&e->lock);
    e->stop = 1;
    pthread_cond_broadcast(&e->cond);
    pthread_mutex_unlock(&e->lock);
    kvirq_signal_fd(e->ctl_fd);
    pthread_join(e->thread, NULL);
    pthread_cond_destroy(&e->cond);
    pthread_mutex_destroy(&e->lock);
    free_engine(e);
}

void *kveng_device(struct kveng *e)
{
    return e->dev;
}

void kveng_set_poll_ns(struct kveng *e, uint64_t ns)
{
    __atomic_store_n(&e->poll_ns, ns, __ATOMIC_RELAXED);
}

/* -- Python's side (any thread but the engine's) ------------------------------------------- */

void kveng_pause(struct kveng *e)
{
    pthread_mutex_lock(&e->lock);
    e->pause_req = 1;
    kvirq_signal_fd(e->ctl_fd);
    while (!e->paused && !e->stop)
        pthread_cond_wait(&e->cond, &e->lock);
    pthread_mutex_unlock(&e->lock);
}

void kveng_resume(struct kveng *e)
{
    pthread_mutex_lock(&e->lock);
    e->pause_req = 0;
    pthread_cond_broadcast(&e->cond);
    pthread_mutex_unlock(&e->lock);
}

int kveng_event_fd(struct kveng *e)
{
    return e->event_fd;
}

int kveng_take_deferred(struct kveng *e, struct kvq_chain *out, int max)
{
    int n = 0;
    pthread_mutex_lock(&e->lock);
    kvirq_drain_fd(e->event_fd);
    while (n < max && e->waiting) {
        struct deferred *d = e->waiting;
        e->waiting = d->next;
        if (!e->waiting)
            e->waiting_tail = &e->waiting;
        d->next = e->taken;
        e->taken = d;
        out[n++] = d->chain;
    }
    if (e->waiting)
        kvirq_signal_fd(e->event_fd);
    pthread_mutex_unlock(&e->lock);
    return n;
}

int kveng_complete(struct kveng *e, uint32_t head, uint32_t written)
{
    pthread_mutex_lock(&e->lock);
    struct deferred **pp = &e->taken;
    while (*pp && (*pp)->chain.head != head)
        pp = &(*pp)->next;
    struct deferred *d = *pp;
    if (!d) {
        pthread_mutex_unlock(&e->lock);
        return -1;
    }
    *pp = d->next;
    free(d);
    e->outstanding--;
    kvq_push(e->q, head, written);
    if (kvq_should_notify(e->q))
        interrupt(e);
    pthread_mutex_unlock(&e->lock);
    return 0;
}

int kveng_broken(struct kveng *e, char *msg, size_t len)
{
    pthread_mutex_lock(&e->lock);
    int broken = e->broken[0] != 0;
    if (broken && len)
        snprintf(msg, len, "%s", e->broken);
    pthread_mutex_unlock(&e->lock);
    return broken;
}

void kveng_get_stats(struct kveng *e, struct kveng_stats *out,
                     void *dev_out, const void *dev_stats, size_t len)
{
    pthread_mutex_lock(&e->lock);
    *out = e->stats;
    if (len)
        memcpy(dev_out, dev_stats, len);
    pthread_mutex_unlock(&e->lock);
}
