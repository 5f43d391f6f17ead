"""The one local-prefill loop (raypd/engine/local_prefill.py) that the colocated engine and a
decode worker both run, over the arithmetic runner (tokens by hand, no compile).

Guards against: retained prefix-cache pages taken from the wrong range or leaked when an insert
fails, and an abort during prefill that leaves pages or a prefill behind.
"""

from __future__ import annotations

from raypd.engine.api import Request, SamplingParams
from raypd.engine.arithmetic import ArithmeticRunner, arithmetic_config, expected_tokens
from raypd.engine.decode import DecodeEngine
from raypd.engine.local_prefill import LocalPrefill
from raypd.engine.pages import OutOfPages
from raypd.engine.prefill import PrefillEngine
from raypd.engine.runner import EngineConfig

G = 4


def loop(max_slots: int = 2) -> LocalPrefill:
    runner = ArithmeticRunner(arithmetic_config(1000, 64), EngineConfig(page_size=G, num_pages=32, max_slots=max_slots,
                                                                         max_seq_len=64), 2, 3)
    return LocalPrefill(PrefillEngine(runner), DecodeEngine(runner))


def run(lp: LocalPrefill) -> dict:
    out = {}
    while len(lp) or lp.decode.num_running:
        for p in lp.prefill_chunk():
            out.setdefault(p.request.request_id, []).append(p.first.token_id)
        for o in lp.decode_step():
            out.setdefault(o.request_id, []).append(o.token_id)
    return out


def test_tokens_and_retained_pages():
    lp = loop()
    prompt = list(range(1, 11))  # 10 tokens: two full pages and a partial one
    lp.add([Request("a", prompt, SamplingParams(max_tokens=4))], retain_from=0, tag="mine")
    (p,) = lp.prefill_chunk()
    assert p.tag == "mine" and p.error is None
    assert p.cached_pages == p.output.pages[:2]  # the full prompt pages, one more reference each
    assert [lp.prefill.allocator.refcount(x) for x in p.cached_pages] == [2, 2]
    got = [p.first.token_id] + run(lp).get("a", [])
    assert got == expected_tokens(prompt, 4, 2, 3, 1000)
    lp.prefill.allocator.free(p.cached_pages)
    assert lp.prefill.allocator.num_used == 0


def test_failed_insert_holds_nothing():
    lp = loop(max_slots=1)
    lp.add([Request("a", [5, 6, 7], SamplingParams(max_tokens=8))])
    lp.add([Request("b", [8, 9], SamplingParams(max_tokens=8))], retain_from=0)
    results = {p.request.request_id: p for p in lp.prefill_chunk()}  # both prompts fit one chunk
    assert results["a"].error is None and isinstance(results["b"].error, OutOfPages)  # one slot
    assert results["b"].cached_pages == [] and len(lp) == 0
    lp.decode.release("a")
    assert lp.prefill.allocator.num_used == 0


def test_abort_while_prefilling_frees_everything():
    lp = loop()
    lp.add([Request("a", list(range(1, 41)), SamplingParams(max_tokens=4))])  # queued, no chunk run yet
    assert "a" in lp and lp.abort("a") and not lp.abort("a")
    assert len(lp) == 0 and lp.prefill.allocator.num_used == 0
    assert lp.prefill_chunk() == [] and run(lp) == {}
