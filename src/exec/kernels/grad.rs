//! Kernels of the backward ops: derivatives of the elementwise functions, equality masks,
//! broadcasting, fills, the embedding's scatter-add and one-hot labels.

use super::pool::take_vec;
use super::{broadcast_shape, from_vec, row_major, to_usize};
use crate::exec::ExecError;
use crate::ir::UnaryOp;
use ndarray::{ArrayD, IxDyn, Zip};

/// f'(x) in f64, matching the forward kernels' definitions (gelu: tanh form; relu'(0) = 0).
fn derivative(op: UnaryOp, x: f64) -> f64 {
    let sigmoid = |z: f64| 1.0 / (1.0 + (-z).exp());
    match op {
        UnaryOp::Gelu => {
            const C: f64 = 0.797_884_560_802_865_4;
            const A: f64 = 0.044715;
            let s = sigmoid(2.0 * C * (x + A * x * x * x));
            let du = C * (1.0 + 3.0 * A * x * x);
            s + x * s * (1.0 - s) * 2.0 * du
        }
        UnaryOp::Relu => f64::from(u8::from(x > 0.0)),
        UnaryOp::Silu => {
            let s = sigmoid(x);
            s * (1.0 + x * (1.0 - s))
        }
        UnaryOp::Tanh => 1.0 - x.tanh().powi(2),
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => 1.0 / x,
        UnaryOp::Neg => -1.0,
        UnaryOp::Sqrt => 0.5 / x.sqrt(),
        UnaryOp::Rsqrt => -0.5 / (x * x.sqrt()),
        UnaryOp::Recip => -1.0 / (x * x),
        UnaryOp::NonFinite => 0.0,
    }
}

/// g·f'(x) elementwise; `x` and `g` have one shape. A zero cotangent gives 0 even where f' is
/// infinite (x = 0 for log), as the chain rule's zero factor does in JAX.
pub fn unary_grad(op: UnaryOp, x: &ArrayD<f32>, g: &ArrayD<f32>) -> Result<ArrayD<f32>, ExecError> {
    if x.shape() != g.shape() {
        let detail = format!("operand {:?} vs cotangent {:?}", x.shape(), g.shape());
        return Err(ExecError::shape(op.grad_name(), detail));
    }
    Ok(Zip::from(x).and(g).map_collect(|&x, &g| {
        if g == 0.0 {
            0.0
        } else {
            (f64::from(g) * derivative(op, f64::from(x))) as f32
        }
    }))
}

/// 1.0 where `a == b` (numpy broadcasting), else 0.0.
pub fn equal<T: Copy + PartialEq>(a: &ArrayD<T>, b: &ArrayD<T>) -> Result<ArrayD<f32>, ExecError> {
    let shape = broadcast_shape(a.shape(), b.shape()).ok_or_else(|| {
        let detail = format!("{:?} and {:?} do not broadcast", a.shape(), b.shape());
        ExecError::shape("equal", detail)
    })?;
    let (a, b) = (
        a.broadcast(IxDyn(&shape)).expect("broadcast shape"),
        b.broadcast(IxDyn(&shape)).expect("broadcast shape"),
    );
    Ok(Zip::from(&a)
        .and(&b)
        .map_collect(|x, y| f32::from(u8::from(x == y))))
}

/// numpy `broadcast_to`.
pub fn broadcast_to<T: Clone>(x: &ArrayD<T>, shape: &[u64]) -> Result<ArrayD<T>, ExecError> {
    let dims = shape
        .iter()
        .map(|&d| to_usize("broadcast_to", d))
        .collect::<Result<Vec<_>, _>>()?;
    let view = x.broadcast(IxDyn(&dims)).ok_or_else(|| {
        let detail = format!("{:?} does not broadcast to {dims:?}", x.shape());
        ExecError::shape("broadcast_to", detail)
    })?;
    Ok(view.to_owned())
}

/// `[rows, H]`: row `i` is the sum, in position order, of the rows of `g` (`ids.shape + [H]`)
/// whose id is `i`. Ids outside `[0, rows)` are an error.
pub fn scatter_add(
    ids: &ArrayD<i32>,
    g: &ArrayD<f32>,
    rows: u64,
) -> Result<ArrayD<f32>, ExecError> {
    const OP: &str = "scatter_add";
    let rows = to_usize(OP, rows)?;
    let h = match g.shape().split_last() {
        Some((&h, lead)) if lead == ids.shape() => h,
        _ => {
            let detail = format!("ids {:?} vs rows {:?}", ids.shape(), g.shape());
            return Err(ExecError::shape(OP, detail));
        }
    };
    let mut out = zeros(OP, rows, h)?;
    let src = row_major(g);
    for (position, &id) in ids.iter().enumerate() {
        let row = usize::try_from(id).ok().filter(|&r| r < rows);
        let row = row.ok_or(ExecError::IdOutOfRange {
            id: i64::from(id),
            position,
            vocab: rows,
        })?;
        let dst = &mut out[row * h..(row + 1) * h];
        for (d, s) in dst.iter_mut().zip(&src[position * h..(position + 1) * h]) {
            *d += s;
        }
    }
    from_vec(OP, vec![rows, h], out)
}

/// `labels.shape + [depth]`: 1.0 at each label's index, 0.0 elsewhere. Labels outside
/// `[0, depth)` are an error.
pub fn one_hot(labels: &ArrayD<i32>, depth: u64) -> Result<ArrayD<f32>, ExecError> {
    const OP: &str = "one_hot";
    let depth = to_usize(OP, depth)?;
    let mut out = zeros(OP, labels.len(), depth)?;
    for (position, &label) in labels.iter().enumerate() {
        let k = usize::try_from(label).ok().filter(|&k| k < depth);
        let k = k.ok_or(ExecError::LabelOutOfRange {
            label: i64::from(label),
            position,
            classes: depth,
        })?;
        out[position * depth + k] = 1.0;
    }
    let mut shape = labels.shape().to_vec();
    shape.push(depth);
    from_vec(OP, shape, out)
}

/// A pooled buffer of `rows · width` zeros, or an error when the count overflows.
fn zeros(op: &'static str, rows: usize, width: usize) -> Result<Vec<f32>, ExecError> {
    let len = rows
        .checked_mul(width)
        .ok_or_else(|| ExecError::shape(op, "result size overflows"))?;
    let mut out = take_vec::<f32>(len);
    out.resize(len, 0.0);
    Ok(out)
}

/// `where(c, x, y)`: `x` where `c` is non-zero, else `y`, all three broadcast (numpy's
/// `where(c != 0, x, y)`).
pub fn select(c: &ArrayD<f32>, x: &ArrayD<f32>, y: &ArrayD<f32>) -> Result<ArrayD<f32>, ExecError> {
    let shape = super::broadcast_shape(x.shape(), y.shape())
        .and_then(|s| super::broadcast_shape(c.shape(), &s))
        .ok_or_else(|| {
            let detail = format!("{:?}, {:?} and {:?}", c.shape(), x.shape(), y.shape());
            ExecError::shape("select", detail)
        })?;
    let view = |a: &ArrayD<f32>| a.broadcast(shape.as_slice()).map(|v| v.to_owned());
    let (Some(c), Some(x), Some(y)) = (view(c), view(x), view(y)) else {
        return Err(ExecError::shape("select", format!("to {shape:?}")));
    };
    Ok(ndarray::Zip::from(&c)
        .and(&x)
        .and(&y)
        .map_collect(|&c, &x, &y| if c != 0.0 { x } else { y }))
}
