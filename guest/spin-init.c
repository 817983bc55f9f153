/*
 * kvmkit "spin" init: a PID 1 that never makes a system call.
 *
 * On the project's CI host, guest user mode cannot enter the kernel through
 * `syscall` or `int $0x80` (see shared/HOST-NOTES.md), so a normal /init dies
 * at once and takes the kernel down with it.  This one only spins on `pause`:
 * the guest kernel stays up, keeps taking interrupts (timer, virtio, serial),
 * answers ARP and ICMP, and can be stopped from the VMM.
 *
 * Built by guest/build-kit with:  gcc -static -nostdlib -O2 ...
 * No libc, no stack use, no data: _start is the whole program.
 */

__attribute__((noreturn, used)) void _start(void)
{
	for (;;)
		__asm__ volatile("pause" ::: "memory");
}
