"""What every `raypd` subcommand shares: the help format, the logging options, the flags that
mean the same thing in every command (connect timeout, sampling) and how a subcommand's parser
is made."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' after every option that has a default worth showing (not None,
    not an off switch) and whose help does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in text:
            return text
        return super()._get_help_string(action)


def common_options() -> argparse.ArgumentParser:
    """Options every subcommand takes (logging). SUPPRESS: `raypd -v serve` and `raypd serve -v` both work."""
    from raypd import compile_cache, logs

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("logging")
    g.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="log at DEBUG level (same as --log-level debug)")
    g.add_argument("--log-level", choices=logs.LEVELS, default=argparse.SUPPRESS, help="log level (default: info)")
    g.add_argument("--log-format", choices=logs.FORMATS, default=argparse.SUPPRESS,
                   help="text, or json: one JSON object per line for log shippers (default: text)")
    g.add_argument("--compile-cache", default=argparse.SUPPRESS, metavar="DIR",
                   help="JAX persistent compilation cache directory, 'off' to disable (default: "
                        f"${compile_cache.ENV}, else ~/.cache/raypd/jax)")
    return p


def add_parser(subparsers, name: str, **kw) -> argparse.ArgumentParser:
    return subparsers.add_parser(name, parents=[common_options()], formatter_class=HelpFormatter, **kw)


def add_connect_timeout(p) -> None:
    p.add_argument("--connect-timeout-s", type=float, default=15.0,
                   help="give up connecting to a Ray cluster or gRPC server after this many seconds")


def add_sampling(p, max_tokens: int = 64) -> None:
    g = p.add_argument_group("sampling (as raypd.generate)")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: off)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    g.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than MIN_P x the most likely one, in [0, 1] (0: off)")
    g.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtract this x how often a token was generated so far from its logit, in [-2, 2] (0: off)")
    g.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtract this from the logit of every token generated so far, in [-2, 2] (0: off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide (positive) or multiply (negative) the logits of tokens in the prompt or "
                        "generated so far, in (0, 2] (1: off)")
    g.add_argument("--min-tokens", type=int, default=0,
                   help="no end-of-sequence or stop token before this many tokens, in [0, --max-tokens]")
    g.add_argument("--logit-bias", action="append", default=None, metavar="ID=BIAS",
                   help="add BIAS in [-100, 100] to token ID's logit (repeatable)")


def parse_logit_bias(items) -> dict:
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        try:
            out[int(key)] = float(value)
        except ValueError:
            raise ValueError(f"--logit-bias must be ID=BIAS (an integer id, a number), got {item!r}") from None
        if not sep:
            raise ValueError(f"--logit-bias must be ID=BIAS, got {item!r}")
    return out


def sampling(args) -> dict:
    """The keyword arguments of `raypd.generate` the sampling flags make (SamplingParams checks them)."""
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos, min_p=args.min_p,
                frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty,
                repetition_penalty=args.repetition_penalty, min_tokens=args.min_tokens,
                logit_bias=parse_logit_bias(args.logit_bias), **({"top_logprobs": args.top_logprobs}
                                                            if getattr(args, "top_logprobs", 0) else {}))
