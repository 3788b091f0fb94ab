# the spec names an axis that `mesh` does not declare (a typo of `tp`)
mesh dp, tp
dim H = 4
param w : f32[H, H] @ [_, tpp]
output w
