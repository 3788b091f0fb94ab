# adding an i32 tensor to an f32 tensor
input ids : i32[2, 3]
input x : f32[2, 3]
y = x + ids
output y
