# One training step minimises one loss.
dim H = 8
input x : f32[H]
param w : f32[H]
a = mean(x * w, 0)
b = mean(w * w, 0)
output a, b
train a with sgd(lr=0.1)
train b with sgd(lr=0.1)
