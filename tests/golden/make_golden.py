#!/usr/bin/env python3
"""Writes the golden .npz files checked by tests/golden_kernels.rs (numpy only).

Each file holds the operands (float32 or int32, C order) and numpy's results for one family
of kernels; attributes (axes, perms, eps) are fixed here and repeated in the Rust test.

Regenerate (from the repository root):

    bash benches/setup_peers.sh && target/benchvenv/bin/python tests/golden/make_golden.py

The files are written uncompressed (the np.savez layout, fixed timestamps) and are committed;
the output is byte-identical across runs for a given numpy version (fixed seed).
"""

import io
import os
import zipfile

import numpy as np

OUT = os.path.dirname(os.path.abspath(__file__))
rng = np.random.default_rng(20260101)
f32 = np.float32


def uniform(shape, lo=-1.0, hi=1.0):
    return rng.uniform(lo, hi, size=shape).astype(f32)


def save(name, **arrays):
    for k, v in arrays.items():
        assert v.dtype in (np.float32, np.int32), (name, k, v.dtype)
    # Like np.savez (stored, one NAME.npy per array), but with a fixed timestamp so that the
    # bytes only change when the data does.
    with zipfile.ZipFile(os.path.join(OUT, name + ".npz"), "w", zipfile.ZIP_STORED) as z:
        for k, v in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(v, order="C"), allow_pickle=False)
            z.writestr(zipfile.ZipInfo(k + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())


def unary():
    # Computed in float64 and rounded once to float32: the correctly rounded result. (numpy's
    # float32 form of gelu, 0.5·x·(1 + tanh(u)), loses ~1e-4 relative for x < -3 to the
    # cancellation in 1 + tanh(u); the Rust kernel evaluates the same function without it.)
    x = uniform((5, 24), -5.0, 5.0)
    x[0, :4] = [0.0, -0.0, 1e-3, -1e-3]
    xp = uniform((5, 24), 0.01, 10.0)
    xd, xpd = x.astype(np.float64), xp.astype(np.float64)
    c = np.sqrt(2.0 / np.pi)
    gelu = 0.5 * xd * (1.0 + np.tanh(c * (xd + 0.044715 * xd**3)))
    results = dict(
        gelu=gelu,
        relu=np.maximum(xd, 0.0),
        silu=xd / (1.0 + np.exp(-xd)),
        tanh=np.tanh(xd),
        exp=np.exp(xd),
        neg=-xd,
        recip=1.0 / xd[:, 4:],
        log=np.log(xpd),
        sqrt=np.sqrt(xpd),
        rsqrt=1.0 / np.sqrt(xpd),
    )
    save("unary", x=x, xp=xp, **{k: v.astype(f32) for k, v in results.items()})


def binary():
    a = uniform((2, 1, 5))
    b = uniform((3, 1), 0.5, 2.0)
    x = uniform((3, 4))
    save(
        "binary",
        a=a,
        b=b,
        add=a + b,
        sub=a - b,
        mul=a * b,
        div=a / b,
        maximum=np.maximum(a, b),
        x=x,
        x_minus_1_5=x - f32(1.5),
        one_5_minus_x=f32(1.5) - x,
        two_over_x=f32(2.0) / x,
        x_times_0_125=x * f32(0.125),
    )


def softmax_np(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def softmax():
    x = uniform((3, 4, 6), -4.0, 4.0)
    x[0, 1, 2] = -np.inf
    x[2, 3, 0] = -np.inf
    x[1, 2, :] = -np.inf  # a whole row along axis 2: NaN there, as numpy
    with np.errstate(invalid="ignore"):
        outs = {f"axis{a}": softmax_np(x, a) for a in range(3)}
    save("softmax", x=x, **outs)


def norms():
    x = uniform((2, 3, 16), -2.0, 3.0)
    g = uniform((16,), 0.5, 1.5)
    b = uniform((16,))
    eps = f32(1e-5)
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    xhat = (x - mean) / np.sqrt(var + eps)
    ms = (x * x).mean(axis=-1, keepdims=True)
    save(
        "norms",
        x=x,
        g=g,
        b=b,
        layernorm_bias=xhat * g + b,
        layernorm=xhat * g,
        rmsnorm=x / np.sqrt(ms + eps) * g,
    )


def cross_entropy():
    logits = uniform((2, 3, 11), -3.0, 3.0)
    labels = rng.integers(0, 11, size=(2, 3)).astype(np.int32)
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[..., 0]
    picked = np.take_along_axis(x, labels[..., None].astype(np.int64), axis=-1)[..., 0]
    loss = np.asarray((lse - picked).mean(), dtype=f32)
    save("cross_entropy", logits=logits, labels=labels, loss=loss)


def causal(x):
    sq, sk = x.shape[-2:]
    i = np.arange(sq)[:, None]
    j = np.arange(sk)[None, :]
    return np.where(j > i + (sk - sq), f32(-np.inf), x).astype(f32)


def causal_mask():
    x1 = uniform((2, 3, 5))
    x2 = uniform((4, 4))
    x3 = uniform((1, 5, 3))
    save("causal_mask", x1=x1, x2=x2, x3=x3, out1=causal(x1), out2=causal(x2), out3=causal(x3))


MATMUL_CASES = [
    ((2, 1, 3, 4), (5, 4, 6)),
    ((4,), (2, 4, 3)),
    ((3, 4), (4,)),
    ((4,), (4,)),
    ((7, 16), (16, 9)),
    ((2, 3, 4), (4, 5)),
    ((1, 3, 4), (2, 4, 5)),
    ((2, 3, 8), (2, 1, 8, 3)),
]


def matmul():
    arrays = {}
    for i, (sa, sb) in enumerate(MATMUL_CASES):
        a, b = uniform(sa), uniform(sb)
        out = np.asarray(np.matmul(a.astype(np.float64), b.astype(np.float64)), dtype=f32)
        assert out.shape == np.matmul(a, b).shape
        arrays.update({f"a{i}": a, f"b{i}": b, f"out{i}": out})
    save("matmul", **arrays)


def embedding():
    table = uniform((10, 4))
    ids = rng.integers(0, 10, size=(2, 3)).astype(np.int32)
    ids[0, 0], ids[1, 2] = 0, 9
    save("embedding", ids=ids, table=table, out=table[ids])


def reduce():
    x = uniform((3, 4, 5), -2.0, 2.0)
    arrays = {"x": x}
    for name, fn in [("sum", np.sum), ("mean", np.mean), ("max", np.max)]:
        for axis in range(3):
            for keep in (0, 1):
                arrays[f"{name}_{axis}_{keep}"] = fn(x, axis=axis, keepdims=bool(keep)).astype(f32)
    save("reduce", **arrays)


def layout():
    x = uniform((2, 3, 4))
    ids = rng.integers(-5, 5, size=(2, 3, 4)).astype(np.int32)
    t = np.transpose(x, (2, 0, 1))
    s1, s2 = np.split(x, [1], axis=1)
    save(
        "layout",
        x=x,
        ids=ids,
        transpose_201=t,
        transpose_102=np.transpose(x, (1, 0, 2)),
        reshape_t_4_6=t.reshape(4, 6),
        split_1_a=s1,
        split_1_b=s2,
        concat_0=np.concatenate([x, x * f32(2.0)], axis=0),
        concat_2=np.concatenate([s2.transpose(0, 2, 1), x[:, :2, :].transpose(0, 2, 1)], axis=2),
        slice_2_1_3=x[:, :, 1:3],
        ids_transpose_210=np.transpose(ids, (2, 1, 0)),
        ids_reshape_6_4=ids.reshape(6, 4),
    )


def bf16_nearest_even(x):
    """Rounds float32 to bfloat16 by comparing distances to both neighbours (not via bit tricks)."""
    bits = x.view(np.uint32)
    lower_bits = bits & np.uint32(0xFFFF0000)
    upper_bits = lower_bits + np.uint32(0x10000)
    lower = lower_bits.view(f32).astype(np.float64)
    upper = upper_bits.view(f32).astype(np.float64)
    # Past the largest finite bf16 the next value is 2**128 in magnitude (IEEE rounds to inf).
    upper = np.where(np.isinf(upper), np.sign(lower) * 2.0**128, upper)
    xd = x.astype(np.float64)
    dl, du = np.abs(xd - lower), np.abs(upper - xd)
    lower_even = ((lower_bits >> np.uint32(16)) & np.uint32(1)) == 0
    pick_upper = (du < dl) | ((du == dl) & ~lower_even)
    return np.where(pick_upper, upper_bits, lower_bits).view(f32)


def cast():
    x = uniform((64,), -300.0, 300.0)
    one = np.float64(1.0)
    specials = np.array(
        [
            one + 2.0**-8,  # tie, to even (down)
            one + 3 * 2.0**-8,  # tie, to even (up)
            -(one + 2.0**-8),
            one + 2.0**-8 + 2.0**-20,  # just above a tie
            3.3895313892515355e38,  # largest bf16
            np.finfo(np.float32).max,  # rounds to inf in bf16
            1e-40,  # subnormal
            -2.5,
            0.0,
            65504.0,  # largest f16
            65519.0,  # still rounds to 65504 in f16
        ]
    ).astype(f32)
    x = np.concatenate([x, specials])
    with np.errstate(over="ignore"):
        f16 = x.astype(np.float16).astype(f32)
    small = x[np.abs(x) < 1e9]
    save("cast", x=x, bf16=bf16_nearest_even(x), f16=f16, small=small, i32=small.astype(np.int32))


def main():
    unary()
    binary()
    softmax()
    norms()
    cross_entropy()
    causal_mask()
    matmul()
    embedding()
    reduce()
    layout()
    cast()
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT) if f.endswith(".npz"))
    print(f"wrote golden files to {OUT} ({total} bytes)")


if __name__ == "__main__":
    main()
