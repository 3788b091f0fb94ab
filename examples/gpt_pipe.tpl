# gpt_pipe.tpl — gpt_train.tpl on a 3-D mesh: data-parallel over dp, tensor-parallel over tp,
# and its layers cut into pipeline stages over pp (`repeat(...) @ pp`): each pp coordinate runs
# a contiguous run of layers on its microbatches by the 1F1B schedule, sending to its neighbours.
# `tpc run examples/gpt_pipe.tpl --mesh dp=2,pp=2,tp=2 --steps 2 --check`
mesh dp, pp, tp
dim B = 4, S = 16, H = 64, NH = 8, L = 4, V = 256
dim D = H / NH

block attention(x: f32[B, S, H]) -> f32[B, S, H] {
    param wq : f32[H, H] @ [_, tp]
    param bq : f32[H]    @ [tp]
    param wk : f32[H, H] @ [_, tp]
    param bk : f32[H]    @ [tp]
    param wv : f32[H, H] @ [_, tp]
    param bv : f32[H]    @ [tp]
    param wo : f32[H, H] @ [tp, _]
    param bo : f32[H]
    q = transpose(reshape(x @ wq + bq, [B, S, NH, D]), [0, 2, 1, 3])
    k = transpose(reshape(x @ wk + bk, [B, S, NH, D]), [0, 2, 1, 3])
    v = transpose(reshape(x @ wv + bv, [B, S, NH, D]), [0, 2, 1, 3])
    p = softmax(causal_mask(q @ transpose(k) * rsqrt(D)))
    ctx = reshape(transpose(p @ v, [0, 2, 1, 3]), [B, S, H])
    return ctx @ wo + bo
}

block mlp(x: f32[B, S, H]) -> f32[B, S, H] {
    param w1 : f32[H, 4*H] @ [_, tp]
    param b1 : f32[4*H]    @ [tp]
    param w2 : f32[4*H, H] @ [tp, _]
    param b2 : f32[H]
    return gelu(x @ w1 + b1) @ w2 + b2
}

block layer(x: f32[B, S, H]) -> f32[B, S, H] {
    param ln1_g : f32[H]
    param ln1_b : f32[H]
    param ln2_g : f32[H]
    param ln2_b : f32[H]
    h = x + attention(layernorm(x, ln1_g, ln1_b))
    return h + mlp(layernorm(h, ln2_g, ln2_b))
}

input tokens : i32[B, S] @ [dp, _]     # the batch is split over dp
param wte : f32[V, H] @ [tp, _]          # token table, vocab-parallel
param wpe : f32[S, H]                    # position table
param lnf_g : f32[H]
param lnf_b : f32[H]

h = embedding(tokens, wte) + wpe
h = repeat(L, layer, h) @ pp             # layer.0 ... layer.{L-1}, cut into stages over pp
logits = layernorm(h, lnf_g, lnf_b) @ transpose(wte)    # tied LM head: [B, S, V]
labels = (V - 1) - tokens                # the task: V - 1 - token
loss = cross_entropy(logits, labels)
train loss with adamw(lr=0.003, weight_decay=0.0)
