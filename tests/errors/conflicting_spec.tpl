# the output is annotated twice with different specs
mesh dp, tp
dim H = 4
input x : f32[H, H]
param w : f32[H, H]
y = x @ w @ [dp, _]
y = y @ [_, tp]
output y
