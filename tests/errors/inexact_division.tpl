# 64 heads of width H / 3: not an integer
dim H = 64
dim D = H / 3
input x : f32[D]
output x
