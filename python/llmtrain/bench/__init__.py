"""Benchmarks users run: ``llmtrain bench train`` (end-to-end training speed, MFU and memory)."""
