# mlp_2d.tpl — the Megatron MLP on a 2-D mesh: data-parallel over dp, tensor-parallel over tp.
# Run with --mesh dp=2,tp=4: tp collectives stay inside each dp group.
mesh dp, tp
dim B = 8, S = 128, H = 1024

input  x  : f32[B, S, H]  @ [dp, _, _]   # the batch is split over dp
param  w1 : f32[H, 4*H]   @ [_, tp]
param  b1 : f32[4*H]      @ [tp]
param  w2 : f32[4*H, H]   @ [tp, _]
param  b2 : f32[H]

y = gelu(x @ w1 + b1) @ w2 + b2
output y @ [dp, _, _]
