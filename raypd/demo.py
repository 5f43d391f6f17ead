"""The README's main job: serve a few prompts with the embedded default model through a
disaggregated deployment (one prefill worker and one decode worker as Ray actors on a local
Ray cluster, K/V moving between them through Ray's object store) and print each completion
with its time to first token (TTFT) and time per output token (TPOT); then check that the
colocated in-process engine gives the same greedy tokens.

`--backend local` skips Ray and runs only the in-process colocated engine.
"""

from __future__ import annotations

import argparse
import sys
import time

PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n    def __init__(self):", "for i in range("]


def show(prompts, completions) -> None:
    for prompt, c in zip(prompts, completions):
        m = c.metrics
        print(f"\n--- {prompt!r}  [TTFT {m['ttft_s'] * 1e3:.0f} ms, TPOT {m['tpot_s'] * 1e3:.1f} ms, "
              f"{len(c.token_ids)} tokens, finish={c.finish_reason}]")
        print(prompt + c.text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raypd.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="preset, shipped model or directory (default: the default model)")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable); default: a few Python openings")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--backend", choices=("ray", "local"), default="ray")
    args = parser.parse_args(argv)

    import models
    import raypd

    name = args.model or models.DEFAULT_MODEL
    prompts = args.prompt or PROMPTS
    if args.backend == "local":
        raypd.generate(prompts, model=name, max_tokens=args.max_tokens, backend="local")  # compiles
        local = raypd.generate(prompts, model=name, max_tokens=args.max_tokens, backend="local")
        print(f"model {name}, colocated in-process engine")
        show(prompts, local)
        return 0

    from scheduler import PolicyConfig

    t = time.perf_counter()
    # Ray starts its processes before this one runs JAX: forking a process whose JAX runtime is
    # up makes JAX warn that os.fork() may deadlock. Every prompt is prefilled on the prefill
    # worker (no local prefill on the decode worker), so each one's K/V really moves between
    # the two actors.
    deployment = raypd.serve(model=name, num_prefill=1, num_decode=1,
                             policy=PolicyConfig(local_prefill_max_len=0), local_prefill_stall_s=None)
    try:
        print(f"model {name}: 1 prefill + 1 decode worker up in {time.perf_counter() - t:.1f} s", flush=True)
        deployment.generate(prompts, max_tokens=args.max_tokens)  # compile the workers' shapes
        completions = deployment.generate(prompts, max_tokens=args.max_tokens)
        show(prompts, completions)
        local = raypd.generate(prompts, model=name, max_tokens=args.max_tokens, backend="local")
        same = sum(c.token_ids == ref.token_ids for c, ref in zip(completions, local))
        print(f"\ndisaggregated == colocated (greedy tokens): {same}/{len(prompts)} prompts")
        return 0 if same == len(prompts) else 1
    finally:
        deployment.shutdown()


if __name__ == "__main__":
    sys.exit(main())
