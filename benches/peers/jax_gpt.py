#!/usr/bin/env python3
"""JAX GSPMD peer of examples/gpt.tpl: the same function, the same params and inputs, the same
Megatron sharding over 8 (virtual CPU) devices. Run by `cargo bench --bench run` (section gpt),
which writes the params and inputs with `tpc::exec::npz::write`; or by hand:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python jax_gpt.py LEAVES.npz \
      --layers 64 --heads 8 --devices 8 --reps 10

The function is gpt.tpl with tpc's kernel semantics: see gpt_fn.py.

Sharding (tp = 8): wq, wk, wv, w1 [_, tp]; bq, bk, bv, b1 [tp]; wo, w2 [tp, _]; wte [tp, _]
(vocab-parallel, as gpt.tpl); everything else replicated; GSPMD propagates the rest.

Prints one JSON document: versions, devices, and for each variant ("unrolled": jit of a Python
loop over the layers; "scan": lax.scan over the per-layer params stacked on a leading axis) the
compile time, the all-reduce count in the compiled HLO, the loss, and ms per forward step.
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
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--variants", default="unrolled,scan")
    ap.add_argument(
        "--dump-logits",
        metavar="OUT.npz",
        help="also write the logits of the unrolled forward (to check the function against "
        "tpc's reference interpreter on a copy of gpt.tpl that outputs its logits)",
    )
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from gpt_fn import tp_mesh

    mesh = tp_mesh(args.devices)
    shard = lambda *spec: NamedSharding(mesh, P(*spec))

    z = np.load(args.npz)
    arrays = {k: z[k] for k in z.files}
    L, NH = args.layers, args.heads

    from gpt_fn import LAYER_SPEC as layer_spec, TOP_SPEC as top_spec

    expected = set(top_spec) | {"tokens", "labels"} | {
        f"layer.{i}.{k}" for i in range(L) for k in layer_spec
    }
    if set(arrays) != expected:
        missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
        sys.exit(f"npz does not fit gpt.tpl at L={L}: missing {missing[:5]}, extra {extra[:5]}")

    put = lambda x, spec: jax.device_put(jnp.asarray(x), shard(*spec))
    top = {k: put(arrays[k], s) for k, s in top_spec.items()}
    layers = [{k: put(arrays[f"layer.{i}.{k}"], s) for k, s in layer_spec.items()} for i in range(L)]
    tokens = put(arrays["tokens"], (None, None))
    labels = put(arrays["labels"], (None, None))

    from gpt_fn import embed, layer, logits_of, loss_scan, loss_unrolled

    def fwd_unrolled(top, layers, tokens, labels):
        return loss_unrolled(top, layers, tokens, labels, NH)

    def fwd_scan(top, stacked, tokens, labels):
        return loss_scan(top, stacked, tokens, labels, NH)

    if args.dump_logits:

        def fwd_logits(top, layers, tokens):
            h = embed(top, tokens)
            for p in layers:
                h = layer(h, p, NH)
            return logits_of(h, top)

        np.savez(args.dump_logits, logits=np.asarray(jax.jit(fwd_logits)(top, layers, tokens)))

    out = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": args.devices,
        "variants": {},
    }
    for variant in [v for v in args.variants.split(",") if v]:
        if variant == "unrolled":
            fn, lp = fwd_unrolled, layers
        elif variant == "scan":
            fn = fwd_scan
            lp = {
                k: jax.device_put(
                    jnp.stack([arrays[f"layer.{i}.{k}"] for i in range(L)]), shard(None, *s)
                )
                for k, s in layer_spec.items()
            }
        else:
            sys.exit(f"unknown variant {variant}")
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(top, lp, tokens, labels).compile()
        compile_s = time.perf_counter() - t0
        hlo = compiled.as_text()
        loss = compiled(top, lp, tokens, labels).block_until_ready()  # warm-up
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            loss = compiled(top, lp, tokens, labels).block_until_ready()
            times.append(time.perf_counter() - t0)
        out["variants"][variant] = {
            "compile_s": compile_s,
            "all_reduce_ops_in_hlo": hlo.count(" all-reduce(") + hlo.count(" all-reduce-start("),
            "loss": float(np.asarray(loss)),
            "median_ms": statistics.median(times) * 1e3,
            "min_ms": min(times) * 1e3,
            "reps": args.reps,
        }
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
