"""The README's main job: complete a few prompts with the embedded default model and print
each completion with its time to first token (TTFT) and time per output token (TPOT).

It runs the in-process engines (`raypd.generate`, backend "local": chunked prefill and
continuous-batching decode over a paged KV cache on this machine's devices).
"""

from __future__ import annotations

import argparse
import sys

PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n    def __init__(self):", "for i in range("]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raypd.demo", description=__doc__)
    parser.add_argument("--model", default=None, help="preset, shipped model or directory (default: the default model)")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable); default: a few Python openings")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args(argv)

    import models
    import raypd

    name = args.model or models.DEFAULT_MODEL
    prompts = args.prompt or PROMPTS
    print(f"model: {name}; {len(prompts)} prompts, max_tokens={args.max_tokens}, "
          f"temperature={args.temperature}", flush=True)
    raypd.generate(prompts, model=name, max_tokens=args.max_tokens)  # compile outside the timed run
    completions = raypd.generate(prompts, model=name, max_tokens=args.max_tokens, temperature=args.temperature)
    for prompt, c in zip(prompts, completions):
        m = c.metrics
        print(f"\n--- {prompt!r}  [TTFT {m['ttft_s'] * 1e3:.0f} ms, TPOT {m['tpot_s'] * 1e3:.1f} ms, "
              f"{m['completion_tokens']} tokens, finish={c.finish_reason}]")
        print(prompt + c.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
