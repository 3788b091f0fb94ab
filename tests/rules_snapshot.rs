//! The sharding rule of every op of the language on a representative shape, in einsum form, as
//! one snapshot (`snapshots/rules_every_op.snap`). A new op fails to compile `kind` below until
//! it is given an example here; each rule is also checked against its types.

use tpc::ir::infer::infer;
use tpc::ir::{BinaryOp, Dtype, Op, ReduceOp, TensorType, UnaryOp};
use tpc::sharding::rules::rule;

fn f(shape: &[u64]) -> TensorType {
    TensorType::new(Dtype::F32, shape.to_vec())
}

fn i(shape: &[u64]) -> TensorType {
    TensorType::new(Dtype::I32, shape.to_vec())
}

/// The variant's name; exhaustive, so that a new op must be placed here (and given an example,
/// or listed as having no rule).
fn kind(op: &Op) -> Option<&'static str> {
    Some(match op {
        Op::MatMul => "matmul",
        Op::Binary { .. } => "binary",
        Op::Scalar { .. } => "scalar",
        Op::Unary { .. } => "unary",
        Op::Softmax { .. } => "softmax",
        Op::LayerNorm { .. } => "layernorm",
        Op::RmsNorm { .. } => "rmsnorm",
        Op::Reduce { .. } => "reduce",
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
        Op::Fill { .. } => "fill",
        Op::BroadcastTo { .. } => "broadcast_to",
        Op::UnaryGrad { .. } => "unary_grad",
        Op::Equal => "equal",
        Op::Select => "select",
        Op::ScatterAdd { .. } => "scatter_add",
        Op::OneHot { .. } => "one_hot",
        // leaves and the SPMD-only ops have no rule
        Op::Input { .. }
        | Op::Param { .. }
        | Op::State { .. }
        | Op::AllReduce { .. }
        | Op::AllGather { .. }
        | Op::ReduceScatter { .. }
        | Op::AllToAll { .. }
        | Op::Redistribute { .. }
        | Op::ShardSlice { .. }
        | Op::KeepOnFirst { .. }
        | Op::VocabEmbedding { .. }
        | Op::TargetLogit { .. } => return None,
    })
}

/// Every op with operand types: B=2, S=8, H=16, F=64, V=32.
fn examples() -> Vec<(Op, Vec<TensorType>)> {
    let (bsh, hf) = (f(&[2, 8, 16]), f(&[16, 64]));
    let mut v = vec![
        (Op::MatMul, vec![bsh.clone(), hf.clone()]),
        (Op::MatMul, vec![f(&[2, 4, 8, 16]), f(&[2, 4, 16, 8])]),
        (Op::MatMul, vec![f(&[16]), hf.clone()]),
    ];
    for op in [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Max,
    ] {
        v.push((Op::Binary { op }, vec![bsh.clone(), f(&[16])]));
    }
    v.push((
        Op::Binary { op: BinaryOp::Add },
        vec![f(&[2, 8, 1]), bsh.clone()],
    ));
    for (op, scalar_lhs) in [
        (BinaryOp::Mul, false),
        (BinaryOp::Div, false),
        (BinaryOp::Div, true),
    ] {
        v.push((
            Op::Scalar {
                op,
                value: 2.0,
                scalar_lhs,
            },
            vec![bsh.clone()],
        ));
    }
    use UnaryOp::*;
    for op in [
        Gelu, Relu, Silu, Tanh, Exp, Log, Neg, Sqrt, Rsqrt, Recip, NonFinite,
    ] {
        v.push((Op::Unary { op }, vec![bsh.clone()]));
    }
    let norm = vec![bsh.clone(), f(&[16]), f(&[16])];
    v.extend([
        (Op::Softmax { axis: 2 }, vec![bsh.clone()]),
        (Op::LayerNorm { eps: 1e-5 }, norm.clone()),
        (Op::RmsNorm { eps: 1e-6 }, norm[..2].to_vec()),
    ]);
    for (op, keepdims) in [
        (ReduceOp::Sum, false),
        (ReduceOp::Mean, true),
        (ReduceOp::Max, false),
    ] {
        v.push((
            Op::Reduce {
                op,
                axis: 1,
                keepdims,
            },
            vec![bsh.clone()],
        ));
    }
    v.extend([
        (
            Op::Transpose {
                perm: vec![0, 2, 1],
            },
            vec![bsh.clone()],
        ),
        (
            Op::Reshape {
                shape: vec![2, 8, 4, 4],
            },
            vec![bsh.clone()],
        ),
        (
            Op::Reshape {
                shape: vec![16, 16],
            },
            vec![bsh.clone()],
        ),
        (
            Op::Split {
                axis: 2,
                sizes: vec![8, 8],
            },
            vec![bsh.clone()],
        ),
        (Op::Concat { axis: 2 }, vec![bsh.clone(), bsh.clone()]),
        (
            Op::Slice {
                axis: 1,
                start: 2,
                end: 6,
            },
            vec![bsh.clone()],
        ),
        (Op::Embedding, vec![i(&[2, 8]), f(&[32, 16])]),
        (Op::CrossEntropy, vec![f(&[2, 8, 32]), i(&[2, 8])]),
        (Op::CausalMask, vec![f(&[2, 4, 8, 8])]),
        (Op::Cast { to: Dtype::Bf16 }, vec![bsh.clone()]),
        (Op::FullLike { value: 1.0 }, vec![f(&[])]),
        (
            Op::Fill {
                value: 1.0,
                dtype: Dtype::F32,
                shape: vec![2, 8],
            },
            vec![],
        ),
        (
            Op::BroadcastTo {
                shape: vec![2, 8, 16],
            },
            vec![f(&[8, 1])],
        ),
        (
            Op::UnaryGrad { op: UnaryOp::Gelu },
            vec![bsh.clone(), bsh.clone()],
        ),
        (Op::Equal, vec![bsh.clone(), f(&[2, 8, 1])]),
        (Op::Select, vec![f(&[]), bsh.clone(), f(&[16])]),
        (Op::ScatterAdd { rows: 32 }, vec![i(&[2, 8]), bsh]),
        (Op::OneHot { depth: 32 }, vec![i(&[2, 8])]),
    ]);
    v
}

fn listing() -> String {
    let mut out = String::new();
    for (op, ins) in examples() {
        let outs = infer(&op, &ins.iter().collect::<Vec<_>>()).expect("a valid example");
        let (ins_r, outs_r): (Vec<_>, Vec<_>) = (ins.iter().collect(), outs.iter().collect());
        let r = rule(&op, &ins_r, &outs_r).expect("every op of the language has a rule");
        r.check(&ins_r, &outs_r, !matches!(op, Op::Reshape { .. }))
            .unwrap_or_else(|e| panic!("{op}: {e}"));
        let types = |t: &[TensorType]| t.iter().map(|t| t.to_string()).collect::<Vec<_>>();
        out.push_str(&format!(
            "{op}({}) -> {}\n    {r}\n",
            types(&ins).join(", "),
            types(&outs).join(", ")
        ));
    }
    out
}

#[test]
fn every_op_of_the_language_has_an_example() {
    let covered: std::collections::BTreeSet<_> =
        examples().iter().filter_map(|(op, _)| kind(op)).collect();
    let all = [
        "matmul",
        "binary",
        "scalar",
        "unary",
        "softmax",
        "layernorm",
        "rmsnorm",
        "reduce",
        "transpose",
        "reshape",
        "split",
        "concat",
        "slice",
        "embedding",
        "cross_entropy",
        "causal_mask",
        "cast",
        "full_like",
        "fill",
        "broadcast_to",
        "unary_grad",
        "equal",
        "select",
        "scatter_add",
        "one_hot",
    ];
    assert_eq!(covered, all.into_iter().collect());
}

#[test]
fn rules_of_every_op() {
    insta::with_settings!({
        snapshot_path => "../snapshots",
        prepend_module_to_snapshot => false,
        omit_expression => true,
    }, {
        insta::assert_snapshot!("rules_every_op", listing());
    });
}
