# f64 is not a dtype of the language
input x : f64[2, 3]
output x
