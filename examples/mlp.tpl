# mlp.tpl — Megatron MLP block
mesh tp                                  # mesh axes; sizes come from --degree / --mesh
dim B = 8, S = 128, H = 1024             # overridable: --set H=4096

input  x  : f32[B, S, H]
param  w1 : f32[H, 4*H] @ [_, tp]        # column-parallel (PartitionSpec style: one entry per dim)
param  b1 : f32[4*H]    @ [tp]
param  w2 : f32[4*H, H] @ [tp, _]        # row-parallel
param  b2 : f32[H]

y = gelu(x @ w1 + b1) @ w2 + b2
output y
