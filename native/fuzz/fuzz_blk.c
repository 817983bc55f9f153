/* libFuzzer harness for virtio-blk's requests in C (../src/blk.c: serve and
 * drop, the engine's per-chain work); built and run by ./run --target blk.
 *
 * The input is one popped chain and the device's configuration:
 *
 *   [0]       bit 0 read-only, bit 1 write-through, bits 2-3 O_DIRECT alignment
 *             (none, 1, 512, 4096)
 *   [1]       capacity in sectors below 0xf0, else one of odd_capacities
 *   [2]       readable buffers (0-8), [3] writable buffers (up to 8 in all)
 *   [4..]     a little-endian u16 per buffer: its length is 1 + (u16 % 4096),
 *             or 16 when the u16 is 0xffff (a request header of its own)
 *   then      the buffers' bytes, in order (zero-padded): the header is the
 *             first 16 readable bytes, as the driver wrote them
 *
 * Each buffer is its own heap block of exactly its length (AddressSanitizer
 * sees any access outside it), as vq.c hands chains to the engine: every
 * buffer non-empty, read_len and write_len their sums.  The image is a memfd
 * of 64 KiB (a capacity above it reads short: EIO).  Checked: a served chain
 * with a status byte has status OK or IOERR there and a used length from 1 to
 * its writable bytes (1 for IOERR); a deferred one is untouched; drop()
 * writes IOERR.
 */
#define _GNU_SOURCE
#include "../src/blk.c"
#include "engine_stubs.h"

#include <sys/mman.h>

#define MAX_BUFS 8
#define IMAGE_BYTES (128 * SECTOR)
#define UNTOUCHED 0xEE

#define CHECK(cond) do { if (!(cond)) __builtin_trap(); } while (0)

static const uint64_t odd_capacities[16] = {0, 1, 127, 128, 129, 1u << 20, UINT32_MAX,
                                            (uint64_t)1 << 40, UINT64_MAX / SECTOR,
                                            UINT64_MAX / SECTOR + 1, UINT64_MAX - 1, UINT64_MAX,
                                            (uint64_t)INT64_MAX / SECTOR, 2, 3, 4096};
static const uint32_t alignments[4] = {0, 1, 512, 4096};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int image = -1;
    if (image < 0) {
        image = memfd_create("fuzz-blk", MFD_CLOEXEC);
        CHECK(image >= 0);
    }
    CHECK(ftruncate(image, IMAGE_BYTES) == 0);      /* writes past it do not pile up */
    if (size < 4)
        return 0;
    uint32_t nread = data[2] % (MAX_BUFS + 1);
    uint32_t nwrite = data[3] % (MAX_BUFS + 1 - nread);
    uint32_t n = nread + nwrite;
    if (size < 4 + 2 * (size_t)n)
        return 0;

    struct kvblk *b = calloc(1, sizeof *b + MAX_BUFS * sizeof(struct iovec));
    CHECK(b != NULL);
    b->cfg.image_fd = image;
    b->cfg.readonly = data[0] & 1;
    b->cfg.writethrough = (data[0] >> 1) & 1;
    b->cfg.direct_align = alignments[(data[0] >> 2) & 3];
    b->cfg.capacity = data[1] < 0xf0 ? data[1] : odd_capacities[data[1] & 15];

    struct kvq_buf bufs[MAX_BUFS];
    struct kvq_chain c = {.head = 0, .nread = nread, .nwrite = nwrite, .bufs = bufs};
    const uint8_t *rest = data + 4 + 2 * n;
    size_t left = size - 4 - 2 * n;
    for (uint32_t i = 0; i < n; i++) {
        uint16_t raw = (uint16_t)(data[4 + 2 * i] | data[5 + 2 * i] << 8);
        uint32_t len = raw == 0xffff ? HEADER_LEN : 1 + raw % 4096;
        uint8_t *p = malloc(len);
        CHECK(p != NULL);
        size_t take = left < len ? left : len;
        memcpy(p, rest, take);
        memset(p + take, 0, len - take);
        rest += take;
        left -= take;
        bufs[i] = (struct kvq_buf){.gpa = 0x1000 * (i + 1), .len = len, .hva = p};
        if (i < nread)
            c.read_len += len;
        else
            c.write_len += len;
    }
    uint8_t *status = n && nwrite ? &bufs[n - 1].hva[bufs[n - 1].len - 1] : NULL;
    if (status)
        *status = UNTOUCHED;

    uint32_t written = UINT32_MAX;
    uint64_t requests = b->stats.requests;
    int r = serve((struct kveng *)b, &c, &written);
    CHECK(r == KVENG_SERVED || r == KVENG_DEFER);
    if (r == KVENG_SERVED) {
        CHECK(b->stats.requests == requests + (c.write_len != 0));
        if (!c.write_len) {
            CHECK(written == 0);
        } else {
            CHECK(*status == S_OK || *status == S_IOERR);
            CHECK(written >= 1 && written <= c.write_len);
            CHECK(*status == S_OK || written == 1);
        }
    } else {
        CHECK(status && *status == UNTOUCHED);            /* Python gets it as it was */
        CHECK(b->stats.requests == requests);
    }
    uint32_t dropped = drop((struct kveng *)b, &c);
    CHECK(dropped == (c.write_len ? 1u : 0u));
    CHECK(!status || *status == S_IOERR);

    for (uint32_t i = 0; i < n; i++)
        free(bufs[i].hva);
    free(b);
    return 0;
}
