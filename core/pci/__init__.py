"""PCI bus 0 on configuration mechanism #1: config space, host bridge, BAR
allocation and MSI-X.  Pure state machines: no KVM, no threads."""
from .allocator import (IO_WINDOW_END, IO_WINDOW_START, MMIO_WINDOW_END, MMIO_WINDOW_START,
                        AllocationError, IoAllocator, MmioAllocator)
from .config_space import (BAR_COUNT, COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE, COMMAND_IO,
                           COMMAND_MEMORY, CONFIG_SPACE_SIZE, STATUS_CAPABILITIES, STATUS_INTERRUPT,
                           Bar, ConfigSpace, ConfigSpaceError)
from .host_bridge import (CLASS_BRIDGE_HOST, CONFIG_ADDRESS_PORT, CONFIG_DATA_PORT,
                          HOST_BRIDGE_DEVICE_ID, HOST_BRIDGE_VENDOR_ID, MAX_DEVICES, PORT_SIZE,
                          HostBridge, PciBusFull, PciHost)
from .msix import (MSIX_CONTROL_ENABLE, MSIX_CONTROL_FUNCTION_MASK, MSIX_ENTRY_SIZE, PCI_CAP_ID_MSIX,
                   MsixCapability, MsixPba, MsixTable, MsixVector)

PCI_CAP_ID_VNDR = 0x09               # vendor-specific capability (virtio's structures)

# Class codes (base class, sub-class, programming interface).
CLASS_STORAGE_SCSI = 0x010000
CLASS_STORAGE_OTHER = 0x018000
CLASS_NETWORK_ETHERNET = 0x020000
CLASS_NETWORK_OTHER = 0x028000
CLASS_COMMUNICATION_OTHER = 0x078000
CLASS_SYSTEM_OTHER = 0x088000
CLASS_INPUT_OTHER = 0x098000
CLASS_OTHER = 0xFF0000

__all__ = [
    "AllocationError", "Bar", "BAR_COUNT", "CLASS_BRIDGE_HOST", "CLASS_COMMUNICATION_OTHER",
    "CLASS_INPUT_OTHER", "CLASS_NETWORK_ETHERNET", "CLASS_NETWORK_OTHER", "CLASS_OTHER",
    "CLASS_STORAGE_OTHER", "CLASS_STORAGE_SCSI", "CLASS_SYSTEM_OTHER", "COMMAND_BUS_MASTER",
    "COMMAND_INTX_DISABLE", "COMMAND_IO", "COMMAND_MEMORY", "CONFIG_ADDRESS_PORT",
    "CONFIG_DATA_PORT", "CONFIG_SPACE_SIZE", "ConfigSpace", "ConfigSpaceError",
    "HOST_BRIDGE_DEVICE_ID", "HOST_BRIDGE_VENDOR_ID", "HostBridge", "IO_WINDOW_END",
    "IO_WINDOW_START", "IoAllocator", "MAX_DEVICES", "MMIO_WINDOW_END", "MMIO_WINDOW_START",
    "MSIX_CONTROL_ENABLE", "MSIX_CONTROL_FUNCTION_MASK", "MSIX_ENTRY_SIZE", "MmioAllocator",
    "MsixCapability", "MsixPba", "MsixTable", "MsixVector", "PCI_CAP_ID_MSIX", "PCI_CAP_ID_VNDR",
    "PORT_SIZE", "PciBusFull", "PciHost", "STATUS_CAPABILITIES", "STATUS_INTERRUPT",
]
