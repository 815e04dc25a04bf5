"""dbllm_lab: DB-LLM (Flexible Dual Binarization + Deviation-Aware Distillation) and its baselines."""
from .model import load_model, quantizable_linears, tiny_llama  # noqa: F401
from .ppl import perplexity  # noqa: F401

__version__ = "0.1.0"
