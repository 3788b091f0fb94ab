# a pipelined repeat needs at least one instance to cut into stages
mesh dp, pp
dim B = 2, H = 8
block layer(x: f32[B, H]) -> f32[B, H] {
    param w : f32[H, H]
    return relu(x @ w)
}
input x : f32[B, H]
h = repeat(0, layer, x) @ pp
output h
