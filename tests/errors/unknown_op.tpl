# `gelo` is a typo of `gelu`
input x : f32[2, 3]
y = gelo(x)
output y
