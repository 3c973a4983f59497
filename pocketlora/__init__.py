"""PocketLoRA: on-device LoRA personalisation for fleets (CLI and the small shared pieces)."""

__version__ = "0.1.0"
