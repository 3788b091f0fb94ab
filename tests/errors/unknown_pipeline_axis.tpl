# `repeat(...) @ pq`: `pq` is no tensor and no declared mesh axis (a typo of `pp`)
mesh dp, pp, tp
dim B = 2, H = 8, L = 2
block layer(x: f32[B, H]) -> f32[B, H] {
    param w : f32[H, H]
    return relu(x @ w)
}
input x : f32[B, H]
h = repeat(L, layer, x) @ pq
output h
