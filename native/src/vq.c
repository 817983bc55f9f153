/* The device side of a split virtqueue: the rules and messages of kvmkit's
 * pure-Python SplitQueue (core/virtio/queue.py), which is the reference.
 *
 * Everything read from guest memory is hostile.  Descriptors are copied out
 * with memcpy (an indirect table need not be aligned) and checked before use;
 * ring words are read and written with memcpy too, except avail.idx (an
 * acquire load) and used.idx (a release store), which are naturally aligned
 * as long as each region's host mapping is aligned like its guest address
 * (mod 8), as page-aligned mappings are.  The full barriers sit where the
 * Python code calls full_barrier(), for the same store->load reasons.
 */
#include "vq.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define DESC_SIZE 16
#define MAX_CHAIN_BYTES (UINT64_C(1) << 32)

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags, next;
};

static uint16_t ld16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static void st16(uint8_t *p, uint16_t v)
{
    memcpy(p, &v, sizeof v);
}

static void full_barrier(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

static uint64_t desc_table_size(uint32_t size) { return (uint64_t)DESC_SIZE * size; }
static uint64_t avail_ring_size(uint32_t size) { return 6 + 2 * (uint64_t)size; }
static uint64_t used_ring_size(uint32_t size) { return 6 + 8 * (uint64_t)size; }

/* Break the queue with a message; returns -1 for the callers' convenience. */
__attribute__((format(printf, 2, 3)))
static int fail(struct kvq *q, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(q->error, sizeof q->error, fmt, ap);
    va_end(ap);
    q->broken = 1;
    return -1;
}

uint8_t *kvq_translate(const struct kvq_mem *mem, uint64_t gpa, uint64_t len)
{
    uint32_t count = mem->count < KVQ_MAX_REGIONS ? mem->count : KVQ_MAX_REGIONS;
    for (uint32_t i = 0; i < count; i++) {
        const struct kvq_region *r = &mem->regions[i];
        /* r->gpa <= gpa and gpa + len <= r->gpa + r->size, without overflow */
        if (gpa >= r->gpa && gpa - r->gpa <= r->size && len <= r->size - (gpa - r->gpa))
            return r->hva + (gpa - r->gpa);
    }
    return NULL;
}

int kvq_init(struct kvq *q, const struct kvq_mem *mem, uint32_t size,
             uint64_t desc, uint64_t avail, uint64_t used, int event_idx, int indirect)
{
    static const char *const names[3] = {"descriptor table", "available ring", "used ring"};
    const uint64_t addrs[3] = {desc, avail, used};
    const uint64_t aligns[3] = {16, 2, 4};
    uint8_t *hvas[3];

    memset(q, 0, sizeof *q);
    if (size < 1 || size > KVQ_MAX_SIZE || (size & (size - 1)))
        return fail(q, "queue size %" PRIu32 " is not a power of two in 1..%d", size, KVQ_MAX_SIZE);
    for (int i = 0; i < 3; i++)
        if (addrs[i] % aligns[i])
            return fail(q, "%s at 0x%" PRIx64 " is not %" PRIu64 "-byte aligned",
                        names[i], addrs[i], aligns[i]);
    const uint64_t lengths[3] = {desc_table_size(size), avail_ring_size(size), used_ring_size(size)};
    for (int i = 0; i < 3; i++)
        if (!(hvas[i] = kvq_translate(mem, addrs[i], lengths[i])))
            return fail(q, "%s 0x%" PRIx64 "+0x%" PRIx64 " is not inside guest RAM",
                        names[i], addrs[i], lengths[i]);
    q->mem = mem;
    q->size = size;
    q->desc_gpa = desc;
    q->avail_gpa = avail;
    q->used_gpa = used;
    q->desc = hvas[0];
    q->avail = hvas[1];
    q->used = hvas[2];
    q->event_idx = !!event_idx;
    q->indirect = !!indirect;
    q->notifications = 1;
    return 0;
}

/* -- the available ring ------------------------------------------------------------- */

/* avail.idx (acquire: the ring entries it publishes are read after it), or -1
 * when it is more than the queue size ahead of last_avail_idx. */
static int read_avail_idx(struct kvq *q)
{
    uint16_t idx = __atomic_load_n((uint16_t *)(q->avail + 2), __ATOMIC_ACQUIRE);
    if ((uint16_t)(idx - q->last_avail_idx) > q->size)
        return fail(q, "avail.idx %u is more than %" PRIu32 " ahead of %u",
                    idx, q->size, q->last_avail_idx);
    q->avail_idx = idx;
    return idx;
}

int kvq_has_available(struct kvq *q)
{
    if (q->broken)
        return 0;
    return __atomic_load_n((uint16_t *)(q->avail + 2), __ATOMIC_ACQUIRE) != q->last_avail_idx;
}

static void write_avail_event(struct kvq *q)
{
    st16(q->used + 4 + 8 * (size_t)q->size, q->last_avail_idx);
}

/* Copy out and check the chain at ``head`` (see SplitQueue._walk): at most
 * ``size`` buffer descriptors, direct and indirect together; no more visits
 * to a table than it has entries (a loop); at most 2^32 bytes. */
static int walk(struct kvq *q, uint16_t head, struct kvq_chain *c)
{
    const uint8_t *table = q->desc;
    uint32_t table_len = q->size, index = head, visits = 0, buffers = 0;
    uint64_t total = 0;
    int in_indirect = 0, seen_writable = 0;

    if (head >= q->size)
        return fail(q, "head descriptor %u is outside the %" PRIu32 "-entry table", head, q->size);
    c->head = head;
    c->nread = c->nwrite = 0;
    c->read_len = c->write_len = 0;
    for (;;) {
        struct desc d;
        if (index >= table_len)
            return fail(q, "descriptor index %" PRIu32 " is outside the %" PRIu32 "-entry %stable",
                        index, table_len, in_indirect ? "indirect " : "");
        if (++visits > table_len)
            return fail(q, "chain from head %u visits more descriptors than its %" PRIu32
                        "-entry table holds (a loop)", head, table_len);
        memcpy(&d.addr, table + (size_t)DESC_SIZE * index, 8);
        memcpy(&d.len, table + (size_t)DESC_SIZE * index + 8, 4);
        memcpy(&d.flags, table + (size_t)DESC_SIZE * index + 12, 2);
        memcpy(&d.next, table + (size_t)DESC_SIZE * index + 14, 2);
        if (d.flags & KVQ_DESC_F_INDIRECT) {
            if (!q->indirect)
                return fail(q, "indirect descriptor, but VIRTIO_F_RING_INDIRECT_DESC "
                            "was not negotiated");
            if (in_indirect)
                return fail(q, "indirect descriptor inside an indirect table");
            if (d.flags & KVQ_DESC_F_NEXT)
                return fail(q, "descriptor has both INDIRECT and NEXT");
            if (d.len == 0 || d.len % DESC_SIZE)
                return fail(q, "indirect table length %" PRIu32 " is not a non-zero "
                            "multiple of %d", d.len, DESC_SIZE);
            if (!(table = kvq_translate(q->mem, d.addr, d.len)))
                return fail(q, "indirect table 0x%" PRIx64 "+0x%" PRIx32 " is not inside "
                            "guest RAM", d.addr, d.len);
            /* The WRITE flag of the descriptor naming the table is ignored (2.7.5.3.2). */
            table_len = d.len / DESC_SIZE;
            index = visits = 0;
            in_indirect = 1;
            continue;
        }
        if (++buffers > q->size)
            return fail(q, "chain from head %u is longer than the queue size %" PRIu32,
                        head, q->size);
        int writable = d.flags & KVQ_DESC_F_WRITE;
        if (writable)
            seen_writable = 1;
        else if (seen_writable)
            return fail(q, "device-readable descriptor after a device-writable one");
        if (d.len) {
            uint8_t *hva = kvq_translate(q->mem, d.addr, d.len);
            if (!hva)
                return fail(q, "buffer 0x%" PRIx64 "+0x%" PRIx32 " is not inside guest RAM",
                            d.addr, d.len);
            total += d.len;
            if (total > MAX_CHAIN_BYTES)
                return fail(q, "chain from head %u is longer than 2^32 bytes", head);
            /* readable buffers all come before the writable ones (checked above) */
            struct kvq_buf *b = &c->bufs[c->nread + c->nwrite];
            b->gpa = d.addr;
            b->len = d.len;
            b->hva = hva;
            if (writable) {
                c->nwrite++;
                c->write_len += d.len;
            } else {
                c->nread++;
                c->read_len += d.len;
            }
        }
        if (!(d.flags & KVQ_DESC_F_NEXT))
            return 0;
        index = d.next;
    }
}

int kvq_pop(struct kvq *q, struct kvq_chain *chain)
{
    if (q->broken)
        return -1;
    if (q->avail_idx == q->last_avail_idx) {
        int idx = read_avail_idx(q);
        if (idx < 0)
            return -1;
        if (idx == q->last_avail_idx) {
            if (!(q->event_idx && q->notifications))
                return 0;
            /* Ask for a kick at the next chain, then look again: a chain added
             * while avail_event was being written would otherwise be left
             * without a notification. */
            write_avail_event(q);
            full_barrier();
            if ((idx = read_avail_idx(q)) < 0)
                return -1;
            if (idx == q->last_avail_idx)
                return 0;
        }
    }
    uint32_t slot = q->last_avail_idx % q->size;
    uint16_t head = ld16(q->avail + 4 + 2 * (size_t)slot);
    q->last_avail_idx++;
    if (walk(q, head, chain) < 0)
        return -1;
    if (q->event_idx && q->notifications)
        write_avail_event(q);
    return 1;
}

/* -- the used ring ------------------------------------------------------------------ */

int kvq_push(struct kvq *q, uint32_t head, uint32_t written)
{
    if (head >= q->size)
        return -1;
    uint8_t *elem = q->used + 4 + 8 * (size_t)(q->used_idx % q->size);
    memcpy(elem, &head, 4);
    memcpy(elem + 4, &written, 4);
    q->used_idx++;
    /* release: the element is visible before the index that publishes it */
    __atomic_store_n((uint16_t *)(q->used + 2), q->used_idx, __ATOMIC_RELEASE);
    return 0;
}

int kvq_should_notify(struct kvq *q)
{
    uint16_t old = q->signalled_used, new = q->used_idx;
    q->signalled_used = new;
    if (old == new)
        return 0;
    full_barrier();                    /* used.idx is visible before we read the driver's wish */
    if (q->event_idx) {
        uint16_t event = ld16(q->avail + 4 + 2 * (size_t)q->size);
        return (uint16_t)(new - event - 1) < (uint16_t)(new - old);
    }
    return !(ld16(q->avail) & KVQ_AVAIL_F_NO_INTERRUPT);
}

/* -- driver -> device notifications ---------------------------------------------------- */

void kvq_disable_notifications(struct kvq *q)
{
    q->notifications = 0;
    if (!q->event_idx)
        st16(q->used, KVQ_USED_F_NO_NOTIFY);
}

int kvq_enable_notifications(struct kvq *q)
{
    q->notifications = 1;
    if (q->event_idx)
        write_avail_event(q);
    else
        st16(q->used, 0);
    full_barrier();
    return kvq_has_available(q);
}
