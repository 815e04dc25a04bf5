"""Packed DB-LLM folders as ordinary transformers models: ``AutoModelForCausalLM.from_pretrained(folder)``.

``import dbllm_lab`` registers, with transformers' ``register_quantization_config`` / ``register_quantizer``:

- ``DbllmConfig`` (``quant_method: "dbllm"``), the ``quantization_config`` of a folder's ``config.json``: the method
  (``fdb``: the dual binarization, the only one the packed format stores), bits, group size, the packing layout
  version, the scale dtype, the per-block linear layers that are packed and the linear layers left in full
  precision (``modules_to_not_convert``; embeddings and RMSNorm weights are never quantized);
- ``DbllmHfQuantizer``: before the weights load it checks the safetensors files (SHA-256 against
  ``quant_config.json`` when the folder has one; every packed tensor's name, shape and dtype) and replaces each
  packed ``nn.Linear`` of the empty (meta) model by a ``PackedDualBinaryLinear``. transformers then reads the
  stored bit-planes and scales straight into those buffers: no dense weight is ever formed.

Packing layout version 1 (``dbllm_lab.packing``): per layer ``p1``, ``p2`` (out, in / 32) int32 words, bit j of
word k = column 32k + j; ``a1``, ``a2`` (out, in / group_size) scales; optional fp32 ``bias``.
"""
import hashlib
import json
import os

import torch
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from .model import LINEAR_NAMES

QUANT_METHOD = "dbllm"
PACKING_VERSION = 1
METHODS = ("fdb",)  # the uniform grid and the other baselines are not stored in the packed format
SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
SAFETENSORS_DTYPES = {torch.int32: "I32", torch.float16: "F16", torch.float32: "F32"}
HEADER = "quant_config.json"  # dbllm_lab's own header beside the weights (checkpoint.py)


class DbllmConfig(QuantizationConfigMixin):
    """``quantization_config`` of a packed DB-LLM folder; every field is checked on construction and a bad one
    is a ValueError naming it."""

    def __init__(self, method="fdb", bits=2, group_size=64, packing_version=PACKING_VERSION, scale_dtype="float16",
                 linear_names=LINEAR_NAMES, modules_to_not_convert=("lm_head",), **kwargs):
        self.quant_method = QUANT_METHOD
        self.method, self.bits, self.group_size = method, bits, group_size
        self.packing_version, self.scale_dtype = packing_version, scale_dtype
        self.linear_names = list(linear_names)
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        self.post_init()

    def post_init(self):
        """Refuse what this dbllm_lab cannot read, naming the field."""
        where = "quantization_config"
        if self.method not in METHODS:
            raise ValueError(f"{where}.method={self.method!r} is not stored in the packed format; it holds "
                             f"{', '.join(METHODS)} only")
        if self.bits != 2:
            raise ValueError(f"{where}.bits={self.bits!r}: the packed format holds 2 bit-planes (bits=2)")
        if self.packing_version != PACKING_VERSION:
            raise ValueError(f"{where}.packing_version={self.packing_version!r} is not supported; this dbllm_lab "
                             f"reads packing_version {PACKING_VERSION} (upgrade dbllm_lab for newer folders)")
        gs = self.group_size
        if isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0 or gs % 32:
            raise ValueError(f"{where}.group_size={gs!r} must be a positive multiple of 32")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"{where}.scale_dtype={self.scale_dtype!r} is not one of {list(SCALE_DTYPES)}")
        bad = [n for n in self.linear_names if n not in LINEAR_NAMES]
        if bad:
            raise ValueError(f"{where}.linear_names has {bad}; packed layers are among {list(LINEAR_NAMES)}")

    @property
    def scale_torch_dtype(self):
        return SCALE_DTYPES[self.scale_dtype]


class DbllmHfQuantizer(HfQuantizer):
    """Loads packed DB-LLM folders (pre-quantized only: ``requires_calibration``); see the module docstring."""

    requires_calibration = True
    quantization_config: DbllmConfig

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        layers = packed_linears(model, self.quantization_config)
        if checkpoint_files:
            verify_files(checkpoint_files, layers, self.quantization_config)
        install_packed_layers(model, layers, self.quantization_config)

    def is_serializable(self):
        return True  # model.save_pretrained stores the packed buffers and this config as they are

    @property
    def is_trainable(self):
        return False


def register():
    """Register ``DbllmConfig`` and ``DbllmHfQuantizer`` with transformers (once; ``import dbllm_lab`` calls it)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(DbllmConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(DbllmHfQuantizer)


# ---- the model side: which linears are packed, and building them ------------------------------------------------
def packed_linears(model, cfg):
    """{name: (in_features, out_features, bias)} of the linears ``cfg`` packs: ``cfg.linear_names`` of every
    decoder block, minus ``cfg.modules_to_not_convert``."""
    from .model import quantizable_linears
    skip = set(cfg.modules_to_not_convert)
    out = {}
    for name, m in quantizable_linears(model).items():
        if name.rpartition(".layers.")[2].split(".", 1)[1] in cfg.linear_names and name not in skip:
            out[name] = (m.in_features, m.out_features, m.bias is not None)
    return out


def install_packed_layers(model, layers, cfg, **layer_kwargs):
    """Replace each layer of ``layers`` ({name: (in, out, bias)}) by an empty ``PackedDualBinaryLinear`` on the
    device of the module it replaces (meta inside ``from_pretrained``)."""
    from .model import quantizable_linears, set_module
    from .packed_linear import PackedDualBinaryLinear
    present = quantizable_linears(model)
    for name, (in_f, out_f, bias) in layers.items():
        device = next(present[name].parameters()).device
        set_module(model, name, PackedDualBinaryLinear(in_f, out_f, cfg.group_size, bias=bias,
                                                       scale_dtype=cfg.scale_torch_dtype, device=device,
                                                       **layer_kwargs))


def expected_tensors(layers, cfg):
    """{tensor name: (shape, dtype)} of every packed tensor of ``layers`` in packing layout ``cfg``."""
    out = {}
    for name, (in_f, out_f, bias) in layers.items():
        if in_f % cfg.group_size:
            raise ValueError(f"layer {name}: in_features={in_f} is not a multiple of "
                             f"quantization_config.group_size={cfg.group_size}")
        for key in ("p1", "p2"):
            out[f"{name}.{key}"] = ((out_f, in_f // 32), torch.int32)
        for key in ("a1", "a2"):
            out[f"{name}.{key}"] = ((out_f, in_f // cfg.group_size), cfg.scale_torch_dtype)
        if bias:
            out[f"{name}.bias"] = ((out_f,), torch.float32)
    return out


# ---- the file side: integrity and layout of the safetensors files ----------------------------------------------
def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stored_tensors(files):
    """{tensor name: (shape, safetensors dtype)} over ``files``, from their headers only; a truncated or
    corrupt file is a ValueError naming it."""
    from safetensors import safe_open
    out = {}
    for path in files:
        try:
            with safe_open(path, "pt") as f:
                for k in f.keys():
                    s = f.get_slice(k)
                    out[k] = (tuple(s.get_shape()), s.get_dtype())
        except Exception as e:  # safetensors raises its own SafetensorError for a bad header or a short file
            raise ValueError(f"{path} is truncated or corrupt ({str(e).splitlines()[0]}); write the folder again "
                             f"(dbllm-lab quantize --out / train --save) or copy it completely") from None
    return out


def check_tensors(stored, expected, where):
    """Every expected packed tensor is stored with its shape and dtype; else a ValueError naming the tensor and
    the quantization_config field that sets its shape."""
    for key, (shape, dtype) in expected.items():
        if key not in stored:
            raise ValueError(f"{where}: packed tensor {key!r} is missing")
        got_shape, got_dtype = stored[key]
        if got_dtype != SAFETENSORS_DTYPES[dtype]:
            raise ValueError(f"{where}: {key} is stored as {got_dtype}, expected {SAFETENSORS_DTYPES[dtype]} "
                             f"({'quantization_config.scale_dtype' if key[-2:] in ('a1', 'a2') else 'packing_version'}"
                             f" {PACKING_VERSION})")
        if got_shape != shape:
            field = ("quantization_config.group_size: (out_features, in_features / group_size)"
                     if key[-2:] in ("a1", "a2") else
                     f"packing_version {PACKING_VERSION}: (out_features, in_features / 32)"
                     if key[-2:] in ("p1", "p2") else "out_features")
            raise ValueError(f"{where}: {key} has shape {got_shape}, expected {shape} from the model config and "
                             f"{field}")


def verify_files(files, layers, cfg):
    """The checks ``from_pretrained`` runs before loading: the SHA-256 of the weights against ``quant_config.json``
    (when the folder has one), the header's settings against ``cfg``, then every packed tensor's shape and dtype."""
    folder = os.path.dirname(files[0])
    header_path = os.path.join(folder, HEADER)
    if os.path.isfile(header_path):
        with open(header_path) as f:
            header = json.load(f)
        for field in ("group_size", "packing_version", "method", "scale_dtype"):
            if field in header and header[field] != getattr(cfg, field):
                raise ValueError(f"{folder}: quantization_config.{field}={getattr(cfg, field)!r} in config.json but "
                                 f"{field}={header[field]!r} in {HEADER}: the folder was edited or mixed")
        for path in files:
            if os.path.basename(path) == header.get("weights") and sha256(path) != header.get("sha256"):
                raise ValueError(f"{path} does not match the sha256 in {HEADER}: the file is corrupt, truncated or "
                                 f"was replaced")
    check_tensors(stored_tensors(files), expected_tensors(layers, cfg), folder)
