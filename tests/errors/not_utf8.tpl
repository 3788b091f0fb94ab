input x : f32[2]
y = x # café
output y
