"""cffi (API mode) bindings to the KVM ioctl interface.

Compiled at install time against the system's <linux/kvm.h>, so every
ioctl number and struct layout comes from the kernel headers.  The parts of
``struct kvm_run``'s exit union that kvmkit reads are mirrored as small
named structs at the union's offset (checked against the header with
static assertions below).
"""
from cffi import FFI

IOCTLS = """
KVM_GET_API_VERSION KVM_CREATE_VM KVM_GET_VCPU_MMAP_SIZE
KVM_GET_SUPPORTED_CPUID KVM_CREATE_VCPU KVM_RUN KVM_SET_USER_MEMORY_REGION
KVM_CREATE_IRQCHIP KVM_CREATE_PIT2 KVM_SET_TSS_ADDR KVM_SET_IDENTITY_MAP_ADDR
KVM_IRQ_LINE KVM_SET_CPUID2 KVM_GET_REGS KVM_SET_REGS KVM_GET_SREGS
KVM_SET_SREGS KVM_GET_FPU KVM_SET_FPU KVM_SET_MSRS KVM_GET_LAPIC KVM_SET_LAPIC
KVM_GET_VCPU_EVENTS KVM_SET_VCPU_EVENTS KVM_GET_MP_STATE KVM_SET_MP_STATE
KVM_IOEVENTFD KVM_IRQFD KVM_SET_GSI_ROUTING KVM_SIGNAL_MSI KVM_TRANSLATE
KVM_EXIT_UNKNOWN KVM_EXIT_EXCEPTION KVM_EXIT_IO KVM_EXIT_HYPERCALL KVM_EXIT_DEBUG
KVM_EXIT_HLT KVM_EXIT_MMIO KVM_EXIT_IRQ_WINDOW_OPEN KVM_EXIT_SHUTDOWN
KVM_EXIT_FAIL_ENTRY KVM_EXIT_INTR KVM_EXIT_SET_TPR KVM_EXIT_TPR_ACCESS
KVM_EXIT_NMI KVM_EXIT_INTERNAL_ERROR KVM_EXIT_SYSTEM_EVENT
KVM_EXIT_IO_IN KVM_EXIT_IO_OUT KVM_INTERNAL_ERROR_EMULATION
KVM_SYSTEM_EVENT_SHUTDOWN KVM_SYSTEM_EVENT_RESET KVM_SYSTEM_EVENT_CRASH
KVM_PIT_SPEAKER_DUMMY KVM_MP_STATE_RUNNABLE KVM_MP_STATE_UNINITIALIZED
KVM_IRQ_ROUTING_IRQCHIP KVM_IRQ_ROUTING_MSI KVM_IRQCHIP_PIC_MASTER KVM_IRQCHIP_PIC_SLAVE
KVM_IRQCHIP_IOAPIC KVM_IRQFD_FLAG_DEASSIGN KVM_IRQFD_FLAG_RESAMPLE
KVM_IOEVENTFD_FLAG_DATAMATCH KVM_IOEVENTFD_FLAG_PIO KVM_IOEVENTFD_FLAG_DEASSIGN
KVM_CHECK_EXTENSION KVM_CAP_SYNC_REGS KVM_SYNC_X86_REGS KVM_MP_STATE_HALTED
KVM_MP_STATE_INIT_RECEIVED KVM_MP_STATE_SIPI_RECEIVED
KVM_GET_MSR_INDEX_LIST KVM_GET_MSRS KVM_GET_CPUID2 KVM_GET_XSAVE KVM_SET_XSAVE KVM_GET_XCRS
KVM_SET_XCRS KVM_GET_DEBUGREGS KVM_SET_DEBUGREGS KVM_GET_IRQCHIP KVM_SET_IRQCHIP
KVM_GET_PIT2 KVM_SET_PIT2 KVM_GET_CLOCK KVM_SET_CLOCK KVM_CAP_XSAVE KVM_CAP_XCRS
KVM_CAP_DEBUGREGS KVM_CAP_ADJUST_CLOCK KVM_CAP_PIT_STATE2 KVM_CAP_VCPU_EVENTS
KVM_CLOCK_REALTIME KVM_CLOCK_TSC_STABLE
""".split()

CDEF = """
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef int __s32;

struct kvm_userspace_memory_region {
    __u32 slot; __u32 flags; __u64 guest_phys_addr; __u64 memory_size; __u64 userspace_addr;
};
struct kvm_pit_config { __u32 flags; ...; };
struct kvm_regs {
    __u64 rax, rbx, rcx, rdx; __u64 rsi, rdi, rsp, rbp;
    __u64 r8, r9, r10, r11; __u64 r12, r13, r14, r15; __u64 rip, rflags;
};
struct kvm_segment {
    __u64 base; __u32 limit; __u16 selector; __u8 type;
    __u8 present, dpl, db, s, l, g, avl; __u8 unusable; ...;
};
struct kvm_dtable { __u64 base; __u16 limit; ...; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss; struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt; __u64 cr0, cr2, cr3, cr4, cr8; __u64 efer; __u64 apic_base;
    ...;
};
struct kvm_fpu { __u16 fcw; __u16 fsw; __u8 ftwx; __u32 mxcsr; ...; };
struct kvm_msr_entry { __u32 index; __u32 reserved; __u64 data; };
struct kvm_cpuid_entry2 {
    __u32 function; __u32 index; __u32 flags; __u32 eax; __u32 ebx; __u32 ecx; __u32 edx; ...;
};
struct kvm_lapic_state { char regs[1024]; };
struct kvm_mp_state { __u32 mp_state; };
struct kvm_translation {
    __u64 linear_address; __u64 physical_address; __u8 valid; __u8 writeable; __u8 usermode; ...;
};
struct kvm_ioeventfd { __u64 datamatch; __u64 addr; __u32 len; __s32 fd; __u32 flags; ...; };
struct kvm_irqfd { __u32 fd; __u32 gsi; __u32 flags; __u32 resamplefd; ...; };
struct kvm_msi { __u32 address_lo; __u32 address_hi; __u32 data; __u32 flags; __u32 devid; ...; };
struct kvm_run {
    __u8 request_interrupt_window; __u8 immediate_exit;
    __u32 exit_reason; __u8 ready_for_interrupt_injection; __u8 if_flag;
    __u64 kvm_valid_regs; __u64 kvm_dirty_regs;
    ...;
};

/* mirrors of members of kvm_run's exit union, checked in the C source */
struct kvmkit_io { __u8 direction; __u8 size; __u16 port; __u32 count; __u64 data_offset; };
struct kvmkit_mmio { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; };
struct kvmkit_internal { __u32 suberror; __u32 ndata; __u64 data[16]; };
struct kvmkit_system_event { __u32 type; __u32 ndata; __u64 data[16]; };
struct kvmkit_fail_entry { __u64 hardware_entry_failure_reason; __u32 cpu; };

static const int KVMKIT_EXIT_UNION_OFFSET;
static const int KVMKIT_CPUID2_HEADER;
static const int KVMKIT_MSRS_HEADER;
static const int KVMKIT_EVENTS_SIZE;
static const int KVMKIT_EVENTS_FLAGS_OFFSET;
static const int KVMKIT_EVENTS_EXCEPTION_OFFSET;
static const int KVMKIT_ROUTING_HEADER;
static const int KVMKIT_ROUTING_ENTRY_SIZE;
static const int KVMKIT_ROUTING_ENTRY_U_OFFSET;
static const int KVMKIT_SYNC_REGS_OFFSET;
static const int KVMKIT_SIZEOF_REGS;
static const int KVMKIT_SIZEOF_SREGS;
static const int KVMKIT_SIZEOF_FPU;
static const int KVMKIT_SIZEOF_XSAVE;
static const int KVMKIT_SIZEOF_XCRS;
static const int KVMKIT_SIZEOF_DEBUGREGS;
static const int KVMKIT_SIZEOF_LAPIC;
static const int KVMKIT_SIZEOF_MP_STATE;
static const int KVMKIT_SIZEOF_IRQCHIP;
static const int KVMKIT_IRQCHIP_CHIP_OFFSET;
static const int KVMKIT_SIZEOF_PIT2;
static const int KVMKIT_SIZEOF_CLOCK;
static const int KVMKIT_CLOCK_REALTIME_OFFSET;
static const int KVMKIT_MSR_LIST_HEADER;

int kvmkit_ioctl(int fd, unsigned long request, void *arg);
int kvmkit_ioctl_val(int fd, unsigned long request, unsigned long arg);
""" + "".join(f"#define {name} ...\n" for name in IOCTLS)

SOURCE = r"""
#include <errno.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

struct kvmkit_io { __u8 direction; __u8 size; __u16 port; __u32 count; __u64 data_offset; };
struct kvmkit_mmio { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; };
struct kvmkit_internal { __u32 suberror; __u32 ndata; __u64 data[16]; };
struct kvmkit_system_event { __u32 type; __u32 ndata; __u64 data[16]; };
struct kvmkit_fail_entry { __u64 hardware_entry_failure_reason; __u32 cpu; };

#define SAME(mirror, member) \
    _Static_assert(sizeof(struct mirror) <= sizeof(((struct kvm_run *)0)->member), #member); \
    _Static_assert(offsetof(struct kvm_run, member) == offsetof(struct kvm_run, io), #member)
SAME(kvmkit_io, io);
SAME(kvmkit_mmio, mmio);
SAME(kvmkit_internal, internal);
SAME(kvmkit_fail_entry, fail_entry);
_Static_assert(offsetof(struct kvm_run, io.port) - offsetof(struct kvm_run, io)
               == offsetof(struct kvmkit_io, port), "io.port");
_Static_assert(offsetof(struct kvm_run, io.data_offset) - offsetof(struct kvm_run, io)
               == offsetof(struct kvmkit_io, data_offset), "io.data_offset");
_Static_assert(offsetof(struct kvm_run, mmio.is_write) - offsetof(struct kvm_run, mmio)
               == offsetof(struct kvmkit_mmio, is_write), "mmio.is_write");
_Static_assert(offsetof(struct kvm_run, system_event.type) == offsetof(struct kvm_run, io),
               "system_event.type");

static const int KVMKIT_EXIT_UNION_OFFSET = offsetof(struct kvm_run, io);
static const int KVMKIT_CPUID2_HEADER = offsetof(struct kvm_cpuid2, entries);
static const int KVMKIT_MSRS_HEADER = offsetof(struct kvm_msrs, entries);
static const int KVMKIT_EVENTS_SIZE = sizeof(struct kvm_vcpu_events);
static const int KVMKIT_EVENTS_FLAGS_OFFSET = offsetof(struct kvm_vcpu_events, flags);
static const int KVMKIT_EVENTS_EXCEPTION_OFFSET = offsetof(struct kvm_vcpu_events, exception);
static const int KVMKIT_ROUTING_HEADER = offsetof(struct kvm_irq_routing, entries);
static const int KVMKIT_ROUTING_ENTRY_SIZE = sizeof(struct kvm_irq_routing_entry);
static const int KVMKIT_ROUTING_ENTRY_U_OFFSET = offsetof(struct kvm_irq_routing_entry, u);
/* kvm_run.s.regs.regs: struct kvm_regs, filled on every exit once kvm_valid_regs asks */
static const int KVMKIT_SYNC_REGS_OFFSET = offsetof(struct kvm_run, s.regs.regs);
/* state saved as raw struct bytes (snapshots): their sizes, checked on restore */
static const int KVMKIT_SIZEOF_REGS = sizeof(struct kvm_regs);
static const int KVMKIT_SIZEOF_SREGS = sizeof(struct kvm_sregs);
static const int KVMKIT_SIZEOF_FPU = sizeof(struct kvm_fpu);
static const int KVMKIT_SIZEOF_XSAVE = sizeof(struct kvm_xsave);
static const int KVMKIT_SIZEOF_XCRS = sizeof(struct kvm_xcrs);
static const int KVMKIT_SIZEOF_DEBUGREGS = sizeof(struct kvm_debugregs);
static const int KVMKIT_SIZEOF_LAPIC = sizeof(struct kvm_lapic_state);
static const int KVMKIT_SIZEOF_MP_STATE = sizeof(struct kvm_mp_state);
static const int KVMKIT_SIZEOF_IRQCHIP = sizeof(struct kvm_irqchip);
static const int KVMKIT_IRQCHIP_CHIP_OFFSET = offsetof(struct kvm_irqchip, chip);
static const int KVMKIT_SIZEOF_PIT2 = sizeof(struct kvm_pit_state2);
static const int KVMKIT_SIZEOF_CLOCK = sizeof(struct kvm_clock_data);
static const int KVMKIT_CLOCK_REALTIME_OFFSET = offsetof(struct kvm_clock_data, realtime);
static const int KVMKIT_MSR_LIST_HEADER = offsetof(struct kvm_msr_list, indices);

/* ioctl wrappers: return the result, or -errno; the GIL is released by cffi. */
int kvmkit_ioctl(int fd, unsigned long request, void *arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

int kvmkit_ioctl_val(int fd, unsigned long request, unsigned long arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("kvmkit.hypervisor._kvm", SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
