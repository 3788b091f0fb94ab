"""gpt.tpl as a JAX function, with tpc's kernel semantics (src/exec/kernels/): shared by the
forward benchmark (jax_gpt.py), the training-step benchmark (jax_train.py) and the gradient
oracle (jax_grad.py).

  h = wte[tokens] + wpe
  per layer (params layer.i.*):
    a = layernorm(h, ln1_g, ln1_b)                      # eps 1e-5, biased variance
    q, k, v = (a @ w + b) reshaped [B,S,NH,D], transposed [B,NH,S,D]
    p = softmax(causal_mask((q @ k^T) * 1/sqrt(D)))     # masked entries -inf, softmax on keys
    h = h + (reshape(transpose(p @ v)) @ wo + bo)
    m = layernorm(h, ln2_g, ln2_b)
    h = h + (gelu_tanh(m @ w1 + b1) @ w2 + b2)
  logits = layernorm(h, lnf_g, lnf_b) @ wte^T           # tied LM head
  loss = mean(logsumexp(logits) - logits[label])
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

LAYER_PARAMS = [
    "ln1_g", "ln1_b", "ln2_g", "ln2_b",
    "attention.wq", "attention.bq", "attention.wk", "attention.bk",
    "attention.wv", "attention.bv", "attention.wo", "attention.bo",
    "mlp.w1", "mlp.b1", "mlp.w2", "mlp.b2",
]
TOP_PARAMS = ["wte", "wpe", "lnf_g", "lnf_b"]

# gpt.tpl's Megatron sharding over one mesh axis "tp" (a PartitionSpec per param).
LAYER_SPEC = {
    "ln1_g": (None,), "ln1_b": (None,), "ln2_g": (None,), "ln2_b": (None,),
    "attention.wq": (None, "tp"), "attention.bq": ("tp",),
    "attention.wk": (None, "tp"), "attention.bk": ("tp",),
    "attention.wv": (None, "tp"), "attention.bv": ("tp",),
    "attention.wo": ("tp", None), "attention.bo": (None,),
    "mlp.w1": (None, "tp"), "mlp.b1": ("tp",),
    "mlp.w2": ("tp", None), "mlp.b2": (None,),
}
TOP_SPEC = {"wte": ("tp", None), "wpe": (None, None), "lnf_g": (None,), "lnf_b": (None,)}


def tp_mesh(devices):
    """A one-axis mesh "tp" over the first `devices` devices; exits when JAX sees fewer."""
    from jax.sharding import Mesh

    devs = jax.devices()
    if len(devs) < devices:
        sys.exit(
            f"need {devices} devices, JAX sees {len(devs)}: set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={devices}"
        )
    return Mesh(np.array(devs[:devices]), ("tp",))


def layernorm(x, g, b, eps=1e-5):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * g + b


def gelu(x):  # tanh approximation
    c = np.sqrt(2.0 / np.pi).astype(x.dtype)
    return 0.5 * x * (1.0 + jnp.tanh(c * (x + 0.044715 * x**3)))


def layer(h, p, heads):
    B, S, H = h.shape
    D = H // heads
    a = layernorm(h, p["ln1_g"], p["ln1_b"])

    def split_heads(w, b):
        return jnp.transpose(jnp.reshape(a @ w + b, (B, S, heads, D)), (0, 2, 1, 3))

    q = split_heads(p["attention.wq"], p["attention.bq"])
    k = split_heads(p["attention.wk"], p["attention.bk"])
    v = split_heads(p["attention.wv"], p["attention.bv"])
    s = (q @ jnp.swapaxes(k, -1, -2)) * np.asarray(1.0 / np.sqrt(D), dtype=h.dtype)
    causal = jnp.tril(jnp.ones((S, S), dtype=bool))
    s = jnp.where(causal, s, -jnp.inf)
    pr = jax.nn.softmax(s, axis=-1)
    ctx = jnp.reshape(jnp.transpose(pr @ v, (0, 2, 1, 3)), (B, S, H))
    h = h + (ctx @ p["attention.wo"] + p["attention.bo"])
    m = layernorm(h, p["ln2_g"], p["ln2_b"])
    return h + (gelu(m @ p["mlp.w1"] + p["mlp.b1"]) @ p["mlp.w2"] + p["mlp.b2"])


def logits_of(h, top):
    return layernorm(h, top["lnf_g"], top["lnf_b"]) @ top["wte"].T


def head(h, top, labels):
    logits = logits_of(h, top)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return jnp.mean(lse - tgt)


def embed(top, tokens):
    return top["wte"][tokens] + top["wpe"]


def loss_unrolled(top, layers, tokens, labels, heads):
    h = embed(top, tokens)
    for p in layers:
        h = layer(h, p, heads)
    return head(h, top, labels)


def loss_scan(top, stacked, tokens, labels, heads):
    h = embed(top, tokens)
    h, _ = jax.lax.scan(lambda h, p: (layer(h, p, heads), None), h, stacked)
    return head(h, top, labels)
