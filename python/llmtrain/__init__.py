"""llmtrain: training linear-cost Power Retention and MLA language models with fused native kernels.

Submodules are imported on demand (``llmtrain.ops``, ``llmtrain.models``, ``llmtrain.data``,
``llmtrain.training``) so that ``import llmtrain`` stays cheap.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
