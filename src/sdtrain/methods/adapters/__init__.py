"""Adapters (LoRA through peft) and their file formats: kohya, diffusers/PEFT, metadata."""
