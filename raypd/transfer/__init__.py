"""K/V transfer between a prefill engine and a decode engine (see base.py for the contract)."""

from raypd.transfer.base import (DEFAULT_BACKEND, KVTransport, SenderLost, TransferError,
                                 TransferHandle, TransferNotFound, TransferTimeout, make_transport)
from raypd.transfer.engines import recv_into, send_prefill

__all__ = ["DEFAULT_BACKEND", "KVTransport", "SenderLost", "TransferError", "TransferHandle",
           "TransferNotFound", "TransferTimeout", "make_transport", "recv_into", "send_prefill"]
