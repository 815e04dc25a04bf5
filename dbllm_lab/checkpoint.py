"""Packed DB-LLM model folders: a complete transformers model folder with the FDB layers as packed bit-planes.

A folder (format_version 2) holds:

- ``model.safetensors``: for every FDB layer the buffers of a ``PackedDualBinaryLinear`` (``{layer}.p1`` /
  ``{layer}.p2`` int32 bit-planes in packing layout 1, ``{layer}.a1`` / ``{layer}.a2`` scales per group), and every
  other tensor of the model under its own name, in full precision (embeddings, tied with ``lm_head``; RMSNorm
  weights, which a student trained with ``train_norms`` changes);
- ``config.json`` with a ``quantization_config`` (``dbllm_lab.hf_quantizer.DbllmConfig``), so that
  ``AutoModelForCausalLM.from_pretrained(folder)`` loads it once ``dbllm_lab`` is imported;
- ``generation_config.json``, the tokenizer files and a ``README.md`` model card (``dbllm_lab.model_card``);
- ``quant_config.json``: dbllm_lab's header: format version, method, group size, layer list, base model, recipe,
  sizes, measured perplexity and the SHA-256 of the safetensors file (checked by both loaders).

``load_quantized`` rebuilds the model without transformers' loader (an empty skeleton from ``config.json``, packed
layers installed, tensors assigned); it is the reference the ``from_pretrained`` path is tested against.
Folders of format_version 1 (``model.safetensors`` + ``quant_config.json`` only) are converted once by
``convert`` (``dbllm-lab convert OLD NEW``). Nothing is unpickled.
"""
import copy
import functools
import json
import os
import warnings

import torch
from safetensors.torch import load_file, save_file

from .hf_quantizer import (PACKING_VERSION, DbllmConfig, check_tensors, expected_tensors, install_packed_layers,
                           sha256, stored_tensors)

FORMAT = "dbllm-dual-binary"
FORMAT_VERSION = 2
WEIGHTS, HEADER, CARD = "model.safetensors", "quant_config.json", "README.md"


def save_quantized(model, path, base_model=None, scale_dtype=torch.float16, recipe=None, tokenizer=None):
    """Write ``model`` (its decoder linears DualBinaryLinear or PackedDualBinaryLinear) as a complete model folder
    ``path`` (see the module docstring). ``recipe``: how it was trained (a dict, kept in the header and the card);
    ``tokenizer``: saved with it (default: the base model's, found by name; ``False``: none). Returns the header."""
    from .model import quantizable_linears
    from .packed_linear import PackedDualBinaryLinear
    base_model = base_model or getattr(model, "name_or_path", None)
    packed, layers = {}, []
    for name, m in quantizable_linears(model).items():
        if not isinstance(m, PackedDualBinaryLinear):
            if not hasattr(m, "bitplanes"):
                raise ValueError(f"layer {name} is a {type(m).__name__}; the packed format stores FDB models "
                                 f"(quantize_model(model, 'fdb', ...)) only")
            m = PackedDualBinaryLinear.from_dual_binary(m, scale_dtype=scale_dtype)
        packed.update({f"{name}.{key}": t.detach().contiguous() for key, t in m.state_dict().items()})
        layers.append({"name": name, "in_features": m.in_features, "out_features": m.out_features,
                       "bias": m.bias is not None, "group_size": m.group_size, "scale_dtype": m.a1.dtype})
    if not layers:
        raise ValueError("the model has no quantized layers to save")
    for field in ("group_size", "scale_dtype"):
        if len({spec[field] for spec in layers}) > 1:
            raise ValueError(f"the packed format holds one {field} per model; these layers mix {field}s "
                             f"{sorted({str(spec[field]) for spec in layers})}")
    group_size, scales = layers[0]["group_size"], str(layers[0]["scale_dtype"]).replace("torch.", "")
    for spec in layers:
        del spec["group_size"], spec["scale_dtype"]
    dense = dense_state(model, {spec["name"] for spec in layers})
    cfg = DbllmConfig(group_size=group_size, scale_dtype=scales,
                      modules_to_not_convert=full_precision_linears(model, {spec["name"] for spec in layers}))
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, WEIGHTS + ".tmp")
    save_file({**dense, **packed}, tmp, metadata={"format": "pt", "dbllm_format": FORMAT,
                                                  "format_version": str(FORMAT_VERSION)})
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "method": cfg.method, "bits": cfg.bits,
              "group_size": group_size, "packing_version": PACKING_VERSION, "scale_dtype": scales,
              "base_model": base_model, "weights": WEIGHTS, "layers": layers, "recipe": recipe,
              "size": sizes(packed, dense, layers, tmp), "perplexity": None, "sha256": sha256(tmp)}
    os.replace(tmp, os.path.join(path, WEIGHTS))
    write_config(model, path, cfg)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)
    tok = base_tokenizer(base_model) if tokenizer is None else tokenizer
    header["tokenizer"] = bool(tok)
    if tok:
        tok.save_pretrained(path)
    write_header(path, header)
    return header


def dense_state(model, packed_names):
    """{name: tensor} of every tensor of ``model`` outside the packed layers, tied copies once (the first name:
    ``model.embed_tokens.weight`` for a tied ``lm_head``)."""
    out, seen = {}, set()
    for key, t in model.state_dict().items():
        if any(key.startswith(name + ".") for name in packed_names):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident not in seen:
            seen.add(ident)
            out[key] = t.detach().contiguous()
    return out


def full_precision_linears(model, packed_names):
    """Names of the ``nn.Linear`` modules left in full precision (``lm_head``)."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in packed_names]


def sizes(packed, dense, layers, weights_path):
    """Storage counted honestly: bits per weight of the packed layers (bit-planes and scales), the full-precision
    tensors, and the whole model (every stored byte over every parameter, a tied matrix once)."""
    def nbytes(ts):
        return sum(t.numel() * t.element_size() for t in ts.values())
    n_quant = sum(s["in_features"] * s["out_features"] for s in layers)
    n_dense = sum(t.numel() for t in dense.values())
    packed_b, dense_b = nbytes(packed), nbytes(dense)
    return {"packed_weights": n_quant, "packed_bytes": packed_b, "packed_bits_per_weight": 8 * packed_b / n_quant,
            "full_precision_params": n_dense, "full_precision_bytes": dense_b,
            "full_precision_dtypes": sorted({str(t.dtype).replace("torch.", "") for t in dense.values()}),
            "total_params": n_quant + n_dense, "bits_per_param": 8 * (packed_b + dense_b) / (n_quant + n_dense),
            "file_bytes": os.path.getsize(weights_path)}


def write_config(model, path, cfg):
    """``config.json``: the model's config with ``cfg`` as its quantization_config (replacing e.g. the GGUF one the
    embedded model was loaded with) and the KV cache on, as a released model has it."""
    config = copy.deepcopy(model.config)
    config.quantization_config = cfg.to_dict()
    config.use_cache = True
    config.architectures = [type(model).__name__]
    config.dtype = model.get_input_embeddings().weight.dtype  # the full-precision tensors' dtype, as stored
    config.save_pretrained(path)


@functools.lru_cache(maxsize=4)
def base_tokenizer(base_model):
    """The tokenizer of ``base_model`` (the embedded alias, a .gguf file, a local folder or a hub id); ``None``
    with a warning when it cannot be found (the folder then has no tokenizer files)."""
    from transformers import AutoTokenizer
    from .model import EMBEDDED_MODEL, embedded_gguf_path
    try:
        if base_model in (None, EMBEDDED_MODEL) or str(base_model).endswith(".gguf"):
            gguf = embedded_gguf_path() if base_model in (None, EMBEDDED_MODEL) else os.path.abspath(base_model)
            return AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
        return AutoTokenizer.from_pretrained(base_model)
    except (OSError, ValueError) as e:
        warnings.warn(f"no tokenizer saved: the tokenizer of base model {base_model!r} was not found "
                      f"({str(e).splitlines()[0]}); pass tokenizer= to save_quantized", RuntimeWarning, stacklevel=3)
        return None


def write_header(path, header):
    """``quant_config.json`` (atomically) and the model card generated from it."""
    from .model_card import model_card
    with open(os.path.join(path, HEADER + ".tmp"), "w") as f:
        json.dump(header, f, indent=2)
    os.replace(os.path.join(path, HEADER + ".tmp"), os.path.join(path, HEADER))
    with open(os.path.join(path, CARD), "w") as f:
        f.write(model_card(header))


def record_perplexity(path, result, command):
    """Put a measured perplexity (a ``ppl.PPLResult``) and the ``command`` that measured it into the folder's
    header and model card."""
    header = read_header(path)
    header["perplexity"] = {k: getattr(result, k) for k in ("ppl_heldout", "ppl_dev", "ppl", "dataset", "split",
                                                            "seqlen", "windows", "tokens")}
    header["perplexity"]["command"] = command
    write_header(path, header)
    return header


def read_header(path, versions=(FORMAT_VERSION,)):
    """The header of folder ``path``; a folder of another format version is a ValueError saying what to do."""
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
    version = header.get("format_version")
    if version == 1 and version not in versions:
        raise ValueError(f"{path} is a format_version 1 checkpoint (weights and header only, no config.json or "
                         f"tokenizer); convert it once into a model folder: dbllm-lab convert {path} NEW_FOLDER")
    if version not in versions:
        raise ValueError(f"{hp}: format_version {version!r} is not supported; this dbllm_lab reads version "
                         f"{FORMAT_VERSION}")
    return header


def _verified_weights(path, header):
    wp = os.path.join(path, WEIGHTS)
    if not os.path.isfile(wp):
        raise FileNotFoundError(f"{wp} is missing")
    if sha256(wp) != header["sha256"]:
        raise ValueError(f"{wp} does not match the sha256 checksum in {HEADER}: the file is corrupt, truncated or "
                         f"was replaced")
    return wp


def _install(model, header, cfg, **layer_kwargs):
    """Check the header's layers against ``model`` and put empty packed layers in their place."""
    from .model import quantizable_linears
    present = quantizable_linears(model)
    layers = {}
    for spec in header["layers"]:
        name = spec["name"]
        if name not in present:
            raise ValueError(f"checkpoint layer {name!r} does not exist in the base model {header['base_model']!r}")
        base = present[name]
        if (base.in_features, base.out_features) != (spec["in_features"], spec["out_features"]):
            raise ValueError(f"checkpoint layer {name!r} is {spec['out_features']}x{spec['in_features']} but the "
                             f"model's is {base.out_features}x{base.in_features}: wrong base model or config.json")
        layers[name] = (spec["in_features"], spec["out_features"], spec["bias"])
    install_packed_layers(model, layers, cfg, **layer_kwargs)
    return layers


def _config_of(header):
    return DbllmConfig(**{k: header[k] for k in ("method", "bits", "group_size", "scale_dtype")},
                       packing_version=header.get("packing_version", PACKING_VERSION))


def load_quantized(path, base_model=None, dtype="float32", device="cpu", **layer_kwargs):
    """Rebuild the model of folder ``path`` without transformers' loader: ``base_model`` (a model or a name; its
    weights are all replaced) or, by default, an empty skeleton from the folder's ``config.json``; a
    ``PackedDualBinaryLinear`` for each stored layer (``layer_kwargs``, e.g. ``backend``); then every stored tensor."""
    from .model import load_model, resolve_dtype
    header = read_header(path)
    wp = _verified_weights(path, header)
    cfg = _config_of(header)
    check_tensors(stored_tensors([wp]), expected_tensors(
        {s["name"]: (s["in_features"], s["out_features"], s["bias"]) for s in header["layers"]}, cfg), path)
    if base_model is None:
        model = empty_model(path, resolve_dtype(dtype))
    elif isinstance(base_model, str):
        model, _ = load_model(base_model, dtype=dtype, device=device)
    else:
        model = base_model
    _install(model, header, cfg, **layer_kwargs)
    own = model.state_dict()
    tensors = {k: v.to(own[k].dtype) if k in own and v.is_floating_point() else v
               for k, v in load_file(wp, device=str(device)).items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"{wp} holds tensors the model does not have: {unexpected[:5]}")
    model.tie_weights()
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = [k for k in missing if k not in tied]
    missing += [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise ValueError(f"{wp} lacks tensors of the model: {sorted(set(missing))[:5]}")
    model.to(device).eval()
    model.config.use_cache = False  # as load_model: the project's evaluations run without the KV cache
    model.name_or_path = str(path)
    model.quant_header = header
    return model


def empty_model(path, dtype):
    """The model of ``path/config.json`` with its parameters on the meta device (nothing allocated, nothing
    initialised) and its non-persistent buffers (rotary frequencies) computed."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config  # a plain skeleton: load_quantized installs the packed layers itself
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def load_v1(path, base_model=None, **layer_kwargs):
    """A format_version 1 checkpoint (packed layers and ``norm.{name}`` norms, no other tensor) rebuilt on its
    base model; used by ``convert``."""
    from .model import load_model, norm_weights
    header = read_header(path, versions=(1,))
    wp = _verified_weights(path, header)
    model = base_model if base_model is not None and not isinstance(base_model, str) else \
        load_model(base_model or header["base_model"])[0]
    cfg = _config_of(header)
    layers = _install(model, header, cfg, **layer_kwargs)
    check_tensors(stored_tensors([wp]), expected_tensors(layers, cfg), path)
    tensors = load_file(wp)
    own = model.state_dict()
    norms = norm_weights(model)
    with torch.no_grad():
        for key in expected_tensors(layers, cfg):
            own[key].copy_(tensors[key])
        for name in header.get("norms", []):  # absent in the oldest files: the base model's norms stay
            if name not in norms:
                raise ValueError(f"checkpoint norm {name!r} does not exist in the base model {header['base_model']!r}")
            norms[name].copy_(tensors[f"norm.{name}"])
    return model, header


def convert(old, new, base_model=None, tokenizer=None):
    """Rewrite the format_version 1 checkpoint ``old`` as a model folder ``new``; returns the new header."""
    if os.path.abspath(old) == os.path.abspath(new):
        raise ValueError("convert writes a new folder: give NEW different from OLD")
    model, header = load_v1(old, base_model)
    return save_quantized(model, new, base_model=header["base_model"], recipe=header.get("recipe"),
                          tokenizer=tokenizer)
