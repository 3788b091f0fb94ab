# a rank-3 tensor with a 2-entry spec
mesh tp
input x : f32[2, 3, 4] @ [_, tp]
output x
