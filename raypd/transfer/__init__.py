"""K/V transfer between a prefill engine and a decode engine (see base.py for the contract,
streaming.py for layer-by-layer streaming)."""

from raypd.transfer.base import (DEFAULT_BACKEND, KVTransport, SenderLost, TransferError,
                                 TransferHandle, TransferNotFound, TransferTimeout, make_transport)
from raypd.transfer.engines import compression_for, recv_into, send_prefill
from raypd.transfer.streaming import LayerPart, StreamingReceiver, StreamingSender

__all__ = ["DEFAULT_BACKEND", "KVTransport", "LayerPart", "SenderLost", "StreamingReceiver",
           "StreamingSender", "TransferError", "TransferHandle", "TransferNotFound", "TransferTimeout",
           "compression_for", "make_transport", "recv_into", "send_prefill"]
