/* Interrupts of a queue engine: see irq.h. */
#include "irq.h"

#include <errno.h>
#include <unistd.h>

void kvirq_signal_fd(int fd)
{
    uint64_t one = 1;
    if (fd >= 0 && write(fd, &one, sizeof one) < 0 && errno != EAGAIN) {
        /* an eventfd write fails only when its counter would overflow */
    }
}

void kvirq_drain_fd(int fd)
{
    uint64_t value;
    if (read(fd, &value, sizeof value) < 0) {
        /* EAGAIN: nothing there */
    }
}

int kvirq_raise(struct kvirq *irq)
{
    if (irq->irq_fd < 0)
        return 0;
    if (irq->resample_fd >= 0) {                /* INTx: ISR bit, then the level irqfd */
        __atomic_fetch_or(&irq->isr, 1u, __ATOMIC_SEQ_CST);
    } else {                                    /* MSI-X: pending while masked */
        uint32_t s = __atomic_load_n(&irq->msix, __ATOMIC_SEQ_CST);
        for (;;) {
            if (!(s & KVIRQ_MASKED))
                break;
            if (__atomic_compare_exchange_n(&irq->msix, &s, s | KVIRQ_PENDING, 0,
                                            __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
                return 0;
        }
    }
    kvirq_signal_fd(irq->irq_fd);
    return 1;
}

void kvirq_set_masked(struct kvirq *irq, int masked)
{
    if (masked) {
        __atomic_fetch_or(&irq->msix, KVIRQ_MASKED, __ATOMIC_SEQ_CST);
        return;
    }
    uint32_t old = __atomic_fetch_and(&irq->msix, ~(uint32_t)(KVIRQ_MASKED | KVIRQ_PENDING),
                                      __ATOMIC_SEQ_CST);
    if (old & KVIRQ_PENDING && irq->irq_fd >= 0)
        kvirq_signal_fd(irq->irq_fd);
}

uint32_t kvirq_take_isr(struct kvirq *irq)
{
    return __atomic_exchange_n(&irq->isr, 0u, __ATOMIC_SEQ_CST);
}

void kvirq_resample(struct kvirq *irq)
{
    kvirq_drain_fd(irq->resample_fd);
    if (__atomic_load_n(&irq->isr, __ATOMIC_SEQ_CST))
        kvirq_signal_fd(irq->irq_fd);
}
