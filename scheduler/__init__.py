"""Middle ring: the scheduler core (a state machine), placement policies, the cost model and the
global KV store (plain Python + numpy).

No Ray, gRPC, threads or asyncio here (tests/test_layering.py checks): the scheduler actor in
the outer ring feeds `core.SchedulerCore` events and carries out the actions it returns.
"""

from scheduler.cost_model import CostModel, fit
from scheduler.kv_index import Evicted, KVIndex, Location, PrefixMatch, page_hash, page_hashes
from scheduler.policy import (DecodeDecision, DecodeWorkerState, Placement, PolicyConfig, PrefillDecision,
                              PrefillEstimate, PrefillWorkerState, RejectReason, Rejection, RequestSpec,
                              TransferState, Wait, admit, admit_deadline, place, place_decode, place_prefill,
                              predict_queue_waits, predict_ttft_s)

__all__ = [
    "CostModel", "fit", "Evicted", "KVIndex", "Location", "PrefixMatch", "page_hash", "page_hashes",
    "DecodeDecision", "DecodeWorkerState", "Placement", "PolicyConfig", "PrefillDecision", "PrefillEstimate",
    "PrefillWorkerState", "RejectReason", "Rejection", "RequestSpec", "TransferState", "Wait", "admit",
    "place", "place_decode", "place_prefill", "admit_deadline", "predict_queue_waits", "predict_ttft_s",
]
