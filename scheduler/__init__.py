"""Middle ring: placement policies, the cost model and the global KV index (plain Python + numpy).

No Ray, gRPC, threads or asyncio here (tests/test_layering.py checks); the scheduler actor in
the outer ring builds snapshots, calls these pure functions and acts on what they return.
"""

from scheduler.cost_model import CostModel, fit
from scheduler.kv_index import Evicted, KVIndex, Location, PrefixMatch, page_hash, page_hashes
from scheduler.policy import (DecodeDecision, DecodeWorkerState, Placement, PolicyConfig, PrefillDecision,
                              PrefillEstimate, PrefillWorkerState, RejectReason, Rejection, RequestSpec,
                              TransferState, Wait, admit, place, place_decode, place_prefill)

__all__ = [
    "CostModel", "fit", "Evicted", "KVIndex", "Location", "PrefixMatch", "page_hash", "page_hashes",
    "DecodeDecision", "DecodeWorkerState", "Placement", "PolicyConfig", "PrefillDecision", "PrefillEstimate",
    "PrefillWorkerState", "RejectReason", "Rejection", "RequestSpec", "TransferState", "Wait", "admit",
    "place", "place_decode", "place_prefill",
]
