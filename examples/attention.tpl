# attention.tpl — multi-head causal self-attention, Megatron-style:
# wq/wk/wv column-parallel (heads split across tp), wo row-parallel.
mesh tp
dim B = 2, S = 16, H = 64, NH = 8
dim D = H / NH                           # head width

input x  : f32[B, S, H]
param wq : f32[H, H] @ [_, tp]
param bq : f32[H]    @ [tp]
param wk : f32[H, H] @ [_, tp]
param bk : f32[H]    @ [tp]
param wv : f32[H, H] @ [_, tp]
param bv : f32[H]    @ [tp]
param wo : f32[H, H] @ [tp, _]
param bo : f32[H]

# [B, S, H] -> [B, NH, S, D]: splitting H into heads carries the tp split onto NH
q = transpose(reshape(x @ wq + bq, [B, S, NH, D]), [0, 2, 1, 3])
k = transpose(reshape(x @ wk + bk, [B, S, NH, D]), [0, 2, 1, 3])
v = transpose(reshape(x @ wv + bv, [B, S, NH, D]), [0, 2, 1, 3])

scores = causal_mask(q @ transpose(k) * rsqrt(D))       # [B, NH, S, S]
ctx = softmax(scores, axis=-1) @ v                       # [B, NH, S, D]
merged = reshape(transpose(ctx, [0, 2, 1, 3]), [B, S, H])
y = merged @ wo + bo
output y
