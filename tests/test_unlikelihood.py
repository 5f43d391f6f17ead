"""models/unlikelihood.py: which tokens count as a repeat, the loss's value and gradient, and one
fine-tuning step that lowers the probability of a looped token (toy model)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import unlikelihood
from models.config import ModelConfig
from models.llama import forward, init_params
from models.trainer import RunSpec, make_optimizer


def test_repeat_mask_marks_only_continuation_tokens_of_repeated_ngrams():
    #            prefix     | continuation
    seqs = np.array([[5, 6, 7, 5, 6, 7, 8, 0, 0],   # "5 6" seen in the prefix, repeated at 3-4
                     [1, 2, 3, 4, 5, 6, 7, 8, 9]])  # nothing repeats
    starts, lengths = np.array([3, 3]), np.array([7, 9])
    mask = unlikelihood.repeat_mask(seqs, starts, lengths, n=2)
    # bigrams (5,6) ending at 4 and (6,7) ending at 5 are repeats; (7,8) is new; padding never counts
    assert mask[0].tolist() == [False, False, False, True, True, True, False, False, False]
    assert not mask[1].any()
    # the same repeat inside the prefix only: nothing to mark
    assert not unlikelihood.repeat_mask(seqs[:1], np.array([6]), np.array([7]), n=2)[0, :6].any()
    with pytest.raises(ValueError, match="n must be >= 1"):
        unlikelihood.repeat_mask(seqs, starts, lengths, n=0)


def test_unlikelihood_value_and_empty_mask():
    logits = jnp.log(jnp.array([[[0.9, 0.1], [0.5, 0.5]]]))  # [1, 2, 2]
    targets = jnp.array([[0, 1]])
    got = unlikelihood.unlikelihood(logits, targets, jnp.array([[True, True]]))
    assert float(got) == pytest.approx((-np.log(0.1) - np.log(0.5)) / 2, rel=1e-5)
    assert float(unlikelihood.unlikelihood(logits, targets, jnp.array([[False, False]]))) == 0.0
    # only the masked position counts
    one = unlikelihood.unlikelihood(logits, targets, jnp.array([[True, False]]))
    assert float(one) == pytest.approx(-np.log(0.1), rel=1e-5)


def test_a_step_lowers_the_probability_of_the_marked_tokens():
    cfg = ModelConfig(architecture="llama", vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=64, eos_token_ids=(0,))
    params = init_params(cfg, seed=0)
    seqs = jnp.asarray(np.tile(np.array([[3, 4, 5, 3, 4, 5, 3, 4, 5]], np.int32), (2, 1)))
    mask = jnp.asarray(unlikelihood.repeat_mask(np.asarray(seqs), np.array([3, 3]), np.array([9, 9]), n=3))
    mle = jnp.asarray(np.random.default_rng(0).integers(1, 32, size=(2, 17)), jnp.int32)

    def p_marked(p):
        logp = jax.nn.log_softmax(forward(p, seqs[:, :-1], cfg), axis=-1)
        lp = jnp.take_along_axis(logp, seqs[:, 1:, None], axis=-1)[..., 0]
        return float(jnp.exp(lp)[np.asarray(mask[:, 1:])].mean())

    before = p_marked(params)
    opt = make_optimizer(RunSpec(size="tiny", num_steps=20, warmup_steps=1, peak_lr=1e-2, seq_lens=(16,),
                                 phase_fractions=(1.0,), tokens_per_step=32))
    state = opt.init(params)
    for _ in range(5):
        params, state, _, ul = unlikelihood.train_step(params, state, mle, seqs, mask, jnp.float32(1.0), cfg, opt)
    assert float(ul) > 0
    assert p_marked(params) < 0.5 * before
