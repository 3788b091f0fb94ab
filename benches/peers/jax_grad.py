#!/usr/bin/env python3
"""Gradient oracle for tpc's autodiff: jax.grad of gpt.tpl's loss (gpt_fn.py) on the params and
inputs in LEAVES.npz, compared with tpc's gradients in GRADS.npz (from `tpc run --grads`, keyed
by param name). Run by `cargo bench --bench run -- grad`, or by hand:

  python jax_grad.py LEAVES.npz GRADS.npz --layers 4 --heads 8

The truth is JAX in float64 on the same (f32) values; JAX in float32 is printed beside tpc as
the error an f32 implementation of the same function makes. Prints one JSON document: per
param and overall, the relative error ||g - g64|| / max(||g64||, 1e-4 ||all of g64||) of tpc
and of JAX f32.
"""
import argparse
import json
import sys

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("leaves")
    ap.add_argument("grads")
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--heads", type=int, required=True)
    args = ap.parse_args()

    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    from gpt_fn import LAYER_PARAMS, TOP_PARAMS, loss_unrolled

    z = np.load(args.leaves)
    leaves = {k: z[k] for k in z.files}
    g = np.load(args.grads)
    tpc = {k: g[k] for k in g.files}
    L = args.layers
    names = TOP_PARAMS + [f"layer.{i}.{k}" for i in range(L) for k in LAYER_PARAMS]
    if set(tpc) != set(names):
        sys.exit(f"gradients do not fit gpt.tpl at L={L}: {sorted(set(tpc) ^ set(names))[:5]}")

    def grads(dtype):
        top = {k: jnp.asarray(leaves[k], dtype) for k in TOP_PARAMS}
        layers = [
            {k: jnp.asarray(leaves[f"layer.{i}.{k}"], dtype) for k in LAYER_PARAMS} for i in range(L)
        ]
        f = lambda t, ls: loss_unrolled(t, ls, leaves["tokens"], leaves["labels"], args.heads)
        loss, (gt, gl) = jax.value_and_grad(f, argnums=(0, 1))(top, layers)
        out = {k: np.asarray(v, np.float64) for k, v in gt.items()}
        for i, p in enumerate(gl):
            out.update({f"layer.{i}.{k}": np.asarray(v, np.float64) for k, v in p.items()})
        return float(loss), out

    loss64, g64 = grads(jnp.float64)
    loss32, g32 = grads(jnp.float32)
    # Relative to the param's gradient, or to 1e-4 of the whole gradient where a param's is
    # (nearly) zero in exact arithmetic: the key bias, whose shift every softmax cancels.
    total = np.sqrt(sum(np.sum(v * v) for v in g64.values()))
    rel = lambda a, b: float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-4 * total))
    per = {
        n: {"tpc": rel(tpc[n].astype(np.float64), g64[n]), "jax_f32": rel(g32[n], g64[n])}
        for n in names
    }
    json.dump(
        {
            "jax": jax.__version__,
            "loss_f64": loss64,
            "loss_f32": loss32,
            "max_rel_tpc": max(v["tpc"] for v in per.values()),
            "max_rel_jax_f32": max(v["jax_f32"] for v in per.values()),
            "worst_param": max(per, key=lambda n: per[n]["tpc"]),
            "params": per,
        },
        sys.stdout,
    )
    print()


if __name__ == "__main__":
    main()
