/* virtio-net's transmit queue on a queue engine: see net.h. */
#define _GNU_SOURCE
#include "net.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

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

struct kvnet_tx {               /* kveng_device() of a transmit engine; used on its thread, under its lock */
    struct kvnet_tx_config cfg;
    struct kvnet_tx_stats stats; /* tx_frames, tx_bytes, write_errors; the rest are the engine's */
    struct iovec iov[];         /* the header, then one per queue entry */
};

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

/* Send one frame in C, or leave it to Python (kveng_serve_fn). */
static int transmit(struct kveng *e, const struct kvq_chain *c, uint32_t *written)
{
    struct kvnet_tx *t = kveng_device(e);
    if (c->read_len < HDR_SIZE + MIN_FRAME)
        return KVENG_DEFER;                             /* a runt: Python counts it */
    uint64_t size = c->read_len - HDR_SIZE;
    uint8_t raw[HDR_SIZE], hdr[HDR_SIZE];
    if (gather(c, raw, HDR_SIZE) < 0 || !check_header(t, raw, size, hdr))
        return KVENG_DEFER;
    if (c->nread + 1 > IOV_MAX)
        return KVENG_DEFER;                             /* writev cannot take it: Python says why */
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
        return KVENG_DEFER;                             /* then counts tx_errors */
    }
    t->stats.tx_frames++;
    t->stats.tx_bytes += size;
    *written = 0;
    return KVENG_SERVED;
}

/* -- the engine -------------------------------------------------------------------------- */

struct kveng *kvnet_tx_start(struct kvq *q, const struct kvnet_tx_config *cfg,
                             char *err, size_t errlen)
{
    struct kvnet_tx *t = calloc(1, sizeof *t + (q->size + 1) * sizeof(struct iovec));
    if (t)
        t->cfg = *cfg;
    return kveng_start(q, cfg->kick_fd, cfg->irq_fd, cfg->resample_fd, transmit, NULL,
                       t, "kvmkit-net-tx", "virtio-net transmit", err, errlen);
}

void kvnet_tx_get_stats(struct kveng *e, struct kvnet_tx_stats *out)
{
    struct kvnet_tx *t = kveng_device(e);
    struct kveng_stats s;
    kveng_get_stats(e, &s, out, &t->stats, sizeof *out);
    out->deferred = s.deferred;
    out->dropped = s.dropped;
    out->interrupts = s.interrupts;
    out->busy_ns = s.busy_ns;
}
