# a param cannot be declared twice
dim H = 4
param w : f32[H, H]
input x : f32[H]
param w : f32[H, H]
y = x @ w
output y
