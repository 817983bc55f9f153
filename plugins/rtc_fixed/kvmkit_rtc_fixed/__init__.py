"""kvmkit device plugin: the MC146818 CMOS clock started at a fixed time
(kind ``rtc-fixed``), an alternative emulation of the ``rtc`` kind's hardware."""
from .clock import FixedStartClock, parse_start

__all__ = ["FixedStartClock", "parse_start"]
