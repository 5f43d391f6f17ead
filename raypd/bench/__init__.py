"""Serving benchmark: workloads (workload.py), targets (targets.py), the load generator
(runner.py), metric math (metrics.py) and the report (report.py). `raypd bench` drives it.

    from raypd.bench import metrics, runner, targets, workload
    rng = np.random.default_rng(0)
    target = targets.LocalTarget("tiny-random")
    reqs = workload.synthetic(10, workload.fixed(16), workload.fixed(8), target.vocab_size,
                              workload.arrival_times(10, 5.0, rng), rng)
    result = runner.run(target, reqs)
    print(metrics.summarize(result.records, result.duration_s, metrics.SLO(ttft_s=0.5)))
"""
