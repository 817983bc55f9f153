/* The exit floor for bench/pio_exit.py: the same vCPU (set up by the
 * benchmark exactly as for kvmkit: the same guest code, 64-bit mode, ports
 * 0x10 and 0x11), run by the smallest loop a VMM can have.  Each port 0x10
 * write is counted and the guest resumed; a write to port 0x11 ends the run.
 * Returns the number of exits handled, or -1 with errno set, or -2 on an
 * exit that is not a port write to 0x10/0x11. */
#include <errno.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>

static long pio_floor(int vcpu_fd, void *run_page)
{
    struct kvm_run *run = run_page;
    long exits = 0;
    for (;;) {
        if (ioctl(vcpu_fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            return -1;
        }
        if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_OUT)
            return -2;
        exits++;
        if (run->io.port == 0x11)
            return exits;
        if (run->io.port != 0x10)
            return -2;
    }
}

/* A C dispatch helper's cost, for the comparison in bench/pio_exit.py: the
 * same loop, but each port write is handed to ``on_out(port, size, value)``
 * (a Python callback through cffi), as a C run loop in front of Python
 * devices would do.  A non-zero return ends the run. */
static long pio_dispatch(int vcpu_fd, void *run_page, int (*on_out)(int, int, unsigned))
{
    struct kvm_run *run = run_page;
    long exits = 0;
    for (;;) {
        if (ioctl(vcpu_fd, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            return -1;
        }
        if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_OUT
            || run->io.count != 1 || run->io.size > 4)
            return -2;
        unsigned value = 0;
        const unsigned char *data = (const unsigned char *)run + run->io.data_offset;
        for (int i = 0; i < run->io.size; i++)
            value |= (unsigned)data[i] << (8 * i);
        exits++;
        if (on_out(run->io.port, run->io.size, value))
            return exits;
    }
}
