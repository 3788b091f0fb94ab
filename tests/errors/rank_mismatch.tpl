# layernorm of a scalar
input x : f32[]
param g : f32[]
y = layernorm(x, g)
output y
