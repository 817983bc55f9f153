/* virtio-blk's data path on a queue engine: see blk.h. */
#define _GNU_SOURCE
#include "blk.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#define SECTOR 512u
#define HEADER_LEN 16u
#define T_IN 0u
#define T_OUT 1u
#define T_FLUSH 4u
#define S_OK 0u
#define S_IOERR 1u

struct kvblk {                  /* kveng_device() of a blk engine; used on its thread, under its lock */
    struct kvblk_config cfg;
    struct kvblk_stats stats;   /* requests, io_errors, syncs; the rest are the engine's */
    struct iovec iov[];         /* one per queue entry */
};

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

/* fdatasync, counted after it returned: a sync the process died in is not one. */
static int sync_image(struct kvblk *b)
{
    while (fdatasync(b->cfg.image_fd) < 0)
        if (errno != EINTR) {
            b->stats.sync_errors++;
            return -1;
        }
    b->stats.syncs++;
    return 0;
}

/* Serve one request in C, or say it is Python's (kveng_serve_fn). */
static int serve(struct kveng *e, const struct kvq_chain *c, uint32_t *written)
{
    struct kvblk *b = kveng_device(e);
    if (c->write_len == 0) {                    /* no status byte: nothing can be reported */
        *written = 0;
        return KVENG_SERVED;
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
                    return KVENG_DEFER;
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
                    return KVENG_DEFER;
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
            return KVENG_DEFER;                         /* GET_ID, DISCARD, WRITE_ZEROES, unknown */
        }
    }
    *status = (uint8_t)st;
    *written = data + 1;
    b->stats.requests++;
    return KVENG_SERVED;
}

/* Too many requests outstanding (kveng_drop_fn): fail it with IOERR. */
static uint32_t drop(struct kveng *e, const struct kvq_chain *c)
{
    (void)e;
    if (!c->write_len)
        return 0;
    const struct kvq_buf *last = &c->bufs[c->nread + c->nwrite - 1];
    last->hva[last->len - 1] = S_IOERR;
    return 1;
}

/* -- the engine -------------------------------------------------------------------------- */

struct kveng *kvblk_start(struct kvq *q, const struct kvblk_config *cfg, char *err, size_t errlen)
{
    struct kvblk *b = calloc(1, sizeof *b + q->size * sizeof(struct iovec));
    if (b)
        b->cfg = *cfg;
    struct kveng *e = kveng_start(q, cfg->kick_fd, cfg->irq_fd, cfg->resample_fd, serve, drop, b,
                                  "kvmkit-blk", "virtio-blk", err, errlen);
    if (e)
        kveng_set_poll_ns(e, cfg->poll_ns);
    return e;
}

void kvblk_get_stats(struct kveng *e, struct kvblk_stats *out)
{
    struct kvblk *b = kveng_device(e);
    struct kveng_stats s;
    kveng_get_stats(e, &s, out, &b->stats, sizeof *out);
    out->deferred = s.deferred;
    out->interrupts = s.interrupts;
    out->busy_ns = s.busy_ns;
    out->polled = s.polled;
    out->poll_ns = s.poll_ns;
}
