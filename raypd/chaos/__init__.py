"""Fault scenarios for raypd's fault suite (`scripts/chaos.py`, one subcommand each).

Each scenario module exposes `run(...) -> Report`-like results that both the script (which
prints them) and a CI-sized test (which asserts on them) use:

  bad_input   >= 40 classes of bad requests, each refused with INVALID_ARGUMENT naming the
              field over gRPC (in-process backend) and ValueError over the Python API.
  kill_decode      a decode worker killed mid-stream: all complete, right tokens, replaced.
  transfer_faults  K/V lost on the way (FaultyEngineFactory): retried, identical output.
  aborts           aborts in 5 phases: nothing held, capacity whole afterwards.
  overload         2x capacity with a TTFT SLO: fast refusals, SLO met by the accepted.
  soak             minutes of load, aborts, a worker killed a minute: no growth.
The Ray scenarios share common.py (deployments on mock or real engines, leak check, tracker).
"""
