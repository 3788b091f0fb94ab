# only the top-level program may pipeline a repeat
mesh dp, pp
dim B = 2, H = 8, L = 2
block layer(x: f32[B, H]) -> f32[B, H] {
    param w : f32[H, H]
    return relu(x @ w)
}
block stack(x: f32[B, H]) -> f32[B, H] {
    h = repeat(L, layer, x) @ pp
    return h
}
input x : f32[B, H]
h = stack(x)
output h
