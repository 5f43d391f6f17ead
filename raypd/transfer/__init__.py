"""K/V transfer between a prefill engine and a decode engine (see base.py for the contract,
streaming.py for layer-by-layer streaming).

The contract (base.py: handles, errors, `make_transport`) imports no JAX; the engine glue
(engines.py, streaming.py) loads on first use of its names.
"""

from raypd.transfer.base import (DEFAULT_BACKEND, KVTransport, SenderLost, TransferError,
                                 TransferHandle, TransferNotFound, TransferTimeout, make_transport)

__all__ = ["DEFAULT_BACKEND", "KVTransport", "LayerPart", "SenderLost", "StreamingReceiver",
           "StreamingSender", "TransferError", "TransferHandle", "TransferNotFound", "TransferTimeout",
           "compression_for", "make_transport", "recv_group", "recv_into", "send_prefill"]

_ENGINE_GLUE = {"compression_for": "engines", "recv_group": "engines", "recv_into": "engines", "send_prefill": "engines",
                "LayerPart": "streaming", "StreamingReceiver": "streaming", "StreamingSender": "streaming"}


def __getattr__(name):
    if name in _ENGINE_GLUE:
        import importlib

        return getattr(importlib.import_module(f"raypd.transfer.{_ENGINE_GLUE[name]}"), name)
    raise AttributeError(f"module 'raypd.transfer' has no attribute {name!r}")
