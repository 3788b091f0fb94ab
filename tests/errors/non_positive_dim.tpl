# a dim must be positive
dim H = 4, K = H - 4
input x : f32[K]
output x
