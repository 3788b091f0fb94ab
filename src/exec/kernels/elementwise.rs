//! Elementwise kernels: binary ops with numpy broadcasting, scalar ops, unary functions, casts.
//!
//! i32 semantics (the IR keeps i32 results where numpy would promote): add, sub, mul wrap; div
//! is numpy floor division `//` (a zero divisor gives 0, as numpy does); a scalar that is not
//! an integer in i32 range is applied in f64 and the result truncated toward zero.

use super::pool::take_f32;
use super::simd::{exp, mul_sigmoid, multiversion};
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

/// [`binary_f32`] where the caller gives up `a` (`a_owned`) or `b`: when that operand has the
/// result's shape, the result is written into its buffer.
pub(crate) fn binary_f32_owned(
    op: BinaryOp,
    a: Operand<'_>,
    b: Operand<'_>,
) -> Result<ArrayD<f32>, ExecError> {
    with_f32_fn!(op, |f| binary_owned(op, a, b, f))
}

/// The in-place form of a [`Pattern`], seen from the operand that has the result's shape.
#[derive(Clone, Copy)]
enum Update {
    Same,
    Scalar,
    Repeat,
    Stretch,
}

/// `dst[i] = f(dst[i], other[..])` for the broadcast `upd`.
#[inline(always)]
fn update_pattern<F: Fn(f32, f32) -> f32 + Copy>(
    dst: &mut [f32],
    other: &[f32],
    upd: Update,
    f: F,
) {
    match upd {
        Update::Same => {
            let n = dst.len();
            let other = &other[..n];
            for i in 0..n {
                dst[i] = f(dst[i], other[i]);
            }
        }
        Update::Scalar => {
            let y = other[0];
            map_self(dst, |x| f(x, y));
        }
        Update::Repeat => {
            let n = other.len();
            for row in dst.chunks_exact_mut(n) {
                for i in 0..n {
                    row[i] = f(row[i], other[i]);
                }
            }
        }
        Update::Stretch => {
            let n = dst.len() / other.len();
            for (block, &y) in dst.chunks_exact_mut(n).zip(other) {
                map_self(block, |x| f(x, y));
            }
        }
    }
}

multiversion! {
    /// [`update_pattern`], vectorized.
    fn update<F>(dst: &mut [f32], other: &[f32], upd: Update, f: F)
    where {F: Fn(f32, f32) -> f32 + Copy} = update_pattern;
}

/// Binary op with an owned operand reused when the broadcast allows, else [`zip_broadcast`].
#[inline(always)]
fn binary_owned<F: Fn(f32, f32) -> f32 + Copy>(
    op: BinaryOp,
    a: Operand<'_>,
    b: Operand<'_>,
    f: F,
) -> Result<ArrayD<f32>, ExecError> {
    let (ra, rb) = (a.get().view(), b.get().view());
    let shape = broadcast_shape(ra.shape(), rb.shape());
    if let (Some(shape), Some(_), Some(_)) = (shape, ra.as_slice(), rb.as_slice()) {
        if !ra.is_empty() && !rb.is_empty() {
            let pat = pattern(ra.shape(), rb.shape(), &shape);
            let lhs = match pat {
                Pattern::Same => Some((Update::Same, true)),
                Pattern::ScalarRhs => Some((Update::Scalar, true)),
                Pattern::RepeatRhs => Some((Update::Repeat, true)),
                Pattern::StretchRhs => Some((Update::Stretch, true)),
                Pattern::ScalarLhs => Some((Update::Scalar, false)),
                Pattern::RepeatLhs => Some((Update::Repeat, false)),
                Pattern::StretchLhs => Some((Update::Stretch, false)),
                Pattern::General => None,
            };
            drop((ra, rb));
            match (lhs, a, b) {
                (Some((upd, true)), Operand::Own(mut x), b) => {
                    let other = b.get().as_slice().expect("contiguous");
                    update(x.as_slice_mut().expect("contiguous"), other, upd, f);
                    return Ok(x);
                }
                (Some((Update::Same, true)), a, Operand::Own(mut y)) => {
                    let other = a.get().as_slice().expect("contiguous");
                    update(
                        y.as_slice_mut().expect("contiguous"),
                        other,
                        Update::Same,
                        |d, o| f(o, d),
                    );
                    return Ok(y);
                }
                (Some((upd, false)), a, Operand::Own(mut y)) => {
                    let other = a.get().as_slice().expect("contiguous");
                    update(y.as_slice_mut().expect("contiguous"), other, upd, |d, o| {
                        f(o, d)
                    });
                    return Ok(y);
                }
                (_, a, b) => return zip_owned(op, a, b, f),
            }
        }
    }
    drop((ra, rb));
    zip_owned(op, a, b, f)
}

/// [`zip_broadcast`] on operands; owned ones are recycled.
fn zip_owned<F: Fn(f32, f32) -> f32 + Copy>(
    op: BinaryOp,
    a: Operand<'_>,
    b: Operand<'_>,
    f: F,
) -> Result<ArrayD<f32>, ExecError> {
    let r = zip_broadcast(op, a.get(), b.get(), f);
    for o in [a, b] {
        if let Operand::Own(x) = o {
            super::pool::recycle(Tensor::F32(x));
        }
    }
    r
}

/// `a op b` on i32 with numpy broadcasting (wrapping; div is floor division).
pub fn binary_i32(
    op: BinaryOp,
    a: &ArrayD<i32>,
    b: &ArrayD<i32>,
) -> Result<ArrayD<i32>, ExecError> {
    zip_broadcast(op, a, b, i32_fn(op))
}

/// An f32 operand: borrowed, or handed over by a caller that no longer needs it (then a kernel
/// may write its result into the operand's buffer).
pub(crate) enum Operand<'a> {
    /// Read only.
    Ref(&'a ArrayD<f32>),
    /// Free to overwrite.
    Own(ArrayD<f32>),
}

impl Operand<'_> {
    /// The array, for reading.
    pub(crate) fn get(&self) -> &ArrayD<f32> {
        match self {
            Operand::Ref(x) => x,
            Operand::Own(x) => x,
        }
    }
}

/// `f(x)` for every element, in row-major order: in place when `x` is owned and contiguous,
/// else into a pooled buffer.
#[inline(always)]
fn map_f32(x: Operand<'_>, f: impl Fn(f32) -> f32 + Copy) -> ArrayD<f32> {
    let x = match x {
        Operand::Own(mut x) => match x.as_slice_mut() {
            Some(s) => {
                map_inplace(s, f);
                return x;
            }
            None => return x.mapv(f),
        },
        Operand::Ref(x) => x,
    };
    let Some(s) = x.as_slice() else {
        return x.mapv(f);
    };
    let mut out = take_f32(s.len());
    map_into(&mut out, s, f);
    ArrayD::from_shape_vec(x.raw_dim(), out).expect("same element count")
}

/// `s[i] = f(s[i])`, as an index loop.
#[inline(always)]
fn map_self<F: Fn(f32) -> f32 + Copy>(s: &mut [f32], f: F) {
    for v in s.iter_mut() {
        *v = f(*v);
    }
}

multiversion! {
    /// [`map_self`], vectorized.
    fn map_inplace<F>(s: &mut [f32], f: F) where {F: Fn(f32) -> f32 + Copy} = map_self;
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
    scalar_impl(op, value, scalar_lhs, Operand::Ref(x))
}

/// [`scalar_f32`] on an operand the caller gives up: the result reuses its buffer.
pub(crate) fn scalar_f32_owned(
    op: BinaryOp,
    value: f64,
    scalar_lhs: bool,
    x: ArrayD<f32>,
) -> ArrayD<f32> {
    scalar_impl(op, value, scalar_lhs, Operand::Own(x))
}

fn scalar_impl(op: BinaryOp, value: f64, scalar_lhs: bool, x: Operand<'_>) -> ArrayD<f32> {
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
/// equal to `0.5·x·(1 + tanh(u))`, but without the cancellation of `1 + tanh(u)` for x ≪ 0,
/// nor the flush to 0 of its tail below x ≈ -10 ([`mul_sigmoid`]).
#[inline(always)]
fn gelu(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
    mul_sigmoid(x, 2.0 * u)
}

/// Applies a unary function elementwise (gelu is the tanh approximation). `exp` (also inside
/// gelu and silu) is the vectorized [`exp`], within 2e-7 relative of the exact value.
pub fn unary_f32(op: UnaryOp, x: &ArrayD<f32>) -> ArrayD<f32> {
    unary_impl(op, Operand::Ref(x))
}

/// [`unary_f32`] on an operand the caller gives up: the result reuses its buffer.
pub(crate) fn unary_f32_owned(op: UnaryOp, x: ArrayD<f32>) -> ArrayD<f32> {
    unary_impl(op, Operand::Own(x))
}

fn unary_impl(op: UnaryOp, x: Operand<'_>) -> ArrayD<f32> {
    match op {
        UnaryOp::Gelu => map_f32(x, gelu),
        UnaryOp::Relu => map_f32(x, |v| nan_max(v, 0.0)),
        UnaryOp::Silu => map_f32(x, |v| mul_sigmoid(v, v)),
        UnaryOp::Tanh => map_f32(x, f32::tanh),
        UnaryOp::Exp => map_f32(x, exp),
        UnaryOp::Log => map_f32(x, f32::ln),
        UnaryOp::Neg => map_f32(x, |v| -v),
        UnaryOp::Sqrt => map_f32(x, f32::sqrt),
        UnaryOp::Rsqrt => map_f32(x, |v| 1.0 / v.sqrt()),
        UnaryOp::Recip => map_f32(x, |v| 1.0 / v),
        UnaryOp::NonFinite => map_f32(x, |v| f32::from(u8::from(!v.is_finite()))),
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
