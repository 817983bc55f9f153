/* virtio-blk's data path in a C thread (virtio 1.2, section 5.2).
 *
 * The thread waits on the queue's ioeventfd, pops chains from the kvq, serves
 * IN, OUT and FLUSH with preadv/pwritev/fdatasync on the image, pushes used
 * elements and signals the interrupt: an MSI-X irqfd (left pending while the
 * vector is masked), or with INTx the ISR bit and a resampling irqfd.  It
 * never takes the GIL.  Requests it does not serve (other types, or buffers
 * O_DIRECT cannot take) are handed to Python: kvblk_event_fd() becomes
 * readable, Python takes them with kvblk_take_deferred(), serves them and
 * returns them with kvblk_complete().  A chain that breaks the ring rules
 * stops the queue and is reported the same way (kvblk_broken()).
 */
#ifndef KVMKIT_BLK_H
#define KVMKIT_BLK_H

#include "vq.h"

struct kvblk_config {
    int image_fd;
    uint64_t capacity;          /* sectors of 512 bytes */
    int readonly;
    int writethrough;           /* FLUSH not negotiated: writes are stable before they complete */
    uint32_t direct_align;      /* O_DIRECT alignment of buffers and lengths; 0 without O_DIRECT */
    int kick_fd;                /* the queue's ioeventfd (an eventfd) */
    int irq_fd;                 /* eventfd: the MSI-X vector's irqfd or INTx's trigger; -1: none */
    int resample_fd;            /* INTx: the irqfd's resample eventfd; -1 with MSI-X */
};

struct kvblk_stats {
    uint64_t requests;          /* served in C */
    uint64_t deferred;          /* handed to Python */
    uint64_t io_errors;         /* completed with VIRTIO_BLK_S_IOERR after a host error */
    uint64_t interrupts;        /* irqfd writes */
    uint64_t syncs;             /* fdatasync calls */
    uint64_t busy_ns;           /* time the thread spent serving the queue (not waiting) */
};

struct kvblk;

/* Start the thread on ``q`` (already set up; the engine owns it until stop).
 * NULL with a message in err on failure. */
struct kvblk *kvblk_start(struct kvq *q, const struct kvblk_config *cfg, char *err, size_t errlen);
/* Stop and join the thread, free the engine (deferred requests are dropped:
 * the device is being reset). */
void kvblk_stop(struct kvblk *b);
/* Return when the thread is between requests and will not start another. */
void kvblk_pause(struct kvblk *b);
void kvblk_resume(struct kvblk *b);

/* Readable when Python has work: deferred requests or a broken queue. */
int kvblk_event_fd(struct kvblk *b);
/* Move up to ``max`` deferred requests into ``out`` (each chain's bufs point
 * into engine memory valid until kvblk_complete of its head); returns how many. */
int kvblk_take_deferred(struct kvblk *b, struct kvq_chain *out, int max);
/* Return a deferred request: push it and interrupt if the driver wants one. */
int kvblk_complete(struct kvblk *b, uint32_t head, uint32_t written);
/* Non-zero once the queue broke; the message is copied into msg. */
int kvblk_broken(struct kvblk *b, char *msg, size_t len);

/* MSI-X: the queue's vector became (un)masked.  Unmasking sends an interrupt
 * left pending while it was masked. */
void kvblk_set_masked(struct kvblk *b, int masked);
/* INTx: read and clear the ISR bits this engine set. */
uint32_t kvblk_take_isr(struct kvblk *b);
void kvblk_get_stats(struct kvblk *b, struct kvblk_stats *out);

#endif
