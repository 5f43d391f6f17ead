"""Fault scenarios for raypd's fault suite (`scripts/chaos.py`, one subcommand each).

Each scenario module exposes `run(...) -> Report`-like results that both the script (which
prints them) and a CI-sized test (which asserts on them) use:

  bad_input   >= 40 classes of bad requests, each refused with INVALID_ARGUMENT naming the
              field over gRPC (in-process backend) and ValueError over the Python API.
"""
