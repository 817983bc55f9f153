/* A queue engine: one virtqueue run by its own thread (blk.c, net.c).
 *
 * The thread waits on the queue's ioeventfd, pops chains from the kvq and
 * gives each to the device's serve callback, which serves it in C or leaves
 * it to Python.  It pushes used elements and signals the interrupt (irq.c):
 * an MSI-X irqfd (left pending while the vector is masked), or with INTx the
 * ISR bit and a resampling irqfd.  It never takes the GIL.  Chains left to
 * Python make kveng_event_fd() readable; Python takes them with
 * kveng_take_deferred(), handles them and returns them with kveng_complete().
 * A chain that breaks the ring rules stops the queue and is reported the same
 * way (kveng_broken()).
 *
 * Threading: one mutex per engine guards the kvq (ring state), the deferred
 * lists, the pause/stop flags, the broken message and every counter, the
 * device's own included (its serve callback runs with the lock held).  The
 * thread drops the lock only to wait: in poll() for a kick, a resample or a
 * control wakeup, and in pthread_cond_wait() while paused.  While it serves a
 * batch it holds the lock, so Python's take_deferred/complete/get_stats wait
 * for the batch (for blk: its disk I/O) to finish.  Interrupt masking and the
 * ISR are atomics in irq.c and take no lock.
 */
#ifndef KVMKIT_ENGINE_H
#define KVMKIT_ENGINE_H

#include "vq.h"

struct kveng;

struct kveng_stats {
    uint64_t deferred;          /* chains handed to Python */
    uint64_t dropped;           /* used without being served or handed over: more chains
                                 * outstanding than the queue has entries (a driver reusing heads) */
    uint64_t interrupts;        /* irqfd writes */
    uint64_t busy_ns;           /* time the thread spent serving the queue (not waiting) */
    uint64_t polled;            /* batches found by polling the avail ring, without a kick */
    uint64_t poll_ns;           /* time the thread spent polling (CPU it burnt waiting) */
};

/* -- for Python (on an engine a device's start returned) ------------------------------------ */

/* Stop and join the thread, free the engine and the device's state
 * (deferred chains are dropped: the device is being reset). */
void kveng_stop(struct kveng *e);
/* Return when the thread is between chains and will not start another. */
void kveng_pause(struct kveng *e);
void kveng_resume(struct kveng *e);

/* Readable when Python has work: deferred chains or a broken queue. */
int kveng_event_fd(struct kveng *e);
/* Move up to ``max`` deferred chains into ``out`` (each chain's bufs point
 * into engine memory valid until kveng_complete of its head); returns how many. */
int kveng_take_deferred(struct kveng *e, struct kvq_chain *out, int max);
/* Return a deferred chain: push it with ``written`` bytes and interrupt if
 * the driver wants one; -1 for a head that was not taken. */
int kveng_complete(struct kveng *e, uint32_t head, uint32_t written);
/* Non-zero once the queue broke; the message is copied into msg. */
int kveng_broken(struct kveng *e, char *msg, size_t len);

/* MSI-X: the queue's vector became (un)masked.  Unmasking sends an interrupt
 * left pending while it was masked. */
void kveng_set_masked(struct kveng *e, int masked);
/* INTx: read and clear the ISR bits this engine set. */
uint32_t kveng_take_isr(struct kveng *e);

/* -- for the devices ------------------------------------------------------------------------ */

#define KVENG_SERVED 0
#define KVENG_DEFER 1

/* Serve one chain in C and return KVENG_SERVED with *written (the used
 * element's length), or return KVENG_DEFER to leave it to Python.  Called on
 * the engine's thread with the lock held. */
typedef int (*kveng_serve_fn)(struct kveng *e, const struct kvq_chain *c, uint32_t *written);
/* A chain the engine can neither serve nor defer (too many outstanding):
 * fail it as the device reports errors; returns the used element's length.
 * NULL: used with 0 bytes. */
typedef uint32_t (*kveng_drop_fn)(struct kveng *e, const struct kvq_chain *c);

/* Start the thread ``name`` on ``q`` (already set up; the engine owns it
 * until stop).  ``dev`` is the device's state (kveng_device), from malloc:
 * the engine owns it too, and frees it at stop or when it cannot start (NULL,
 * an allocation that failed: "out of memory").
 * ``what`` names the device in error messages.  NULL with a message in err
 * on failure. */
struct kveng *kveng_start(struct kvq *q, int kick_fd, int irq_fd, int resample_fd,
                          kveng_serve_fn serve, kveng_drop_fn drop, void *dev,
                          const char *name, const char *what, char *err, size_t errlen);
void *kveng_device(struct kveng *e);
/* Adaptive polling: after serving a batch, watch the avail ring (with
 * notifications off, so the driver need not kick) before sleeping on the kick
 * eventfd, for a window of at most ``ns`` nanoseconds that grows while kicks
 * come soon after the thread sleeps and shrinks while polling finds nothing;
 * each batch found restarts the window.  0 (the default) turns it off.  Any
 * thread, any time. */
void kveng_set_poll_ns(struct kveng *e, uint64_t ns);
/* Copy the engine's counters and, under the same lock, ``len`` bytes of the
 * device's own counters from ``dev_stats`` to ``dev_out``. */
void kveng_get_stats(struct kveng *e, struct kveng_stats *out,
                     void *dev_out, const void *dev_stats, size_t len);

#endif
