#!/usr/bin/env python3
"""numpy (OpenBLAS) f32 matmul timings: the reference column of `cargo bench --bench run`.

Protocol (so the bench can interleave its own measurements with these, under the same load):
on start, prints one JSON line describing numpy and the BLAS libraries threadpoolctl reports
(the OpenBLAS kernel is "architecture"); then, for each JSON request line read on stdin,
  {"a": [..shape..], "b": [..shape..], "threads": 1 | 2,
   "min_time": 0.4, "min_samples": 7, "sample_time": 0.02}
prints one JSON result line
  {"iters": .., "samples": .., "best_s": .., "median_s": ..}   (seconds per matmul call).

Every matmul runs with BLAS limited to one thread (threadpoolctl). threads = 2 means two
concurrent single-threaded matmuls on independent data (two Python threads; numpy releases the
GIL inside the BLAS call), as the tpc bench does with two ranks. Method (same as the bench):
calibrate `iters` so that one sample (iters calls; with 2 threads, the slower thread's time for
its iters calls) takes >= sample_time, then take samples until
both min_samples and min_time are reached; best and median of seconds per call.

Run by hand: echo '{"a":[1024,1024],"b":[1024,1024],"threads":1}' | python matmul_numpy.py
"""
import json
import os
import sys
import threading
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

DEFAULTS = {"min_time": 0.4, "min_samples": 7, "sample_time": 0.02}


def operands(sa, sb, seed):
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1, 1, size=sa).astype(np.float32)
    b = rng.uniform(-1, 1, size=sb).astype(np.float32)
    return a, b


def run_samples(sample, req):
    """sample(iters) -> seconds for iters calls; returns (iters, [seconds per call])."""
    iters, t = 1, sample(1)
    while t < req["sample_time"] and iters < 1 << 20:
        want = int(iters * req["sample_time"] / max(t, 1e-9)) + 1
        iters = min(1 << 20, max(2 * iters, min(16 * iters, want)))
        t = sample(iters)
    per_call = []
    start = time.perf_counter()
    while len(per_call) < req["min_samples"] or time.perf_counter() - start < req["min_time"]:
        per_call.append(sample(iters) / iters)
        if len(per_call) >= 200:
            break
    return iters, per_call


def bench_1(sa, sb, req):
    a, b = operands(sa, sb, 1)

    def sample(iters):
        t0 = time.perf_counter()
        for _ in range(iters):
            np.matmul(a, b)
        return time.perf_counter() - t0

    return run_samples(sample, req)


def bench_concurrent(sa, sb, req, k):
    data = [operands(sa, sb, 10 + i) for i in range(k)]
    # Each worker times its own calls; a sample is the slowest worker's time (timing in the
    # main thread would be wrong when it is preempted between the barriers).
    state = {"iters": 0, "stop": False, "times": [0.0] * k}
    start = threading.Barrier(k + 1)
    done = threading.Barrier(k + 1)

    def worker(i):
        a, b = data[i]
        while True:
            start.wait()
            if state["stop"]:
                return
            t0 = time.perf_counter()
            for _ in range(state["iters"]):
                np.matmul(a, b)
            state["times"][i] = time.perf_counter() - t0
            done.wait()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()

    def sample(iters):
        state["iters"] = iters
        start.wait()
        done.wait()
        return max(state["times"])

    try:
        return run_samples(sample, req)
    finally:
        state["stop"] = True
        start.wait()
        for t in threads:
            t.join()


def main():
    header = {
        "numpy": np.__version__,
        "blas": threadpool_info(),
        "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")},
    }
    print(json.dumps(header), flush=True)
    with threadpool_limits(limits=1, user_api="blas"):
        for line in sys.stdin:
            if not line.strip():
                continue
            req = dict(DEFAULTS, **json.loads(line))
            k = req.get("threads", 1)
            if k == 1:
                iters, per_call = bench_1(req["a"], req["b"], req)
            else:
                iters, per_call = bench_concurrent(req["a"], req["b"], req, k)
            s = sorted(per_call)
            out = {"iters": iters, "samples": len(s), "best_s": s[0], "median_s": s[len(s) // 2]}
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
