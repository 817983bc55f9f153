/* virtio-net's transmit queue in a C thread (virtio 1.2, section 5.1.6.2),
 * for a tap device (IFF_VNET_HDR, a 12-byte virtio_net_hdr_v1 per frame).
 *
 * The thread waits on the queue's ioeventfd, pops chains from the kvq and
 * writes each frame with writev() to the tap: a 12-byte header built from the
 * guest's (exactly as the Python model's TapBackend.transmit passes it: the
 * header of a plain frame is all zeros, an offload's keeps NEEDS_CSUM of the
 * flags and its GSO and checksum fields, num_buffers 0), then iovecs straight
 * into guest memory.  It pushes used elements (0 bytes written) and signals
 * the interrupt as the virtio-blk engine does (irq.c).  It never takes the GIL.
 *
 * Frames it does not send are handed to Python: runts, headers that ask for
 * an offload that was not negotiated or that is malformed, frames above the
 * limit, and frames the tap refused (writev failed, EAGAIN included).
 * kvnet_tx_event_fd() becomes readable, Python takes them with
 * kvnet_tx_take_deferred(), lets the model count (and, for a refused write,
 * try once more) and returns them with kvnet_tx_complete().  A chain that
 * breaks the ring rules stops the queue (kvnet_tx_broken()).
 */
#ifndef KVMKIT_NET_H
#define KVMKIT_NET_H

#include "vq.h"

struct kvnet_tx_config {
    int tap_fd;                 /* the tap, opened with IFF_VNET_HDR and a 12-byte header */
    uint64_t features;          /* the negotiated feature bits (offloads the guest may use) */
    uint64_t plain_limit;       /* largest frame without GSO (MTU + Ethernet + VLAN) */
    uint64_t gso_limit;         /* largest GSO frame */
    int kick_fd;                /* the queue's ioeventfd (an eventfd) */
    int irq_fd;                 /* eventfd: the MSI-X vector's irqfd or INTx's trigger; -1: none */
    int resample_fd;            /* INTx: the irqfd's resample eventfd; -1 with MSI-X */
};

struct kvnet_tx_stats {
    uint64_t tx_frames;         /* frames written to the tap in C */
    uint64_t tx_bytes;          /* their bytes, without the header */
    uint64_t deferred;          /* chains handed to Python */
    uint64_t write_errors;      /* of those: writev failed (EAGAIN included) */
    uint64_t dropped;           /* used without being sent or handed over: more chains
                                 * outstanding than the queue has entries (a driver reusing heads) */
    uint64_t interrupts;        /* irqfd writes */
    uint64_t busy_ns;           /* time the thread spent serving the queue (not waiting) */
};

struct kvnet_tx;

/* Start the thread on ``q`` (already set up; the engine owns it until stop).
 * NULL with a message in err on failure. */
struct kvnet_tx *kvnet_tx_start(struct kvq *q, const struct kvnet_tx_config *cfg,
                                char *err, size_t errlen);
/* Stop and join the thread, free the engine (deferred chains are dropped:
 * the device is being reset). */
void kvnet_tx_stop(struct kvnet_tx *t);
/* Return when the thread is between frames and will not start another. */
void kvnet_tx_pause(struct kvnet_tx *t);
void kvnet_tx_resume(struct kvnet_tx *t);

/* Readable when Python has work: deferred chains or a broken queue. */
int kvnet_tx_event_fd(struct kvnet_tx *t);
/* Move up to ``max`` deferred chains into ``out`` (each chain's bufs point
 * into engine memory valid until kvnet_tx_complete of its head); returns how many. */
int kvnet_tx_take_deferred(struct kvnet_tx *t, struct kvq_chain *out, int max);
/* Return a deferred chain: push it (0 bytes written) and interrupt if the
 * driver wants one; -1 for a head that was not taken. */
int kvnet_tx_complete(struct kvnet_tx *t, uint32_t head);
/* Non-zero once the queue broke; the message is copied into msg. */
int kvnet_tx_broken(struct kvnet_tx *t, char *msg, size_t len);

/* MSI-X: the queue's vector became (un)masked. */
void kvnet_tx_set_masked(struct kvnet_tx *t, int masked);
/* INTx: read and clear the ISR bits this engine set. */
uint32_t kvnet_tx_take_isr(struct kvnet_tx *t);
void kvnet_tx_get_stats(struct kvnet_tx *t, struct kvnet_tx_stats *out);

#endif
