"""Building llama.cpp for the peer comparison (``bench/llamacpp.py``): fetch PyPI's ``llama-cpp-python`` source
distribution (``pip download --no-binary :all: --no-deps``), unpack it into build/llama.cpp and build only
``llama-quantize``, ``llama-bench`` and ``llama-perplexity`` from its vendored llama.cpp (CPU, Release, -j2); and
export the project's FP model as a plain HF folder for ``convert_hf_to_gguf.py``. llama.cpp is a cmake build, not a
pip dependency.
"""
import glob
import json
import os
import re
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEST = os.path.join(ROOT, "build", "llama.cpp")
TOOLS = ("llama-quantize", "llama-bench", "llama-perplexity")
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_CUDA=OFF",
               "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"]


def run_checked(cmd, **kw):
    """Run ``cmd``; on failure raise with its last output lines (so a broken build says why)."""
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).splitlines()[-30:])
        raise RuntimeError(f"command failed (exit {p.returncode}): {' '.join(map(str, cmd))}\n{tail}")
    return p


def binary(name, dest=DEST):
    """Path of a built llama.cpp tool."""
    if name not in TOOLS:
        raise ValueError(f"tool {name!r} is not built here; one of {TOOLS}")
    return os.path.join(dest, "cmake", "bin", name)


def source_dir(dest=DEST):
    """The unpacked sdist's folder (llama_cpp_python-X.Y.Z), or None before ``build``."""
    found = sorted(glob.glob(os.path.join(dest, "llama_cpp_python-*", "vendor", "llama.cpp")))
    return os.path.dirname(os.path.dirname(found[-1])) if found else None


def version(dest=DEST):
    """llama-cpp-python's version, the llama.cpp commit it vendors (from its CHANGELOG) and the ggml version."""
    src = source_dir(dest)
    if src is None:
        raise FileNotFoundError(f"no llama-cpp-python source in {dest}; run `python bench/llamacpp.py --build`")
    pkg = os.path.basename(src).split("-", 1)[1]
    with open(os.path.join(src, "CHANGELOG.md")) as f:  # "## [0.3.36]" then "- feat: update llama.cpp to ...@SHA"
        section = f.read().split(f"## [{pkg}]", 1)[-1].split("\n## [", 1)[0]
    m = re.search(r"llama\.cpp@([0-9a-f]{7,40})", section)
    commit = m.group(1) if m else None
    with open(os.path.join(src, "vendor", "llama.cpp", "ggml", "CMakeLists.txt")) as f:
        text = f.read()
    ggml = ".".join(re.search(rf"set\(GGML_VERSION_{p} (\d+)\)", text).group(1) for p in ("MAJOR", "MINOR", "PATCH"))
    return {"llama_cpp_python": pkg, "llama_cpp_commit": commit, "ggml": ggml,
            "source": f"PyPI sdist llama-cpp-python=={pkg}, vendor/llama.cpp"}


def build(dest=DEST):
    """Download llama-cpp-python's sdist, unpack it and build TOOLS (CPU only, Release, -j2) into dest/cmake/bin.
    Skipped when the binaries exist. Returns version() plus the build's wall seconds (None when skipped)."""
    if all(os.path.isfile(binary(t, dest)) for t in TOOLS):
        info = version(dest)
        stamp = os.path.join(dest, "build_info.json")
        return {**info, **(json.load(open(stamp)) if os.path.isfile(stamp) else {}), "skipped": True}
    os.makedirs(dest, exist_ok=True)
    t0 = time.time()
    if not glob.glob(os.path.join(dest, "llama_cpp_python-*.tar.gz")):
        run_checked([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "llama-cpp-python",
              "-d", dest])
    if source_dir(dest) is None:
        sdist = sorted(glob.glob(os.path.join(dest, "llama_cpp_python-*.tar.gz")))[-1]
        with tarfile.open(sdist) as tar:
            tar.extractall(dest)
    vendor = os.path.join(source_dir(dest), "vendor", "llama.cpp")
    t1 = time.time()
    run_checked(["cmake", "-S", vendor, "-B", os.path.join(dest, "cmake"), *CMAKE_FLAGS])
    run_checked(["cmake", "--build", os.path.join(dest, "cmake"), "--config", "Release", "-j2", "--target", *TOOLS])
    info = {"build_seconds": round(time.time() - t1, 1), "download_unpack_seconds": round(t1 - t0, 1),
            "cmake_flags": CMAKE_FLAGS, "targets": list(TOOLS)}
    with open(os.path.join(dest, "build_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(f"built {', '.join(TOOLS)} in {info['build_seconds']:.0f} s", flush=True)
    return {**version(dest), **info, "skipped": False}


def export_fp(dest=DEST):
    """The project's FP model (embedded Q4_1 GGUF dequantized by transformers) as a plain HF folder dest/hf_fp:
    config.json without the GGUF quantization_config, fp32 safetensors (tied lm_head left out), tokenizer."""
    import copy

    from safetensors.torch import save_file

    from dbllm_lab.model import load_model
    folder = os.path.join(dest, "hf_fp")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return folder
    model, tok = load_model(None)
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # transformers refuses to save a GGUF-loaded model; the weights are plain floats
    cfg.architectures, cfg.use_cache = ["LlamaForCausalLM"], True
    os.makedirs(folder, exist_ok=True)
    cfg.save_pretrained(folder)
    tok.save_pretrained(folder)
    tied = getattr(cfg, "tie_word_embeddings", False)
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
          if not (tied and k == "lm_head.weight")}
    save_file(sd, os.path.join(folder, "model.safetensors.tmp"), metadata={"format": "pt"})
    os.replace(os.path.join(folder, "model.safetensors.tmp"), os.path.join(folder, "model.safetensors"))
    return folder
