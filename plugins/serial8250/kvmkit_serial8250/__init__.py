"""kvmkit device plugin: a 16550A UART (kind ``serial8250``)."""
from .uart import Uart16550

__all__ = ["Uart16550"]
