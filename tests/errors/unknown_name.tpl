# `hiden` is a typo of `hidden`
dim H = 4
input x : f32[H]
hidden = gelu(x)
y = hiden + x
output y
