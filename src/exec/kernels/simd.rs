//! Vectorization helpers: run-time ISA dispatch for auto-vectorized loops, a vectorizable
//! `exp`, and lane-parallel sums and maxima with a fixed order.
//!
//! The crate is compiled for baseline x86-64 (SSE2), so a loop only uses AVX2 or AVX-512 when it
//! is compiled inside a function with those target features. [`multiversion!`] wraps an
//! `#[inline(always)]` kernel into such functions and picks one by run-time detection; the
//! kernel (and the `#[inline(always)]` helpers and small closures it calls) is inlined there and
//! vectorized for that ISA.
//!
//! Results do not depend on the ISA picked: Rust never contracts `a * b + c` into an FMA, and the
//! lane-parallel reductions below fix their summation order explicitly, so every path computes
//! the same IEEE operations in the same order and the output is bitwise identical everywhere.

/// The instruction sets a multiversioned kernel is compiled for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    /// AVX-512 F/VL/DQ/BW with AVX2 and FMA (x86-64-v4).
    V4,
    /// AVX2 and FMA (x86-64-v3).
    V3,
    /// The compile-time baseline.
    Base,
}

/// The best level this CPU supports (the detection is cached by std).
#[inline]
pub(crate) fn level() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512vl") && has!("avx512dq") && has!("avx512bw") {
            return Level::V4;
        }
        if has!("avx2") && has!("fma") {
            return Level::V3;
        }
    }
    Level::Base
}

/// Defines `fn $name` that runs the `#[inline(always)]` function `$imp` with the same arguments,
/// compiled for the best ISA of the CPU: `multiversion! { fn name<T>(a: &[T]) -> R where {T: Copy} = imp; }`.
macro_rules! multiversion {
    (
        $(#[$m:meta])*
        $vis:vis fn $name:ident<$($g:ident),*>($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)?
        where {$($w:tt)*} = $imp:path;
    ) => {
        $(#[$m])*
        $vis fn $name<$($g),*>($($a: $t),*) $(-> $r)? where $($w)* {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(
                    enable = "avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,bmi1,bmi2,lzcnt,popcnt"
                )]
                unsafe fn v4<$($g),*>($($a: $t),*) $(-> $r)? where $($w)* {
                    $imp($($a),*)
                }
                #[target_feature(enable = "avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
                unsafe fn v3<$($g),*>($($a: $t),*) $(-> $r)? where $($w)* {
                    $imp($($a),*)
                }
                match $crate::exec::kernels::simd::level() {
                    // SAFETY: `level` detected the features `v4` is compiled for.
                    $crate::exec::kernels::simd::Level::V4 => return unsafe { v4($($a),*) },
                    // SAFETY: `level` detected the features `v3` is compiled for.
                    $crate::exec::kernels::simd::Level::V3 => return unsafe { v3($($a),*) },
                    $crate::exec::kernels::simd::Level::Base => {}
                }
            }
            $imp($($a),*)
        }
    };
}
pub(crate) use multiversion;

/// `e^x` in f32, vectorizable: Cody–Waite range reduction and the Cephes `expf` polynomial
/// (relative error below 2e-7 over the whole range). Overflows to +inf above ~88.72, underflows
/// gradually to 0 below ~-87.3 (0 below ~-103.9); NaN gives NaN, -inf gives 0, +inf gives +inf.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    exp_scaled(x, 0)
}

/// `e^x · 2^k` for `k` in `0..=64`, rounded once: [`exp`] with `k` added to the exponent, so
/// that a result which `exp` would underflow stays normal (`e^-100 · 2^64` is 3.4e-25).
#[inline(always)]
pub(crate) fn exp_scaled(x: f32, k: i32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2^23: adding it rounds to an integer (ties to even) held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    // Also maps ±inf into range; NaN stays NaN (every comparison with it is false). Below -150
    // even `e^x · 2^64` is 0.
    let x = x.clamp(-150.0, 89.0);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    // n (+ k) as an integer in [-217, 193], read from the mantissa (garbage for NaN, whose
    // result is NaN anyway through `p`).
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_2e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    p = p * (r * r) + r + 1.0;
    // 2^(n+k) as two normal factors 2^e1 · 2^e2 (each exponent in [-109, 97]), so that the
    // product overflows or underflows (gradually) exactly once.
    let ni = ni.wrapping_add(k);
    let e1 = ni >> 1;
    let e2 = ni.wrapping_sub(e1);
    let s1 = f32::from_bits((e1.wrapping_add(127) as u32) << 23);
    let s2 = f32::from_bits((e2.wrapping_add(127) as u32) << 23);
    p * s1 * s2
}

/// `x · sigmoid(z)`, without overflow or premature underflow: for `z < 0` it is
/// `x · e^z / (1 + e^z)` with `e^z` scaled by 2^64 until the last product, so that a result
/// that is a normal (or subnormal) float is not flushed to 0 when `e^-z` overflows.
#[inline(always)]
pub(crate) fn mul_sigmoid(x: f32, z: f32) -> f32 {
    /// 2^-64.
    const TWO_M64: f32 = 5.421_011e-20;
    let t = exp_scaled(-z.abs(), 64);
    let q = x / (1.0 + t * TWO_M64);
    if z < 0.0 {
        (q * t) * TWO_M64
    } else {
        q
    }
}

/// The accumulator lanes after their loop, through an optimization barrier (an identity).
/// Without it LLVM's SLP vectorizer shapes the accumulators after the horizontal combine that
/// follows and keeps them as 2-lane vectors; with it the loop runs on whole registers.
#[inline(always)]
fn lanes<T>(acc: T) -> T {
    std::hint::black_box(acc)
}

/// Number of lanes of the f64 accumulators: four AVX-512 registers, so that the adds of a row
/// are not serialized on one register's latency.
const L64: usize = 32;

/// Σ x in f64: 32 interleaved partial sums combined in a fixed tree, then the tail in order.
#[inline(always)]
pub(crate) fn sum_f64(x: &[f32]) -> f64 {
    let mut acc = [0.0f64; L64];
    // Fixed-size chunks: no per-element bounds checks, so the lanes vectorize as whole registers.
    let (chunks, tail) = x.as_chunks::<L64>();
    for c in chunks {
        for j in 0..L64 {
            acc[j] += c[j] as f64;
        }
    }
    let mut s = combine(lanes(acc));
    for &v in tail {
        s += v as f64;
    }
    s
}

/// Σ (x - mu)² in f64, with the order of [`sum_f64`].
#[inline(always)]
pub(crate) fn sum_sq_dev_f64(x: &[f32], mu: f64) -> f64 {
    let mut acc = [0.0f64; L64];
    // Fixed-size chunks: no per-element bounds checks, so the lanes vectorize as whole registers.
    let (chunks, tail) = x.as_chunks::<L64>();
    for c in chunks {
        for j in 0..L64 {
            let d = c[j] as f64 - mu;
            acc[j] += d * d;
        }
    }
    let mut s = combine(lanes(acc));
    for &v in tail {
        let d = v as f64 - mu;
        s += d * d;
    }
    s
}

/// The partial sums added in a fixed tree: halves added lane by lane down to 8, then pairwise.
#[inline(always)]
fn combine(a: [f64; L64]) -> f64 {
    let mut b = [0.0f64; 16];
    for j in 0..16 {
        b[j] = a[j] + a[j + 16];
    }
    let mut c = [0.0f64; 8];
    for j in 0..8 {
        c[j] = b[j] + b[j + 8];
    }
    ((c[0] + c[4]) + (c[2] + c[6])) + ((c[1] + c[5]) + (c[3] + c[7]))
}

/// Number of lanes of the f32 maximum.
const L32: usize = 16;

/// numpy `max` of a slice: NaN if any element is NaN, -inf when empty.
#[inline(always)]
pub(crate) fn max_f32(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; L32];
    let mut nan = [false; L32];
    // Fixed-size chunks: no per-element bounds checks, so the lanes vectorize as whole registers.
    let (chunks, tail) = x.as_chunks::<L32>();
    for c in chunks {
        for j in 0..L32 {
            let v = c[j];
            nan[j] |= v.is_nan();
            acc[j] = if v > acc[j] { v } else { acc[j] };
        }
    }
    let (acc, nan) = (lanes(acc), lanes(nan));
    let mut m = f32::NEG_INFINITY;
    let mut any_nan = false;
    for j in 0..L32 {
        any_nan |= nan[j];
        m = if acc[j] > m { acc[j] } else { m };
    }
    for &v in tail {
        any_nan |= v.is_nan();
        m = if v > m { v } else { m };
    }
    if any_nan {
        f32::NAN
    } else {
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0.0f64;
        let mut x = -103.0f32;
        while x < 88.7 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            if want > 1e-37 {
                worst = worst.max(((got - want) / want).abs());
            }
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-100.0) > 0.0 && exp(-100.0) < 1e-43);
    }

    #[test]
    fn lane_reductions() {
        let x: Vec<f32> = (0..37).map(|i| (i as f32 - 20.0) * 0.5).collect();
        assert_eq!(max_f32(&x), 8.0);
        assert_eq!(sum_f64(&x), x.iter().map(|&v| v as f64).sum::<f64>());
        let mut y = x.clone();
        y[33] = f32::NAN;
        assert!(max_f32(&y).is_nan());
        y[33] = 0.0;
        y[3] = f32::NAN;
        assert!(max_f32(&y).is_nan());
        assert_eq!(max_f32(&[]), f32::NEG_INFINITY);
        assert_eq!(max_f32(&[f32::NEG_INFINITY; 20]), f32::NEG_INFINITY);
    }
}
