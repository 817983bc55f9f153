/* libFuzzer harness for virtio-net's transmit checks in C (../src/net.c:
 * check_header and transmit, the engine's per-frame work); built and run by
 * ./run --target net.
 *
 * The input is the negotiated features, the size limits and one popped chain:
 *
 *   [0]       feature bits: bit 0 CSUM, 1 HOST_TSO4, 2 HOST_TSO6, 3 HOST_ECN,
 *             4 HOST_UFO
 *   [1..2]    plain_limit = 60 + u16 % 9000; [3] gso_limit = 60 + [3] * 300
 *   [4]       readable buffers (0-8), [5] writable ones (up to 8 in all)
 *   [6..]     a little-endian u16 per buffer: its length is 1 + (u16 % 4096),
 *             or 12 when the u16 is 0xffff (a virtio-net header of its own)
 *   then      the buffers' bytes (zero-padded): the first 12 readable bytes
 *             are the guest's virtio_net_hdr
 *
 * Buffers are heap blocks of exactly their length (AddressSanitizer).  The
 * "tap" is a non-blocking datagram socket pair.  Checked, for check_header on
 * the chain's header and on the raw input bytes with a made-up size: an
 * accepted frame fits its limit, an offload is one the features allow with
 * NEEDS_CSUM and a GSO size, the checksum field lies inside the frame, and the
 * header for the tap carries no flag but NEEDS_CSUM and no num_buffers (all
 * zero for a frame without offloads, whatever the guest left in it); a
 * transmitted frame arrives whole: that header, then the frame's bytes.
 */
#define _GNU_SOURCE
#include "../src/net.c"
#include "engine_stubs.h"

#include <fcntl.h>
#include <sys/socket.h>

#define MAX_BUFS 8
#define CHECK(cond) do { if (!(cond)) __builtin_trap(); } while (0)

static const int feature_bits[5] = {F_CSUM, F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN, F_HOST_UFO};
static uint8_t frame[MAX_BUFS * 4096 + 64];

static void check_accepted(const struct kvnet_tx *t, const uint8_t *raw, uint64_t size,
                           const uint8_t *out)
{
    int needs_csum = raw[0] & HDR_F_NEEDS_CSUM;
    unsigned gso = raw[1] & ~GSO_ECN;
    CHECK(size <= (gso ? t->cfg.gso_limit : t->cfg.plain_limit));
    static const uint8_t zeros[HDR_SIZE];
    if (raw[0] == 0 && raw[1] == 0)                         /* no offload: an all-zero header */
        CHECK(memcmp(out, zeros, HDR_SIZE) == 0);
    CHECK(out[0] == (uint8_t)needs_csum);
    CHECK((raw[0] == 0 && raw[1] == 0) || memcmp(out + 1, raw + 1, 9) == 0);
    CHECK(out[10] == 0 && out[11] == 0);
    if (needs_csum) {
        CHECK(has(t, F_CSUM));
        CHECK((uint64_t)le16(raw + 6) + le16(raw + 8) + 2 <= size);
    }
    if (raw[1]) {
        CHECK(needs_csum && le16(raw + 4) != 0);
        CHECK((gso == GSO_TCPV4 && has(t, F_HOST_TSO4)) || (gso == GSO_TCPV6 && has(t, F_HOST_TSO6))
              || (gso == GSO_UDP && has(t, F_HOST_UFO)));
        CHECK(!(raw[1] & GSO_ECN) || has(t, F_HOST_ECN));
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int tap[2] = {-1, -1};
    if (tap[0] < 0) {
        CHECK(socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, tap) == 0);
        int big = 1 << 20;
        setsockopt(tap[0], SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
        setsockopt(tap[1], SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    }
    if (size < 6)
        return 0;
    uint32_t nread = data[4] % (MAX_BUFS + 1);
    uint32_t nwrite = data[5] % (MAX_BUFS + 1 - nread);
    uint32_t n = nread + nwrite;
    if (size < 6 + 2 * (size_t)n)
        return 0;

    struct kvnet_tx *t = calloc(1, sizeof *t + (MAX_BUFS + 1) * sizeof(struct iovec));
    CHECK(t != NULL);
    t->cfg.tap_fd = tap[0];
    for (int i = 0; i < 5; i++)
        if (data[0] >> i & 1)
            t->cfg.features |= (uint64_t)1 << feature_bits[i];
    t->cfg.plain_limit = 60 + (uint16_t)(data[1] | data[2] << 8) % 9000;
    t->cfg.gso_limit = 60 + (uint64_t)data[3] * 300;

    if (size >= 6 + HDR_SIZE + 4) {                      /* the header check on raw bytes */
        const uint8_t *raw = data + 6;
        uint64_t fsize;
        memcpy(&fsize, raw + HDR_SIZE - 4, 4);
        fsize &= 0xFFFFFFFF;
        uint8_t out[HDR_SIZE];
        if (check_header(t, raw, fsize, out))
            check_accepted(t, raw, fsize, out);
    }

    struct kvq_buf bufs[MAX_BUFS];
    struct kvq_chain c = {.head = 0, .nread = nread, .nwrite = nwrite, .bufs = bufs};
    const uint8_t *rest = data + 6 + 2 * n;
    size_t left = size - 6 - 2 * n;
    for (uint32_t i = 0; i < n; i++) {
        uint16_t raw = (uint16_t)(data[6 + 2 * i] | data[7 + 2 * i] << 8);
        uint32_t len = raw == 0xffff ? HDR_SIZE : 1 + raw % 4096;
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

    uint32_t written = UINT32_MAX;
    uint64_t frames = t->stats.tx_frames;
    int r = transmit((struct kveng *)t, &c, &written);
    CHECK(r == KVENG_SERVED || r == KVENG_DEFER);
    ssize_t got = recv(tap[1], frame, sizeof frame, 0);
    if (r == KVENG_SERVED) {
        CHECK(written == 0 && t->stats.tx_frames == frames + 1);
        CHECK(c.read_len >= HDR_SIZE + MIN_FRAME);
        CHECK(got == (ssize_t)c.read_len);                /* the tap's header + the frame */
        uint8_t raw[HDR_SIZE], hdr[HDR_SIZE];
        CHECK(gather(&c, raw, HDR_SIZE) == 0);
        CHECK(check_header(t, raw, c.read_len - HDR_SIZE, hdr));
        check_accepted(t, raw, c.read_len - HDR_SIZE, hdr);
        CHECK(memcmp(frame, hdr, HDR_SIZE) == 0);
        uint64_t at = 0;                                   /* the frame: the readable bytes after the header */
        for (uint32_t i = 0; i < nread; i++)
            for (uint32_t j = 0; j < bufs[i].len; j++, at++)
                if (at >= HDR_SIZE)
                    CHECK(frame[at] == bufs[i].hva[j]);
    } else {
        CHECK(got < 0 && t->stats.tx_frames == frames);    /* nothing reached the tap */
    }

    for (uint32_t i = 0; i < n; i++)
        free(bufs[i].hva);
    free(t);
    return 0;
}
