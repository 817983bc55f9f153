/* The device side of a virtio split virtqueue (virtio 1.2, section 2.7), in C.
 *
 * Same rules as kvmkit's pure-Python SplitQueue (core/virtio/queue.py): every
 * guest-physical range is translated through the guest memory map and must lie
 * wholly inside one RAM region before it is touched; a chain that loops, is
 * longer than the queue size (direct and indirect buffers together) or than
 * 2^32 bytes, nests indirect tables, or puts a device-readable buffer after a
 * device-writable one, breaks the queue (kvq.broken, kvq.error) and nothing
 * of it is used.  Nothing here allocates, locks or blocks.
 */
#ifndef KVMKIT_VQ_H
#define KVMKIT_VQ_H

#include <stdint.h>
#include <stddef.h>

#define KVQ_MAX_REGIONS 8
#define KVQ_MAX_SIZE 32768
#define KVQ_ERROR_LEN 160

#define KVQ_DESC_F_NEXT 1
#define KVQ_DESC_F_WRITE 2
#define KVQ_DESC_F_INDIRECT 4
#define KVQ_AVAIL_F_NO_INTERRUPT 1
#define KVQ_USED_F_NO_NOTIFY 1

struct kvq_region {
    uint64_t gpa;       /* guest-physical start */
    uint64_t size;
    uint8_t *hva;       /* where it is mapped in this process, aligned like gpa (mod 8)
                         * so that avail.idx and used.idx can be accessed atomically */
};

struct kvq_mem {
    uint32_t count;
    struct kvq_region regions[KVQ_MAX_REGIONS];
};

/* One buffer of a chain: zero-length descriptors are left out. */
struct kvq_buf {
    uint64_t gpa;
    uint32_t len;
    uint8_t *hva;       /* translated and checked: hva[0..len) is guest RAM */
};

/* A popped chain: bufs[0..nread) device-readable, then nwrite device-writable.
 * ``bufs`` is the caller's array of at least the queue's size entries. */
struct kvq_chain {
    uint16_t head;
    uint32_t nread, nwrite;
    uint64_t read_len, write_len;
    struct kvq_buf *bufs;
};

struct kvq {
    const struct kvq_mem *mem;
    uint32_t size;
    uint64_t desc_gpa, avail_gpa, used_gpa;
    uint8_t *desc, *avail, *used;           /* checked host pointers of the rings */
    int event_idx, indirect;
    uint16_t last_avail_idx;                /* next available slot the device reads */
    uint16_t avail_idx;                     /* avail.idx as last read */
    uint16_t used_idx;                      /* next used slot the device writes */
    uint16_t signalled_used;                /* used_idx when should_notify last ran */
    int notifications;                      /* the device wants kicks */
    int broken;
    char error[KVQ_ERROR_LEN];
};

/* Host pointer of [gpa, gpa + len) when it lies wholly inside one region
 * (len 0: gpa inside or at the end of a region), else NULL.  Overflow-safe. */
uint8_t *kvq_translate(const struct kvq_mem *mem, uint64_t gpa, uint64_t len);

/* Check and set up a queue; 0, or -1 with q->error set. */
int kvq_init(struct kvq *q, const struct kvq_mem *mem, uint32_t size,
             uint64_t desc, uint64_t avail, uint64_t used, int event_idx, int indirect);

/* Whether the driver made chains available that kvq_pop has not returned. */
int kvq_has_available(struct kvq *q);

/* 1: *chain holds the next chain; 0: none available; -1: the ring or the
 * chain broke the rules (q->broken, q->error); every later call returns -1. */
int kvq_pop(struct kvq *q, struct kvq_chain *chain);

/* Return chain ``head`` with ``written`` bytes written; 0, or -1 for a head
 * outside the table.  The element is visible before used.idx. */
int kvq_push(struct kvq *q, uint32_t head, uint32_t written);

/* Whether the driver wants an interrupt for what was pushed since the last
 * call (used_event with EVENT_IDX, else avail.flags). */
int kvq_should_notify(struct kvq *q);

void kvq_disable_notifications(struct kvq *q);
/* Returns 1 if chains are already available (their kick may be suppressed). */
int kvq_enable_notifications(struct kvq *q);

#endif
