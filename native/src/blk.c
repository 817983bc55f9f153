/* virtio-blk's data path in a C thread: see blk.h. */
#define _GNU_SOURCE
#include "blk.h"
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

#define SECTOR 512u
#define HEADER_LEN 16u
#define T_IN 0u
#define T_OUT 1u
#define T_FLUSH 4u
#define S_OK 0u
#define S_IOERR 1u

struct deferred {               /* a request Python serves */
    struct deferred *next;
    struct kvq_chain chain;     /* bufs point just past this struct */
};

struct kvblk {
    struct kvq *q;
    struct kvblk_config cfg;
    pthread_t thread;
    pthread_mutex_t lock;       /* the ring, the deferred lists, pausing */
    pthread_cond_t cond;
    int ctl_fd;                 /* eventfd: wakes the thread to pause or stop */
    int event_fd;               /* eventfd: Python has work */
    int stop, pause_req, paused;
    struct kvirq irq;           /* the interrupt (irq.c) */
    struct deferred *waiting;   /* popped, not yet taken by Python (oldest first) */
    struct deferred **waiting_tail;
    struct deferred *taken;     /* taken by Python, not yet completed */
    uint32_t outstanding;       /* waiting + taken */
    struct kvq_chain chain;     /* the thread's scratch chain */
    struct iovec *iov;          /* one per queue entry */
    struct kvblk_stats stats;
    char broken[KVQ_ERROR_LEN];
};

#define signal_fd kvirq_signal_fd
#define drain_fd kvirq_drain_fd

/* -- interrupts (irq.c) ------------------------------------------------------------------ */

static void interrupt(struct kvblk *b)
{
    if (kvirq_raise(&b->irq))
        b->stats.interrupts++;
}

void kvblk_set_masked(struct kvblk *b, int masked)
{
    kvirq_set_masked(&b->irq, masked);
}

uint32_t kvblk_take_isr(struct kvblk *b)
{
    return kvirq_take_isr(&b->irq);
}

/* -- requests ---------------------------------------------------------------------------- */

/* Copy ``len`` bytes from offset ``off`` of the chain's readable buffers. */
static int gather(const struct kvq_chain *c, uint64_t off, void *dst, size_t len)
{
    uint8_t *out = dst;
    for (uint32_t i = 0; i < c->nread && len; i++) {
        const struct kvq_buf *buf = &c->bufs[i];
        if (off >= buf->len) {
            off -= buf->len;
            continue;
        }
        size_t take = buf->len - off < len ? buf->len - off : len;
        memcpy(out, buf->hva + off, take);
        out += take;
        len -= take;
        off = 0;
    }
    return len ? -1 : 0;
}

static int in_range(const struct kvblk *b, uint64_t sector, uint64_t bytes)
{
    if (sector > b->cfg.capacity)
        return 0;
    return bytes <= (b->cfg.capacity - sector) * SECTOR;
}

/* iovecs for [skip, skip + len) of buffers first..first+n of the chain. */
static int build_iov(struct kvblk *b, const struct kvq_buf *bufs, uint32_t n,
                     uint64_t skip, uint64_t len)
{
    int count = 0;
    for (uint32_t i = 0; i < n && len; i++) {
        uint64_t blen = bufs[i].len;
        if (skip >= blen) {
            skip -= blen;
            continue;
        }
        uint64_t take = blen - skip < len ? blen - skip : len;
        b->iov[count].iov_base = bufs[i].hva + skip;
        b->iov[count].iov_len = take;
        count++;
        len -= take;
        skip = 0;
    }
    return count;
}

static int aligned(const struct kvblk *b, int count, uint64_t offset)
{
    uint32_t a = b->cfg.direct_align;
    if (!a)
        return 1;
    if (offset % a)
        return 0;
    for (int i = 0; i < count; i++)
        if ((uintptr_t)b->iov[i].iov_base % a || b->iov[i].iov_len % a)
            return 0;
    return 1;
}

/* preadv/pwritev until every byte moved; 0 or -1 (errno set; EIO for a short file). */
static int transfer(struct kvblk *b, int count, uint64_t offset, int write)
{
    struct iovec *iov = b->iov;
    while (count) {
        int n = count > IOV_MAX ? IOV_MAX : count;
        ssize_t done = write ? pwritev(b->cfg.image_fd, iov, n, (off_t)offset)
                             : preadv(b->cfg.image_fd, iov, n, (off_t)offset);
        if (done < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (done == 0) {
            errno = EIO;
            return -1;
        }
        offset += (uint64_t)done;
        while (count && (size_t)done >= iov->iov_len) {
            done -= (ssize_t)iov->iov_len;
            iov++;
            count--;
        }
        if (count) {
            iov->iov_base = (uint8_t *)iov->iov_base + done;
            iov->iov_len -= (size_t)done;
        }
    }
    return 0;
}

static int sync_image(struct kvblk *b)
{
    b->stats.syncs++;
    while (fdatasync(b->cfg.image_fd) < 0)
        if (errno != EINTR)
            return -1;
    return 0;
}

enum outcome { SERVED, DEFER };

/* Serve one request in C, or say it is Python's.  *written: bytes for the used element. */
static enum outcome serve(struct kvblk *b, const struct kvq_chain *c, uint32_t *written)
{
    if (c->write_len == 0) {                    /* no status byte: nothing can be reported */
        *written = 0;
        return SERVED;
    }
    const struct kvq_buf *last = &c->bufs[c->nread + c->nwrite - 1];
    uint8_t *status = last->hva + last->len - 1;
    uint32_t st = S_IOERR;
    uint32_t data = 0;
    uint8_t header[HEADER_LEN];
    if (c->read_len >= HEADER_LEN && gather(c, 0, header, HEADER_LEN) == 0) {
        uint32_t type;
        uint64_t sector;
        memcpy(&type, header, 4);
        memcpy(&sector, header + 8, 8);
        uint64_t out_len = c->read_len - HEADER_LEN;    /* driver -> device bytes after the header */
        uint64_t in_len = c->write_len - 1;              /* device -> driver bytes before the status */
        if (type == T_IN) {
            if (!out_len && !(in_len % SECTOR) && in_range(b, sector, in_len)) {
                int n = build_iov(b, c->bufs + c->nread, c->nwrite, 0, in_len);
                if (!aligned(b, n, sector * SECTOR))
                    return DEFER;
                if (transfer(b, n, sector * SECTOR, 0) == 0) {
                    st = S_OK;
                    data = (uint32_t)in_len;
                } else {
                    b->stats.io_errors++;
                }
            }
        } else if (type == T_OUT) {
            if (!b->cfg.readonly && !in_len && !(out_len % SECTOR) && in_range(b, sector, out_len)) {
                int n = build_iov(b, c->bufs, c->nread, HEADER_LEN, out_len);
                if (!aligned(b, n, sector * SECTOR))
                    return DEFER;
                if (transfer(b, n, sector * SECTOR, 1) == 0
                    && (!b->cfg.writethrough || !out_len || sync_image(b) == 0))
                    st = S_OK;
                else
                    b->stats.io_errors++;
            }
        } else if (type == T_FLUSH) {
            if (!out_len && !in_len) {
                if (sync_image(b) == 0)
                    st = S_OK;
                else
                    b->stats.io_errors++;
            }
        } else {
            return DEFER;                        /* GET_ID, DISCARD, WRITE_ZEROES, unknown */
        }
    }
    *status = (uint8_t)st;
    *written = data + 1;
    b->stats.requests++;
    return SERVED;
}

static void defer(struct kvblk *b, const struct kvq_chain *c)
{
    uint32_t n = c->nread + c->nwrite;
    /* A driver has at most ``size`` requests in flight; more is a driver
     * resubmitting heads, and is failed rather than queued without bound. */
    struct deferred *d = b->outstanding < b->q->size
        ? malloc(sizeof *d + n * sizeof(struct kvq_buf)) : NULL;
    if (!d) {
        if (c->write_len) {
            const struct kvq_buf *last = &c->bufs[n - 1];
            last->hva[last->len - 1] = S_IOERR;
        }
        kvq_push(b->q, c->head, c->write_len ? 1 : 0);
        return;
    }
    d->chain = *c;
    d->chain.bufs = (struct kvq_buf *)(d + 1);
    memcpy(d->chain.bufs, c->bufs, n * sizeof(struct kvq_buf));
    d->next = NULL;
    *b->waiting_tail = d;
    b->waiting_tail = &d->next;
    b->outstanding++;
    b->stats.deferred++;
    signal_fd(b->event_fd);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Serve everything available; called with the lock held. */
static void process(struct kvblk *b)
{
    struct kvq *q = b->q;
    int rc = 0;
    uint64_t start = now_ns();
    do {
        kvq_disable_notifications(q);
        uint32_t written;
        while ((rc = kvq_pop(q, &b->chain)) == 1) {
            if (serve(b, &b->chain, &written) == DEFER)
                defer(b, &b->chain);
            else
                kvq_push(q, b->chain.head, written);
        }
    } while (rc == 0 && kvq_enable_notifications(q));
    if (kvq_should_notify(q))
        interrupt(b);
    if (rc < 0 && !b->broken[0]) {
        snprintf(b->broken, sizeof b->broken, "%s", q->error[0] ? q->error : "queue broken");
        signal_fd(b->event_fd);
    }
    b->stats.busy_ns += now_ns() - start;
}

/* -- the thread ------------------------------------------------------------------------- */

static void *run(void *arg)
{
    struct kvblk *b = arg;
    struct pollfd fds[3] = {
        {.fd = b->ctl_fd, .events = POLLIN},
        {.fd = b->cfg.kick_fd, .events = POLLIN},
        {.fd = b->cfg.resample_fd, .events = POLLIN},  /* poll ignores a negative fd */
    };
    pthread_mutex_lock(&b->lock);
    process(b);                                 /* chains made available before we started */
    for (;;) {
        while (b->pause_req && !b->stop) {
            b->paused = 1;
            pthread_cond_broadcast(&b->cond);
            pthread_cond_wait(&b->cond, &b->lock);
        }
        b->paused = 0;
        if (b->stop)
            break;
        pthread_mutex_unlock(&b->lock);
        int n = poll(fds, 3, -1);
        pthread_mutex_lock(&b->lock);
        if (n < 0)
            continue;                           /* EINTR */
        if (fds[0].revents)
            drain_fd(b->ctl_fd);
        if (b->stop || b->pause_req)
            continue;                           /* the kick stays counted in its eventfd */
        if (fds[2].revents & POLLIN)            /* INTx EOI: still pending? assert again */
            kvirq_resample(&b->irq);
        if (fds[1].revents & POLLIN) {
            drain_fd(b->cfg.kick_fd);
            if (!b->broken[0])
                process(b);
        }
    }
    b->paused = 0;
    pthread_mutex_unlock(&b->lock);
    return NULL;
}

struct kvblk *kvblk_start(struct kvq *q, const struct kvblk_config *cfg, char *err, size_t errlen)
{
    struct kvblk *b = calloc(1, sizeof *b);
    if (!b) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    b->q = q;
    b->cfg = *cfg;
    b->irq.irq_fd = cfg->irq_fd;
    b->irq.resample_fd = cfg->resample_fd;
    b->waiting_tail = &b->waiting;
    b->chain.bufs = calloc(q->size, sizeof(struct kvq_buf));
    b->iov = calloc(q->size, sizeof(struct iovec));
    b->ctl_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    b->event_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (!b->chain.bufs || !b->iov || b->ctl_fd < 0 || b->event_fd < 0) {
        snprintf(err, errlen, "cannot set up the virtio-blk engine: %s", strerror(errno));
        goto fail;
    }
    pthread_mutex_init(&b->lock, NULL);
    pthread_cond_init(&b->cond, NULL);
    int rc = pthread_create(&b->thread, NULL, run, b);
    if (rc) {
        snprintf(err, errlen, "cannot start the virtio-blk thread: %s", strerror(rc));
        pthread_cond_destroy(&b->cond);
        pthread_mutex_destroy(&b->lock);
        goto fail;
    }
    pthread_setname_np(b->thread, "kvmkit-blk");
    return b;
fail:
    if (b->ctl_fd >= 0)
        close(b->ctl_fd);
    if (b->event_fd >= 0)
        close(b->event_fd);
    free(b->chain.bufs);
    free(b->iov);
    free(b);
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

void kvblk_stop(struct kvblk *b)
{
    pthread_mutex_lock(&b->lock);
    b->stop = 1;
    pthread_cond_broadcast(&b->cond);
    pthread_mutex_unlock(&b->lock);
    signal_fd(b->ctl_fd);
    pthread_join(b->thread, NULL);
    free_list(b->waiting);
    free_list(b->taken);
    pthread_cond_destroy(&b->cond);
    pthread_mutex_destroy(&b->lock);
    close(b->ctl_fd);
    close(b->event_fd);
    free(b->chain.bufs);
    free(b->iov);
    free(b);
}

void kvblk_pause(struct kvblk *b)
{
    pthread_mutex_lock(&b->lock);
    b->pause_req = 1;
    signal_fd(b->ctl_fd);
    while (!b->paused && !b->stop)
        pthread_cond_wait(&b->cond, &b->lock);
    pthread_mutex_unlock(&b->lock);
}

void kvblk_resume(struct kvblk *b)
{
    pthread_mutex_lock(&b->lock);
    b->pause_req = 0;
    pthread_cond_broadcast(&b->cond);
    pthread_mutex_unlock(&b->lock);
}

int kvblk_event_fd(struct kvblk *b)
{
    return b->event_fd;
}

int kvblk_take_deferred(struct kvblk *b, struct kvq_chain *out, int max)
{
    int n = 0;
    pthread_mutex_lock(&b->lock);
    drain_fd(b->event_fd);
    while (n < max && b->waiting) {
        struct deferred *d = b->waiting;
        b->waiting = d->next;
        if (!b->waiting)
            b->waiting_tail = &b->waiting;
        d->next = b->taken;
        b->taken = d;
        out[n++] = d->chain;
    }
    if (b->waiting)
        signal_fd(b->event_fd);
    pthread_mutex_unlock(&b->lock);
    return n;
}

int kvblk_complete(struct kvblk *b, uint32_t head, uint32_t written)
{
    pthread_mutex_lock(&b->lock);
    struct deferred **pp = &b->taken;
    while (*pp && (*pp)->chain.head != head)
        pp = &(*pp)->next;
    struct deferred *d = *pp;
    if (!d) {
        pthread_mutex_unlock(&b->lock);
        return -1;
    }
    *pp = d->next;
    free(d);
    b->outstanding--;
    kvq_push(b->q, head, written);
    if (kvq_should_notify(b->q))
        interrupt(b);
    pthread_mutex_unlock(&b->lock);
    return 0;
}

int kvblk_broken(struct kvblk *b, char *msg, size_t len)
{
    pthread_mutex_lock(&b->lock);
    int broken = b->broken[0] != 0;
    if (broken && len)
        snprintf(msg, len, "%s", b->broken);
    pthread_mutex_unlock(&b->lock);
    return broken;
}

void kvblk_get_stats(struct kvblk *b, struct kvblk_stats *out)
{
    pthread_mutex_lock(&b->lock);
    *out = b->stats;
    pthread_mutex_unlock(&b->lock);
}
