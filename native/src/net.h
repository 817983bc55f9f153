/* virtio-net's transmit queue on a queue engine (engine.h; virtio 1.2,
 * section 5.1.6.2), for a tap device (IFF_VNET_HDR, a 12-byte
 * virtio_net_hdr_v1 per frame).
 *
 * The engine's thread writes each frame with writev() to the tap: a 12-byte
 * header built from the guest's (exactly as the Python model's
 * TapBackend.transmit passes it: the header of a plain frame is all zeros, an
 * offload's keeps NEEDS_CSUM of the flags and its GSO and checksum fields,
 * num_buffers 0), then iovecs straight into guest memory.  The tap is
 * non-blocking: the thread never waits on it.  Used elements carry 0 bytes.
 *
 * Frames it does not send are handed to Python: runts, headers that ask for
 * an offload that was not negotiated or that is malformed, frames above the
 * limit, and frames the tap refused (writev failed, EAGAIN included).  Python
 * takes them through the kveng_* calls, lets the model count (and, for a
 * refused write, try once more) and returns them with
 * kveng_complete(e, head, 0).
 */
#ifndef KVMKIT_NET_H
#define KVMKIT_NET_H

#include "engine.h"

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

/* Start the engine on ``q`` (already set up; the engine owns it until kveng_stop).
 * NULL with a message in err on failure. */
struct kveng *kvnet_tx_start(struct kvq *q, const struct kvnet_tx_config *cfg,
                             char *err, size_t errlen);
/* The counters of an engine kvnet_tx_start returned. */
void kvnet_tx_get_stats(struct kveng *e, struct kvnet_tx_stats *out);

#endif
