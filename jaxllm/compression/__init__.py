"""Compression: pruning masks (in the optimizer state), int8 quantization, distillation."""
