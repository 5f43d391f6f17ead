"""A minimal demo: greedy continuation of a prompt with teacher-forced `Model.logits` (no cache).

Placeholder until the engine demo lands. Loads the shipped default model, or the
"tiny-random" preset when no default model has been shipped yet (its output is noise).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raypd.demo", description=__doc__)
    parser.add_argument("--model", default=None, help="preset, shipped model or directory "
                        "(default: the shipped default model, else tiny-random)")
    parser.add_argument("--prompt", default="def fibonacci(n):")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    import models

    name = args.model
    if name is None:
        shipped = (models.DATA_DIR / models.DEFAULT_MODEL).is_dir()
        name = models.DEFAULT_MODEL if shipped else "tiny-random"
    model = models.load(name)
    if model.tokenizer is None:
        raise SystemExit(f"model {name!r} has no tokenizer")
    tok = model.tokenizer
    ids = tok.encode(args.prompt, add_bos=tok.bos_id is not None)
    new: list[int] = []
    total_len = len(ids) + args.max_new_tokens
    for _ in range(args.max_new_tokens):
        # Pad to one fixed length so logits compiles once; causal attention makes the padding
        # after the last real token invisible to it.
        seq = ids + new
        next_id = int(model.logits(seq + [0] * (total_len - len(seq)))[len(seq) - 1].argmax())
        if next_id in tok.eos_ids:
            break
        new.append(next_id)
    print(f"model: {name}")
    print(f"prompt: {args.prompt!r}")
    print(f"continuation: {tok.decode(new)!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
