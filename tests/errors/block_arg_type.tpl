# `mlp` takes f32[4], gets f32[8]
dim H = 4
block mlp(x: f32[H]) -> f32[H] {
    return gelu(x)
}
input a : f32[2 * H]
y = mlp(a)
output y
