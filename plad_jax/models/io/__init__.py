"""Checkpoint file formats: safetensors and GGUF readers and writers."""
