"""`raypd generate` (prompts on the command line, in-process) and `raypd batch` (JSONL in,
JSONL out, on a Ray deployment or in-process)."""

from __future__ import annotations

import argparse
import json
import logging

from raypd.cli.common import add_connect_timeout, add_parser, add_sampling, sampling

log = logging.getLogger(__name__)


def add_generate(subparsers) -> None:
    p = add_parser(
        subparsers, "generate", help="complete prompts once, in-process, and print them",
        description="Complete each PROMPT with raypd.generate (backend 'local': the colocated engine "
                    "on this machine's devices) and print the completions with TTFT/TPOT. The engine "
                    "compiles every shape it serves before the first prompt, so TTFT never includes "
                    "compilation (--no-warmup skips that, for one-off runs).")
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text (one completion each)")
    p.add_argument("--model", default=None, help="preset, shipped model or directory (default: the default model)")
    add_sampling(p)
    p.add_argument("--logprobs", action="store_true", help="report each generated token's logprob")
    p.add_argument("--top-logprobs", type=int, default=0, metavar="K",
                   help="with --json: also the K (<= 20) most likely tokens and their logprobs at each position")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt (with --stream: one per token, then the summary)")
    p.add_argument("--no-warmup", action="store_true", help="skip compiling every shape first")
    p.set_defaults(run=generate)


def generate(args: argparse.Namespace) -> int:
    import raypd
    from raypd.api import get_backend

    from raypd.engine.api import SamplingParams

    try:
        SamplingParams(**{**sampling(args), "stop": tuple(args.stop or ())})  # bad flags: say so before compiling
        if not args.no_warmup:  # the shapes these prompts use, so TTFT is not compile time
            backend = get_backend(args.model)
            lens = [len(backend.model.tokenizer.encode(p)) if backend.model.tokenizer else 1 for p in args.prompts]
            backend.warmup(max_len=max(lens) + args.max_tokens, num_seqs=len(args.prompts))
        if args.stream:
            for prompt in args.prompts:
                _stream_one(raypd, prompt, args)
            return 0
        completions = raypd.generate(args.prompts, model=args.model, logprobs=args.logprobs, backend="local",
                                     **sampling(args))
    except ValueError as e:
        raise SystemExit(f"raypd generate: {e}") from None
    for prompt, c in zip(args.prompts, completions):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": c.text, "token_ids": c.token_ids,
                              "finish_reason": c.finish_reason, "logprobs": c.logprobs, "metrics": c.metrics,
                              **({"top_logprobs": c.top_logprobs} if c.top_logprobs else {})}))
        else:
            print(f"{prompt}{c.text}\n{_metrics_line(c.metrics, c.finish_reason, c.logprobs)}")
    return 0


def _metrics_line(m: dict, finish_reason: str, logprobs) -> str:
    extra = f", mean logprob {sum(logprobs) / len(logprobs):.3f}" if logprobs else ""
    return (f"[TTFT {m['ttft_s'] * 1e3:.0f} ms, TPOT {m['tpot_s'] * 1e3:.1f} ms, "
            f"{m['completion_tokens']} tokens, finish={finish_reason}{extra}]")


def _stream_one(raypd, prompt: str, args: argparse.Namespace) -> None:
    chunks = raypd.stream(prompt, model=args.model, logprobs=args.logprobs, backend="local", **sampling(args))
    if not args.json:
        print(prompt, end="", flush=True)
    last = None
    for chunk in chunks:
        last = chunk
        if args.json:
            print(json.dumps({"prompt": prompt, "token_id": chunk.token_id, "text": chunk.text,
                              "logprob": chunk.logprob if args.logprobs else None,
                              "finish_reason": chunk.finish_reason,
                              **({"top_logprobs": chunk.top_logprobs} if chunk.top_logprobs else {})}), flush=True)
        else:
            print(chunk.text, end="", flush=True)
    m = (last.metrics or {}) if last is not None else {}
    if args.json:
        print(json.dumps({"prompt": prompt, "finish_reason": last.finish_reason if last else None, "metrics": m}))
    elif m:
        print(f"\n{_metrics_line(m, last.finish_reason, None)}")



def add_batch(subparsers) -> None:
    p = add_parser(
        subparsers, "batch", help="JSONL prompts in, JSONL completions out (attaches to or starts a deployment)",
        description="Complete every line of --input (JSON objects with 'prompt' and optional 'id', "
                    "'max_tokens', 'temperature', 'top_p', 'top_k', 'seed', 'stop') into --output, in order; "
                    "the sampling flags are the defaults of lines that do not set their own. --input and "
                    "--output may be paths or URIs (s3://, gs://, ... through fsspec or pyarrow.fs when "
                    "installed). With --backend ray (default) it attaches to the deployment named "
                    "--deployment on the cluster at --address, or starts one for the batch; runnable as "
                    "`ray job submit -- python scripts/batch_generate.py ...`, where --output must be an "
                    "absolute path on storage that outlives the job, or a URI.")
    p.add_argument("--input", required=True, help="JSONL prompts: a path or a URI")
    p.add_argument("--output", required=True, help="JSONL completions: a path or a URI (written anew)")
    p.add_argument("--model", default=None, help="model for a deployment this command starts (default: the "
                   "default model)")
    p.add_argument("--backend", choices=("ray", "local"), default="ray",
                   help="ray: a Ray deployment; local: the engine in this process")
    p.add_argument("--address", default=None, help="Ray cluster ('auto', HOST:PORT; default: $RAY_ADDRESS, else "
                   "a cluster on this machine, else a new local one)")
    p.add_argument("--deployment", default="raypd", help="deployment name to attach to or start")
    p.add_argument("--batch-size", type=int, default=32, help="prompts sent together")
    add_sampling(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_connect_timeout(p)
    p.set_defaults(run=batch)


def batch(args: argparse.Namespace) -> int:
    from raypd.batch import run_batch

    try:
        summary = run_batch(args.input, args.output, backend=args.backend, deployment=args.deployment,
                            model=args.model, batch_size=args.batch_size, progress=not args.no_progress,
                            address=args.address, connect_timeout_s=args.connect_timeout_s, **sampling(args))
    except (ValueError, OSError) as e:  # ConnectionError is an OSError
        raise SystemExit(f"raypd batch: {e}") from None
    log.info("wrote %d completions to %s", summary["completions"], summary["output"])
    print(json.dumps(summary))
    return 0

