# `mlp` takes one argument
dim H = 4
block mlp(x: f32[H]) -> f32[H] {
    return gelu(x)
}
input a : f32[H]
input b : f32[H]
y = mlp(a, b)
output y
