/* Interrupts of a queue engine (engine.c), and the eventfd helpers it shares.
 *
 * MSI-X: the vector's irqfd is signalled unless the guest masked the vector;
 * then the interrupt is left pending and sent when it is unmasked.  INTx: the
 * ISR's queue bit is set and the level-triggered irqfd signalled; KVM's
 * resample eventfd fires at the guest's EOI and kvirq_resample asserts the
 * line again while the ISR bit is still unread.
 */
#ifndef KVMKIT_IRQ_H
#define KVMKIT_IRQ_H

#include <stdint.h>

struct kvirq {
    int irq_fd;                 /* eventfd: the MSI-X vector's irqfd or INTx's trigger; -1: none */
    int resample_fd;            /* INTx: the irqfd's resample eventfd; -1 with MSI-X */
    uint32_t msix;              /* KVIRQ_MASKED | KVIRQ_PENDING, atomic */
    uint32_t isr;               /* INTx ISR bits, atomic */
};

#define KVIRQ_MASKED 1
#define KVIRQ_PENDING 2

/* Write 1 to an eventfd (fd < 0: nothing); read (and so clear) one. */
void kvirq_signal_fd(int fd);
void kvirq_drain_fd(int fd);

/* Interrupt the driver; 1 if the irqfd was written, 0 if none is wired or
 * the MSI-X vector is masked (the interrupt is then pending). */
int kvirq_raise(struct kvirq *irq);
/* MSI-X: the vector became (un)masked; unmasking sends a pending interrupt. */
void kvirq_set_masked(struct kvirq *irq, int masked);
/* INTx: read and clear the ISR bits. */
uint32_t kvirq_take_isr(struct kvirq *irq);
/* INTx: the resample eventfd fired (the guest's EOI): drain it, assert again
 * if the ISR is still set. */
void kvirq_resample(struct kvirq *irq);

#endif
