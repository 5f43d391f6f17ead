"""What an operator sees (issue 18): commands that never hang, one consistent command line,
warm before ready, logs, and batch output where the user asked."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raypd import batch, cli, logs, reach

REPO = Path(__file__).resolve().parents[1]


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is


def run_cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "raypd.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


# ------------------------------------------------------------------ nothing hangs


@pytest.mark.integration  # a subprocess or a served endpoint
def test_status_against_a_closed_port_fails_within_15_s_naming_the_address():
    address = f"127.0.0.1:{closed_port()}"
    start = time.monotonic()
    run = run_cli("status", "--address", address, timeout=60)
    assert time.monotonic() - start < 15
    assert run.returncode != 0 and address in run.stderr and "raypd status" in run.stderr, run.stderr[-2000:]


@pytest.mark.integration  # a subprocess or a served endpoint
def test_ray_init_gives_up_on_a_port_that_is_not_ray():
    """An open port that never answers as Ray (here: a listening socket nobody serves) must not
    block: ray.init runs in a helper thread the caller stops waiting for."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        address = f"127.0.0.1:{s.getsockname()[1]}"
        code = ("import sys, time; from raypd import reach\n"
                f"t = time.monotonic()\ntry:\n    reach.ray_init({address!r}, timeout_s=3)\n"
                "except ConnectionError as e:\n    print(round(time.monotonic() - t, 1), e); sys.exit(7)\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             env=dict(env, PYTHONPATH=str(REPO)))
    assert run.returncode == 7 and address in run.stdout, run.stdout + run.stderr[-2000:]


@pytest.mark.parametrize("bad", ["nonsense", "host:", ":80", "host:port"])
def test_addresses_must_be_host_port(bad):
    with pytest.raises(ValueError, match="HOST:PORT"):
        reach.split_address(bad)


def test_grpc_check_names_the_target():
    target = f"127.0.0.1:{closed_port()}"
    with pytest.raises(ConnectionError, match=target):
        reach.check_grpc(target, timeout_s=3)


@pytest.mark.integration  # a subprocess or a served endpoint
def test_bench_against_a_closed_grpc_port_fails_fast():
    target = f"127.0.0.1:{closed_port()}"
    start = time.monotonic()
    run = run_cli("bench", "--target", "grpc", "--grpc-address", target, "--connect-timeout-s", "5", timeout=120)
    assert run.returncode != 0 and target in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert time.monotonic() - start < 60  # mostly the interpreter and imports on a busy machine


@pytest.mark.integration  # a subprocess or a served endpoint
def test_sigterm_while_serve_is_starting_stops_it_promptly():
    """SIGTERM during start-up (loading and compiling) unwinds at once rather than after it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.Popen([sys.executable, "-m", "raypd.cli", "serve", "--backend", "local", "--model",
                             "tiny-random", "--grpc-port", "0", "--compile-cache", "off"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(env, PYTHONPATH=str(REPO)), cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        seen = ""
        while "compiling" not in seen and time.monotonic() < deadline:  # the progress line of the warm-up
            line = proc.stderr.readline()
            if not line:
                break
            seen += line
        assert "compiling" in seen, seen[-2000:]
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        assert time.monotonic() - sent < 30 and code == 143, (code, proc.stderr.read()[-4000:])
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.integration  # a subprocess or a served endpoint
def test_a_start_up_stuck_in_native_code_still_stops_on_sigterm():
    """The main thread never returns to Python (a stuck compile or join, here a read nobody
    answers, with a handler that does not raise): the watchdog exits with the stacks printed."""
    code = ("import os, signal, raypd.cli as c; c._UNWIND_LIMIT_S = 1.0; "
            "signal.signal(signal.SIGTERM, lambda *a: None); c._watch_signals_during_start_up([False]); "
            "print('armed', flush=True); os.read(os.pipe()[0], 1)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "armed"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
        assert "still stopping after 1 s" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


# ------------------------------------------------------------------ one command line


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip().startswith("raypd 0.")


def _subparsers():
    parser = cli.build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return parser, action.choices


def test_every_flag_has_help_and_help_shows_defaults():
    parser, commands = _subparsers()
    assert set(commands) == {"convert", "generate", "serve", "batch", "status", "bench", "profile", "simulate", "plan",
                             "rebalance"}
    for name, sub in commands.items():
        for action in sub._actions:
            if action.help == argparse.SUPPRESS:
                continue  # a hidden old spelling
            assert action.help, f"raypd {name} {action.option_strings or action.dest}: no help"
        text = sub.format_help()
        for action in sub._actions:
            shown = (action.default is not None and action.default is not False
                     and action.default != argparse.SUPPRESS and action.option_strings)
            if shown and action.help != argparse.SUPPRESS and "default" not in action.help:
                assert f"(default: {action.default})" in " ".join(text.split()), f"raypd {name} {action.dest}"


def test_same_flags_for_the_same_things():
    _, commands = _subparsers()
    for name in ("serve", "batch", "status", "bench"):
        assert "--address" in commands[name]._option_string_actions, name
        assert "--connect-timeout-s" in commands[name]._option_string_actions, name
    for name in ("generate", "batch"):
        for flag in ("--max-tokens", "--temperature", "--top-p", "--top-k", "--seed", "--stop", "--ignore-eos"):
            assert flag in commands[name]._option_string_actions, (name, flag)
    assert {"--stream", "--logprobs"} <= set(commands["generate"]._option_string_actions)
    old = cli.build_parser().parse_args(["bench", "--ray-address", "10.0.0.1:6379"])  # the old spelling still works
    assert old.address == "10.0.0.1:6379"


def test_generate_stream_logprobs_and_ignore_eos(capsys):
    assert cli.main(["generate", "hello", "--model", "tiny-random", "--max-tokens", "4", "--ignore-eos",
                     "--logprobs", "--stream", "--json", "--no-warmup"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    tokens, summary = rows[:-1], rows[-1]
    assert len(tokens) == 4 and all(isinstance(r["logprob"], float) and r["logprob"] <= 0 for r in tokens)
    assert summary["finish_reason"] == "length" and summary["metrics"]["completion_tokens"] == 4
    assert summary["metrics"]["prompt_tokens"] >= 1


def test_bench_prints_a_summary_table():
    from raypd.bench.cli import summary_table

    stats = dict(mean=12.0, p50=11.0, p99=20.0)
    s = dict(num_completed=10, num_rejected=0, num_failed=0, duration_s=2.0, total_input_tokens=100,
             total_output_tokens=50, request_throughput=5.0, output_throughput=25.0, total_token_throughput=75.0,
             goodput=None, slo_attainment=None, ttft_ms=stats, tpot_ms=stats, itl_ms=stats, e2e_ms=stats)
    table = summary_table([dict(rate=20.0, summary=s)])
    assert "Serving Benchmark Result (rate 20 req/s)" in table
    assert any(line.startswith("Successful requests:") and line.endswith(" 10") for line in table.splitlines())
    assert "Median TTFT (ms):" in table and "P99 TPOT (ms):" in table


# ------------------------------------------------------------------ logs


def test_json_log_lines_carry_the_fields():
    record = logging.LogRecord("raypd.x", logging.INFO, __file__, 1, "request %s", ("id=1",), None)
    record.fields = dict(event="request", id="r1", ttft_s=0.5)
    out = json.loads(logs.JsonFormatter().format(record))
    assert out["level"] == "info" and out["msg"] == "request id=1" and out["id"] == "r1" and out["ttft_s"] == 0.5


def test_request_line_and_off(caplog):
    logger = logging.getLogger("raypd.test")
    with caplog.at_level(logging.INFO, "raypd.test"):
        logs.log_request(logger, logging.INFO, request_id="r7", prompt_tokens=5, completion_tokens=3, ttft_s=0.1,
                         tpot_s=0.02, e2e_s=0.14, finish_reason="length", prefilled_on="prefill-0")
        logs.log_request(logger, logs.request_level("off"), request_id="r8", prompt_tokens=5, completion_tokens=3,
                         ttft_s=0.1, tpot_s=0.02, e2e_s=0.14, finish_reason="length")
    (rec,) = caplog.records
    assert "id=r7" in rec.getMessage() and "prefilled_on=prefill-0" in rec.getMessage()
    assert rec.fields["completion_tokens"] == 3 and rec.fields["finish_reason"] == "length"


def test_stats_line_only_while_there_is_traffic(caplog):
    now = [0.0]
    state = dict(num_running=0, num_queued=0, num_pages_used=3)
    reporter = logs.StatsReporter(lambda: state, interval_s=10, clock=lambda: now[0])
    now[0] = 10.0
    assert reporter.tick() is None  # quiet: no line
    reporter.count(4, 40)
    now[0] = 20.0
    with caplog.at_level(logging.INFO, "raypd.stats"):
        fields = reporter.tick()
    assert fields["req_per_s"] == 0.4 and fields["tok_per_s"] == 4.0 and fields["num_pages_used"] == 3
    assert "stats" in caplog.records[-1].getMessage()
    state["num_running"] = 2  # running but nothing finished this period: still a line
    now[0] = 30.0
    assert reporter.tick()["req_per_s"] == 0.0
    with pytest.raises(ValueError, match="interval"):
        logs.StatsReporter(lambda: {}, interval_s=0)


def test_tpot_is_time_between_tokens_after_the_first():
    assert logs.tpot_s(1.0, 1.5, 6) == pytest.approx(0.1)
    assert logs.tpot_s(1.0, 1.0, 1) == 0.0


# ------------------------------------------------------------------ batch output


def test_batch_takes_sampling_flags_and_writes_whole_files(tmp_path, capsys):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"prompt": [5, 6, 7]}\n{"prompt": [8, 9], "seed": 3}\n')
    args = ["batch", "--input", str(src), "--output", str(dst), "--backend", "local", "--model", "tiny-random",
            "--max-tokens", "3", "--temperature", "1.0", "--top-p", "0.9", "--seed", "1", "--ignore-eos",
            "--no-progress"]
    assert cli.main(args) == 0
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert cli.main(args) == 0
    again = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["token_ids"] for r in again] == [r["token_ids"] for r in rows]  # seeded: the same again
    assert not Path(str(dst) + ".partial").exists()
    assert [len(r["token_ids"]) for r in rows] == [3, 3] and rows[0]["metrics"]["prompt_tokens"] == 3
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["output"] == str(dst.resolve())


def test_batch_in_a_ray_job_refuses_a_relative_output(tmp_path, monkeypatch):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": [5, 6]}\n')
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what a Ray job's entrypoint sees
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="relative, and this runs as a Ray job"):
        cli.main(["batch", "--input", str(src), "--output", "out.jsonl", "--backend", "local"])
    assert not (tmp_path / "out.jsonl").exists()
    with pytest.raises(SystemExit, match="does not exist"):
        cli.main(["batch", "--input", str(src), "--output", str(tmp_path / "no" / "out.jsonl"), "--backend", "local"])


def test_batch_reads_and_writes_uris():
    pytest.importorskip("fsspec")
    with batch.open_text("memory://ops/in.jsonl", "w") as f:
        f.write('{"prompt": [5, 6, 7], "id": "u"}\n')
    summary = batch.run_batch("memory://ops/in.jsonl", "memory://ops/out.jsonl", backend="local",
                              model="tiny-random", progress=False, max_tokens=2, ignore_eos=True)
    assert summary["output"] == "memory://ops/out.jsonl"
    with batch.open_text("memory://ops/out.jsonl", "r") as f:
        (row,) = [json.loads(line) for line in f]
    assert row["id"] == "u" and len(row["token_ids"]) == 2


def test_uri_detection():
    assert batch.is_uri("s3://bucket/x.jsonl") and batch.is_uri("memory://x")
    assert not batch.is_uri("/abs/x.jsonl") and not batch.is_uri("file:///abs/x") and not batch.is_uri("C:x")


# ------------------------------------------------------------------ warm before ready


@pytest.mark.integration  # a subprocess or a served endpoint
def test_first_request_after_ready_is_as_fast_as_a_warm_one():
    """A served endpoint compiles before it opens: the first request's TTFT is within 2x of a
    warm request's (without the warm-up it would include seconds of compilation)."""
    import grpc

    import models
    from raypd.api import LocalBackend
    from raypd.engine.runner import EngineConfig
    from raypd.proto import raypd_pb2, raypd_pb2_grpc
    from raypd.server.grpc_server import Endpoint

    # few shapes (one prefill bucket, four context sizes, one batch size): compiling is slow on a busy CPU
    backend = LocalBackend(models.load("tiny-random"), EngineConfig(max_seq_len=64, max_slots=1,
                                                                   prefill_buckets=(16,)))
    endpoint = Endpoint(backend, "tiny-random", stats_interval_s=None).start(warmup=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{endpoint.port}") as ch:
            stub = raypd_pb2_grpc.GenerationStub(ch)

            def ttft(ids) -> float:
                req = raypd_pb2.GenerateRequest(token_ids=raypd_pb2.TokenIds(ids=ids),
                                                params=raypd_pb2.SamplingParams(max_tokens=3, ignore_eos=True))
                return stub.Generate(req, timeout=120).timings.ttft_s

            first = ttft(list(range(5, 15)))
            warm = sorted(ttft(list(range(7, 17))) for _ in range(5))
        median = warm[len(warm) // 2]
        assert first <= 2 * max(median, 0.005) + 0.05, (first, warm)  # 50 ms: a busy machine's jitter
    finally:
        endpoint.stop()


def test_warmup_lengths_cover_every_prefill_bucket():
    from raypd.server.backends import warmup_lengths

    assert warmup_lengths((32, 128, 512), 2048) == [32, 128, 512]
    assert warmup_lengths((32, 128, 512), 100) == [32, 98]


def test_compile_cache_env_for_workers(tmp_path, monkeypatch):
    from raypd import compile_cache

    for k in compile_cache.JAX_ENV:
        monkeypatch.delenv(k, raising=False)
    assert compile_cache.enable("off") is None and compile_cache.worker_env() == {}
    import jax

    before = jax.config.jax_compilation_cache_dir
    try:
        path = compile_cache.enable(str(tmp_path / "cache"))
        assert Path(path).is_dir() and compile_cache.worker_env()["JAX_COMPILATION_CACHE_DIR"] == path
        assert jax.config.jax_compilation_cache_dir == path
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        for k in compile_cache.JAX_ENV:
            monkeypatch.delenv(k, raising=False)


def test_configure_json_logs(capsys):
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        logs.configure("info", "json")
        handler = [h for h in root.handlers if getattr(h, "_raypd", False)][-1]
        handler.stream = io.StringIO()
        logs.log_event(logging.getLogger("raypd.x"), logging.INFO, "ready", grpc="127.0.0.1:1")
        out = json.loads(handler.stream.getvalue().strip())
        assert out["event"] == "ready" and out["grpc"] == "127.0.0.1:1"
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
