"""kvmkit device plugin: an i8042 PS/2 controller with a keyboard (kind ``i8042``)."""
from .controller import I8042

__all__ = ["I8042"]
