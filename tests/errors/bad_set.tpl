# compiled with --set HH=3: the program has no dim HH
dim B = 2, H = 4
input x : f32[B, H]
output x
