# one axis cannot split two dims of the same tensor
mesh tp
dim H = 4
param w : f32[H, H] @ [tp, tp]
output w
