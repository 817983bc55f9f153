"""kvmkit device plugin: the MC146818 CMOS real-time clock (kind ``rtc``)."""
from .mc146818 import Rtc

__all__ = ["Rtc"]
