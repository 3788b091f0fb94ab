# a missing operand between two operators
dim H = 4
input x : f32[H]
y = x + * x
output y
