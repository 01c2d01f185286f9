"""Interoperability with other ecosystems: Hugging Face checkpoints and tokenizers (hf.py)."""
