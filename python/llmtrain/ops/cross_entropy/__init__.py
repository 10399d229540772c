"""Cross-entropy over the vocabulary fused with the output projection, chunked over tokens."""

from llmtrain.ops.cross_entropy.op import default_chunk_rows, linear_cross_entropy

__all__ = ["default_chunk_rows", "linear_cross_entropy"]
