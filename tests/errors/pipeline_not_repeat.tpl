# `@ pp` with a mesh axis splits a `repeat` into pipeline stages; `x` is no repeat
mesh dp, pp
dim B = 2, H = 8
input x : f32[B, H]
y = relu(x @ pp)
output y
