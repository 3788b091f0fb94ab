# `pp` cuts the layers into pipeline stages, so no tensor can also be split over it
mesh dp, pp
dim B = 2, H = 8, L = 2
block layer(x: f32[B, H]) -> f32[B, H] {
    param w : f32[H, H]
    return relu(x @ w)
}
input x : f32[B, H]
param w : f32[H, H] @ [_, pp]
h = repeat(L, layer, x @ w) @ pp
output h
