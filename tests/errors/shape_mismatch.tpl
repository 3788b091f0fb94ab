# matmul of [2, 3] by [4, 5]: the inner dims differ
input a : f32[2, 3]
input b : f32[4, 5]
y = a @ b
output y
