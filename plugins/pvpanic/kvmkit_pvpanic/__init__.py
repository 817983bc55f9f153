"""kvmkit's pvpanic device plugin."""
