"""The scheduler <-> worker <-> client wire types (raypd/runtime/messages.py, scheduler/state.py).

Tokens cross two process boundaries (decode worker -> scheduler -> client) and are read by
field name everywhere: a `Token` is not a tuple, so a reader that indexes it by position fails
here and in every test that polls, instead of silently reading the wrong field.
"""

from __future__ import annotations

import pickle

import pytest

from raypd.engine.api import FINISH_LENGTH, TokenOutput
from raypd.runtime.messages import DecodeReport, Token, token_of, token_output


def test_token_round_trip_keeps_every_field():
    o = TokenOutput("r0", 17, -0.25, FINISH_LENGTH, "ab", prompt_logprobs=[-1.0, -2.0],
                    top_logprobs=((17, -0.25), (3, -1.5)))
    t = token_of(o)
    assert (t.token_id, t.logprob, t.finish_reason, t.text) == (17, -0.25, FINISH_LENGTH, "ab")
    assert t.prompt_logprobs == [-1.0, -2.0] and t.top_logprobs == ((17, -0.25), (3, -1.5))
    assert token_output("r0", t) == o
    assert token_output("r0", pickle.loads(pickle.dumps(t))) == o


def test_token_has_no_positional_access():
    t = Token(5, -0.5, None, "x")
    with pytest.raises(TypeError):
        t[0]  # noqa: B018 - the point: indexing fails
    with pytest.raises(TypeError):
        token_id, *_ = t
    with pytest.raises(AttributeError):  # frozen: a token is not edited on the way
        t.token_id = 6


def test_a_chunk_of_tokens_is_small_on_the_wire():
    """A collect report of 64 requests x 16 plain tokens pickles to under 32 bytes a token:
    ids and short text, never K/V or per-token dictionaries."""
    report = DecodeReport(tokens={f"req-{i}": [Token(1000 + j, -0.5 - j, None, "ab") for j in range(16)]
                                  for i in range(64)})
    num_bytes = len(pickle.dumps(report))
    assert num_bytes < 32 * 64 * 16, num_bytes
