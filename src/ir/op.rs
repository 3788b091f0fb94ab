//! The closed set of operations. Every pass matches on `Op` exhaustively.

use super::types::Dtype;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Elementwise binary operations (numpy semantics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BinaryOp {
    /// a + b
    Add,
    /// a - b
    Sub,
    /// a * b
    Mul,
    /// a / b
    Div,
    /// elementwise maximum
    Max,
}

impl BinaryOp {
    /// Name used in the text IR.
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Max => "maximum",
        }
    }
}

/// Elementwise unary functions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnaryOp {
    /// gelu, tanh approximation: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
    Gelu,
    /// max(x, 0)
    Relu,
    /// x · sigmoid(x)
    Silu,
    /// tanh(x)
    Tanh,
    /// e^x
    Exp,
    /// natural log
    Log,
    /// -x
    Neg,
    /// √x
    Sqrt,
    /// 1/√x
    Rsqrt,
    /// 1/x
    Recip,
    /// 1 where x is ±inf or NaN, else 0: a loss-scaled step's overflow check (derivative 0).
    NonFinite,
}

impl UnaryOp {
    /// Name used in the text IR and the language.
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Gelu => "gelu",
            UnaryOp::Relu => "relu",
            UnaryOp::Silu => "silu",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Neg => "neg",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Recip => "recip",
            UnaryOp::NonFinite => "nonfinite",
        }
    }

    /// Name of the op computing g·f'(x) in the text IR.
    pub fn grad_name(self) -> &'static str {
        match self {
            UnaryOp::Gelu => "gelu_grad",
            UnaryOp::Relu => "relu_grad",
            UnaryOp::Silu => "silu_grad",
            UnaryOp::Tanh => "tanh_grad",
            UnaryOp::Exp => "exp_grad",
            UnaryOp::Log => "log_grad",
            UnaryOp::Neg => "neg_grad",
            UnaryOp::Sqrt => "sqrt_grad",
            UnaryOp::Rsqrt => "rsqrt_grad",
            UnaryOp::Recip => "recip_grad",
            UnaryOp::NonFinite => "nonfinite_grad",
        }
    }

    /// True when f(a + b) = f(a) + f(b) and f(c·a) = c·f(a): such ops pass Partial(sum) through.
    pub fn is_linear(self) -> bool {
        matches!(self, UnaryOp::Neg)
    }
}

/// Reductions over one axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReduceOp {
    /// Σ
    Sum,
    /// Σ / n (n the global size of the axis)
    Mean,
    /// max
    Max,
}

impl ReduceOp {
    /// Name used in the text IR and the language.
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Mean => "mean",
            ReduceOp::Max => "max",
        }
    }
}

/// What a `State` leaf holds before the first training step.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateInit {
    /// Zeros (optimizer moments, momentum buffers, AdamW's step count).
    #[default]
    Zeros,
    /// The named param's values, widened to the state's dtype (an f32 master weight).
    Param(String),
    /// Every element this constant (a loss scale).
    Fill(f64),
}

impl StateInit {
    /// True for the default, zeros.
    pub fn is_zeros(&self) -> bool {
        *self == StateInit::Zeros
    }
}

/// As in the text IR: nothing for zeros, ` = param NAME` or ` = fill V` otherwise.
impl fmt::Display for StateInit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateInit::Zeros => Ok(()),
            StateInit::Param(p) => write!(f, " = param {p}"),
            StateInit::Fill(v) => write!(f, " = fill {}", fmt_f64(*v)),
        }
    }
}

/// One operation of the IR. Operands and results are listed on the node; the variant holds the
/// static attributes. Shape and dtype rules live in `ir::infer`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Op {
    /// A program input fed at run time; no operands, one result.
    Input {
        /// The input's name as declared.
        name: String,
    },
    /// A weight with a stable hierarchical name (`layer.3.w1`); no operands, one result.
    Param {
        /// Full dotted name, block call path first.
        name: String,
    },
    /// Optimizer state carried from one training step to the next (`adamw.m(layer.3.w1)`),
    /// as `init` says before the first (zeros unless stated); no operands, one result.
    State {
        /// The state's name: the optimizer's slot and the param's full name.
        name: String,
        /// Its value before the first step.
        #[serde(default, skip_serializing_if = "StateInit::is_zeros")]
        init: StateInit,
    },
    /// numpy matmul: `...mk,...kn->...mn`, batch dims broadcast, 1-D operands promoted then dropped.
    MatMul,
    /// Elementwise binary op with numpy broadcasting; both operands have the same dtype.
    Binary {
        /// Which operation.
        op: BinaryOp,
    },
    /// Elementwise op between the operand and a compile-time scalar (`x * 0.5`, `1.0 - x`).
    Scalar {
        /// Which operation.
        op: BinaryOp,
        /// The scalar.
        value: f64,
        /// True when the scalar is the left operand (`value op x`).
        scalar_lhs: bool,
    },
    /// Elementwise unary function; result has the operand's type.
    Unary {
        /// Which function.
        op: UnaryOp,
    },
    /// softmax along `axis` with max subtraction; result has the operand's type.
    Softmax {
        /// The normalized axis.
        axis: usize,
    },
    /// Layer norm over the last dim: (x - mean) / √(var + eps) · scale (+ bias); operands x, scale[, bias].
    LayerNorm {
        /// Added to the variance.
        eps: f64,
    },
    /// RMS norm over the last dim: x / √(mean(x²) + eps) · scale; operands x, scale.
    RmsNorm {
        /// Added to the mean square.
        eps: f64,
    },
    /// Reduction of one axis; the axis is kept with size 1 when `keepdims`.
    Reduce {
        /// Which reduction.
        op: ReduceOp,
        /// The reduced axis.
        axis: usize,
        /// Keep the axis with size 1.
        keepdims: bool,
    },
    /// Permutes dims: result dim i is operand dim `perm[i]`.
    Transpose {
        /// A permutation of 0..rank.
        perm: Vec<usize>,
    },
    /// Row-major reshape to `shape` (same element count).
    Reshape {
        /// The new shape.
        shape: Vec<u64>,
    },
    /// Splits `axis` into consecutive pieces of the given sizes; one result per piece.
    Split {
        /// The split axis.
        axis: usize,
        /// Piece sizes, summing to the axis size.
        sizes: Vec<u64>,
    },
    /// Concatenates the operands (same rank and dtype, equal but for `axis`) along `axis`.
    Concat {
        /// The joined axis.
        axis: usize,
    },
    /// Elements `start..end` of `axis`.
    Slice {
        /// The sliced axis.
        axis: usize,
        /// First index kept.
        start: u64,
        /// One past the last index kept.
        end: u64,
    },
    /// Row lookup: operands ids `i32[...]` and table `[V, H]`; result `[..., H]`.
    Embedding,
    /// Mean softmax cross-entropy: operands logits `[..., V]` (float) and labels `i32[...]`; result f32 scalar.
    CrossEntropy,
    /// Sets entries above the diagonal of the last two dims (key index > query index) to -inf.
    CausalMask,
    /// Converts the element type.
    Cast {
        /// The result dtype.
        to: Dtype,
    },
    /// A tensor of the operand's type whose every element is `value` (numpy `full_like`).
    FullLike {
        /// The fill value.
        value: f64,
    },
    /// A tensor of `dtype[shape]` whose every element is `value`; no operands (the training
    /// step's cotangent seed: it reads nothing, so nothing is reduced to make it).
    Fill {
        /// The fill value.
        value: f64,
        /// The element type.
        dtype: Dtype,
        /// The shape.
        shape: Vec<u64>,
    },
    /// numpy `broadcast_to`: the operand repeated along new leading dims and size-1 dims.
    BroadcastTo {
        /// The result shape.
        shape: Vec<u64>,
    },
    /// Backward of an elementwise function: operands x and the cotangent g (same shape, f32);
    /// result g·f'(x) (relu'(0) = 0).
    UnaryGrad {
        /// The function differentiated.
        op: UnaryOp,
    },
    /// 1.0 where the operands (broadcast, same dtype) are equal, else 0.0; result f32.
    Equal,
    /// `where(c, a, b)`: `a` where the float `c` is non-zero, else `b` (a and b floats of one
    /// dtype; all three broadcast). Unlike `c·a + (1−c)·b` it is not NaN where the operand not
    /// chosen is inf: a skipped step keeps its old values with it.
    Select,
    /// Backward of embedding: operands ids `i32[...]` and rows `f32[..., H]`; result `[rows, H]`
    /// with row `i` the sum of the rows whose id is `i`.
    ScatterAdd {
        /// Rows of the result (the table's vocabulary).
        rows: u64,
    },
    /// Operand labels `i32[...]`; result `f32[..., depth]`, 1.0 at each label's index.
    OneHot {
        /// Size of the new last dim.
        depth: u64,
    },
    /// SPMD: reduces the operand over the devices of the group along mesh axis `axis` (of `size`
    /// devices), or with `also` over the product group of `axis` and those axes (the devices
    /// differing only there); every device gets the result. Partial → Replicate on each axis.
    /// Several operands (one dtype) are a bucket: reduced as one message, result `k` is operand
    /// `k` reduced.
    AllReduce {
        /// The mesh axis (the first, with `also`).
        axis: String,
        /// Devices along `axis`.
        size: u64,
        /// Sum or Max.
        reduce: ReduceOp,
        /// Further mesh axes of the group with their sizes; empty for the single-axis
        /// all-reduce every reshard emits. A field rather than a new variant: a multi-axis
        /// all-reduce is still an all-reduce (cost, bucketing, verification treat it as one),
        /// every single-axis plan keeps its text and JSON byte for byte, and plan JSON written
        /// before the field loads (it defaults to empty).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        also: Vec<(String, u64)>,
    },
    /// SPMD: concatenates the group's blocks along `dim` (result dim × size). Shard → Replicate.
    AllGather {
        /// The mesh axis.
        axis: String,
        /// Devices in the group.
        size: u64,
        /// The gathered dim.
        dim: usize,
    },
    /// SPMD: reduces over the group and keeps this device's block of `dim` (dim / size).
    /// Partial → Shard.
    ReduceScatter {
        /// The mesh axis.
        axis: String,
        /// Devices in the group.
        size: u64,
        /// The scattered dim.
        dim: usize,
        /// Sum or Max.
        reduce: ReduceOp,
    },
    /// SPMD: re-splits from dim `concat` to dim `split` (result `split` / size, `concat` × size).
    /// Shard(concat) → Shard(split).
    AllToAll {
        /// The mesh axis.
        axis: String,
        /// Devices in the group.
        size: u64,
        /// The dim split after the exchange.
        split: usize,
        /// The dim joined after the exchange.
        concat: usize,
    },
    /// SPMD: moves blocks between the devices of the combined group of `axes` from one split of
    /// the dims to another; each device sends every peer the part of its block that the peer's
    /// new block covers (one all-to-all over the group). Shard → Shard on several axes at once.
    Redistribute {
        /// The group's mesh axes with their sizes, in mesh order.
        axes: Vec<(String, u64)>,
        /// Per dim, the group's axes splitting it before (indices into `axes`, major first).
        from: Vec<Vec<usize>>,
        /// Per dim, the group's axes splitting it after (indices into `axes`, major first).
        to: Vec<Vec<usize>>,
    },
    /// SPMD, no communication: keeps this device's block of `dim` (its coordinate on `axis`).
    /// Replicate → Shard.
    ShardSlice {
        /// The mesh axis.
        axis: String,
        /// Devices in the group.
        size: u64,
        /// The sliced dim.
        dim: usize,
    },
    /// SPMD, no communication: the operand on coordinate 0 of `axis`, zeros elsewhere.
    /// Replicate → Partial(sum).
    KeepOnFirst {
        /// The mesh axis.
        axis: String,
    },
    /// SPMD embedding over a vocab-split table: operands ids `i32[...]` (global ids) and the local
    /// table `[V/k, H]` holding block `b` of `k` (block index from the coordinates on `axes`, major
    /// first); ids outside the block give zero rows. Result `[..., H]`, Partial(sum) over `axes`.
    VocabEmbedding {
        /// Axes splitting the vocab, major first, with their sizes.
        axes: Vec<(String, u64)>,
    },
    /// SPMD: picks `x[..., label - offset]` from the local vocab block of `x` `[..., V/k]` where the
    /// label falls in the block, 0 elsewhere; operands x and labels `i32[...]`; result `[...]`.
    TargetLogit {
        /// Axes splitting the vocab, major first, with their sizes.
        axes: Vec<(String, u64)>,
    },
}

impl Op {
    /// The op's name in the text IR.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Param { .. } => "param",
            Op::State { .. } => "state",
            Op::MatMul => "matmul",
            Op::Binary { op } => op.name(),
            Op::Scalar { .. } => "scalar",
            Op::Unary { op } => op.name(),
            Op::Softmax { .. } => "softmax",
            Op::LayerNorm { .. } => "layernorm",
            Op::RmsNorm { .. } => "rmsnorm",
            Op::Reduce { op, .. } => op.name(),
            Op::Transpose { .. } => "transpose",
            Op::Reshape { .. } => "reshape",
            Op::Split { .. } => "split",
            Op::Concat { .. } => "concat",
            Op::Slice { .. } => "slice",
            Op::Embedding => "embedding",
            Op::CrossEntropy => "cross_entropy",
            Op::CausalMask => "causal_mask",
            Op::Cast { .. } => "cast",
            Op::FullLike { .. } => "full_like",
            Op::BroadcastTo { .. } => "broadcast_to",
            Op::Fill { .. } => "fill",
            Op::UnaryGrad { op } => op.grad_name(),
            Op::Equal => "equal",
            Op::Select => "select",
            Op::ScatterAdd { .. } => "scatter_add",
            Op::OneHot { .. } => "one_hot",
            Op::AllReduce { .. } => "all_reduce",
            Op::AllGather { .. } => "all_gather",
            Op::ReduceScatter { .. } => "reduce_scatter",
            Op::AllToAll { .. } => "all_to_all",
            Op::Redistribute { .. } => "redistribute",
            Op::ShardSlice { .. } => "shard_slice",
            Op::KeepOnFirst { .. } => "keep_on_first",
            Op::VocabEmbedding { .. } => "vocab_embedding",
            Op::TargetLogit { .. } => "target_logit",
        }
    }

    /// True for the collectives (ops that exchange data between devices).
    pub fn is_collective(&self) -> bool {
        matches!(
            self,
            Op::AllReduce { .. }
                | Op::AllGather { .. }
                | Op::ReduceScatter { .. }
                | Op::AllToAll { .. }
                | Op::Redistribute { .. }
        )
    }

    /// True for the ops that exist only in partitioned programs and need a rank to run: the
    /// collectives, local slices and the vocab-parallel ops.
    pub fn is_spmd_only(&self) -> bool {
        self.is_collective()
            || matches!(
                self,
                Op::ShardSlice { .. }
                    | Op::KeepOnFirst { .. }
                    | Op::VocabEmbedding { .. }
                    | Op::TargetLogit { .. }
            )
    }

    /// True for the leaves (`Input`, `Param`, `State`).
    pub fn is_leaf(&self) -> bool {
        matches!(self, Op::Input { .. } | Op::Param { .. } | Op::State { .. })
    }

    /// The name of a leaf.
    pub fn leaf_name(&self) -> Option<&str> {
        match self {
            Op::Input { name } | Op::Param { name } | Op::State { name, .. } => Some(name),
            _ => None,
        }
    }

    /// The mesh axes an SPMD op names, with the group size it claims (`None`: not stated);
    /// empty for every other op.
    pub fn mesh_axes(&self) -> Vec<(&str, Option<u64>)> {
        match self {
            Op::AllReduce {
                axis, size, also, ..
            } => std::iter::once((axis, size))
                .chain(also.iter().map(|(a, n)| (a, n)))
                .map(|(a, n)| (a.as_str(), Some(*n)))
                .collect(),
            Op::AllGather { axis, size, .. }
            | Op::ReduceScatter { axis, size, .. }
            | Op::AllToAll { axis, size, .. }
            | Op::ShardSlice { axis, size, .. } => vec![(axis.as_str(), Some(*size))],
            Op::KeepOnFirst { axis } => vec![(axis.as_str(), None)],
            Op::VocabEmbedding { axes }
            | Op::TargetLogit { axes }
            | Op::Redistribute { axes, .. } => {
                axes.iter().map(|(a, n)| (a.as_str(), Some(*n))).collect()
            }
            _ => Vec::new(),
        }
    }
}

/// Formats a float attribute so that it reads back exactly and integers stay short (`2`, `0.125`).
fn fmt_f64(v: f64) -> String {
    format!("{v:?}")
}

/// A split of the dims over a group's axes, spec style: `[dp, (tp,sp), _]`.
fn group_spec(axes: &[(String, u64)], dims: &[Vec<usize>]) -> String {
    let name = |a: &usize| axes.get(*a).map_or("?", |(n, _)| n.as_str());
    let entries: Vec<String> = dims
        .iter()
        .map(|d| match d.len() {
            0 => "_".to_string(),
            1 => name(&d[0]).to_string(),
            _ => format!("({})", d.iter().map(name).collect::<Vec<_>>().join(",")),
        })
        .collect();
    format!("[{}]", entries.join(", "))
}

/// Displays the op with its attributes, as in the text IR: `softmax{axis=3}`.
impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[u64]| {
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        match self {
            Op::Input { name } | Op::Param { name } => write!(f, "{} {}", self.name(), name),
            Op::State { name, init } => write!(f, "{} {}{}", self.name(), name, init),
            Op::Scalar {
                op,
                value,
                scalar_lhs,
            } => {
                let side = if *scalar_lhs { "lhs" } else { "rhs" };
                write!(f, "{}_scalar{{{}={}}}", op.name(), side, fmt_f64(*value))
            }
            Op::Softmax { axis } => write!(f, "softmax{{axis={axis}}}"),
            Op::LayerNorm { eps } | Op::RmsNorm { eps } => {
                write!(f, "{}{{eps={}}}", self.name(), fmt_f64(*eps))
            }
            Op::Reduce { op, axis, keepdims } => {
                write!(f, "{}{{axis={axis},keepdims={keepdims}}}", op.name())
            }
            Op::Transpose { perm } => {
                let p: Vec<u64> = perm.iter().map(|&x| x as u64).collect();
                write!(f, "transpose{{perm=[{}]}}", list(&p))
            }
            Op::Reshape { shape } => write!(f, "reshape{{shape=[{}]}}", list(shape)),
            Op::Split { axis, sizes } => write!(f, "split{{axis={axis},sizes=[{}]}}", list(sizes)),
            Op::Concat { axis } => write!(f, "concat{{axis={axis}}}"),
            Op::Slice { axis, start, end } => {
                write!(f, "slice{{axis={axis},start={start},end={end}}}")
            }
            Op::Cast { to } => write!(f, "cast{{to={to}}}"),
            Op::FullLike { value } => write!(f, "full_like{{value={}}}", fmt_f64(*value)),
            Op::BroadcastTo { shape } => write!(f, "broadcast_to{{shape=[{}]}}", list(shape)),
            Op::Fill {
                value,
                dtype,
                shape,
            } => write!(
                f,
                "fill{{value={}, {dtype}[{}]}}",
                fmt_f64(*value),
                list(shape)
            ),
            Op::ScatterAdd { rows } => write!(f, "scatter_add{{rows={rows}}}"),
            Op::OneHot { depth } => write!(f, "one_hot{{depth={depth}}}"),
            Op::AllReduce {
                axis,
                size,
                reduce,
                also,
            } => {
                write!(f, "all_reduce{{{}:{axis}={size}", reduce.name())?;
                for (a, n) in also {
                    write!(f, ",{a}={n}")?;
                }
                f.write_str("}")
            }
            Op::AllGather { axis, size, dim } => write!(f, "all_gather{{dim={dim},{axis}={size}}}"),
            Op::ReduceScatter {
                axis,
                size,
                dim,
                reduce,
            } => write!(
                f,
                "reduce_scatter{{{}:dim={dim},{axis}={size}}}",
                reduce.name()
            ),
            Op::AllToAll {
                axis,
                size,
                split,
                concat,
            } => write!(
                f,
                "all_to_all{{split={split},concat={concat},{axis}={size}}}"
            ),
            Op::Redistribute { axes, from, to } => {
                let spec = |dims: &[Vec<usize>]| group_spec(axes, dims);
                let sizes: Vec<String> = axes.iter().map(|(n, k)| format!("{n}={k}")).collect();
                write!(
                    f,
                    "redistribute{{{} -> {},{}}}",
                    spec(from),
                    spec(to),
                    sizes.join(",")
                )
            }
            Op::ShardSlice { axis, size, dim } => {
                write!(f, "shard_slice{{dim={dim},{axis}={size}}}")
            }
            Op::KeepOnFirst { axis } => write!(f, "keep_on_first{{{axis}}}"),
            Op::VocabEmbedding { axes } | Op::TargetLogit { axes } => {
                let a: Vec<String> = axes.iter().map(|(n, k)| format!("{n}={k}")).collect();
                write!(f, "{}{{{}}}", self.name(), a.join(","))
            }
            Op::MatMul
            | Op::Binary { .. }
            | Op::Unary { .. }
            | Op::Embedding
            | Op::CrossEntropy
            | Op::CausalMask
            | Op::UnaryGrad { .. }
            | Op::Equal
            | Op::Select => f.write_str(self.name()),
        }
    }
}
