//! Elementwise kernels: binary ops with numpy broadcasting, scalar ops, unary functions, casts.
//!
//! i32 semantics (the IR keeps i32 results where numpy would promote): add, sub, mul wrap; div
//! is numpy floor division `//` (a zero divisor gives 0, as numpy does); a scalar that is not
//! an integer in i32 range is applied in f64 and the result truncated toward zero.

use super::broadcast_shape;
use crate::exec::{ExecError, Tensor};
use crate::ir::{BinaryOp, Dtype, UnaryOp};
use ndarray::{ArrayD, IxDyn, Zip};

/// numpy `maximum`: NaN in either operand gives NaN.
fn nan_max(x: f32, y: f32) -> f32 {
    if x.is_nan() || y.is_nan() {
        f32::NAN
    } else {
        x.max(y)
    }
}

/// The f32 function of a binary op.
fn f32_fn(op: BinaryOp) -> fn(f32, f32) -> f32 {
    match op {
        BinaryOp::Add => |x, y| x + y,
        BinaryOp::Sub => |x, y| x - y,
        BinaryOp::Mul => |x, y| x * y,
        BinaryOp::Div => |x, y| x / y,
        BinaryOp::Max => nan_max,
    }
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

/// Applies `f` elementwise to `a` and `b` broadcast together.
fn zip_broadcast<T: Copy>(
    op: BinaryOp,
    a: &ArrayD<T>,
    b: &ArrayD<T>,
    f: fn(T, T) -> T,
) -> Result<ArrayD<T>, ExecError> {
    if a.shape() == b.shape() {
        return Ok(Zip::from(a).and(b).map_collect(|&x, &y| f(x, y)));
    }
    let err = || {
        let detail = format!(
            "shapes {:?} and {:?} do not broadcast",
            a.shape(),
            b.shape()
        );
        ExecError::shape(op.name(), detail)
    };
    let shape = IxDyn(&broadcast_shape(a.shape(), b.shape()).ok_or_else(err)?);
    let av = a.broadcast(shape.clone()).ok_or_else(err)?;
    let bv = b.broadcast(shape).ok_or_else(err)?;
    Ok(Zip::from(&av).and(&bv).map_collect(|&x, &y| f(x, y)))
}

/// `a op b` on f32 with numpy broadcasting (`maximum` propagates NaN).
pub fn binary_f32(
    op: BinaryOp,
    a: &ArrayD<f32>,
    b: &ArrayD<f32>,
) -> Result<ArrayD<f32>, ExecError> {
    zip_broadcast(op, a, b, f32_fn(op))
}

/// `a op b` on i32 with numpy broadcasting (wrapping; div is floor division).
pub fn binary_i32(
    op: BinaryOp,
    a: &ArrayD<i32>,
    b: &ArrayD<i32>,
) -> Result<ArrayD<i32>, ExecError> {
    zip_broadcast(op, a, b, i32_fn(op))
}

/// `x op value` (or `value op x` when `scalar_lhs`), the scalar rounded to f32 first.
pub fn scalar_f32(op: BinaryOp, value: f64, scalar_lhs: bool, x: &ArrayD<f32>) -> ArrayD<f32> {
    let (f, v) = (f32_fn(op), value as f32);
    if scalar_lhs {
        x.mapv(|e| f(v, e))
    } else {
        x.mapv(|e| f(e, v))
    }
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
fn gelu(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
    x / (1.0 + (-2.0 * u).exp())
}

/// The f32 function of a unary op.
fn unary_fn(op: UnaryOp) -> fn(f32) -> f32 {
    match op {
        UnaryOp::Gelu => gelu,
        UnaryOp::Relu => |x| nan_max(x, 0.0),
        UnaryOp::Silu => |x| x / (1.0 + (-x).exp()),
        UnaryOp::Tanh => f32::tanh,
        UnaryOp::Exp => f32::exp,
        UnaryOp::Log => f32::ln,
        UnaryOp::Neg => |x| -x,
        UnaryOp::Sqrt => f32::sqrt,
        UnaryOp::Rsqrt => |x| 1.0 / x.sqrt(),
        UnaryOp::Recip => |x| 1.0 / x,
    }
}

/// Applies a unary function elementwise (gelu is the tanh approximation).
pub fn unary_f32(op: UnaryOp, x: &ArrayD<f32>) -> ArrayD<f32> {
    x.mapv(unary_fn(op))
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
