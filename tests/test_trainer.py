"""The default model's trainer and gates on a toy model: exact resume from a checkpoint, the
sequence-length schedule, deterministic batches, the KV-cache greedy used by the gates
(it must match a no-cache greedy loop), and each gate failing on the input it exists for."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from models import dense_decode, quality_gates as qg, stdlib_corpus as corpus, trainer
from models.config import ModelConfig
from models.llama import forward, init_params

TOY = ModelConfig(architecture="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64,
                  tie_word_embeddings=True, dtype="float32", eos_token_ids=(0,))
SPEC = trainer.RunSpec(size="tiny", vocab_size=64, num_steps=6, tokens_per_step=64, seq_lens=(8, 16),
                       phase_fractions=(0.5, 0.5), warmup_steps=2, peak_lr=1e-2)


def _stream() -> np.ndarray:
    return np.random.default_rng(7).integers(1, 64, size=2000).astype(np.int32)


def _train(params, opt_state, opt, first: int, last: int):
    stream = _stream()
    for step in range(first, last + 1):
        batch = trainer.batch_at(stream, SPEC, step)
        params, opt_state, _ = trainer.train_step(params, opt_state, batch, TOY, opt)
    return params, opt_state


def test_schedule_phases_and_batch_shapes():
    assert [SPEC.seq_len(s) for s in range(1, 7)] == [8, 8, 8, 16, 16, 16]
    assert [SPEC.batch_size(s) for s in (1, 6)] == [8, 4]
    b = trainer.batch_at(_stream(), SPEC, 5)
    assert b.shape == (4, 17)
    np.testing.assert_array_equal(b, trainer.batch_at(_stream(), SPEC, 5))
    assert not np.array_equal(b, trainer.batch_at(_stream(), SPEC, 6))


@pytest.mark.parametrize("kw, field", [
    ({"size": "huge"}, "size"), ({"num_steps": 0}, "num_steps"),
    ({"seq_lens": (8,), "phase_fractions": (0.5, 0.5)}, "seq_lens"),
    ({"phase_fractions": (0.5, 0.4, 0.05, 0.0)}, "phase_fractions"),
    ({"seq_lens": (16384, 256, 256, 256)}, "seq_len"),
])
def test_spec_rejects_bad_values(kw, field):
    with pytest.raises(ValueError, match=field):
        trainer.RunSpec(**kw)


def test_resume_from_checkpoint_is_exact(tmp_path):
    """4 steps, a checkpoint, a fresh process state restored from it, 2 more steps == 6 steps
    straight, bit for bit (optimizer moments and schedule count included)."""
    opt = trainer.make_optimizer(SPEC)
    fresh = lambda: init_params(TOY, seed=0)  # noqa: E731
    p, s = _train(fresh(), opt.init(fresh()), opt, 1, 6)
    straight = jax.tree.leaves((p, s))

    p, s = _train(fresh(), opt.init(fresh()), opt, 1, 4)
    trainer.save_checkpoint(tmp_path, p, s, {"step": 4, "train_s": 1.0, "tokens_seen": 256})
    trainer.save_checkpoint(tmp_path, p, s, {"step": 4, "train_s": 1.0, "tokens_seen": 256})  # rewrite is fine
    (path,) = trainer.checkpoint_paths(tmp_path)
    p2, s2, meta = trainer.restore_checkpoint(path, fresh(), opt.init(fresh()))
    assert meta["step"] == 4
    p2, s2 = _train(p2, s2, opt, 5, 6)
    for a, b in zip(straight, jax.tree.leaves((p2, s2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoints_keep_the_latest_two_and_restore_checks_shapes(tmp_path):
    p = init_params(TOY)
    opt = trainer.make_optimizer(SPEC)
    s = opt.init(p)
    for step in (1, 2, 3):
        trainer.save_checkpoint(tmp_path, p, s, {"step": step})
    assert [c.name for c in trainer.checkpoint_paths(tmp_path)] == ["step-00000002", "step-00000003"]
    other = init_params(TOY.replace(hidden_size=16))
    with pytest.raises(ValueError, match="expected"):
        trainer.restore_checkpoint(trainer.checkpoint_paths(tmp_path)[-1], other, opt.init(other))


def test_cached_greedy_matches_no_cache_greedy():
    params = init_params(TOY, seed=3, std=0.3)  # large weights: argmax varies with context
    prompts = [[5, 9, 2], [7], [1, 2, 3, 4, 5, 6]]
    got = dense_decode.greedy(params, TOY, prompts, 12, pad_id=0)
    logits_fn = lambda ids: np.asarray(forward(params, ids[None], TOY)[0])  # noqa: E731
    want = [corpus.greedy_ids(logits_fn, p, 12, len(p) + 12, 0) for p in prompts]
    assert got == want
    with pytest.raises(ValueError, match="context"):
        dense_decode.greedy(params, TOY, [[1] * 60], 12, pad_id=0)


def test_window_nll_matches_the_forward_pass():
    params = init_params(TOY, seed=1)
    w = _stream()[:33].reshape(1, 33)
    logits = np.asarray(forward(params, w[:, :-1], TOY)[0], np.float64)
    logz = np.log(np.exp(logits).sum(-1))
    want = logz - logits[np.arange(32), w[0, 1:]]
    np.testing.assert_allclose(dense_decode.window_nll(params, TOY, w)[0], want, rtol=1e-5)


def test_gate_helpers_by_hand():
    assert qg.max_line_repeats("import os\nimport os\n\n\nimport sys\nimport os  \n") == 3
    assert qg.max_line_repeats("") == 0
    assert qg.max_ngram_repeats([1, 2, 3] * 4, n=3) == 4
    assert qg.max_ngram_repeats([7] * 10, n=8) == 3
    assert qg.max_ngram_repeats(list(range(64))) == 1
    assert qg.bucket_losses(np.array([[1.0, 3.0, 2.0, 2.0]]), bucket=2) == [2.0, 2.0]
    byte_lens = np.array([0, 1, 2, 4])
    windows = np.array([[0, 1, 2, 3]])  # predicts ids 1, 2, 3: 7 bytes
    assert qg.bits_per_byte(np.full((1, 3), np.log(2)), windows, byte_lens) == pytest.approx(3 / 7)


def _evaluate(nll: np.ndarray, text: str, zlib_bpb: float = 3.0, new_ids=tuple(range(64))) -> dict:
    T = nll.shape[1]
    windows = np.ones((nll.shape[0], T + 1), np.int64)
    return qg.evaluate(lambda w: nll, lambda prompts, n: [list(new_ids)] * len(prompts), encode=lambda s: [1],
                       decode=lambda ids: text, heldout_windows=windows,
                       byte_lens=np.array([0, 4]), zlib_bpb=zlib_bpb)


def test_each_gate_fails_on_what_it_guards_against():
    T = 2 * qg.POSITION_BUCKET
    good = np.concatenate([np.full((2, T // 2), 2.0), np.full((2, T // 2), 1.5)], axis=1)  # 0.63 bits/byte
    ok = _evaluate(good, "x = 1\ny = 2\n")
    assert ok["passed"] == {"heldout_bpb": True, "no_loops": True, "long_context": True}
    assert not _evaluate(good, "\nimport os" * 3)["passed"]["no_loops"]
    assert not _evaluate(good, "." * 64, new_ids=[5] * 64)["passed"]["no_loops"]  # a loop within one line
    assert not _evaluate(good[:, ::-1], "x = 1\n")["passed"]["long_context"]
    assert not _evaluate(good, "x = 1\n", zlib_bpb=0.7)["passed"]["heldout_bpb"]  # limit 0.56
    assert not _evaluate(good * 4, "x = 1\n")["passed"]["heldout_bpb"]  # 2.9 > 2.3
