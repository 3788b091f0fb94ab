# The loss of a training step must be an f32 scalar.
dim B = 4, H = 8
input x : f32[B, H]
param w : f32[H, H]
y = x @ w
output y
train y with adamw(lr=1e-3)
