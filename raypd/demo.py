"""The README's main job: serve a few prompts with the embedded default model through a
disaggregated deployment (one prefill worker and one decode worker as Ray actors on a local
Ray cluster, K/V moving between them through Ray's object store) and print each completion
with its time to first token (TTFT) and time per output token (TPOT). Then:

- greedy completions with a repetition penalty, and sampled ones with a seed and a frequency
  penalty (the same seed gives the same text);
- a long prompt and a second turn that extends it: the second turn's shared prefix comes from
  the K/V pages the first turn left cached, so only its new tokens are prefilled;
- the colocated in-process engine gives the same tokens, greedy and seeded.

`--backend local` skips Ray and runs only the in-process colocated engine.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import textwrap
import time

PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:\n    def __init__(self):", "for i in range("]
SAMPLING = dict(temperature=0.8, top_p=0.95, seed=1234, frequency_penalty=0.5)
# Greedy (argmax) with a repetition penalty: the small default model repeats lines under plain
# greedy decoding (its model card shows where); the penalty is applied on the device, so the
# tokens are as deterministic as plain greedy ones.
GREEDY = dict(temperature=0.0, repetition_penalty=1.3)


def show(prompts, completions, label: str = "") -> None:
    for prompt, c in zip(prompts, completions):
        m = c.metrics
        head = prompt if len(prompt) < 60 else f"{prompt[:25]}...{prompt[-25:]}"
        print(f"\n--- {label}{head!r}  [TTFT {m['ttft_s'] * 1e3:.0f} ms, TPOT {m['tpot_s'] * 1e3:.1f} ms, "
              f"{len(c.token_ids)} tokens, finish={c.finish_reason}]")
        print((prompt if len(prompt) < 200 else "...") + c.text)


def long_prompt(tokenizer, budget: int) -> str:
    """The first `budget` tokens' worth of whole lines of textwrap's source (the standard library
    ships with every Python, so the demo needs no file of its own)."""
    lines, text = inspect.getsource(textwrap).splitlines(keepends=True), ""
    for line in lines:
        if len(tokenizer.encode(text + line)) > budget:
            break
        text += line
    return text


def turns(generate, prompt: str, max_tokens: int):
    """A first turn on `prompt`, then a second turn on prompt + answer + a new request."""
    (first,) = generate([prompt], max_tokens=max_tokens)
    follow = prompt + first.text + "\n\ndef "
    (second,) = generate([follow], max_tokens=max_tokens)
    return [(prompt, first), (follow, second)]


def show_turns(pairs) -> None:
    for n, (prompt, c) in enumerate(pairs, 1):
        m = c.metrics
        cached = (m["prompt_tokens"] - m["num_computed_tokens"]) if m.get("num_computed_tokens") is not None else None
        print(f"turn {n}: {m['prompt_tokens']} prompt tokens, "
              f"{'?' if cached is None else cached} of them from cached pages, TTFT {m['ttft_s'] * 1e3:.0f} ms")


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
    n = args.max_tokens

    def local(ps, **kw):
        return raypd.generate(ps, model=name, backend="local", **dict(dict(max_tokens=n), **kw))

    if args.backend == "local":
        local(prompts)  # compiles
        print(f"model {name}, colocated in-process engine")
        show(prompts, local(prompts, **GREEDY), label=f"greedy {GREEDY} ")
        show(prompts, local(prompts, **SAMPLING), label="sampled ")
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
        deployment.generate(prompts, max_tokens=n)  # compile the workers' shapes
        greedy = deployment.generate(prompts, max_tokens=n, **GREEDY)
        show(prompts, greedy, label=f"greedy {GREEDY} ")
        sampled = deployment.generate(prompts, max_tokens=n, **SAMPLING)
        show(prompts, sampled, label=f"sampled {SAMPLING} ")
        again = deployment.generate(prompts, max_tokens=n, **SAMPLING)
        same_seed = sum(a.token_ids == b.token_ids for a, b in zip(sampled, again))
        print(f"\nsame seed, same text: {same_seed}/{len(prompts)} prompts")

        info = deployment.info()
        budget = min(1024, info["max_seq_len"] // 2)
        print(f"\nprefix reuse: a {budget}-token prompt (textwrap's source), then a second turn that extends it")
        text = long_prompt(info["model"].tokenizer, budget)
        turns(deployment.generate, "# warm-up\n" + text, n)  # compiles these shapes; shares no page with `text`
        pairs = turns(deployment.generate, text, n)
        show_turns(pairs)

        ok = True
        for label, ours, ref in (("greedy", greedy, local(prompts, **GREEDY)), ("seeded", sampled, local(prompts, **SAMPLING))):
            same = sum(c.token_ids == r.token_ids for c, r in zip(ours, ref))
            ok &= same == len(prompts)
            print(f"disaggregated == colocated ({label} tokens): {same}/{len(prompts)} prompts")
        local_turns = turns(local, pairs[0][0], n)
        same = sum(c.token_ids == r.token_ids for (_, c), (_, r) in zip(pairs, local_turns))
        print(f"disaggregated == colocated (both turns, greedy): {same}/2")
        return 0 if ok and same == 2 and same_seed == len(prompts) else 1
    finally:
        deployment.shutdown()


if __name__ == "__main__":
    sys.exit(main())
