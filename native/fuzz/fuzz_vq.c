/* libFuzzer harness for the C split queue (../src/vq.c); built and run by ./run.
 *
 * The input is a small guest: a header that picks the queue and what to do
 * with it, then the contents of guest RAM (zero-padded), which holds the
 * rings, descriptors and indirect tables at whatever addresses the bytes say.
 *
 *   [0]       queue size: 1 << (b % 7) below 0xf0, else one of odd_sizes (big or invalid)
 *   [1]       bit 0 EVENT_IDX, bit 1 INDIRECT_DESC, bits 2-3 the RAM layout:
 *             0 one 8 KiB region; 1 two 4 KiB regions with a hole between;
 *             2 two back to back (a range may not straddle them);
 *             3 one at 4 KiB and one ending at the top of the 64-bit space
 *   [2..7]    desc, avail, used: u16 each, bit 15 picks the region, the rest
 *             is the offset into it (which may run past its end)
 *   [8..23]   16 operations: pop, pop until empty, should_notify, disable or
 *             enable notifications, has_available, push an arbitrary head, or
 *             a driver publishing more chains (avail.idx += n)
 *   [24..]    guest RAM
 *
 * Every region is its own heap block of exactly its size, so AddressSanitizer
 * sees any access outside guest RAM.  Chains that come out are checked: each
 * buffer is non-empty and wholly inside one region, the counts and totals add
 * up; once pop fails, the queue stays broken.
 */
#include "vq.h"

#include <stdlib.h>
#include <string.h>

#define HEADER 24
#define NOPS 16
#define MAX_SIZE 512            /* the largest queue whose descriptor table fits in RAM */
#define REGION 4096

#define CHECK(cond) do { if (!(cond)) __builtin_trap(); } while (0)

static const uint32_t odd_sizes[16] = {0, 3, 6, 12, 100, 255, 128, 256, 512, 1024,
                                       32768, 65536, 1u << 20, 0x80000000u, 0xffffffffu, 24};

static const uint8_t *rest;
static size_t rest_len;

/* A heap block of ``size`` bytes filled from the input (then zeros). */
static uint8_t *block(size_t size)
{
    uint8_t *p = malloc(size);
    size_t n = rest_len < size ? rest_len : size;
    memcpy(p, rest, n);
    memset(p + n, 0, size - n);
    rest += n;
    rest_len -= n;
    return p;
}

static void layout(struct kvq_mem *mem, int which)
{
    static const uint64_t second[4] = {0, 0x3000, 0x1000, 0 - (uint64_t)REGION};
    memset(mem, 0, sizeof *mem);
    if (which == 0) {
        mem->count = 1;
        mem->regions[0] = (struct kvq_region){0, 2 * REGION, block(2 * REGION)};
        return;
    }
    mem->count = 2;
    mem->regions[0] = (struct kvq_region){which == 3 ? REGION : 0, REGION, block(REGION)};
    mem->regions[1] = (struct kvq_region){second[which], REGION, block(REGION)};
}

static uint64_t ring_addr(const struct kvq_mem *mem, const uint8_t *p)
{
    uint16_t v = (uint16_t)(p[0] | p[1] << 8);
    const struct kvq_region *r = &mem->regions[(v >> 15) % mem->count];
    return r->gpa + (v & 0x7fff);
}

static void check_chain(const struct kvq *q, const struct kvq_chain *c)
{
    uint64_t read_len = 0, write_len = 0;
    CHECK(c->head < q->size);
    CHECK(c->nread + c->nwrite <= q->size);
    for (uint32_t i = 0; i < c->nread + c->nwrite; i++) {
        const struct kvq_buf *b = &c->bufs[i];
        CHECK(b->len > 0);
        CHECK(kvq_translate(q->mem, b->gpa, b->len) == b->hva);
        /* the first and the last byte are guest RAM (AddressSanitizer checks) */
        volatile uint8_t sink = b->hva[0];
        sink = b->hva[b->len - 1];
        (void)sink;
        *(i < c->nread ? &read_len : &write_len) += b->len;
    }
    CHECK(read_len == c->read_len && write_len == c->write_len);
    CHECK(read_len + write_len <= (UINT64_C(1) << 32));
}

/* Pop one chain and return it; 0 when there was none, -1 when the queue broke. */
static int pop_one(struct kvq *q, struct kvq_chain *c, uint32_t written)
{
    int got = kvq_pop(q, c);
    if (got < 0) {
        CHECK(q->broken && q->error[0]);
        CHECK(kvq_pop(q, c) == -1 && !kvq_has_available(q));
        return -1;
    }
    CHECK(got == 0 || got == 1);
    if (got) {
        check_chain(q, c);
        CHECK(kvq_push(q, c->head, written < c->write_len ? written : (uint32_t)c->write_len) == 0);
    }
    return got;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct kvq_buf bufs[MAX_SIZE];
    struct kvq_mem mem;
    struct kvq q;
    struct kvq_chain chain = {.bufs = bufs};

    if (size < HEADER)
        return 0;
    rest = data + HEADER;
    rest_len = size - HEADER;
    layout(&mem, data[1] >> 2 & 3);
    uint32_t qsize = data[0] >= 0xf0 ? odd_sizes[data[0] - 0xf0] : 1u << (data[0] % 7);
    if (kvq_init(&q, &mem, qsize, ring_addr(&mem, data + 2), ring_addr(&mem, data + 4),
                 ring_addr(&mem, data + 6), data[1] & 1, data[1] & 2) < 0) {
        CHECK(q.broken && q.error[0]);
        goto out;
    }
    CHECK(qsize <= MAX_SIZE);
    for (int i = 0; i < NOPS; i++) {
        uint8_t op = data[8 + i] & 7, arg = data[8 + i] >> 3;
        switch (op) {
        case 0:
        case 1:
            pop_one(&q, &chain, arg * 97u);
            break;
        case 2:                         /* the usual notify handler: pop until empty */
            for (uint32_t n = 0; n <= q.size && pop_one(&q, &chain, arg) > 0; n++)
                ;
            break;
        case 3:
            kvq_should_notify(&q);
            break;
        case 4:
            kvq_disable_notifications(&q);
            break;
        case 5:
            kvq_enable_notifications(&q);
            break;
        case 6:
            CHECK(kvq_has_available(&q) <= 1);
            break;
        case 7:
            if (arg & 1) {
                CHECK((kvq_push(&q, arg >> 1, arg) == 0) == ((uint32_t)(arg >> 1) < q.size));
            } else {                    /* the driver publishes arg/2 more chains */
                uint8_t *idx = kvq_translate(&mem, q.avail_gpa + 2, 2);
                uint16_t v;
                memcpy(&v, idx, 2);
                v = (uint16_t)(v + (arg >> 1));
                memcpy(idx, &v, 2);
            }
            break;
        }
    }
out:
    for (uint32_t i = 0; i < mem.count; i++)
        free(mem.regions[i].hva);
    return 0;
}
