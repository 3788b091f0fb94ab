//! Elementwise kernels: binary ops with numpy broadcasting, scalar ops, unary functions, casts.
//!
//! i32 semantics (the IR keeps i32 results where numpy would promote): add, sub, mul wrap; div
//! is numpy floor division `//` (a zero divisor gives 0, as numpy does); a scalar that is not
//! an integer in i32 range is applied in f64 and the result truncated toward zero.

use super::pool::take_f32;
use super::simd::{exp, multiversion};
use super::{broadcast_shape, from_vec};
use crate::exec::{ExecError, Tensor};
use crate::ir::{BinaryOp, Dtype, UnaryOp};
use ndarray::{ArrayD, IxDyn, Zip};

/// numpy `maximum`: NaN in either operand gives NaN.
#[inline(always)]
fn nan_max(x: f32, y: f32) -> f32 {
    if x.is_nan() || y.is_nan() {
        f32::NAN
    } else {
        x.max(y)
    }
}

/// Calls `$body` with `$f` bound to the f32 function of the binary op `$op` (a closure, so that
/// each op gets its own inlined, vectorized loop).
macro_rules! with_f32_fn {
    ($op:expr, |$f:ident| $body:expr) => {
        match $op {
            BinaryOp::Add => {
                let $f = |x: f32, y: f32| x + y;
                $body
            }
            BinaryOp::Sub => {
                let $f = |x: f32, y: f32| x - y;
                $body
            }
            BinaryOp::Mul => {
                let $f = |x: f32, y: f32| x * y;
                $body
            }
            BinaryOp::Div => {
                let $f = |x: f32, y: f32| x / y;
                $body
            }
            BinaryOp::Max => {
                let $f = nan_max;
                $body
            }
        }
    };
}

/// numpy `floor_divide` on int32: rounds toward -inf; division by zero gives 0.
fn floor_div(x: i32, y: i32) -> i32 {
    if y == 0 {
        return 0;
    }
    let q = x.wrapping_div(y);
    if x.wrapping_rem(y) != 0 && ((x < 0) != (y < 0)) {
        q - 1
    } else {
        q
    }
}

/// The i32 function of a binary op.
fn i32_fn(op: BinaryOp) -> fn(i32, i32) -> i32 {
    match op {
        BinaryOp::Add => i32::wrapping_add,
        BinaryOp::Sub => i32::wrapping_sub,
        BinaryOp::Mul => i32::wrapping_mul,
        BinaryOp::Div => floor_div,
        BinaryOp::Max => std::cmp::max,
    }
}

/// How the operands of a broadcast binary op line up with the contiguous output of `n` elements.
enum Pattern {
    /// Both operands have the output's shape.
    Same,
    /// The rhs is one element.
    ScalarRhs,
    /// The lhs is one element.
    ScalarLhs,
    /// The rhs (its `len` elements) repeats for every block of `len` lhs elements: a trailing
    /// bias `[N]` over `[.., N]`.
    RepeatRhs,
    /// The lhs repeats over the rhs.
    RepeatLhs,
    /// Each rhs element applies to a block of `n / rhs.len()` consecutive lhs elements: a
    /// `[.., 1]` operand over `[.., N]`.
    StretchRhs,
    /// Each lhs element applies to a block of the rhs.
    StretchLhs,
    /// Anything else: ndarray's general broadcast.
    General,
}

/// `small`, padded with leading 1s to the rank of `full`, as `(leading, trailing)`: true when it
/// equals `[1, .., 1, full[j..]]` (a suffix) resp. `[full[..j], 1, .., 1]` (a prefix).
fn suffix_prefix(small: &[usize], full: &[usize]) -> (bool, bool) {
    let pad = full.len() - small.len();
    let dim = |i: usize| if i < pad { 1 } else { small[i - pad] };
    let n = full.len();
    // Suffix: some j with dims [0, j) all 1 and dims [j, n) equal to full.
    let first_eq = (0..=n)
        .rev()
        .take_while(|&j| j == n || dim(j) == full[j])
        .last()
        .unwrap_or(n);
    let suffix = (0..first_eq).all(|i| dim(i) == 1);
    let last_eq = (0..=n)
        .take_while(|&j| j == 0 || dim(j - 1) == full[j - 1])
        .last()
        .unwrap_or(0);
    let prefix = (last_eq..n).all(|i| dim(i) == 1);
    (suffix, prefix)
}

/// The fast pattern for contiguous operands `a`, `b` of output shape `out`.
fn pattern(a: &[usize], b: &[usize], out: &[usize]) -> Pattern {
    let (na, nb) = (a.iter().product::<usize>(), b.iter().product::<usize>());
    if a == out && b == out {
        return Pattern::Same;
    }
    if a == out {
        if nb == 1 {
            return Pattern::ScalarRhs;
        }
        let (suffix, prefix) = suffix_prefix(b, out);
        if suffix {
            return Pattern::RepeatRhs;
        }
        if prefix {
            return Pattern::StretchRhs;
        }
    }
    if b == out {
        if na == 1 {
            return Pattern::ScalarLhs;
        }
        let (suffix, prefix) = suffix_prefix(a, out);
        if suffix {
            return Pattern::RepeatLhs;
        }
        if prefix {
            return Pattern::StretchLhs;
        }
    }
    Pattern::General
}

/// Applies `f` elementwise to `a` and `b` broadcast together.
#[inline(always)]
fn zip_broadcast<T: Copy + Buf, F: Fn(T, T) -> T + Copy>(
    op: BinaryOp,
    a: &ArrayD<T>,
    b: &ArrayD<T>,
    f: F,
) -> Result<ArrayD<T>, ExecError> {
    let err = || {
        let detail = format!(
            "shapes {:?} and {:?} do not broadcast",
            a.shape(),
            b.shape()
        );
        ExecError::shape(op.name(), detail)
    };
    let shape = broadcast_shape(a.shape(), b.shape()).ok_or_else(err)?;
    let n: usize = shape.iter().product();
    if let (Some(sa), Some(sb)) = (a.as_slice(), b.as_slice()) {
        let pat = pattern(a.shape(), b.shape(), &shape);
        if !matches!(pat, Pattern::General) && n > 0 {
            let mut out = new_buf(n);
            fill(&mut out, pat, sa, sb, f);
            return from_vec(op.name(), shape, out);
        }
    }
    let shape = IxDyn(&shape);
    let av = a.broadcast(shape.clone()).ok_or_else(err)?;
    let bv = b.broadcast(shape).ok_or_else(err)?;
    Ok(Zip::from(&av).and(&bv).map_collect(|&x, &y| f(x, y)))
}

multiversion! {
    /// [`fill_pattern`], vectorized.
    fn fill<T, F>(out: &mut [T], pat: Pattern, a: &[T], b: &[T], f: F)
    where {T: Copy, F: Fn(T, T) -> T + Copy} = fill_pattern;
}

/// `out[i] = f(a[i], b[i])`, as an index loop (no iterator adaptor left un-inlined).
#[inline(always)]
fn zip2<T: Copy, F: Fn(T, T) -> T + Copy>(out: &mut [T], a: &[T], b: &[T], f: F) {
    let n = out.len();
    let (a, b) = (&a[..n], &b[..n]);
    for i in 0..n {
        out[i] = f(a[i], b[i]);
    }
}

/// `out[i] = f(a[i])`, as an index loop.
#[inline(always)]
fn map1<T: Copy, U: Copy, F: Fn(T) -> U + Copy>(out: &mut [U], a: &[T], f: F) {
    let n = out.len();
    let a = &a[..n];
    for i in 0..n {
        out[i] = f(a[i]);
    }
}

/// Writes `f(a, b)` for every output element of pattern `pat` into `out`.
#[inline(always)]
fn fill_pattern<T: Copy, F: Fn(T, T) -> T + Copy>(
    out: &mut [T],
    pat: Pattern,
    a: &[T],
    b: &[T],
    f: F,
) {
    match pat {
        Pattern::Same => zip2(out, a, b, f),
        Pattern::ScalarRhs => {
            let y = b[0];
            map1(out, a, |x| f(x, y));
        }
        Pattern::ScalarLhs => {
            let x = a[0];
            map1(out, b, |y| f(x, y));
        }
        Pattern::RepeatRhs => {
            for (o, row) in out.chunks_exact_mut(b.len()).zip(a.chunks_exact(b.len())) {
                zip2(o, row, b, f);
            }
        }
        Pattern::RepeatLhs => {
            for (o, row) in out.chunks_exact_mut(a.len()).zip(b.chunks_exact(a.len())) {
                zip2(o, a, row, f);
            }
        }
        Pattern::StretchRhs => {
            let n = a.len() / b.len();
            for ((o, block), &y) in out.chunks_exact_mut(n).zip(a.chunks_exact(n)).zip(b) {
                map1(o, block, |x| f(x, y));
            }
        }
        Pattern::StretchLhs => {
            let n = b.len() / a.len();
            for ((o, block), &x) in out.chunks_exact_mut(n).zip(b.chunks_exact(n)).zip(a) {
                map1(o, block, |y| f(x, y));
            }
        }
        Pattern::General => unreachable!("handled by the caller"),
    }
}

/// `a op b` on f32 with numpy broadcasting (`maximum` propagates NaN).
pub fn binary_f32(
    op: BinaryOp,
    a: &ArrayD<f32>,
    b: &ArrayD<f32>,
) -> Result<ArrayD<f32>, ExecError> {
    with_f32_fn!(op, |f| zip_broadcast(op, a, b, f))
}

/// `a op b` on i32 with numpy broadcasting (wrapping; div is floor division).
pub fn binary_i32(
    op: BinaryOp,
    a: &ArrayD<i32>,
    b: &ArrayD<i32>,
) -> Result<ArrayD<i32>, ExecError> {
    zip_broadcast(op, a, b, i32_fn(op))
}

/// `f(x)` for every element, in row-major order, into a pooled buffer.
#[inline(always)]
fn map_f32(x: &ArrayD<f32>, f: impl Fn(f32) -> f32 + Copy) -> ArrayD<f32> {
    let Some(s) = x.as_slice() else {
        return x.mapv(f);
    };
    let mut out = take_f32(s.len());
    map_into(&mut out, s, f);
    ArrayD::from_shape_vec(x.raw_dim(), out).expect("same element count")
}

multiversion! {
    /// [`map1`] on f32, vectorized.
    fn map_into<F>(out: &mut [f32], s: &[f32], f: F) where {F: Fn(f32) -> f32 + Copy} = map1;
}

/// An output buffer of `n` elements, to be overwritten.
trait Buf: Sized {
    fn new_buf(n: usize) -> Vec<Self>;
}

impl Buf for f32 {
    fn new_buf(n: usize) -> Vec<f32> {
        take_f32(n)
    }
}

impl Buf for i32 {
    fn new_buf(n: usize) -> Vec<i32> {
        vec![0; n]
    }
}

/// An output buffer of `n` elements, to be overwritten.
fn new_buf<T: Buf>(n: usize) -> Vec<T> {
    T::new_buf(n)
}

/// `x op value` (or `value op x` when `scalar_lhs`), the scalar rounded to f32 first.
pub fn scalar_f32(op: BinaryOp, value: f64, scalar_lhs: bool, x: &ArrayD<f32>) -> ArrayD<f32> {
    let v = value as f32;
    with_f32_fn!(op, |f| if scalar_lhs {
        map_f32(x, move |e| f(v, e))
    } else {
        map_f32(x, move |e| f(e, v))
    })
}

/// `x op value` (or `value op x`) on i32; a non-integral scalar is applied in f64, then truncated.
pub fn scalar_i32(op: BinaryOp, value: f64, scalar_lhs: bool, x: &ArrayD<i32>) -> ArrayD<i32> {
    let integral = value.fract() == 0.0 && value >= i32::MIN as f64 && value <= i32::MAX as f64;
    if integral {
        let (f, v) = (i32_fn(op), value as i32);
        return if scalar_lhs {
            x.mapv(|e| f(v, e))
        } else {
            x.mapv(|e| f(e, v))
        };
    }
    let f = |p: f64, q: f64| match op {
        BinaryOp::Add => p + q,
        BinaryOp::Sub => p - q,
        BinaryOp::Mul => p * q,
        BinaryOp::Div => p / q,
        BinaryOp::Max => p.max(q),
    };
    let g = |e: i32| {
        let e = e as f64;
        let r = if scalar_lhs { f(value, e) } else { f(e, value) };
        r as i32
    };
    x.mapv(g)
}

/// √(2/π), the gelu tanh-approximation constant.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// gelu, tanh approximation, evaluated as `x · sigmoid(2u)` with `u = √(2/π)(x + 0.044715x³)`:
/// equal to `0.5·x·(1 + tanh(u))`, but without the cancellation of `1 + tanh(u)` for x ≪ 0.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
    x / (1.0 + exp(-2.0 * u))
}

/// Applies a unary function elementwise (gelu is the tanh approximation). `exp` (also inside
/// gelu and silu) is the vectorized [`exp`], within 2e-7 relative of the exact value.
pub fn unary_f32(op: UnaryOp, x: &ArrayD<f32>) -> ArrayD<f32> {
    match op {
        UnaryOp::Gelu => map_f32(x, gelu),
        UnaryOp::Relu => map_f32(x, |v| nan_max(v, 0.0)),
        UnaryOp::Silu => map_f32(x, |v| v / (1.0 + exp(-v))),
        UnaryOp::Tanh => map_f32(x, f32::tanh),
        UnaryOp::Exp => map_f32(x, exp),
        UnaryOp::Log => map_f32(x, f32::ln),
        UnaryOp::Neg => map_f32(x, |v| -v),
        UnaryOp::Sqrt => map_f32(x, f32::sqrt),
        UnaryOp::Rsqrt => map_f32(x, |v| 1.0 / v.sqrt()),
        UnaryOp::Recip => map_f32(x, |v| 1.0 / v),
    }
}

/// Applies a unary function to i32: only `neg` (wrapping) is defined.
pub fn unary_i32(op: UnaryOp, x: &ArrayD<i32>) -> Result<ArrayD<i32>, ExecError> {
    match op {
        UnaryOp::Neg => Ok(x.mapv(i32::wrapping_neg)),
        _ => Err(ExecError::Dtype {
            op: op.name(),
            index: 0,
            expected: "f32",
            got: "i32",
        }),
    }
}

/// Rounds to the nearest bfloat16 (ties to even), via the bits; NaN stays a (quiet) NaN.
pub fn round_bf16(x: f32) -> f32 {
    let bits = x.to_bits();
    if x.is_nan() {
        return f32::from_bits((bits | 0x0040_0000) & 0xFFFF_0000);
    }
    let lsb = (bits >> 16) & 1;
    f32::from_bits(bits.wrapping_add(0x7FFF + lsb) & 0xFFFF_0000)
}

/// Rounds to the nearest IEEE half (ties to even), overflowing to ±inf.
pub fn round_f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// Rounds a float to the precision of `to` (identity for f32).
fn round_to(to: Dtype) -> fn(f32) -> f32 {
    match to {
        Dtype::Bf16 => round_bf16,
        Dtype::F16 => round_f16,
        Dtype::F32 | Dtype::I32 => |x| x,
    }
}

/// Converts to `to`: float→i32 truncates toward zero (saturating, NaN → 0), float→bf16/f16
/// rounds to nearest even, i32→float converts then rounds.
pub fn cast(x: &Tensor, to: Dtype) -> Tensor {
    match (x, to) {
        (Tensor::F32(a), Dtype::I32) => Tensor::I32(a.mapv(|v| v as i32)),
        (Tensor::F32(a), _) => Tensor::F32(a.mapv(round_to(to))),
        (Tensor::I32(a), Dtype::I32) => Tensor::I32(a.clone()),
        (Tensor::I32(a), _) => {
            let r = round_to(to);
            Tensor::F32(a.mapv(|v| r(v as f32)))
        }
    }
}
