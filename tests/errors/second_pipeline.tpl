# a program pipelines one stack of layers: a second `repeat(...) @ pp` is an error
mesh dp, pp
dim B = 2, H = 8, L = 2
block layer(x: f32[B, H]) -> f32[B, H] {
    param w : f32[H, H]
    return relu(x @ w)
}
input x : f32[B, H]
h = repeat(L, layer, x) @ pp
h = repeat(L, layer, h) @ pp
output h
