#!/usr/bin/env python3
"""Writes tests/golden/extreme.npz, checked by tests/oracle_extreme.rs (numpy only).

Extreme inputs for the kernels: tails of the unary functions, softmax rows with -inf entries,
all-equal and huge rows, cross entropy with large logits, layernorm/rmsnorm of a large mean and
of huge magnitudes, reductions with inf/NaN, matmul with a large K.

Every result is computed in float64 from the float32 inputs and rounded once to float32 (the
correctly rounded result of the exact function of the stored inputs, not numpy's float32
arithmetic). Next to each result `R` the file holds `R.tol`, the largest error allowed per
element (u = 2^-24, the unit roundoff of f32; κ the condition number of the function):

    unary f(x)          (8 + 4·κ)·u·|f(x)|,   κ = |x·f'(x)/f(x)|: a few roundings of the
                        result plus a few ulps of backward error on x (e.g. gelu's inner u).
    softmax             (8 + 4·κ_i)·u·|p_i|,  κ_i = |d_i|(1-p_i) + Σ_{j≠i} |d_j|·p_j on the
                        shifted row d = x - max(x) (the kernel rounds d once per element).
    cross_entropy       (8 + |loss|)·u + 2^-50·max|x|: the f32 exponentials, the sum and log
                        in f64, one final rounding.
    layernorm           16·u·(|g_i·a_i| + |b_i|) + |g_i|·r·n·2^-52·mean|x|, with a_i the
                        normalized value, r = 1/√(var+eps): a few roundings of the output plus
                        an f64 accumulation of the mean; the catastrophic cancellation of an
                        f32 mean or of f32 squares does not fit.
    rmsnorm             16·u·|y_i|
    sum / mean          2·u·|s| + n·2^-52·Σ|x| (accumulated in f64, rounded once);
    max                 exact.
    matmul              K·u·(|A|·|B|)_ij + 2·u·|C_ij| (the classic γ_K bound of f32 dot
                        products).
Elementwise and softmax tolerances add 4·2^-149 (four subnormal steps) for results that
underflow. Non-finite results must match exactly (NaN matches NaN, ±inf its own sign).

Regenerate (from the repository root; bash benches/setup_peers.sh makes target/benchvenv):

    target/benchvenv/bin/python tests/golden/make_extreme.py

Fixed seed and fixed zip timestamps: the output is byte-identical across runs for a numpy version.
"""

import io
import os
import zipfile

import numpy as np

OUT = os.path.dirname(os.path.abspath(__file__))
rng = np.random.default_rng(20261130)
f32, f64 = np.float32, np.float64
U = 2.0**-24
INF = np.inf
# Four steps of f32's subnormal spacing (2^-149): the floor for results that underflow, which
# are rounded twice at most there (the exponential's gradual underflow, then a product or ratio).
SUBNORMAL = 4 * 2.0**-149
ARRAYS = {}


def put(name, value, tol=None):
    v = np.asarray(value)
    if v.dtype == np.float64:
        with np.errstate(over="ignore"):
            v = v.astype(f32)
    assert v.dtype in (np.float32, np.int32), (name, v.dtype)
    ARRAYS[name] = v
    if tol is not None:
        ARRAYS[name + ".tol"] = np.asarray(tol, dtype=f64).astype(f32)


def save():
    with zipfile.ZipFile(os.path.join(OUT, "extreme.npz"), "w", zipfile.ZIP_STORED) as z:
        for k, v in ARRAYS.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(v, order="C"), allow_pickle=False)
            z.writestr(zipfile.ZipInfo(k + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())


def elementwise_tol(f, df, x):
    """(8 + 4κ)·u·|f(x)| with κ = |x f'(x) / f(x)| (0 where f(x) is 0 or not finite)."""
    with np.errstate(all="ignore"):
        y, dy = f(x), df(x)
        kappa = np.where((y != 0) & np.isfinite(y) & np.isfinite(x), np.abs(x * dy / y), 0.0)
        kappa = np.nan_to_num(kappa, nan=0.0, posinf=0.0)
        y = np.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0)
        return (8 + 4 * kappa) * U * np.abs(y) + SUBNORMAL


C = np.sqrt(2.0 / np.pi)


def sigmoid(z):
    with np.errstate(over="ignore"):
        return np.where(z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z))))


def gelu(x):
    # 0.5·x·(1 + tanh(u)) = x·sigmoid(2u), written without the cancellation for x ≪ 0.
    with np.errstate(all="ignore"):
        return x * sigmoid(2 * C * (x + 0.044715 * x**3))


def dgelu(x):
    with np.errstate(all="ignore"):
        z = 2 * C * (x + 0.044715 * x**3)
        s = sigmoid(z)
        return s + x * s * (1 - s) * 2 * C * (1 + 3 * 0.044715 * x**2)


def silu(x):
    with np.errstate(all="ignore"):
        return x * sigmoid(x)


def dsilu(x):
    with np.errstate(all="ignore"):
        s = sigmoid(x)
        return s + x * s * (1 - s)


def unary():
    tails = [-1e30, -3e3, -120.0, -103.0, -95.0, -89.5, -88.8, -87.0, -50.0, -20.0, -10.5, -10.05,
             -10.0, -9.0, -5.5, -3.0, -0.5, -1e-3, -1e-30, -0.0, 0.0, 1e-38, 1e-30, 1e-3, 0.5, 3.0,
             5.5, 9.0, 10.0, 20.0, 50.0, 87.0, 88.5, 88.8, 89.5, 120.0, 3e3, 1e30, 3.4e38]
    x = np.array(tails, dtype=f32)
    xd = x.astype(f64)
    put("x", x)
    one = lambda v: np.ones_like(v)
    cases = {
        "gelu": (gelu, dgelu),
        "silu": (silu, dsilu),
        "tanh": (np.tanh, lambda v: 1 - np.tanh(v) ** 2),
        "exp": (np.exp, np.exp),
        "relu": (lambda v: np.maximum(v, 0.0), lambda v: (v > 0).astype(f64)),
        "neg": (lambda v: -v, lambda v: -one(v)),
    }
    for name, (f, df) in cases.items():
        with np.errstate(over="ignore"):
            put(name, f(xd), elementwise_tol(f, df, xd))
    # Infinities and NaN, where every library agrees on the limit.
    special = np.array([-INF, INF, np.nan], dtype=f32)
    put("xs", special)
    for name, f in [("exp", np.exp), ("tanh", np.tanh), ("relu", lambda v: np.maximum(v, 0.0)),
                    ("neg", lambda v: -v)]:
        put(name + "_s", f(special.astype(f64)))
    for name in ["gelu", "silu"]:
        put(name + "_s", np.array([np.nan], dtype=f32))  # only NaN: the ±inf limits are 0/inf
    xp = np.array([1.4e-45, 1e-40, 1.2e-38, 1e-30, 1e-10, 0.1, 1.0, 1.0 + 2**-23, 10.0, 1e10, 1e30,
                   3.4e38, 0.0, INF, -1.0, -0.0], dtype=f32)
    put("xp", xp)
    xpd = xp.astype(f64)
    with np.errstate(all="ignore"):
        pos = {
            "log": (np.log, lambda v: 1 / v),
            "sqrt": (np.sqrt, lambda v: 0.5 / np.sqrt(v)),
            "rsqrt": (lambda v: 1 / np.sqrt(v), lambda v: -0.5 * v**-1.5),
            "recip": (lambda v: 1 / v, lambda v: -1 / v**2),
        }
        for name, (f, df) in pos.items():
            put(name, f(xpd), elementwise_tol(f, df, xpd))


def softmax_rows(x):
    d = x - x.max(axis=-1, keepdims=True)
    e = np.exp(d)
    p = e / e.sum(axis=-1, keepdims=True)
    ad = np.where(np.isfinite(d), np.abs(d), 0.0)
    pz = np.nan_to_num(p)
    kappa = ad * (1 - pz) + (ad * pz).sum(axis=-1, keepdims=True) - ad * pz
    return p, (8 + 4 * kappa) * U * np.abs(pz) + SUBNORMAL


def softmax():
    short = np.array(
        [
            [100, 0, 0, 0],
            [1e4, 0, -1e4, 5],
            [1e30, 1e30, 1e30, 1e30],
            [-INF, -INF, -INF, -INF],  # a fully masked row: NaN, as numpy
            [-INF, 3, -INF, 3],
            [88, 89, 90, 200],
            [-1e30, -1e30, 0, -3.4e38],
            [7, 7, 7, 7],
            [-100, -200, -300, -104],
            [1.5, -INF, -INF, -INF],  # the first row of a causal mask
        ],
        dtype=f32,
    )
    long = np.empty((5, 40), dtype=f32)
    long[0] = 1e4 + rng.normal(0, 3, 40).astype(f32)
    long[1] = 5.0
    long[2] = rng.uniform(-4, 4, 40)
    long[2, 17:] = -INF  # a causal-mask row, the mask inside the vector lanes
    long[3] = -INF
    long[4] = rng.uniform(-1e3, 1e3, 40)
    long[4, 33] = 2e4  # the max in the tail
    with np.errstate(invalid="ignore", over="ignore"):
        for name, x in [("softmax_short", short), ("softmax_long", long)]:
            p, tol = softmax_rows(x.astype(f64))
            put(name + ".x", x)
            put(name, p, tol)


def cross_entropy():
    cases = [
        ([[1e4, 0, -1e4], [1e4, 0, -1e4]], [0, 1]),
        ([[88, 89, 90], [-1e30, 0, 1e30]], [0, 2]),
        ([[5, 5, 5], [-INF, 2, 3]], [1, 1]),  # a masked class that is not the label
        ([[1e30, 1e30, 1e30], [-3e4, -3e4 + 1, -3e4 + 2]], [2, 0]),
        ([[-INF, 2, 3], [1, 2, 3]], [0, 1]),  # the label's logit is -inf: the loss is inf
    ]
    for i, (logits, labels) in enumerate(cases):
        x = np.array(logits, dtype=f32)
        lab = np.array(labels, dtype=np.int32)
        xd = x.astype(f64)
        with np.errstate(invalid="ignore"):
            m = xd.max(axis=-1, keepdims=True)
            lse = (m + np.log(np.exp(xd - m).sum(axis=-1, keepdims=True)))[..., 0]
            loss = (lse - xd[np.arange(len(lab)), lab]).mean()
        finite = np.abs(xd[np.isfinite(xd)])
        tol = (8 + abs(loss) if np.isfinite(loss) else 0) * U + 2.0**-50 * finite.max()
        put(f"ce{i}.logits", x)
        put(f"ce{i}.labels", lab)
        put(f"ce{i}", np.asarray(loss), np.asarray(tol))


def norms():
    n = 1024
    x = np.empty((6, n), dtype=f32)
    x[0] = (1e4 + rng.normal(0, 1, n)).astype(f32)  # large mean, unit spread
    x[1] = 1e4  # all equal: exactly 0 (the variance is 0)
    x[2] = (1e7 + rng.integers(-2, 3, n)).astype(f32)  # mean ≫ spread, spread at the ulp
    x[3] = np.where(rng.random(n) < 0.5, -3e20, 1e20)  # squares overflow f32
    x[4] = rng.normal(0, 1e-20, n)  # squares underflow f32; eps dominates
    x[5] = rng.uniform(-2, 3, n)
    g = rng.uniform(0.5, 1.5, n).astype(f32)
    b = rng.uniform(-1, 1, n).astype(f32)
    eps = 1e-5
    xd, gd, bd = x.astype(f64), g.astype(f64), b.astype(f64)
    mu = xd.mean(axis=-1, keepdims=True)
    var = ((xd - mu) ** 2).mean(axis=-1, keepdims=True)
    r = 1 / np.sqrt(var + eps)
    a = (xd - mu) * r
    acc = r * n * 2.0**-52 * np.abs(xd).mean(axis=-1, keepdims=True)
    put("norm.x", x)
    put("norm.g", g)
    put("norm.b", b)
    put("layernorm", a * gd + bd, 16 * U * (np.abs(gd * a) + np.abs(bd)) + np.abs(gd) * acc)
    put("layernorm_nobias", a * gd, 16 * U * np.abs(gd * a) + np.abs(gd) * acc)
    ms = (xd * xd).mean(axis=-1, keepdims=True)
    y = xd / np.sqrt(ms + eps) * gd
    put("rmsnorm", y, 16 * U * np.abs(y))


def reductions():
    x = np.array(
        [
            [1e30, 1e30, -1e30, 1.0, 0, 0, 0, 0],
            [3e38, 3e38, 0, 0, 0, 0, 0, 0],  # the sum overflows f32 only at the end: inf
            [1.0, INF, 2.0, 0, 0, 0, 0, 0],
            [1.0, INF, -INF, 0, 0, 0, 0, 0],  # NaN
            [1.0, np.nan, 2.0, INF, 0, 0, 0, 0],
            [-INF, -INF, -INF, -INF, -INF, -INF, -INF, -INF],
            [1e8, 1.0, -1e8, 1.0, 1e8, 1.0, -1e8, 1.0],  # f32 summation would lose the ones
            [2.0**-149, 2.0**-149, 0, 0, 0, 0, 0, 0],
        ],
        dtype=f32,
    )
    wide = np.tile(x, (1, 5))  # 40 wide: through the vector lanes and their tail
    wide[6, :] = np.tile([1e8, 1.0, -1e8, 1.0], 10)
    for name, v in [("red", x), ("redw", wide)]:
        put(name + ".x", v)
        vd = v.astype(f64)
        n = v.shape[1]
        with np.errstate(invalid="ignore", over="ignore"):
            s = vd.sum(axis=1)
            absum = np.nan_to_num(np.abs(vd), posinf=0.0).sum(axis=1)
            put(name + ".sum", s, 2 * U * np.nan_to_num(np.abs(s), posinf=0.0) + n * 2.0**-52 * absum)
            mean = s / n
            put(name + ".mean", mean, 2 * U * np.nan_to_num(np.abs(mean), posinf=0.0) + 2.0**-52 * absum)
            put(name + ".max", vd.max(axis=1), np.zeros(v.shape[0]))
            # Along axis 0 too (the strided path).
            s0 = vd.sum(axis=0)
            absum0 = np.nan_to_num(np.abs(vd), posinf=0.0).sum(axis=0)
            put(name + ".sum0", s0, 2 * U * np.nan_to_num(np.abs(s0), posinf=0.0) + v.shape[0] * 2.0**-52 * absum0)
            put(name + ".max0", vd.max(axis=0), np.zeros(v.shape[1]))


def matmul():
    for i, (m, k, n) in enumerate([(3, 4096, 5), (2, 8192, 3)]):
        a = rng.uniform(-1, 1, (m, k)).astype(f32)
        b = rng.uniform(-1, 1, (k, n)).astype(f32)
        if i == 1:
            a[:, : k // 2] *= f32(1e4)  # large terms that cancel against each other
            b[: k // 2, :] *= f32(1e-4)
        ad, bd = a.astype(f64), b.astype(f64)
        c = ad @ bd
        bound = np.abs(ad) @ np.abs(bd)
        put(f"mm{i}.a", a)
        put(f"mm{i}.b", b)
        put(f"mm{i}", c, k * U * bound + 2 * U * np.abs(c))


def main():
    unary()
    softmax()
    cross_entropy()
    norms()
    reductions()
    matmul()
    save()
    size = os.path.getsize(os.path.join(OUT, "extreme.npz"))
    print(f"wrote {len(ARRAYS)} arrays to {OUT}/extreme.npz ({size} bytes)")


if __name__ == "__main__":
    main()
