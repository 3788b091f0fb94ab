//! The reference interpreter on hand-built graphs (a tiny GPT, an MLP) and on bad leaves.

use super::*;
use crate::exec::init::{generate_inputs, generate_params};
use crate::exec::kernels as k;
use crate::ir::infer::infer;
use crate::ir::{BinaryOp, Dtype, Output, ReduceOp, TensorType, UnaryOp, ValueId};
use crate::span::Span;

/// Builds graphs with inferred result types.
struct B(Graph);

impl B {
    fn leaf(&mut self, op: Op, dtype: Dtype, shape: &[u64]) -> ValueId {
        let root = self.0.root();
        let ty = TensorType::new(dtype, shape.to_vec());
        let n = self.0.add_node(op, vec![], vec![ty], Span::default(), root);
        self.0.node(n).outputs[0]
    }
    fn param(&mut self, name: &str, shape: &[u64]) -> ValueId {
        self.leaf(Op::Param { name: name.into() }, Dtype::F32, shape)
    }
    fn input(&mut self, name: &str, dtype: Dtype, shape: &[u64]) -> ValueId {
        self.leaf(Op::Input { name: name.into() }, dtype, shape)
    }
    fn ops(&mut self, op: Op, args: &[ValueId]) -> Vec<ValueId> {
        let tys: Vec<&TensorType> = args.iter().map(|&v| self.0.ty(v)).collect();
        let out = infer(&op, &tys).unwrap();
        let root = self.0.root();
        let n = self
            .0
            .add_node(op, args.to_vec(), out, Span::default(), root);
        self.0.node(n).outputs.clone()
    }
    fn op(&mut self, op: Op, args: &[ValueId]) -> ValueId {
        self.ops(op, args)[0]
    }
    fn bin(&mut self, op: BinaryOp, a: ValueId, b: ValueId) -> ValueId {
        self.op(Op::Binary { op }, &[a, b])
    }
    fn output(&mut self, name: &str, value: ValueId) {
        self.0.add_output(Output {
            name: name.into(),
            value,
            annotation: None,
            span: Span::default(),
            like: None,
        });
    }
}

const V: u64 = 64;

/// One causal attention layer with a tied LM head and a mean cross-entropy loss:
/// B=2, S=5, H=8, two heads (split/concat on the head dim), V=64.
fn tiny_gpt() -> Graph {
    let (b, s, h) = (2, 5, 8);
    let mut g = B(Graph::new("tiny"));
    let tokens = g.input("tokens", Dtype::I32, &[b, s]);
    let labels = g.input("labels", Dtype::I32, &[b, s]);
    let wte = g.param("wte", &[V, h]);
    let ln_g = g.param("ln_g", &[h]);
    let ln_b = g.param("ln_b", &[h]);
    let wqkv = g.param("wqkv", &[h, 3 * h]);
    let x = g.op(Op::Embedding, &[tokens, wte]);
    let n = g.op(Op::LayerNorm { eps: 1e-5 }, &[x, ln_g, ln_b]);
    let qkv = g.op(Op::MatMul, &[n, wqkv]);
    let qkv = g.ops(
        Op::Split {
            axis: 2,
            sizes: vec![h; 3],
        },
        &[qkv],
    );
    let heads = |g: &mut B, v| {
        let r = g.op(
            Op::Reshape {
                shape: vec![b, s, 2, h / 2],
            },
            &[v],
        );
        g.op(
            Op::Transpose {
                perm: vec![0, 2, 1, 3],
            },
            &[r],
        )
    };
    let (q, kk, vv) = (
        heads(&mut g, qkv[0]),
        heads(&mut g, qkv[1]),
        heads(&mut g, qkv[2]),
    );
    let kt = g.op(
        Op::Transpose {
            perm: vec![0, 1, 3, 2],
        },
        &[kk],
    );
    let att = g.op(Op::MatMul, &[q, kt]);
    let att = g.op(
        Op::Scalar {
            op: BinaryOp::Mul,
            value: 0.5,
            scalar_lhs: false,
        },
        &[att],
    );
    let att = g.op(Op::CausalMask, &[att]);
    let p = g.op(Op::Softmax { axis: 3 }, &[att]);
    let ctx = g.op(Op::MatMul, &[p, vv]);
    let parts = g.ops(
        Op::Split {
            axis: 1,
            sizes: vec![1, 1],
        },
        &[ctx],
    );
    let ctx = g.op(Op::Concat { axis: 3 }, &[parts[0], parts[1]]);
    let ctx = g.op(
        Op::Reshape {
            shape: vec![b, s, h],
        },
        &[ctx],
    );
    let y = g.bin(BinaryOp::Add, x, ctx);
    let y = g.op(Op::Unary { op: UnaryOp::Gelu }, &[y]);
    let head = g.op(Op::Transpose { perm: vec![1, 0] }, &[wte]);
    let logits = g.op(Op::MatMul, &[y, head]);
    let loss = g.op(Op::CrossEntropy, &[logits, labels]);
    let m = g.op(
        Op::Reduce {
            op: ReduceOp::Max,
            axis: 2,
            keepdims: false,
        },
        &[logits],
    );
    g.output("loss", loss);
    g.output("max_logit", m);
    g.output("wte", wte);
    g.0
}

#[test]
fn tiny_gpt_runs_deterministically() {
    let g = tiny_gpt();
    crate::ir::verify::verify(&g, "test").unwrap();
    let params = generate_params(&g, 0, V);
    let inputs = generate_inputs(&g, 0, V);
    let out = run(&g, &params, &inputs).unwrap();
    let loss = out["loss"].as_f32().unwrap()[[]];
    assert!((loss - (V as f32).ln()).abs() < 1.0, "loss {loss}");
    assert_eq!(out["max_logit"].shape(), &[2, 5]);
    assert_eq!(out["wte"], params["wte"]);
    assert_eq!(run(&g, &params, &inputs).unwrap(), out);
}

#[test]
fn mlp_matches_the_kernels_by_hand() {
    let mut g = B(Graph::new("mlp"));
    let x = g.input("x", Dtype::F32, &[2, 3, 8]);
    let (w1, b1) = (g.param("w1", &[8, 32]), g.param("b1", &[32]));
    let (w2, b2) = (g.param("w2", &[32, 8]), g.param("b2", &[8]));
    let h = g.op(Op::MatMul, &[x, w1]);
    let h = g.bin(BinaryOp::Add, h, b1);
    let h = g.op(Op::Unary { op: UnaryOp::Gelu }, &[h]);
    let y = g.op(Op::MatMul, &[h, w2]);
    let y = g.bin(BinaryOp::Add, y, b2);
    g.output("y", y);
    let g = g.0;
    let params = generate_params(&g, 1, 0);
    let inputs = generate_inputs(&g, 1, 0);
    let out = run(&g, &params, &inputs).unwrap();
    let p = |n: &str| params[n].as_f32().unwrap().clone();
    let x = inputs["x"].as_f32().unwrap();
    let h = k::binary_f32(BinaryOp::Add, &k::matmul(x, &p("w1")).unwrap(), &p("b1")).unwrap();
    let h = k::unary_f32(UnaryOp::Gelu, &h);
    let y = k::binary_f32(BinaryOp::Add, &k::matmul(&h, &p("w2")).unwrap(), &p("b2")).unwrap();
    assert_eq!(out["y"], Tensor::F32(y));
}

#[test]
fn missing_and_mistyped_leaves_are_errors() {
    let g = tiny_gpt();
    let mut params = generate_params(&g, 0, V);
    let mut inputs = generate_inputs(&g, 0, V);
    let wte = params.remove("wte").unwrap();
    assert_eq!(
        run(&g, &params, &inputs),
        Err(ExecError::MissingParam("wte".into()))
    );
    params.insert(
        "wte".into(),
        Tensor::F32(ndarray::ArrayD::zeros(vec![3, 3])),
    );
    assert!(matches!(
        run(&g, &params, &inputs),
        Err(ExecError::WrongType { .. })
    ));
    params.insert("wte".into(), wte);
    let tokens = inputs.remove("tokens").unwrap();
    assert_eq!(
        run(&g, &params, &inputs),
        Err(ExecError::MissingInput("tokens".into()))
    );
    inputs.insert("tokens".into(), k::cast(&tokens, Dtype::F32));
    assert!(matches!(
        run(&g, &params, &inputs),
        Err(ExecError::WrongType { .. })
    ));
}

#[test]
fn out_of_range_ids_and_labels_are_errors() {
    let g = tiny_gpt();
    let params = generate_params(&g, 0, V);
    let too_big = generate_inputs(&g, 0, 10 * V);
    let err = run(&g, &params, &too_big).unwrap_err();
    assert!(
        matches!(err, ExecError::IdOutOfRange { vocab: 64, .. }),
        "{err}"
    );
    let mut inputs = generate_inputs(&g, 0, V);
    inputs.insert("labels".into(), too_big["labels"].clone());
    let err = run(&g, &params, &inputs).unwrap_err();
    assert!(
        matches!(err, ExecError::LabelOutOfRange { classes: 64, .. }),
        "{err}"
    );
}

#[test]
fn liveness_keeps_outputs_and_frees_the_rest() {
    let g = tiny_gpt();
    let live = Liveness::of(&g);
    for o in g.outputs() {
        assert_eq!(live.last_use(o.value), Some(g.num_nodes()));
    }
    for (v, val) in g.values() {
        if g.outputs().iter().all(|o| o.value != v) {
            let dies = (0..g.num_nodes()).find(|&i| live.dies_at(v, i)).unwrap();
            assert!(dies >= val.node.index());
        }
    }
}
