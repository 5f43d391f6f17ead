"""One token poller per deployment handle: every client path (Deployment.generate / stream, the
gRPC and HTTP servers, the benchmark) registers its requests here, and one thread asks the
scheduler for the new tokens of all of them in a single `poll` call. The client side then costs
one RPC per chunk of tokens whatever the concurrency, never one per request per token.

`add(rid, q=None)` -> a queue that receives (rid, poll entry) for each poll entry of that
request ({"tokens", "finished", "error", "metrics"}) until it ends (finished, or an error);
several requests may share one queue. `drop(rid)` stops delivery (the caller aborts the
request itself). A poll that fails delivers that error to every request
waiting, which ends them.
"""

from __future__ import annotations

import queue
import threading


class TokenPoller:
    def __init__(self, poll, timeout_s: float = 1.0, name: str = "raypd-poller"):
        self._poll, self.timeout_s = poll, timeout_s  # poll(ids, timeout_s) -> {rid: entry}
        self._queues: dict[str, queue.SimpleQueue] = {}
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def add(self, rid: str, q: queue.SimpleQueue | None = None) -> queue.SimpleQueue:
        q = queue.SimpleQueue() if q is None else q
        with self._cv:
            if self._stopped:
                raise RuntimeError("the token poller is stopped")
            self._queues[rid] = q
            self._cv.notify()
        return q

    def drop(self, rid: str) -> None:
        with self._cv:
            self._queues.pop(rid, None)

    def num_waiting(self) -> int:
        with self._cv:
            return len(self._queues)

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._queues or self._stopped)
                if self._stopped:
                    return
                ids = list(self._queues)
            try:
                out = self._poll(ids, self.timeout_s)
            except Exception as e:  # noqa: BLE001 - every waiting request ends with it
                out = {rid: dict(tokens=[], finished=True, error=("failed", f"{type(e).__name__}: {e}"), metrics={})
                       for rid in ids}
            with self._cv:
                for rid, entry in out.items():
                    q = self._queues.get(rid)
                    if q is None:
                        continue
                    q.put((rid, entry))
                    if entry["finished"] or entry["error"] is not None:
                        del self._queues[rid]
