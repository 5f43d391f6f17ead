"""Outer ring: the Ray runtime (workers, the scheduler actor, deployments).

  engines.py          factories that build a worker's engines in its own process (a model, or the arithmetic stand-in)
  workers.py          PrefillWorker: a plain class (prefill, K/V send, host-copy export)
  decode_worker.py    DecodeWorker: a plain class, the decode loop thread
  scheduler_actor.py  the thin actor around the scheduler core (scheduler/core.py): actions -> calls,
                      call results -> events
  deployment.py       ray.remote applied in one place; serve / connect / Deployment handle
  errors.py           typed errors the client raises
Nothing here is imported by `import raypd`: `raypd.serve` / `raypd.connect` load it on use.
"""
