# blocks cannot call themselves
dim H = 4
block f(x: f32[H]) -> f32[H] {
    return g(x)
}
block g(x: f32[H]) -> f32[H] {
    return f(x)
}
input a : f32[H]
y = f(a)
output y
