/* virtio-blk's data path on a queue engine (engine.h; virtio 1.2, section 5.2).
 *
 * The engine's thread serves IN, OUT and FLUSH with preadv/pwritev/fdatasync
 * on the image; it may block in that I/O, holding the engine's lock.  It
 * leaves to Python the requests it does not serve (other types, or buffers
 * O_DIRECT cannot take): Python gets them through the kveng_* calls and
 * completes them with kveng_complete(e, head, written).  When more requests
 * are outstanding than the queue has entries, one is failed with IOERR.
 */
#ifndef KVMKIT_BLK_H
#define KVMKIT_BLK_H

#include "engine.h"

struct kvblk_config {
    int image_fd;
    uint64_t capacity;          /* sectors of 512 bytes */
    int readonly;
    int writethrough;           /* FLUSH not negotiated: writes are stable before they complete */
    uint32_t direct_align;      /* O_DIRECT alignment of buffers and lengths; 0 without O_DIRECT */
    int kick_fd;                /* the queue's ioeventfd (an eventfd) */
    int irq_fd;                 /* eventfd: the MSI-X vector's irqfd or INTx's trigger; -1: none */
    int resample_fd;            /* INTx: the irqfd's resample eventfd; -1 with MSI-X */
    uint64_t poll_ns;           /* adaptive polling bound after each batch; 0: off */
};

struct kvblk_stats {
    uint64_t requests;          /* served in C */
    uint64_t deferred;          /* handed to Python */
    uint64_t io_errors;         /* completed with VIRTIO_BLK_S_IOERR after a host error */
    uint64_t interrupts;        /* irqfd writes */
    uint64_t syncs;             /* fdatasync calls that succeeded (counted once they returned) */
    uint64_t busy_ns;           /* time the thread spent serving the queue (not waiting) */
    uint64_t polled;            /* batches found by polling, without a kick */
    uint64_t poll_ns;           /* time the thread spent polling */
    uint64_t sync_errors;       /* fdatasync calls that failed (the FLUSH got IOERR) */
};

/* Start the engine on ``q`` (already set up; the engine owns it until kveng_stop).
 * NULL with a message in err on failure. */
struct kveng *kvblk_start(struct kvq *q, const struct kvblk_config *cfg, char *err, size_t errlen);
/* The counters of an engine kvblk_start returned. */
void kvblk_get_stats(struct kveng *e, struct kvblk_stats *out);

#endif
