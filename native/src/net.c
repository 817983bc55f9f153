/* virtio-net's transmit queue in a C thread: see net.h. */
#define _GNU_SOURCE
#include "net.h"
#include "irq.h"

#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define HDR_SIZE 12u
#define MIN_FRAME 14u                   /* an Ethernet header */
#define HDR_F_NEEDS_CSUM 1u
#define GSO_TCPV4 1u
#define GSO_UDP 3u
#define GSO_TCPV6 4u
#define GSO_ECN 0x80u
#define F_CSUM 0
#define F_HOST_TSO4 11
#define F_HOST_TSO6 12
#define F_HOST_ECN 13
#define F_HOST_UFO 14

struct deferred {               /* a chain Python handles */
    struct deferred *next;
    struct kvq_chain chain;     /* bufs point just past this struct */
};

struct kvnet_tx {
    struct kvq *q;
    struct kvnet_tx_config cfg;
    pthread_t thread;
    pthread_mutex_t lock;       /* the ring, the deferred lists, pausing */
    pthread_cond_t cond;
    int ctl_fd;                 /* eventfd: wakes the thread to pause or stop */
    int event_fd;               /* eventfd: Python has work */
    int stop, pause_req, paused;
    struct kvirq irq;
    struct deferred *waiting;   /* popped, not yet taken by Python (oldest first) */
    struct deferred **waiting_tail;
    struct deferred *taken;     /* taken by Python, not yet completed */
    uint32_t outstanding;       /* waiting + taken */
    struct kvq_chain chain;     /* the thread's scratch chain */
    struct iovec *iov;          /* the header, then one per queue entry */
    struct kvnet_tx_stats stats;
    char broken[KVQ_ERROR_LEN];
};

static void interrupt(struct kvnet_tx *t)
{
    if (kvirq_raise(&t->irq))
        t->stats.interrupts++;
}

void kvnet_tx_set_masked(struct kvnet_tx *t, int masked)
{
    kvirq_set_masked(&t->irq, masked);
}

uint32_t kvnet_tx_take_isr(struct kvnet_tx *t)
{
    return kvirq_take_isr(&t->irq);
}

/* -- frames ------------------------------------------------------------------------------ */

/* Copy ``len`` bytes from the start of the chain's readable buffers. */
static int gather(const struct kvq_chain *c, void *dst, size_t len)
{
    uint8_t *out = dst;
    for (uint32_t i = 0; i < c->nread && len; i++) {
        size_t take = c->bufs[i].len < len ? c->bufs[i].len : len;
        memcpy(out, c->bufs[i].hva, take);
        out += take;
        len -= take;
    }
    return len ? -1 : 0;
}

static int has(const struct kvnet_tx *t, int bit)
{
    return (t->cfg.features >> bit) & 1;
}

static uint16_t le16(const uint8_t *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

/* Whether a frame of ``size`` bytes behind the guest's header ``raw`` may go
 * to the tap, by the rules of the Python model (VirtioNet._tx_problem and the
 * size limits of _send); if so, ``out`` is the header the tap gets. */
static int check_header(const struct kvnet_tx *t, const uint8_t *raw, uint64_t size, uint8_t *out)
{
    uint8_t flags = raw[0], gso_type = raw[1];
    memset(out, 0, HDR_SIZE);
    if (flags == 0 && gso_type == 0)                    /* no offload: the usual case */
        return size <= t->cfg.plain_limit;
    int needs_csum = flags & HDR_F_NEEDS_CSUM;
    uint16_t gso_size = le16(raw + 4), csum_start = le16(raw + 6), csum_offset = le16(raw + 8);
    if (needs_csum) {
        if (!has(t, F_CSUM))
            return 0;
        if ((uint64_t)csum_start + csum_offset + 2 > size)
            return 0;
    }
    unsigned gso = gso_type & ~GSO_ECN;
    if (gso) {
        int need = gso == GSO_TCPV4 ? F_HOST_TSO4 : gso == GSO_TCPV6 ? F_HOST_TSO6
                 : gso == GSO_UDP ? F_HOST_UFO : -1;
        if (need < 0 || !has(t, need))
            return 0;
        if (gso_type & GSO_ECN && !has(t, F_HOST_ECN))
            return 0;
        if (!needs_csum || gso_size == 0)
            return 0;
    } else if (gso_type) {
        return 0;
    }
    if (size > (gso ? t->cfg.gso_limit : t->cfg.plain_limit))
        return 0;
    out[0] = (uint8_t)needs_csum;                       /* DATA_VALID is not the tap's */
    memcpy(out + 1, raw + 1, 9);                        /* gso_type .. csum_offset; num_buffers 0 */
    return 1;
}

enum outcome { SENT, DEFER };

static enum outcome transmit(struct kvnet_tx *t, const struct kvq_chain *c)
{
    if (c->read_len < HDR_SIZE + MIN_FRAME)
        return DEFER;                                   /* a runt: Python counts it */
    uint64_t size = c->read_len - HDR_SIZE;
    uint8_t raw[HDR_SIZE], hdr[HDR_SIZE];
    if (gather(c, raw, HDR_SIZE) < 0 || !check_header(t, raw, size, hdr))
        return DEFER;
    if (c->nread + 1 > IOV_MAX)
        return DEFER;                                   /* writev cannot take it: Python says why */
    t->iov[0].iov_base = hdr;
    t->iov[0].iov_len = HDR_SIZE;
    int n = 1;
    uint64_t skip = HDR_SIZE;
    for (uint32_t i = 0; i < c->nread; i++) {
        uint64_t blen = c->bufs[i].len;
        if (skip >= blen) {
            skip -= blen;
            continue;
        }
        t->iov[n].iov_base = c->bufs[i].hva + skip;
        t->iov[n].iov_len = blen - skip;
        n++;
        skip = 0;
    }
    while (writev(t->cfg.tap_fd, t->iov, n) < 0) {
        if (errno == EINTR)
            continue;
        t->stats.write_errors++;                        /* EAGAIN too: Python retries once, */
        return DEFER;                                   /* then counts tx_errors */
    }
    t->stats.tx_frames++;
    t->stats.tx_bytes += size;
    return SENT;
}

static void defer(struct kvnet_tx *t, const struct kvq_chain *c)
{
    uint32_t n = c->nread + c->nwrite;
    /* A driver has at most ``size`` chains in flight; more is a driver
     * resubmitting heads, and is dropped rather than queued without bound. */
    struct deferred *d = t->outstanding < t->q->size
        ? malloc(sizeof *d + n * sizeof(struct kvq_buf)) : NULL;
    if (!d) {
        t->stats.dropped++;
        kvq_push(t->q, c->head, 0);
        return;
    }
    d->chain = *c;
    d->chain.bufs = (struct kvq_buf *)(d + 1);
    memcpy(d->chain.bufs, c->bufs, n * sizeof(struct kvq_buf));
    d->next = NULL;
    *t->waiting_tail = d;
    t->waiting_tail = &d->next;
    t->outstanding++;
    t->stats.deferred++;
    kvirq_signal_fd(t->event_fd);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Send everything available; called with the lock held. */
static void process(struct kvnet_tx *t)
{
    struct kvq *q = t->q;
    int rc = 0;
    uint64_t start = now_ns();
    do {
        kvq_disable_notifications(q);
        while ((rc = kvq_pop(q, &t->chain)) == 1) {
            if (transmit(t, &t->chain) == DEFER)
                defer(t, &t->chain);
            else
                kvq_push(q, t->chain.head, 0);
        }
    } while (rc == 0 && kvq_enable_notifications(q));
    if (kvq_should_notify(q))
        interrupt(t);
    if (rc < 0 && !t->broken[0]) {
        snprintf(t->broken, sizeof t->broken, "%s", q->error[0] ? q->error : "queue broken");
        kvirq_signal_fd(t->event_fd);
    }
    t->stats.busy_ns += now_ns() - start;
}

/* -- the thread ------------------------------------------------------------------------- */

static void *run(void *arg)
{
    struct kvnet_tx *t = arg;
    struct pollfd fds[3] = {
        {.fd = t->ctl_fd, .events = POLLIN},
        {.fd = t->cfg.kick_fd, .events = POLLIN},
        {.fd = t->cfg.resample_fd, .events = POLLIN},  /* poll ignores a negative fd */
    };
    pthread_mutex_lock(&t->lock);
    process(t);                                 /* chains made available before we started */
    for (;;) {
        while (t->pause_req && !t->stop) {
            t->paused = 1;
            pthread_cond_broadcast(&t->cond);
            pthread_cond_wait(&t->cond, &t->lock);
        }
        t->paused = 0;
        if (t->stop)
            break;
        pthread_mutex_unlock(&t->lock);
        int n = poll(fds, 3, -1);
        pthread_mutex_lock(&t->lock);
        if (n < 0)
            continue;                           /* EINTR */
        if (fds[0].revents)
            kvirq_drain_fd(t->ctl_fd);
        if (t->stop || t->pause_req)
            continue;                           /* the kick stays counted in its eventfd */
        if (fds[2].revents & POLLIN)            /* INTx EOI: still pending? assert again */
            kvirq_resample(&t->irq);
        if (fds[1].revents & POLLIN) {
            kvirq_drain_fd(t->cfg.kick_fd);
            if (!t->broken[0])
                process(t);
        }
    }
    t->paused = 0;
    pthread_mutex_unlock(&t->lock);
    return NULL;
}

struct kvnet_tx *kvnet_tx_start(struct kvq *q, const struct kvnet_tx_config *cfg,
                                char *err, size_t errlen)
{
    struct kvnet_tx *t = calloc(1, sizeof *t);
    if (!t) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    t->q = q;
    t->cfg = *cfg;
    t->irq.irq_fd = cfg->irq_fd;
    t->irq.resample_fd = cfg->resample_fd;
    t->waiting_tail = &t->waiting;
    t->chain.bufs = calloc(q->size, sizeof(struct kvq_buf));
    t->iov = calloc(q->size + 1, sizeof(struct iovec));
    t->ctl_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    t->event_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (!t->chain.bufs || !t->iov || t->ctl_fd < 0 || t->event_fd < 0) {
        snprintf(err, errlen, "cannot set up the virtio-net transmit engine: %s", strerror(errno));
        goto fail;
    }
    pthread_mutex_init(&t->lock, NULL);
    pthread_cond_init(&t->cond, NULL);
    int rc = pthread_create(&t->thread, NULL, run, t);
    if (rc) {
        snprintf(err, errlen, "cannot start the virtio-net transmit thread: %s", strerror(rc));
        pthread_cond_destroy(&t->cond);
        pthread_mutex_destroy(&t->lock);
        goto fail;
    }
    pthread_setname_np(t->thread, "kvmkit-net-tx");
    return t;
fail:
    if (t->ctl_fd >= 0)
        close(t->ctl_fd);
    if (t->event_fd >= 0)
        close(t->event_fd);
    free(t->chain.bufs);
    free(t->iov);
    free(t);
    return NULL;
}

static void free_list(struct deferred *d)
{
    while (d) {
        struct deferred *next = d->next;
        free(d);
        d = next;
    }
}

void kvnet_tx_stop(struct kvnet_tx *t)
{
    pthread_mutex_lock(&t->lock);
    t->stop = 1;
    pthread_cond_broadcast(&t->cond);
    pthread_mutex_unlock(&t->lock);
    kvirq_signal_fd(t->ctl_fd);
    pthread_join(t->thread, NULL);
    free_list(t->waiting);
    free_list(t->taken);
    pthread_cond_destroy(&t->cond);
    pthread_mutex_destroy(&t->lock);
    close(t->ctl_fd);
    close(t->event_fd);
    free(t->chain.bufs);
    free(t->iov);
    free(t);
}

void kvnet_tx_pause(struct kvnet_tx *t)
{
    pthread_mutex_lock(&t->lock);
    t->pause_req = 1;
    kvirq_signal_fd(t->ctl_fd);
    while (!t->paused && !t->stop)
        pthread_cond_wait(&t->cond, &t->lock);
    pthread_mutex_unlock(&t->lock);
}

void kvnet_tx_resume(struct kvnet_tx *t)
{
    pthread_mutex_lock(&t->lock);
    t->pause_req = 0;
    pthread_cond_broadcast(&t->cond);
    pthread_mutex_unlock(&t->lock);
}

int kvnet_tx_event_fd(struct kvnet_tx *t)
{
    return t->event_fd;
}

int kvnet_tx_take_deferred(struct kvnet_tx *t, struct kvq_chain *out, int max)
{
    int n = 0;
    pthread_mutex_lock(&t->lock);
    kvirq_drain_fd(t->event_fd);
    while (n < max && t->waiting) {
        struct deferred *d = t->waiting;
        t->waiting = d->next;
        if (!t->waiting)
            t->waiting_tail = &t->waiting;
        d->next = t->taken;
        t->taken = d;
        out[n++] = d->chain;
    }
    if (t->waiting)
        kvirq_signal_fd(t->event_fd);
    pthread_mutex_unlock(&t->lock);
    return n;
}

int kvnet_tx_complete(struct kvnet_tx *t, uint32_t head)
{
    pthread_mutex_lock(&t->lock);
    struct deferred **pp = &t->taken;
    while (*pp && (*pp)->chain.head != head)
        pp = &(*pp)->next;
    struct deferred *d = *pp;
    if (!d) {
        pthread_mutex_unlock(&t->lock);
        return -1;
    }
    *pp = d->next;
    free(d);
    t->outstanding--;
    kvq_push(t->q, head, 0);
    if (kvq_should_notify(t->q))
        interrupt(t);
    pthread_mutex_unlock(&t->lock);
    return 0;
}

int kvnet_tx_broken(struct kvnet_tx *t, char *msg, size_t len)
{
    pthread_mutex_lock(&t->lock);
    int broken = t->broken[0] != 0;
    if (broken && len)
        snprintf(msg, len, "%s", t->broken);
    pthread_mutex_unlock(&t->lock);
    return broken;
}

void kvnet_tx_get_stats(struct kvnet_tx *t, struct kvnet_tx_stats *out)
{
    pthread_mutex_lock(&t->lock);
    *out = t->stats;
    pthread_mutex_unlock(&t->lock);
}
