#!/usr/bin/env python3
"""Writes tests/golden/vjp.npz: float64 gradients from JAX, the outside oracle that
tests/vjp_golden.rs checks tpc's reverse-mode derivative (src/autodiff/) against.

Regenerate (from the repository root; the venv has numpy and jax, CPU):

    bash benches/setup_peers.sh && target/benchvenv/bin/python tests/golden/make_vjp.py

For every case below: params and inputs are drawn with numpy from a seed fixed per case (the
CRC-32 of its name), rounded to float32 (ints are int32) and stored as such; JAX then computes,
in float64 (jax_enable_x64) from exactly those float32 values, the scalar loss and its gradient
with respect to every float param. The archive holds, per case,

    CASE/param/NAME   float32, a param (trained by tpc: it gets a gradient)
    CASE/input/NAME   float32 or int32, an input (a fixed random weight, token ids, labels)
    CASE/grad/NAME    float64, d loss / d param NAME, computed by jax.grad in float64
    CASE/loss         float64, the loss (a scalar)

The same function is written in .tpl in tests/vjp_golden.rs. Each loss depends nonlinearly on
every op's output: most cases end in `head(y, r) = sum(y * (r + y))` with `r` a random input of
y's shape, so the cotangent reaching the op (r + 2y) is neither constant nor symmetric and a
wrong factor, sign, transpose or missing term cannot cancel.

Cases (together every op of the language that has a VJP):

    matmul_2d, matmul_vec (1-D operands promoted), matmul_3d_2d (a weight broadcast over the
        batch, plus a bias), matmul_4d_4d (batched), matmul_4d_3d (batch dims broadcast)
    add, sub, mul, div, maximum: (a OP b[H]) OP c[B, 1] and b OP d (a [H] bias broadcast over
        [B, H] on either side, a [B, 1] column, same shapes; `max(b, d)` in maximum); no ties
    unary: gelu (tanh form), relu, silu, tanh, exp, log, neg (and prefix `-x`), sqrt, rsqrt,
        recip, one param each (relu: no zeros; log, sqrt, rsqrt, recip: positive operands)
    scalar: x * 0.5, 2.5 * x, scale(x, 0.25), x + 1.5, 1.5 + x, x - 0.25, 1.0 - x, x / 3.0,
        2.0 / x, one param each
    reduce_sum, reduce_mean, reduce_max: over axes 0, 1 and 2 with keepdims (max: no ties)
    softmax: along the last axis, axis 0 of a matrix, a middle axis of a 3-D tensor
    layernorm: with bias, without, with eps=0.1 on a small-variance input (biased variance, eps
        inside the square root, default eps 1e-5); rmsnorm: default eps 1e-6 and eps=0.05
    reshape, transpose (default: last two swapped; a permutation), split (equal parts with an
        unused piece; a list of sizes), concat (two axes), slice (three ranges)
    embedding: repeated ids (the scatter-add accumulates) and rows no id selects (zero)
    causal_mask: followed by softmax, square [.., 4, 4] and [3, 5] (-inf where j > i + Sk - Sq)
    cross_entropy: mean over [2, 3] positions of logsumexp - logit[label], plus the loss of a
        matmul's logits squared (so the incoming cotangent is not 1)
    cast: f32 -> bf16 -> f32 and f32 -> f16 -> f32 (round to nearest even). JAX's
        convert_element_type has the VJP of tpc's cast: the cotangent is converted back to the
        operand's dtype, so through bf16 it is rounded to bf16 (asserted below); the float64
        oracle therefore rounds the float64 cotangent to bf16 as tpc rounds its float32 one
    attention: a composite (embedding, layernorm, heads by reshape + transpose, causal softmax
        attention, rmsnorm, gelu MLP, residuals, tied LM head, cross-entropy)

The file is written uncompressed with fixed timestamps, so its bytes only change with the
data (well under 1 MB).
"""

import io
import os
import zipfile
import zlib

import numpy as np

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vjp.npz")
f32 = np.float32
GELU_C = np.sqrt(2.0 / np.pi)

CASES = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


class Gen:
    """Deterministic float32 / int32 draws for one case."""

    def __init__(self, name):
        self.rng = np.random.default_rng(zlib.crc32(name.encode()))

    def u(self, shape, lo=-1.0, hi=1.0):
        return self.rng.uniform(lo, hi, size=shape).astype(f32)

    def away(self, shape, lo=0.5, hi=1.5):
        """|x| in [lo, hi], random sign: safe divisors."""
        s = np.where(self.rng.uniform(size=shape) < 0.5, -1.0, 1.0)
        return (s * self.rng.uniform(lo, hi, size=shape)).astype(f32)

    def ids(self, values):
        return np.asarray(values, dtype=np.int32)


def head(y, r):
    return jnp.sum(y * (r + y))


# ---------------------------------------------------------------------------------------------
# matmul


@case
def matmul_2d(g):
    P = dict(a=g.u((3, 4)), w=g.u((4, 5)))
    I = dict(r=g.u((3, 5)))

    def loss(p, i):
        return head(p["a"] @ p["w"], i["r"])

    return P, I, loss


@case
def matmul_vec(g):
    P = dict(v=g.u((4,)), m=g.u((4, 3)), u=g.u((3,)))
    I = dict(r1=g.u((3,)), r2=g.u((4,)))

    def loss(p, i):
        return head(p["v"] @ p["m"], i["r1"]) + head(p["m"] @ p["u"], i["r2"])

    return P, I, loss


@case
def matmul_3d_2d(g):
    P = dict(a=g.u((2, 3, 4)), w=g.u((4, 5)), b=g.u((5,)))
    I = dict(r=g.u((2, 3, 5)))

    def loss(p, i):
        return head(p["a"] @ p["w"] + p["b"], i["r"])

    return P, I, loss


@case
def matmul_4d_4d(g):
    P = dict(q=g.u((2, 3, 4, 5)), k=g.u((2, 3, 5, 4)))
    I = dict(r=g.u((2, 3, 4, 4)))

    def loss(p, i):
        return head(p["q"] @ p["k"], i["r"])

    return P, I, loss


@case
def matmul_4d_3d(g):
    P = dict(q=g.u((2, 3, 4, 5)), k=g.u((3, 5, 2)))
    I = dict(r=g.u((2, 3, 4, 2)))

    def loss(p, i):
        return head(p["q"] @ p["k"], i["r"])

    return P, I, loss


# ---------------------------------------------------------------------------------------------
# elementwise binaries: y1 = (a OP b) OP c, y2 = b OP d; a, d [3, 4], b [4], c [3, 1]


def binary(g, op, divisor=False):
    draw = g.away if divisor else g.u
    P = dict(a=g.u((3, 4)), b=draw((4,)), c=draw((3, 1)), d=draw((3, 4)))
    I = dict(r1=g.u((3, 4)), r2=g.u((3, 4)))
    if op is jnp.maximum:
        a, b, c, d = (P[k].astype(np.float64) for k in "abcd")
        ab = np.maximum(a, b)
        assert np.all(a != b) and np.all(ab != c) and np.all(b != d), "ties"

    def loss(p, i):
        y1 = op(op(p["a"], p["b"]), p["c"])
        y2 = op(p["b"], p["d"])
        return head(y1, i["r1"]) + head(y2, i["r2"])

    return P, I, loss


@case
def add(g):
    return binary(g, jnp.add)


@case
def sub(g):
    return binary(g, jnp.subtract)


@case
def mul(g):
    return binary(g, jnp.multiply)


@case
def div(g):
    return binary(g, jnp.divide, divisor=True)


@case
def maximum(g):
    return binary(g, jnp.maximum)


# ---------------------------------------------------------------------------------------------
# unary functions, one param each (names x_FN)


def gelu(x):
    return 0.5 * x * (1.0 + jnp.tanh(GELU_C * (x + 0.044715 * x**3)))


UNARY = dict(
    gelu=(gelu, False),
    relu=(lambda x: jnp.maximum(x, 0.0), False),
    silu=(lambda x: x * jax.nn.sigmoid(x), False),
    tanh=(jnp.tanh, False),
    exp=(jnp.exp, False),
    neg=(jnp.negative, False),
    minus=(jnp.negative, False),  # prefix `-x`
    log=(jnp.log, True),
    sqrt=(jnp.sqrt, True),
    rsqrt=(lambda x: 1.0 / jnp.sqrt(x), True),
    recip=(lambda x: 1.0 / x, True),
)


@case
def unary(g):
    P, I = {}, {}
    for name, (_, positive) in UNARY.items():
        P[f"x_{name}"] = g.u((4, 6), 0.5, 3.0) if positive else g.u((4, 6), -3.0, 3.0)
        I[f"r_{name}"] = g.u((4, 6))
    assert np.all(P["x_relu"] != 0.0)

    def loss(p, i):
        return sum(head(f(p[f"x_{n}"]), i[f"r_{n}"]) for n, (f, _) in UNARY.items())

    return P, I, loss


# ---------------------------------------------------------------------------------------------
# scalar ops, one param each (names x_OP); the scalars are exact in float32

SCALAR = dict(
    mul=lambda x: x * 0.5,
    lmul=lambda x: 2.5 * x,
    scale=lambda x: x * 0.25,
    add=lambda x: x + 1.5,
    ladd=lambda x: 1.5 + x,
    sub=lambda x: x - 0.25,
    rsub=lambda x: 1.0 - x,
    div=lambda x: x / 3.0,
    rdiv=lambda x: 2.0 / x,
)


@case
def scalar(g):
    P, I = {}, {}
    for name in SCALAR:
        P[f"x_{name}"] = g.away((3, 4)) if name == "rdiv" else g.u((3, 4))
        I[f"r_{name}"] = g.u((3, 4))

    def loss(p, i):
        return sum(head(f(p[f"x_{n}"]), i[f"r_{n}"]) for n, f in SCALAR.items())

    return P, I, loss


# ---------------------------------------------------------------------------------------------
# reductions: y0 = R(a, 0), y1 = R(a, 1), y2 = R(a, 2, keepdims=true); a [3, 4, 5]


def reduction(g, fn):
    P = dict(a=g.u((3, 4, 5)))
    I = dict(r0=g.u((4, 5)), r1=g.u((3, 5)), r2=g.u((3, 4, 1)))
    if fn is jnp.max:
        a = P["a"]
        for ax in range(3):
            top2 = np.sort(a, axis=ax).take([-1, -2], axis=ax)
            assert np.all(top2.take(0, axis=ax) != top2.take(1, axis=ax)), "ties"

    def loss(p, i):
        a = p["a"]
        return (
            head(fn(a, axis=0), i["r0"])
            + head(fn(a, axis=1), i["r1"])
            + head(fn(a, axis=2, keepdims=True), i["r2"])
        )

    return P, I, loss


@case
def reduce_sum(g):
    return reduction(g, jnp.sum)


@case
def reduce_mean(g):
    return reduction(g, jnp.mean)


@case
def reduce_max(g):
    return reduction(g, jnp.max)


# ---------------------------------------------------------------------------------------------
# softmax and the norms


def softmax(x, axis=-1):
    # max-subtracted, as tpc (the same function in exact arithmetic)
    z = x - jnp.max(x, axis=axis, keepdims=True)
    e = jnp.exp(z)
    return e / jnp.sum(e, axis=axis, keepdims=True)


@case
def softmax_(g):
    P = dict(a=g.u((3, 5), -2.0, 2.0), b=g.u((2, 3, 4), -2.0, 2.0))
    I = dict(r1=g.u((3, 5)), r2=g.u((3, 5)), r3=g.u((2, 3, 4)))

    def loss(p, i):
        return (
            head(softmax(p["a"]), i["r1"])
            + head(softmax(p["a"], 0), i["r2"])
            + head(softmax(p["b"], 1), i["r3"])
        )

    return P, I, loss


def layernorm(x, g, b=None, eps=1e-5):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mu) ** 2, axis=-1, keepdims=True)  # biased
    y = (x - mu) / jnp.sqrt(var + eps) * g
    return y if b is None else y + b


def rmsnorm(x, g, eps=1e-6):
    return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * g


@case
def layernorm_(g):
    P = dict(
        x=g.u((2, 3, 8), -1.5, 2.5),
        g=g.u((8,), 0.5, 1.5),
        b=g.u((8,)),
        x2=g.u((2, 3, 8), -1.5, 2.5),
        g2=g.u((8,), 0.5, 1.5),
        x3=g.u((3, 8), -0.3, 0.3),
        g3=g.u((8,), 0.5, 1.5),
        b3=g.u((8,)),
    )
    I = dict(r1=g.u((2, 3, 8)), r2=g.u((2, 3, 8)), r3=g.u((3, 8)))

    def loss(p, i):
        return (
            head(layernorm(p["x"], p["g"], p["b"]), i["r1"])
            + head(layernorm(p["x2"], p["g2"]), i["r2"])
            + head(layernorm(p["x3"], p["g3"], p["b3"], eps=0.1), i["r3"])
        )

    return P, I, loss


@case
def rmsnorm_(g):
    P = dict(
        x=g.u((2, 3, 8), -1.5, 2.5),
        g=g.u((8,), 0.5, 1.5),
        x2=g.u((3, 8), -0.3, 0.3),
        g2=g.u((8,), 0.5, 1.5),
    )
    I = dict(r1=g.u((2, 3, 8)), r2=g.u((3, 8)))

    def loss(p, i):
        return head(rmsnorm(p["x"], p["g"]), i["r1"]) + head(
            rmsnorm(p["x2"], p["g2"], eps=0.05), i["r2"]
        )

    return P, I, loss


# ---------------------------------------------------------------------------------------------
# layout


@case
def reshape(g):
    P = dict(a=g.u((2, 3, 4)))
    I = dict(r1=g.u((6, 4)), r2=g.u((4, 6)), r3=g.u((24,)))

    def loss(p, i):
        a = p["a"]
        return (
            head(a.reshape(6, 4), i["r1"])
            + head(a.reshape(4, 6), i["r2"])
            + head(a.reshape(24), i["r3"])
        )

    return P, I, loss


@case
def transpose(g):
    P = dict(a=g.u((2, 3, 4)), m=g.u((3, 5)))
    I = dict(r1=g.u((2, 4, 3)), r2=g.u((4, 2, 3)), r3=g.u((5, 3)))

    def loss(p, i):
        a = p["a"]
        return (
            head(jnp.swapaxes(a, 1, 2), i["r1"])
            + head(jnp.transpose(a, (2, 0, 1)), i["r2"])
            + head(p["m"].T, i["r3"])
        )

    return P, I, loss


@case
def split(g):
    P = dict(a=g.u((2, 6)), b=g.u((4, 3)))
    I = dict(r1=g.u((2, 2)), r3=g.u((2, 2)), ru=g.u((1, 3)), rv=g.u((3, 3)))

    def loss(p, i):
        x, _, z = jnp.split(p["a"], 3, axis=1)  # the middle piece is unused
        u, v = p["b"][:1], p["b"][1:]
        return head(x, i["r1"]) + head(z, i["r3"]) + head(u, i["ru"]) + head(v, i["rv"])

    return P, I, loss


@case
def concat(g):
    P = dict(a=g.u((2, 3)), b=g.u((2, 2)), c=g.u((1, 3)))
    I = dict(r1=g.u((2, 5)), r2=g.u((3, 3)))

    def loss(p, i):
        y1 = jnp.concatenate([p["a"], p["b"]], axis=1)
        y2 = jnp.concatenate([p["a"], p["c"]], axis=0)
        return head(y1, i["r1"]) + head(y2, i["r2"])

    return P, I, loss


@case
def slice_(g):
    P = dict(a=g.u((4, 5)))
    I = dict(r1=g.u((4, 3)), r2=g.u((2, 5)), r3=g.u((2, 5)))

    def loss(p, i):
        a = p["a"]
        return head(a[:, 1:4], i["r1"]) + head(a[0:2], i["r2"]) + head(a[2:4], i["r3"])

    return P, I, loss


# ---------------------------------------------------------------------------------------------
# lookup, masking, loss, casts


@case
def embedding(g):
    P = dict(wte=g.u((7, 4)))
    # rows 1, 3, 6 repeat (the scatter-add accumulates); rows 4 and 5 are never selected
    I = dict(ids=g.ids([[1, 3, 1, 6, 3], [0, 1, 6, 6, 2]]), r=g.u((2, 5, 4)))

    def loss(p, i):
        return head(p["wte"][i["ids"]], i["r"])

    return P, I, loss


def causal_mask(x):
    sq, sk = x.shape[-2:]
    i = np.arange(sq)[:, None]
    j = np.arange(sk)[None, :]
    return jnp.where(j > i + (sk - sq), -jnp.inf, x)


@case
def causal_mask_(g):
    P = dict(a=g.u((2, 4, 4), -2.0, 2.0), b=g.u((3, 5), -2.0, 2.0))
    I = dict(r1=g.u((2, 4, 4)), r2=g.u((3, 5)))

    def loss(p, i):
        return head(softmax(causal_mask(p["a"])), i["r1"]) + head(
            softmax(causal_mask(p["b"])), i["r2"]
        )

    return P, I, loss


def cross_entropy(logits, labels):
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return jnp.mean(lse - picked)


@case
def cross_entropy_(g):
    P = dict(z=g.u((2, 3, 7), -3.0, 3.0), x=g.u((4, 5)), w=g.u((5, 7), -2.0, 2.0))
    I = dict(
        labels=g.ids(g.rng.integers(0, 7, size=(2, 3))),
        labels2=g.ids(g.rng.integers(0, 7, size=(4,))),
    )

    def loss(p, i):
        c2 = cross_entropy(p["x"] @ p["w"], i["labels2"])
        return cross_entropy(p["z"], i["labels"]) + c2 * c2

    return P, I, loss


@case
def cast(g):
    P = dict(a=g.u((3, 8), -2.0, 2.0), b=g.u((3, 8), -2.0, 2.0))
    I = dict(r1=g.u((3, 8)), r2=g.u((3, 8)))

    def loss(p, i):
        y1 = p["a"].astype(jnp.bfloat16).astype(jnp.float64)
        y2 = p["b"].astype(jnp.float16).astype(jnp.float64)
        return head(y1, i["r1"]) + head(y2, i["r2"])

    def check(p, i, grads):
        # The cotangent r + 2y is rounded to the narrow type on its way back (see the header).
        for k, narrow, r in (("a", jnp.bfloat16, "r1"), ("b", jnp.float16, "r2")):
            y = np.asarray(jnp.asarray(p[k]).astype(narrow).astype(np.float64))
            ct = i[r].astype(np.float64) + 2.0 * y
            want = np.asarray(jnp.asarray(ct).astype(narrow).astype(np.float64))
            assert np.array_equal(grads[k], want), k
            assert not np.array_equal(grads[k], ct), k  # the rounding is visible

    return P, I, loss, check


@case
def attention(g):
    B, S, H, NH, V = 2, 4, 8, 2, 11
    D = H // NH
    P = dict(
        wte=g.u((V, H)),
        ln_g=g.u((H,), 0.5, 1.5),
        ln_b=g.u((H,), -0.2, 0.2),
        wq=g.u((H, H)),
        wk=g.u((H, H)),
        wv=g.u((H, H)),
        rms_g=g.u((H,), 0.5, 1.5),
        w1=g.u((H, 2 * H)),
        b1=g.u((2 * H,), -0.2, 0.2),
        w2=g.u((2 * H, H)),
    )
    I = dict(
        tokens=g.ids(g.rng.integers(0, V, size=(B, S))),
        labels=g.ids(g.rng.integers(0, V, size=(B, S))),
    )

    def heads_of(t):
        return jnp.transpose(t.reshape(B, S, NH, D), (0, 2, 1, 3))

    def loss(p, i):
        h = p["wte"][i["tokens"]]
        n = layernorm(h, p["ln_g"], p["ln_b"])
        q, k, v = (heads_of(n @ p[w]) for w in ("wq", "wk", "wv"))
        att = softmax(causal_mask(q @ jnp.swapaxes(k, -1, -2) * 0.5))
        o = jnp.transpose(att @ v, (0, 2, 1, 3)).reshape(B, S, H)
        h2 = h + o
        m = gelu(rmsnorm(h2, p["rms_g"]) @ p["w1"] + p["b1"]) @ p["w2"]
        logits = (h2 + m) @ p["wte"].T
        return cross_entropy(logits, i["labels"])

    return P, I, loss


# ---------------------------------------------------------------------------------------------


def main():
    arrays = {}
    for name, make in CASES.items():
        key = name.rstrip("_")  # a trailing _ only avoids clashing with a helper's name
        P, I, loss, *check = make(Gen(key))
        for k, v in {**P, **I}.items():
            assert v.dtype in (np.float32, np.int32), (key, k, v.dtype)
        p64 = {k: jnp.asarray(v, dtype=jnp.float64) for k, v in P.items()}
        i64 = {
            k: jnp.asarray(v, dtype=jnp.float64 if v.dtype == np.float32 else jnp.int32)
            for k, v in I.items()
        }
        value, grads = jax.value_and_grad(loss)(p64, i64)
        grads = {k: np.asarray(v, dtype=np.float64) for k, v in grads.items()}
        for k, gk in grads.items():
            assert gk.dtype == np.float64 and gk.shape == P[k].shape, (key, k)
            assert np.all(np.isfinite(gk)) and np.any(gk != 0.0), (key, k)
        if check:
            check[0](P, I, grads)
        for k, v in P.items():
            arrays[f"{key}/param/{k}"] = v
        for k, v in I.items():
            arrays[f"{key}/input/{k}"] = v
        for k, v in grads.items():
            arrays[f"{key}/grad/{k}"] = v
        arrays[f"{key}/loss"] = np.asarray(value, dtype=np.float64)
        print(f"{key}: loss {float(value):.6g}, params {', '.join(P)}")
    # Like np.savez (stored, one NAME.npy per array), with a fixed timestamp.
    with zipfile.ZipFile(OUT, "w", zipfile.ZIP_STORED) as z:
        for k, v in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(v, order="C"), allow_pickle=False)
            info = zipfile.ZipInfo(k + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            z.writestr(info, buf.getvalue())
    print(f"wrote {OUT}: {len(CASES)} cases, {os.path.getsize(OUT)} bytes")


if __name__ == "__main__":
    main()
