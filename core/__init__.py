"""kvmkit: a KVM virtual machine monitor whose devices are plugins."""
__version__ = "0.1.0"
