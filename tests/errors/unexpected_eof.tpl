# the file ends in the middle of an expression
dim H = 4
input x : f32[H]
y = gelu(x
