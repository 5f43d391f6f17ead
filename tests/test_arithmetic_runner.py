"""The arithmetic runner under the real engines: outputs worked out by hand, read through the
page tables (a wrong page, prefix or transfer changes them), exact through the INT8 codec.

Hand rule (raypd/engine/arithmetic.py): next token = (weight * sum of the tokens so far) % V.
"""

from __future__ import annotations

import numpy as np
import pytest

from raypd.engine.api import Request, SamplingParams
from raypd.engine.arithmetic import ArithmeticRunner, arithmetic_config
from raypd.engine.decode import DecodeEngine
from raypd.engine.prefill import PrefillEngine
from raypd.engine.runner import EngineConfig
from raypd.runtime.engines import MockEngineFactory
from raypd.transfer.engines import export_pages, import_pages, recv_into, send_prefill
from raypd.transfer.inproc import InProcTransport

V = 100
ENGINE = EngineConfig(page_size=4, num_pages=64, max_slots=4, max_seq_len=128, prefill_buckets=(8, 16),
                      max_decode_steps=4)


def runner(prefill_weight=1, decode_weight=1, **kw) -> ArithmeticRunner:
    return ArithmeticRunner(arithmetic_config(V, 128), EngineConfig(**{**ENGINE.__dict__, **kw}),
                            prefill_weight, decode_weight)


def by_hand(prompt, n, prefill_weight, decode_weight):
    """The tokens the rule gives: the first from prefill, the rest from decode steps."""
    total, out = sum(prompt), []
    for i in range(n):
        out.append((total * (prefill_weight if i == 0 else decode_weight)) % V)
        total += out[-1]
    return out


def drain(decode: DecodeEngine) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while decode.num_running:
        for o in decode.decode_step():
            out.setdefault(o.request_id, []).append(o.token_id)
    for o in decode.flush():
        out.setdefault(o.request_id, []).append(o.token_id)
    return out


def test_prefill_and_decode_by_hand_across_chunks_and_pages():
    r = runner(prefill_weight=3, decode_weight=7)
    prefill, decode = PrefillEngine(r), DecodeEngine(r)
    prompts = {"short": [10, 20, 5], "long": list(range(1, 21))}  # "long" spans 2 chunks of 16, 5 pages
    # 3 * 35 = 105; 7 * (35 + 5) = 280; 7 * (40 + 80) = 840; 7 * (120 + 40) = 1120 (mod 100)
    assert by_hand(prompts["short"], 4, 3, 7) == [5, 80, 40, 20]
    firsts = {}
    for out in prefill.prefill([Request(k, p, SamplingParams(max_tokens=6)) for k, p in prompts.items()]):
        firsts[out.request_id] = out.first_token
        decode.insert(Request(out.request_id, prompts[out.request_id], SamplingParams(max_tokens=6)), out)
        prefill.release(out.request_id)
    assert firsts == {"short": 35 * 3 % V, "long": 210 * 3 % V}
    got = drain(decode)
    for k, p in prompts.items():
        assert [firsts[k]] + got[k] == by_hand(p, 6, 3, 7), k
    assert r.allocator.num_used == 0


def test_multi_step_dispatches_equal_single_steps_and_stop_ids_end_on_the_device():
    prompt = [4, 9, 2, 7, 1]
    outs = []
    for steps in (1, 4):
        r = runner(max_decode_steps=steps)
        prefill, decode = PrefillEngine(r), DecodeEngine(r, eos_ids=())
        ref = by_hand(prompt, 10, 1, 1)
        req = Request("a", prompt, SamplingParams(max_tokens=10, stop_token_ids=(ref[6],)))
        (out,) = prefill.prefill([req])
        decode.insert(req, out)
        prefill.release("a")
        outs.append([out.first_token] + drain(decode)["a"])
    assert outs[0] == outs[1] == ref[:7]


def test_a_cached_prefix_is_read_from_its_pages():
    """A prefix reused from the pool gives the same tokens with fewer computed; the same
    prefix pages offered for another prompt are caught (they hold other tokens)."""
    r = runner()
    prefill = PrefillEngine(r)
    prompt = list(range(1, 14))  # 3 full pages + 1 token
    (first,) = prefill.prefill([Request("a", prompt)])
    pages = first.pages[:3]
    r.allocator.incref(pages)
    prefill.release("a")
    (again,) = prefill.prefill([Request("b", prompt)], {"b": pages})
    assert again.first_token == first.first_token == sum(prompt) % V and again.num_cached_tokens == 12
    prefill.release("b")
    # the tokens live in the pool: overwriting one cached slot changes the output
    tok, pos = r._pool()
    tok[pages[1], 2] += 1
    r._store(tok, pos)
    (bad,) = prefill.prefill([Request("c", prompt)], {"c": pages})
    assert bad.first_token == (sum(prompt) + 1) % V
    prefill.release("c")
    r.allocator.free(pages)
    assert r.allocator.num_used == 0


@pytest.mark.parametrize("compression", ["none", "int8"])
def test_transfer_and_host_copies_are_exact(compression):
    """Prefill on one runner, decode on another through the real codec; a host copy of the
    pages imported into a third pool reproduces the same first token."""
    src, dst, other = runner(prefill_weight=2), runner(decode_weight=3), runner(prefill_weight=2)
    prefill, decode, transport = PrefillEngine(src), DecodeEngine(dst), InProcTransport()
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, V, 30)]
    req = Request("r", prompt, SamplingParams(max_tokens=5))
    (out,) = prefill.prefill([req])
    handle = send_prefill(prefill, out, transport, compression)
    host = export_pages(src, out.pages[:7], compression)  # 7 full pages = 28 tokens
    prefill.release("r")
    first = recv_into(decode, req, out, handle, transport)
    transport.release(handle)
    assert [first.token_id] + drain(decode)["r"] == by_hand(prompt, 5, 2, 3)
    pages = import_pages(other, [host])
    (again,) = PrefillEngine(other).prefill([Request("s", prompt)], {"s": pages})
    assert again.first_token == out.first_token and again.num_cached_tokens == 28
    assert src.allocator.num_used == dst.allocator.num_used == 0


def test_factory_builds_the_real_engines_with_one_pool():
    f = MockEngineFactory(prefill_weight=2, decode_weight=3, local_prefill_weight=5, vocab_size=V)
    e = f.build("decode")
    assert type(e.prefill) is PrefillEngine and type(e.decode) is DecodeEngine
    assert e.decode.allocator is e.prefill.allocator and e.kv_bytes_per_page == f.kv_bytes_per_page
    (out,) = e.prefill.prefill([Request("x", [1, 2, 3])])
    assert out.first_token == 6 * 5 % V  # a decode worker prefills with the local weight
    assert f.build("prefill").prefill.runner.prefill_weight == 2
    with pytest.raises(ValueError, match="vocab_size must be in"):
        MockEngineFactory(vocab_size=5000).build("prefill")


def test_the_stand_in_has_the_runner_interface():
    """Every public method of ModelRunner exists on the stand-in with the same parameters, and
    the attributes the engines and the transfer code read are there."""
    import inspect

    from raypd.engine.runner import ModelRunner

    r = runner()
    for name, fn in inspect.getmembers(ModelRunner, inspect.isfunction):
        if not name.startswith("_"):
            assert list(inspect.signature(getattr(ArithmeticRunner, name)).parameters) == \
                list(inspect.signature(fn).parameters), name
    for attr in ("cfg", "config", "allocator", "cache", "mesh", "max_seq_len", "max_pages_per_seq", "page_size",
                 "page_buckets", "batch_buckets", "prefill_buckets", "layer_groups"):
        assert hasattr(r, attr), attr
