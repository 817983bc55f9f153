"""ACPI tables for the guest: an AML encoder, the fixed tables, the DSDT and
the small platform device (sleep control/status, reset) behind them.

Facts come from the ACPI specification (6.x): section 5.2 (tables), 6.4
(resource descriptors), 20 (AML encoding).
"""
