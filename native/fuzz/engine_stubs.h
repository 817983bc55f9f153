/* What the blk and net fuzz harnesses give the device code in place of the
 * engine (../src/engine.c): the device state is the "engine" itself, and the
 * engine's thread, queue and counters are not there. */
#ifndef KVMKIT_FUZZ_ENGINE_STUBS_H
#define KVMKIT_FUZZ_ENGINE_STUBS_H

#include "engine.h"

#include <string.h>

void *kveng_device(struct kveng *e) { return (void *)e; }

struct kveng *kveng_start(struct kvq *q, int kick_fd, int irq_fd, int resample_fd,
                          kveng_serve_fn serve, kveng_drop_fn drop, void *dev,
                          const char *thread_name, const char *what, char *err, size_t errlen)
{
    (void)q; (void)kick_fd; (void)irq_fd; (void)resample_fd; (void)serve; (void)drop;
    (void)thread_name; (void)what; (void)err; (void)errlen;
    return dev;
}

void kveng_set_poll_ns(struct kveng *e, uint64_t ns) { (void)e; (void)ns; }

void kveng_get_stats(struct kveng *e, struct kveng_stats *out, void *dev_out,
                     const void *dev_stats, size_t len)
{
    (void)e;
    memset(out, 0, sizeof *out);
    memcpy(dev_out, dev_stats, len);
}

#endif
