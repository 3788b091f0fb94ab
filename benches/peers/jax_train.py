#!/usr/bin/env python3
"""JAX GSPMD peer of gpt.tpl's training step with `train loss with sgd(lr=LR)`: the forward,
`jax.value_and_grad` and the update p - LR * g, jitted as one step with the params donated (updated
in place), on the same params and inputs and the same Megatron sharding over 8 (virtual CPU)
devices as tpc. Run by `cargo bench --bench run -- train`, or by hand:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python jax_train.py LEAVES.npz \
      --layers 16 --heads 8 --lr 0.1 --steps 10

The function is gpt.tpl with tpc's kernel semantics (gpt_fn.py); the layers are unrolled, as
tpc's plan is. Prints one JSON document: versions, compile time, the all-reduce count in the
compiled HLO, the loss of every step (the params move, so each step's loss checks the update
too), and ms per training step after one warm-up step.
"""
import argparse
import json
import statistics
import sys
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("npz")
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--heads", type=int, required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from gpt_fn import LAYER_SPEC, TOP_SPEC, loss_unrolled

    from gpt_fn import tp_mesh

    mesh = tp_mesh(args.devices)
    shard = lambda spec: NamedSharding(mesh, P(*spec))
    z = np.load(args.npz)
    arrays = {k: z[k] for k in z.files}
    L, NH, lr = args.layers, args.heads, args.lr
    expected = set(TOP_SPEC) | {"tokens", "labels"} | {
        f"layer.{i}.{k}" for i in range(L) for k in LAYER_SPEC
    }
    if set(arrays) != expected:
        diff = sorted(expected ^ set(arrays))
        sys.exit(f"npz does not fit gpt.tpl at L={L}: {diff[:5]}")

    put = lambda x, spec: jax.device_put(jnp.asarray(x), shard(spec))
    top = {k: put(arrays[k], s) for k, s in TOP_SPEC.items()}
    layers = [{k: put(arrays[f"layer.{i}.{k}"], s) for k, s in LAYER_SPEC.items()} for i in range(L)]
    tokens = put(arrays["tokens"], (None, None))
    labels = put(arrays["labels"], (None, None))
    out_shardings = (
        None,
        {k: shard(s) for k, s in TOP_SPEC.items()},
        [{k: shard(s) for k, s in LAYER_SPEC.items()} for _ in range(L)],
    )

    def step(top, layers, tokens, labels):
        f = lambda t, ls: loss_unrolled(t, ls, tokens, labels, NH)
        loss, (gt, gl) = jax.value_and_grad(f, argnums=(0, 1))(top, layers)
        sgd = lambda p, g: jax.tree_util.tree_map(lambda x, d: x - lr * d, p, g)
        return loss, sgd(top, gt), sgd(layers, gl)

    t0 = time.perf_counter()
    compiled = (
        jax.jit(step, donate_argnums=(0, 1), out_shardings=out_shardings)
        .lower(top, layers, tokens, labels)
        .compile()
    )
    compile_s = time.perf_counter() - t0
    hlo = compiled.as_text()
    losses, times = [], []
    for i in range(args.steps + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        loss, top, layers = compiled(top, layers, tokens, labels)
        loss.block_until_ready()
        jax.tree_util.tree_map(lambda x: x.block_until_ready(), (top, layers))
        if i > 0:
            times.append(time.perf_counter() - t0)
        losses.append(float(np.asarray(loss)))
    json.dump(
        {
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "devices": args.devices,
            "compile_s": compile_s,
            "all_reduce_ops_in_hlo": hlo.count(" all-reduce(") + hlo.count(" all-reduce-start("),
            "losses": losses,
            "median_ms": statistics.median(times) * 1e3,
            "min_ms": min(times) * 1e3,
            "steps": args.steps,
        },
        sys.stdout,
    )
    print()


if __name__ == "__main__":
    main()
