"""Outer ring: the Ray runtime (workers, the scheduler actor, deployments).

  engines.py          factories that build a worker's engines in its own process (JAX or mock)
  workers.py          PrefillWorker / DecodeWorker: plain classes, the decode loop thread
  scheduler_actor.py  the central scheduler around scheduler/ (policy, cost model, KV index)
  deployment.py       ray.remote applied in one place; serve / connect / Deployment handle
  errors.py           typed errors the client raises
Nothing here is imported by `import raypd`: `raypd.serve` / `raypd.connect` load it on use.
"""
