"""The `raypd` command line. Outer ring: parse arguments, call into `models` / `raypd`, report.

Each subcommand is two functions, `add_<name>(subparsers)` declaring its arguments and
`<name>(args) -> int` running it, in a module by command group:
  common.py       the help format, logging options, flags shared by commands
  completions.py  generate, batch
  serving.py      serve
  ops.py          convert, status, bench
  raypd/planner_cli.py  profile, simulate, plan, rebalance
This module is the entry point (`raypd`, `python -m raypd.cli`): it builds the parser from
`SUBCOMMANDS`, configures logging and the compilation cache, and makes every command stop on
SIGINT and SIGTERM. Heavy imports (jax) happen inside the runners so that `raypd --help`
answers at once.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from raypd.cli import completions, ops, serving
from raypd.cli.common import HelpFormatter, common_options

log = logging.getLogger(__name__)


def _planner_subcommands():
    from raypd import planner_cli

    return (planner_cli.add_profile, planner_cli.add_simulate, planner_cli.add_plan, planner_cli.add_rebalance)


SUBCOMMANDS = (ops.add_convert, completions.add_generate, serving.add_serve, completions.add_batch, ops.add_status,
               ops.add_bench, *_planner_subcommands())


class _Version(argparse.Action):
    """--version without importing the package (which imports JAX) until asked."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib import metadata

        try:
            version = metadata.version("raypd")
        except metadata.PackageNotFoundError:
            import raypd

            version = raypd.__version__
        print(f"raypd {version}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raypd", parents=[common_options()], formatter_class=HelpFormatter,
                                     description="Prefill/decode-disaggregated LLM serving for JAX on Ray.")
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


class Interrupted(Exception):
    """SIGTERM arrived (SIGINT raises KeyboardInterrupt)."""


_UNWIND_LIMIT_S = 15.0  # what a stop during start-up may spend unwinding before the process just exits


def _watch_signals_during_start_up(is_serving: list[bool]) -> None:
    """A stop during start-up ends the process within _UNWIND_LIMIT_S even when the main thread
    is stuck in a native call (a compile, a thread join) and cannot run its Python handler: the
    signal's byte reaches a watcher thread through the wakeup fd, which arms a watchdog that
    prints every thread's stack and exits. Once serving, the graceful stop is the handler's."""
    import faulthandler
    import os
    import threading

    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def fire(code: int) -> None:
        print(f"raypd: still stopping after {_UNWIND_LIMIT_S:.0f} s; exiting now. Where each thread was:",
              file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(code)

    def watch() -> None:
        while True:
            signum = os.read(read_fd, 1)
            if not signum:
                return
            if not is_serving[0]:
                code = 143 if signum[0] == signal.SIGTERM else 130
                timer = threading.Timer(_UNWIND_LIMIT_S, fire, (code,))
                timer.daemon = True  # a normal unwind is not held up by it
                timer.start()
                return

    threading.Thread(target=watch, name="raypd-stop-watchdog", daemon=True).start()


def _on_sigterm(signum, frame):
    raise Interrupted()


def main(argv: list[str] | None = None) -> int:
    from raypd import compile_cache, logs

    args = build_parser().parse_args(argv)
    level = "debug" if getattr(args, "verbose", False) else getattr(args, "log_level", "info")
    logs.configure(level, getattr(args, "log_format", "text"))
    if args.command not in ("convert", "status"):
        cache = compile_cache.enable(getattr(args, "compile_cache", None))
        log.debug("compilation cache: %s", cache or "off")
    # Every command stops promptly on SIGTERM as on Ctrl-C (serve installs its own handlers
    # for a graceful stop); a connect in progress runs in a helper thread, so this is heard.
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.run(args)
    except (KeyboardInterrupt, Interrupted) as e:
        print(f"raypd {args.command}: interrupted", file=sys.stderr)
        return 143 if isinstance(e, Interrupted) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
