"""Applying: build a planned layout on a real model (DTensor TP, activation checkpointing, FSDP2) under Lightning."""
