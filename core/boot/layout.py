"""Fixed guest-physical addresses used while booting Linux (x86-64)."""

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30

# Low memory (below 1 MiB): boot structures the VMM writes.
BDA_EBDA_SEGMENT = 0x40E     # u16: segment of the EBDA, read by firmware-aware guests
BDA_BASE_MEMORY_KIB = 0x413  # u16: conventional memory size in KiB
GDT_START = 0x500
ZERO_PAGE_START = 0x7000     # struct boot_params, the vCPU's RSI
SETUP_DATA_START = 0x8000    # the SETUP_RNG_SEED node
PML4_START = 0x9000          # the vCPU's CR3
PDPT_START = 0xA000
PD_START = 0xB000            # four page directories, 0xB000-0xEFFF
PD_COUNT = 4
CMDLINE_START = 0x20000
CMDLINE_MAX_SIZE = 0x1000    # buffer size, terminating zero included
EBDA_START = 0x9FC00         # extended BIOS data area: the MP table lives here
EBDA_END = 0xA0000
MPTABLE_START = EBDA_START
BIOS_START = 0xF0000         # reserved for a later ACPI RSDP
HIGH_MEMORY_START = 0x100000  # the kernel and the initrd go above this

# Where the identity map stops (2 MiB pages, first 4 GiB).
IDENTITY_MAP_END = 4 * GIB

# The page at the top of 4 GiB that holds the reset vector (kvmkit.chipset).
RESET_PAGE = 0xFFFF_F000
RESET_PAGE_SIZE = 0x1000

# Interrupt controllers (KVM's in-kernel irqchip).
IOAPIC_ADDR = 0xFEC00000
LAPIC_ADDR = 0xFEE00000

# Segment selectors of the GDT written at GDT_START.
BOOT_CS = 0x10
BOOT_DS = 0x18
BOOT_TSS = 0x20

# Defaults for kernels whose setup header does not say.
DEFAULT_INITRD_ADDR_MAX = 0x7FFFFFFF
DEFAULT_CMDLINE_SIZE = 2047   # COMMAND_LINE_SIZE (2048) less the terminating zero
DEFAULT_KERNEL_ALIGNMENT = 2 * MIB
