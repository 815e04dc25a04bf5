"""Packed dual-bit-plane checkpoints: ``model.safetensors`` + ``quant_config.json`` in one folder.

The safetensors file holds, for every FDB layer, the buffers of a ``PackedDualBinaryLinear``:
``{layer}.p1`` / ``{layer}.p2`` (int32 bit-planes, ``dbllm_lab.packing`` layout) and ``{layer}.a1`` /
``{layer}.a2`` (fp16 scales per group), and every RMSNorm weight as ``norm.{module}.weight`` (full precision; a
student trained with ``train_norms`` changes them). The JSON header names the format version, method, bits, group
size, layer list, base model and the SHA-256 of the safetensors file. Loading rebuilds the quantized
layers on the base model; nothing is unpickled.
"""
import hashlib
import json
import os

import torch
from safetensors.torch import load_file, save_file

FORMAT = "dbllm-dual-binary"
FORMAT_VERSION = 1
WEIGHTS, HEADER = "model.safetensors", "quant_config.json"


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_quantized(model, path, base_model=None, scale_dtype=torch.float16, recipe=None):
    """Save the FDB layers of ``model`` (DualBinaryLinear or PackedDualBinaryLinear) into folder ``path``,
    atomically (temp files + os.replace); ``recipe``: how it was trained (a dict, kept in the header). Returns the
    header dict."""
    from .model import norm_weights, quantizable_linears
    from .packed_linear import PackedDualBinaryLinear
    tensors, layers, group_size = {}, [], None
    norms = norm_weights(model)
    for name, m in quantizable_linears(model).items():
        if not isinstance(m, PackedDualBinaryLinear):
            if not hasattr(m, "bitplanes"):
                raise ValueError(f"layer {name} is a {type(m).__name__}; the packed format stores FDB models "
                                 f"(quantize_model(model, 'fdb', ...)) only")
            m = PackedDualBinaryLinear.from_dual_binary(m, scale_dtype=scale_dtype)
        for key, t in m.state_dict().items():
            tensors[f"{name}.{key}"] = t.contiguous()
        layers.append({"name": name, "in_features": m.in_features, "out_features": m.out_features,
                       "bias": m.bias is not None})
        group_size = m.group_size
    if not layers:
        raise ValueError("the model has no quantized layers to save")
    tensors.update({f"norm.{k}": p.detach().contiguous() for k, p in norms.items()})
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, WEIGHTS + ".tmp")
    save_file(tensors, tmp, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "method": "fdb", "bits": 2,
              "group_size": group_size, "scale_dtype": str(scale_dtype).replace("torch.", ""),
              "base_model": base_model or getattr(model, "name_or_path", None), "layers": layers,
              "norms": list(norms), "recipe": recipe,
              "sha256": _sha256(tmp)}
    os.replace(tmp, os.path.join(path, WEIGHTS))
    with open(os.path.join(path, HEADER + ".tmp"), "w") as f:
        json.dump(header, f, indent=2)
    os.replace(os.path.join(path, HEADER + ".tmp"), os.path.join(path, HEADER))
    return header


def read_header(path):
    hp = os.path.join(path, HEADER)
    if not os.path.isfile(hp):
        raise FileNotFoundError(f"{path!r} is not a dbllm_lab checkpoint: {HEADER} is missing")
    try:
        with open(hp) as f:
            header = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{hp} is not valid JSON: {e}") from None
    if header.get("format") != FORMAT:
        raise ValueError(f"{hp}: format {header.get('format')!r} is not {FORMAT!r}")
    if header.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{hp}: format_version {header.get('format_version')!r} is not supported; this dbllm_lab "
                         f"reads version {FORMAT_VERSION}")
    return header


def load_quantized(path, base_model=None, dtype="float32", device="cpu", **layer_kwargs):
    """Rebuild a quantized model from folder ``path``: load the base model (``base_model`` module or
    name; default the header's) and install a ``PackedDualBinaryLinear`` for each stored layer."""
    from .model import load_model, norm_weights, quantizable_linears, set_module
    from .packed_linear import PackedDualBinaryLinear
    header = read_header(path)
    wp = os.path.join(path, WEIGHTS)
    if not os.path.isfile(wp):
        raise FileNotFoundError(f"{wp} is missing")
    if _sha256(wp) != header["sha256"]:
        raise ValueError(f"{wp} does not match the checksum in {HEADER}: the file is corrupt or was replaced")
    tensors = load_file(wp, device=str(device))
    if base_model is None or isinstance(base_model, str):
        model, _ = load_model(base_model or header["base_model"], dtype=dtype, device=device)
    else:
        model = base_model
    present = quantizable_linears(model)
    scale_dtype = getattr(torch, header["scale_dtype"])
    for spec in header["layers"]:
        name = spec["name"]
        if name not in present:
            raise ValueError(f"checkpoint layer {name!r} does not exist in the base model {header['base_model']!r}")
        base = present[name]
        if (base.in_features, base.out_features) != (spec["in_features"], spec["out_features"]):
            raise ValueError(f"checkpoint layer {name!r} is {spec['out_features']}x{spec['in_features']} but the base "
                             f"model's is {base.out_features}x{base.in_features}: wrong base model")
        layer = PackedDualBinaryLinear(spec["in_features"], spec["out_features"], header["group_size"],
                                       bias=spec["bias"], scale_dtype=scale_dtype, device=device, **layer_kwargs)
        state = {k: tensors[f"{name}.{k}"] for k in layer.state_dict() if f"{name}.{k}" in tensors}
        try:
            layer.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"checkpoint tensors for {name!r} do not fit: {str(e).splitlines()[0]}") from None
        set_module(model, name, layer)
    norms = norm_weights(model)
    with torch.no_grad():
        for name in header.get("norms", []):  # absent in files written before norms were stored: the base's stay
            if name not in norms:
                raise ValueError(f"checkpoint norm {name!r} does not exist in the base model {header['base_model']!r}")
            norms[name].copy_(tensors[f"norm.{name}"])
    model.quant_header = header
    return model
