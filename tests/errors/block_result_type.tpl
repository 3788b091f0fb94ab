# the body returns f32[4, 8], the declaration says f32[4, 4]
dim H = 4
block up(x: f32[H, H]) -> f32[H, H] {
    param w : f32[H, 2 * H]
    return x @ w
}
input a : f32[H, H]
y = up(a)
output y
