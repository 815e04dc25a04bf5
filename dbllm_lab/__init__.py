"""dbllm_lab: DB-LLM (Flexible Dual Binarization + Deviation-Aware Distillation) and its baselines.

Importing it registers the ``dbllm`` quantizer with transformers (``dbllm_lab.hf_quantizer``), so that a packed
model folder loads with ``AutoModelForCausalLM.from_pretrained(folder)``."""
from .hf_quantizer import register as _register_with_transformers
from .model import load_model, quantizable_linears, tiny_llama  # noqa: F401
from .ppl import perplexity  # noqa: F401

_register_with_transformers()

__version__ = "0.1.0"
