"""The n samples of one prompt in the scheduler core (scheduler/groups.py), with fake workers.

Guards against: n > 1 running one prefill (and one K/V transfer) per sample; samples left
waiting forever when their leader is aborted (queued, prefilling or handing off) or its prefill
worker dies; a group's pages or slots held after it ends. `core.check()` runs after every event.
"""

from __future__ import annotations

import pytest

from scheduler import PolicyConfig
from scheduler import core
from tests.fake_cluster import FakeCluster, token

PROMPT = [11] + [7] * 9  # two full pages and a partial one


def expected(max_tokens: int) -> list[int]:
    return [token(PROMPT, n) for n in range(max_tokens)]


def test_samples_share_one_prefill_and_one_transfer():
    c = FakeCluster(max_slots=4)
    rids = c.submit_samples(PROMPT, 3, max_tokens=5)
    (task,) = c.workers["prefill-0"].prefills  # one prefill for the three
    assert task.request.request_id == rids[0] and [s.request_id for s in task.samples] == rids[1:]
    # the decode worker holds one slot per sample and the group's pages: the prompt's 2 full pages
    # once, then 2 more pages each (the partial prompt page and the new tokens')
    d = c.core.workers["decode-0"]
    assert d.reserved == {rids[0]: 4 + 2 * 2, rids[1]: 0, rids[2]: 0}
    c.run(rids)
    assert [c.outputs[r] for r in rids] == [expected(5)] * 3
    assert c.num_inserted_samples == 2  # one Insert: the others forked from the first's K/V
    c.assert_baseline()


def test_samples_prefilled_locally_on_the_decode_worker():
    c = FakeCluster(max_slots=4, policy=PolicyConfig(local_prefill_max_len=1000))
    rids = c.submit_samples(PROMPT, 3, max_tokens=4)
    c.run(rids)
    assert [c.outputs[r] for r in rids] == [expected(4)] * 3
    c.assert_baseline()


def test_a_group_needs_a_slot_per_sample():
    c = FakeCluster(max_slots=4)
    busy = c.submit([[90] * 6, [91] * 6], max_tokens=3)
    rids = c.submit_samples(PROMPT, 3, max_tokens=4)  # 2 slots free, 3 needed: it waits
    assert {c.core.requests[r].phase for r in rids} == {core.QUEUED}
    c.run(busy + rids)
    assert [c.outputs[r] for r in rids] == [expected(4)] * 3
    c.assert_baseline()


@pytest.mark.parametrize("phase", [core.QUEUED, core.PREFILLING, core.HANDOFF])
def test_the_others_go_on_when_the_leader_is_aborted(phase):
    c = FakeCluster(max_slots=4)
    busy = c.submit([[90] * 6, [91] * 6], max_tokens=3) if phase == core.QUEUED else []
    rids = c.submit_samples(PROMPT, 3, max_tokens=5)
    if phase == core.HANDOFF:
        c.finish_prefills()
    assert {c.core.requests[r].phase for r in rids} == {phase}
    c.abort(rids[:1])
    c.run(busy + rids[1:])
    assert [c.outputs[r] for r in rids[1:]] == [expected(5)] * 2
    c.settle()
    c.assert_baseline()


@pytest.mark.parametrize("phase", [core.QUEUED, core.PREFILLING, core.HANDOFF, core.DECODING])
def test_aborting_every_sample_leaves_nothing(phase):
    c = FakeCluster(max_slots=4)
    busy = c.submit([[90] * 6, [91] * 6], max_tokens=3) if phase == core.QUEUED else []
    rids = c.submit_samples(PROMPT, 3, max_tokens=8)
    if phase in (core.HANDOFF, core.DECODING):
        c.finish_prefills()
    if phase == core.DECODING:
        c.step()
    assert {c.core.requests[r].phase for r in rids} == {phase}
    c.abort(rids[1:])
    c.abort(rids[:1])
    if busy:
        c.run(busy)
    c.settle()
    c.assert_baseline()


def test_prefill_worker_death_places_each_sample_again():
    c = FakeCluster(num_prefill=2, max_slots=4, max_replacements=0)
    rids = c.submit_samples(PROMPT, 3, max_tokens=4)
    (w,) = [name for name, f in c.workers.items() if f.prefills]
    c.kill(w)
    c.run(rids)
    assert [c.outputs[r] for r in rids] == [expected(4)] * 3
    assert c.core.num_retries == 3
    c.assert_baseline()


def test_k_v_lost_on_the_way_retries_every_sample():
    c = FakeCluster(num_prefill=2, max_slots=4, max_replacements=0)
    rids = c.submit_samples(PROMPT, 3, max_tokens=4)
    (w,) = [name for name, f in c.workers.items() if f.prefills]
    c.finish_prefills()
    c.workers[w].is_alive = False  # dies with the K/V still on it; the decode worker notices
    c.workers[w].transfers.clear()
    c.workers[w].used.clear()
    c.run(rids)
    assert [c.outputs[r] for r in rids] == [expected(4)] * 3
    c.assert_baseline()
