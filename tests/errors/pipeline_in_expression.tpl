# only a `repeat` call itself can be pipelined, not an expression around it
mesh dp, pp
dim B = 2, H = 8, L = 2
block layer(x: f32[B, H]) -> f32[B, H] {
    param w : f32[H, H]
    return relu(x @ w)
}
input x : f32[B, H]
h = (repeat(L, layer, x) + 1) @ pp
output h
