"""`raypd convert`: HF directory in, raypd checkpoint out, same logits when loaded back."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_tokenizer_json

import models
import raypd
from models import checkpoint
from models.weights import save_hf
from raypd import cli


def test_convert_round_trip(tmp_path, capsys):
    preset = models.load("tiny-random")
    hf_dir, out_dir = tmp_path / "hf", tmp_path / "out"
    save_hf(hf_dir, preset.params, preset.config)

    assert cli.main(["convert", str(hf_dir), str(out_dir), "--dtype", "bfloat16"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["dtype"] == "bfloat16"
    assert checkpoint.is_checkpoint(out_dir)
    loaded = models.load(out_dir)
    assert loaded.config == preset.config.replace(dtype="bfloat16")
    expected = np.asarray(preset.params.embed).astype("bfloat16").astype(np.float32)
    np.testing.assert_array_equal(np.asarray(loaded.params.embed, np.float32), expected)


def test_convert_copies_tokenizer_and_keeps_generation_eos(tmp_path):
    preset = models.load("tiny-random")
    hf_dir, out_dir = tmp_path / "hf", tmp_path / "out"
    save_hf(hf_dir, preset.params, preset.config)
    write_tokenizer_json(hf_dir)
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))

    assert cli.main(["convert", str(hf_dir), str(out_dir)]) == 0
    loaded = models.load(out_dir)
    assert (out_dir / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    assert loaded.config.eos_token_ids == (2, 3) and loaded.tokenizer.eos_ids == (2, 3)
    ids = [1, 4, 5, 6]
    np.testing.assert_array_equal(loaded.logits(ids), preset.logits(ids))


def test_convert_refuses_non_empty_output(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with pytest.raises(SystemExit, match="not empty"):
        cli.main(["convert", str(tmp_path), str(tmp_path / "out")])


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    assert "convert" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", "--help"])
    assert e.value.code == 0 and "HF_DIR" in capsys.readouterr().out


def test_generate_json_and_bad_input(capsys):
    assert cli.main(["generate", "hello", "--model", "tiny-random", "--max-tokens", "3", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["prompt"] == "hello" and len(row["token_ids"]) <= 3 and "ttft_s" in row["metrics"]
    with pytest.raises(SystemExit, match="temperature"):
        cli.main(["generate", "hello", "--model", "tiny-random", "--temperature", "-1"])


def test_generate_penalty_flags(capsys):
    args = ["generate", "hello hello hello", "--model", "tiny-random", "--max-tokens", "4", "--json", "--no-warmup",
            "--ignore-eos", "--frequency-penalty", "1.5", "--repetition-penalty", "1.2", "--logit-bias", "7=3",
            "--min-tokens", "2", "--top-logprobs", "2"]
    assert cli.main(args) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (ref,) = raypd.generate(["hello hello hello"], model="tiny-random", max_tokens=4, ignore_eos=True,
                            frequency_penalty=1.5, repetition_penalty=1.2, logit_bias={7: 3}, min_tokens=2,
                            top_logprobs=2, backend="local")
    assert row["token_ids"] == ref.token_ids and [len(t) for t in row["top_logprobs"]] == [2] * 4
    for flags, match in ((["--presence-penalty", "3"], r"presence_penalty must be a number in \[-2, 2\]"),
                         (["--logit-bias", "7"], "--logit-bias must be ID=BIAS"),
                         (["--min-tokens", "9", "--max-tokens", "4"], "min_tokens"),
                         (["--top-logprobs", "30"], "top_logprobs")):
        with pytest.raises(SystemExit, match=match):
            cli.main(["generate", "hello", "--model", "tiny-random", *flags])


def test_serve_runs_in_the_foreground_and_stops_cleanly_on_sigint():
    """`raypd serve` as a user runs it: a real process, a real client, Ctrl-C (SIGINT)."""
    import os
    import signal
    import subprocess
    import sys

    import grpc

    from raypd.proto import raypd_pb2, raypd_pb2_grpc

    proc = subprocess.Popen([sys.executable, "-m", "raypd.cli", "serve", "--backend", "local", "--model", "tiny-random",
                             "--grpc-port", "0", "--no-warmup"], stdout=subprocess.PIPE, text=True, env={**os.environ})
    try:
        info = json.loads(proc.stdout.readline())
        assert info["grpc"].startswith("127.0.0.1:") and info["auth"] is False
        with grpc.insecure_channel(info["grpc"]) as ch:
            stub = raypd_pb2_grpc.GenerationStub(ch)
            resp = stub.Generate(raypd_pb2.GenerateRequest(text="hi", params=raypd_pb2.SamplingParams(
                max_tokens=3, ignore_eos=True)), timeout=60)
            assert len(resp.token_ids) == 3
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_serve_refuses_an_open_bind_without_tls_or_auth(backend):
    with pytest.raises(SystemExit, match="non-loopback"):  # before loading a model or starting Ray
        cli.main(["serve", "--backend", backend, "--model", "tiny-random", "--grpc-host", "0.0.0.0", "--no-warmup"])


@pytest.mark.parametrize("command", ["convert", "generate", "serve", "batch", "status"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0 and command in capsys.readouterr().out


def test_batch_local_and_bad_lines(tmp_path, capsys):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"prompt": "hi", "id": "x"}\n{"prompt": [5, 6], "max_tokens": 2}\n')
    assert cli.main(["batch", "--input", str(src), "--output", str(dst), "--backend", "local", "--model",
                     "tiny-random", "--max-tokens", "3", "--no-progress"]) == 0
    rows = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["x", "line-2"] and len(rows[1]["token_ids"]) <= 2
    for bad, match in (('{"prompt": "a"}\nnot json\n', ":2: not valid JSON"),
                       ('{"text": "a"}\n', "'prompt'"),
                       ('{"prompt": "a", "temperature": -1}\n', "temperature"),
                       ('{"prompt": "a", "colour": 1}\n', "unknown field")):
        src.write_text(bad)
        with pytest.raises(SystemExit, match=match):
            cli.main(["batch", "--input", str(src), "--output", str(dst), "--backend", "local"])
