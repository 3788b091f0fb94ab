//! Behaviour of lowering on small sources: hierarchical param names, block instances and regions,
//! `repeat`, dim overrides, broadcasting, scalar ops, multi-target assignment, the two `max`es,
//! annotations, outputs, and the size of the GPT example as a function of its depth.

use std::collections::{BTreeMap, BTreeSet};
use tpc::diag::SourceFile;
use tpc::driver::{compile_global, Error};
use tpc::ir::{BinaryOp, Graph, Op, ReduceOp, RegionId, Spec, UnaryOp, ValueId};
use tpc::lower::LowerError;

/// Compiles `text` (named `t.tpl`) with the dim overrides; panics with the rendering on error.
fn compile_with(text: &str, overrides: &[(&str, i64)]) -> Graph {
    let src = SourceFile::new("t.tpl", text);
    let ov: Vec<(String, i64)> = overrides.iter().map(|(n, v)| (n.to_string(), *v)).collect();
    compile_global(&src, &ov).unwrap_or_else(|e| panic!("{}", e.render(Some(&src))))
}

fn compile(text: &str) -> Graph {
    compile_with(text, &[])
}

/// The lowering error of `text`, with its rendering.
fn lower_error(text: &str) -> (LowerError, String) {
    let src = SourceFile::new("t.tpl", text);
    match compile_global(&src, &[]) {
        Ok(g) => panic!("compiled:\n{}", tpc::emit::text::print(&g)),
        Err(Error::Lower(e)) => {
            let out = Error::Lower(e.clone()).render(Some(&src));
            (e, out)
        }
        Err(e) => panic!("not a lowering error: {}", e.render(Some(&src))),
    }
}

fn example(name: &str) -> String {
    let path = format!("{}/examples/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn param_names(g: &Graph) -> Vec<String> {
    g.params().map(|(n, _)| n.to_string()).collect()
}

/// The value bound to the output `name`.
fn output(g: &Graph, name: &str) -> ValueId {
    g.outputs()
        .iter()
        .find(|o| o.name == name)
        .unwrap_or_else(|| panic!("no output {name}"))
        .value
}

/// The op producing `v`.
fn producer(g: &Graph, v: ValueId) -> &Op {
    &g.node(g.value(v).node).op
}

fn shape(g: &Graph, v: ValueId) -> Vec<u64> {
    g.ty(v).shape.clone()
}

/// The region with instance path `path`.
fn region(g: &Graph, path: &str) -> RegionId {
    g.regions()
        .find(|(_, r)| r.path == path)
        .unwrap_or_else(|| {
            let paths: Vec<_> = g.regions().map(|(_, r)| r.path.clone()).collect();
            panic!("no region {path}; regions: {paths:?}")
        })
        .0
}

/// True when region `r` is `ancestor` or lies inside it.
fn within(g: &Graph, mut r: RegionId, ancestor: RegionId) -> bool {
    loop {
        if r == ancestor {
            return true;
        }
        match g.region(r).parent {
            Some(p) => r = p,
            None => return false,
        }
    }
}

fn spec(dims: &[&str]) -> Spec {
    Spec {
        dims: dims
            .iter()
            .map(|d| match *d {
                "_" => vec![],
                a => vec![a.to_string()],
            })
            .collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// Names, instances, regions

const LAYERS: &str = "
mesh tp
dim B = 2, H = 8, L = 3
block mlp(x: f32[B, H]) -> f32[B, H] {
    param w : f32[H, H] @ [_, tp]
    return gelu(x @ w)
}
block attention(x: f32[B, H]) -> f32[B, H] {
    param wq : f32[H, H] @ [_, tp]
    return softmax(x @ wq)
}
block layer(x: f32[B, H]) -> f32[B, H] {
    param g : f32[H]
    h = x + attention(x * g)
    return mlp(h) + mlp(h)
}
input x : f32[B, H]
y = repeat(L, layer, x)
output y
";

#[test]
fn param_names_are_hierarchical() {
    let g = compile(LAYERS);
    let names = param_names(&g);
    let expected: Vec<String> = (0..3)
        .flat_map(|i| {
            [
                format!("layer.{i}.g"),
                format!("layer.{i}.attention.wq"),
                format!("layer.{i}.mlp.0.w"),
                format!("layer.{i}.mlp.1.w"),
            ]
        })
        .collect();
    assert_eq!(names, expected);
    // Every param name is unique.
    assert_eq!(names.iter().collect::<BTreeSet<_>>().len(), names.len());
}

#[test]
fn gpt_params_follow_the_layer_path() {
    let g = compile_with(&example("gpt.tpl"), &[("L", 4)]);
    let names = param_names(&g);
    for want in [
        "wte",
        "wpe",
        "layer.0.ln1_g",
        "layer.3.attention.wq",
        "layer.3.attention.bo",
        "layer.2.mlp.w1",
        "lnf_b",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
    }
    assert!(!names.iter().any(|n| n.starts_with("layer.4")), "{names:?}");
    assert_eq!(names.iter().collect::<BTreeSet<_>>().len(), names.len());
}

#[test]
fn a_block_called_twice_in_one_scope_is_numbered() {
    let g = compile(
        "
dim H = 4
block mlp(x: f32[H]) -> f32[H] {
    param w : f32[H, H]
    return x @ w
}
block once(x: f32[H]) -> f32[H] {
    param v : f32[H]
    return x * v
}
input x : f32[H]
y = mlp(once(x)) + mlp(x)
output y
",
    );
    assert_eq!(param_names(&g), ["once.v", "mlp.0.w", "mlp.1.w"]);
    let paths: Vec<String> = g.regions().skip(1).map(|(_, r)| r.path.clone()).collect();
    assert_eq!(paths, ["once", "mlp.0", "mlp.1"]);
}

#[test]
fn repeat_creates_chained_instances() {
    let g = compile(LAYERS);
    let root = g.root();
    let layers: Vec<RegionId> = (0..3).map(|i| region(&g, &format!("layer.{i}"))).collect();
    for (i, &r) in layers.iter().enumerate() {
        let reg = g.region(r);
        assert_eq!(reg.block, "layer");
        assert_eq!(reg.parent, Some(root));
        // The instance reads the previous instance's result (or the input for the first one),
        // and nothing else from outside itself.
        let mut outside = BTreeSet::new();
        for (_, n) in g.nodes().filter(|(_, n)| within(&g, n.region, r)) {
            for &v in &n.inputs {
                let from = g.node(g.value(v).node).region;
                if !within(&g, from, r) {
                    outside.insert(from);
                }
            }
        }
        let expected = if i == 0 { root } else { layers[i - 1] };
        assert_eq!(
            outside.into_iter().collect::<Vec<_>>(),
            [expected],
            "layer.{i}"
        );
    }
    // The output is the last instance's result.
    let y = output(&g, "y");
    assert_eq!(g.node(g.value(y).node).region, layers[2]);
    assert_eq!(
        g.regions().filter(|(_, r)| r.block == "layer").count(),
        3,
        "exactly L instances"
    );
}

#[test]
fn repeat_once_still_numbers_the_instance() {
    let g = compile_with(LAYERS, &[("L", 1)]);
    assert!(param_names(&g).contains(&"layer.0.g".to_string()));
}

#[test]
fn instances_of_one_block_share_their_body() {
    let g = compile(LAYERS);
    let mut bodies: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    for (_, r) in g.regions().skip(1) {
        bodies.entry(r.block.clone()).or_default().insert(r.body);
    }
    assert_eq!(
        bodies.keys().collect::<Vec<_>>(),
        ["attention", "layer", "mlp"]
    );
    for (block, b) in &bodies {
        assert_eq!(b.len(), 1, "{block}: {b:?}");
    }
    let all: BTreeSet<u32> = bodies.values().flatten().copied().collect();
    assert_eq!(all.len(), 3, "distinct blocks have distinct bodies");
    assert!(!all.contains(&g.region(g.root()).body));
    // Instances stamped from one body have the same ops, in the same order.
    let ops = |path: &str| -> Vec<String> {
        let r = region(&g, path);
        g.nodes()
            .filter(|(_, n)| within(&g, n.region, r))
            .map(|(_, n)| match &n.op {
                Op::Param { .. } => "param".to_string(),
                op => op.to_string(),
            })
            .collect()
    };
    assert_eq!(ops("layer.0"), ops("layer.2"));
    assert_eq!(ops("layer.1.mlp.0"), ops("layer.2.mlp.1"));
}

#[test]
fn one_block_with_two_argument_shapes_has_two_bodies() {
    let g = compile(
        "
block act(x: f32[2, 2]) {
    return gelu(x)
}
block act2(x: f32[2, 4]) {
    return gelu(x)
}
input a : f32[2, 2]
input b : f32[2, 4]
y = act(a) + act(a)
z = act2(b)
output y, z
",
    );
    let act: BTreeSet<u32> = g
        .regions()
        .filter(|(_, r)| r.block == "act")
        .map(|(_, r)| r.body)
        .collect();
    let act2: BTreeSet<u32> = g
        .regions()
        .filter(|(_, r)| r.block == "act2")
        .map(|(_, r)| r.body)
        .collect();
    assert_eq!(act.len(), 1);
    assert_eq!(act2.len(), 1);
    assert_ne!(act, act2);
}

#[test]
fn every_node_belongs_to_an_existing_region() {
    let g = compile(LAYERS);
    let n_regions = g.regions().len();
    assert_eq!(n_regions, 1 + 3 * (1 + 1 + 2));
    for (_, n) in g.nodes() {
        assert!(n.region.index() < n_regions);
    }
}

// ---------------------------------------------------------------------------------------------
// Dims

#[test]
fn set_recomputes_derived_dims() {
    let text = example("attention.tpl");
    let g = compile(&text);
    assert!(g.dims.contains(&("D".to_string(), 8)), "{:?}", g.dims);
    let g = compile_with(&text, &[("H", 128)]);
    assert!(g.dims.contains(&("H".to_string(), 128)), "{:?}", g.dims);
    assert!(g.dims.contains(&("D".to_string(), 16)), "{:?}", g.dims);
    assert_eq!(shape(&g, output(&g, "y")), [2, 16, 128]);
    let reshapes: Vec<Vec<u64>> = g
        .nodes()
        .filter_map(|(_, n)| match &n.op {
            Op::Reshape { shape } => Some(shape.clone()),
            _ => None,
        })
        .collect();
    assert!(reshapes.contains(&vec![2, 16, 8, 16]), "{reshapes:?}");
    let g = compile_with(&text, &[("NH", 4), ("S", 32)]);
    assert!(g.dims.contains(&("D".to_string(), 16)), "{:?}", g.dims);
    assert_eq!(shape(&g, output(&g, "y")), [2, 32, 64]);
}

#[test]
fn dims_keep_their_declaration_order() {
    let g = compile("dim B = 2, H = 4\ndim D = H / B\ninput x : f32[D]\noutput x\n");
    assert_eq!(
        g.dims,
        [
            ("B".to_string(), 2),
            ("H".to_string(), 4),
            ("D".to_string(), 2)
        ]
    );
}

#[test]
fn set_of_an_unknown_or_non_positive_dim_is_an_error() {
    let src = SourceFile::new("t.tpl", example("mlp.tpl"));
    for ov in [("Q", 3), ("H", 0), ("H", -4)] {
        let err = compile_global(&src, &[(ov.0.to_string(), ov.1)]).unwrap_err();
        assert!(
            matches!(err, Error::Lower(LowerError::BadSet { .. })),
            "{ov:?}: {err:?}"
        );
    }
}

#[test]
fn a_derived_dim_that_stops_dividing_is_an_error() {
    let src = SourceFile::new("t.tpl", example("attention.tpl"));
    let err = compile_global(&src, &[("H".to_string(), 60)]).unwrap_err();
    let out = err.render(Some(&src));
    assert!(out.starts_with("error[bad_dim]"), "{out}");
    assert!(out.contains("60 / 8 is not exact"), "{out}");
    assert!(out.contains("--> t.tpl:5:9"), "{out}");
}

// ---------------------------------------------------------------------------------------------
// Operators

#[test]
fn add_broadcasts() {
    let g = compile(
        "
input x : f32[2, 3, 4]
input b : f32[4]
input c : f32[3, 1]
y = x + b
z = x + c
output y, z
",
    );
    let y = output(&g, "y");
    assert_eq!(producer(&g, y), &Op::Binary { op: BinaryOp::Add });
    assert_eq!(shape(&g, y), [2, 3, 4]);
    assert_eq!(shape(&g, output(&g, "z")), [2, 3, 4]);
}

#[test]
fn incompatible_broadcast_is_a_shape_error() {
    let (e, out) = lower_error("input a : f32[3]\ninput b : f32[4]\ny = a + b\noutput y\n");
    assert!(matches!(e, LowerError::ShapeMismatch { .. }), "{out}");
    assert!(out.contains("f32[3]") && out.contains("f32[4]"), "{out}");
}

#[test]
fn scalar_ops() {
    let g = compile(
        "
dim H = 4
input x : f32[2, H]
a = x * 0.5
b = 1.0 - x
c = x / H
d = x * (2 * 3)
e = -x
f = x + 1e-5
output a, b, c, d, e, f
",
    );
    let scalar = |name: &str| producer(&g, output(&g, name)).clone();
    assert_eq!(
        scalar("a"),
        Op::Scalar {
            op: BinaryOp::Mul,
            value: 0.5,
            scalar_lhs: false
        }
    );
    assert_eq!(
        scalar("b"),
        Op::Scalar {
            op: BinaryOp::Sub,
            value: 1.0,
            scalar_lhs: true
        }
    );
    assert_eq!(
        scalar("c"),
        Op::Scalar {
            op: BinaryOp::Div,
            value: 4.0,
            scalar_lhs: false
        }
    );
    // Constants fold before they meet the tensor: one node.
    assert_eq!(
        scalar("d"),
        Op::Scalar {
            op: BinaryOp::Mul,
            value: 6.0,
            scalar_lhs: false
        }
    );
    assert_eq!(scalar("e"), Op::Unary { op: UnaryOp::Neg });
    assert_eq!(
        scalar("f"),
        Op::Scalar {
            op: BinaryOp::Add,
            value: 1e-5,
            scalar_lhs: false
        }
    );
    // x, then one node per output.
    assert_eq!(g.num_nodes(), 7);
    for o in g.outputs() {
        assert_eq!(shape(&g, o.value), [2, 4]);
    }
}

#[test]
fn a_constant_cannot_be_assigned() {
    let (e, out) = lower_error("dim H = 2\ny = H * 2\noutput y\n");
    assert!(matches!(e, LowerError::Invalid { .. }), "{out}");
    assert!(out.contains("compile-time scalar"), "{out}");
}

#[test]
fn matmul_of_a_scalar_is_an_error() {
    let (e, out) = lower_error("input x : f32[2]\ny = x @ 2\noutput y\n");
    assert!(matches!(e, LowerError::BadOp { .. }), "{out}");
}

#[test]
fn split_assigns_several_targets() {
    let g = compile(
        "
input qkv : f32[2, 12]
q, k, v = split(qkv, 3, axis=-1)
a, b = split(qkv, [4, 8], axis=1)
output v, q, k, a, b
",
    );
    let (q, k, v) = (output(&g, "q"), output(&g, "k"), output(&g, "v"));
    let n = g.value(q).node;
    assert_eq!(g.value(k).node, n);
    assert_eq!(g.value(v).node, n);
    assert_eq!(g.node(n).outputs, [q, k, v]);
    assert_eq!(
        g.node(n).op,
        Op::Split {
            axis: 1,
            sizes: vec![4, 4, 4]
        }
    );
    for (val, name) in [(q, "q"), (k, "k"), (v, "v")] {
        assert_eq!(g.value(val).name.as_deref(), Some(name));
        assert_eq!(shape(&g, val), [2, 4]);
    }
    assert_eq!(shape(&g, output(&g, "a")), [2, 4]);
    assert_eq!(shape(&g, output(&g, "b")), [2, 8]);
}

#[test]
fn split_with_the_wrong_number_of_targets_is_an_error() {
    let (e, out) = lower_error("input x : f32[6]\na, b = split(x, 3)\noutput a\n");
    assert!(matches!(e, LowerError::BadOp { .. }), "{out}");
    assert!(out.contains("2 name(s) on the left"), "{out}");
    let (e, out) = lower_error("input x : f32[6]\na = split(x, 3)\noutput a\n");
    assert!(matches!(e, LowerError::BadOp { .. }), "{out}");
}

#[test]
fn max_with_an_axis_reduces_and_max_of_two_tensors_is_elementwise() {
    let g = compile(
        "
input x : f32[2, 3]
input z : f32[2, 3]
r = max(x, axis=1)
p = max(x, 0)
k = max(x, axis=-1, keepdims=true)
m = max(x, z)
e = max(x, z * 2.0)
output r, p, k, m, e
",
    );
    let r = output(&g, "r");
    assert_eq!(
        producer(&g, r),
        &Op::Reduce {
            op: ReduceOp::Max,
            axis: 1,
            keepdims: false
        }
    );
    assert_eq!(shape(&g, r), [2]);
    assert_eq!(
        producer(&g, output(&g, "p")),
        &Op::Reduce {
            op: ReduceOp::Max,
            axis: 0,
            keepdims: false
        }
    );
    assert_eq!(shape(&g, output(&g, "k")), [2, 1]);
    for name in ["m", "e"] {
        let v = output(&g, name);
        assert_eq!(producer(&g, v), &Op::Binary { op: BinaryOp::Max });
        assert_eq!(shape(&g, v), [2, 3]);
    }
}

/// `sum(x, -1)` reduces the last axis, but `max(x, -1)` is taken for the elementwise max of two
/// tensors because `-1` is not a bare number, and fails with "expected a tensor".
#[test]

fn max_with_a_negative_positional_axis_reduces() {
    let g = compile("input x : f32[2, 3]\nr = max(x, -1)\noutput r\n");
    assert_eq!(
        producer(&g, output(&g, "r")),
        &Op::Reduce {
            op: ReduceOp::Max,
            axis: 1,
            keepdims: false
        }
    );
}

#[test]
fn sum_with_a_negative_positional_axis_reduces() {
    let g = compile("input x : f32[2, 3]\nr = sum(x, -1)\noutput r\n");
    assert_eq!(
        producer(&g, output(&g, "r")),
        &Op::Reduce {
            op: ReduceOp::Sum,
            axis: 1,
            keepdims: false
        }
    );
}

// ---------------------------------------------------------------------------------------------
// Annotations and outputs

#[test]
fn annotations_land_on_the_right_values() {
    let g = compile(
        "
mesh dp, tp
dim B = 2, S = 4, H = 8
input x : f32[B, S, H] @ [dp, _, _]
param w : f32[H, H] @ [_, tp]
param b : f32[H]
h = x @ w @ [dp, _, tp]
y = h + b
q, k = split(y, 2) @ [dp, _, _]
output y @ [(dp, tp), _, _], q, k
",
    );
    let find = |name: &str| {
        g.values()
            .find(|(_, v)| v.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no value {name}"))
            .0
    };
    let ann = |v: ValueId| g.annotation(v).map(|a| a.spec.clone());
    let (x, w, b, h, y) = (find("x"), find("w"), find("b"), find("h"), find("y"));
    assert_eq!(ann(x), Some(spec(&["dp", "_", "_"])));
    assert_eq!(ann(w), Some(spec(&["_", "tp"])));
    assert_eq!(ann(b), None);
    // The constraint is on the matmul result, not on its operands.
    assert_eq!(producer(&g, h), &Op::MatMul);
    assert_eq!(ann(h), Some(spec(&["dp", "_", "tp"])));
    // An output's spec is on the output, not on the value.
    assert_eq!(ann(y), None);
    let out_y = &g.outputs()[0];
    assert_eq!(out_y.name, "y");
    let want = Spec {
        dims: vec![vec!["dp".into(), "tp".into()], vec![], vec![]],
    };
    assert_eq!(out_y.annotation.as_ref().map(|a| &a.spec), Some(&want));
    assert!(g.outputs()[1].annotation.is_none());
    // A spec after a multi-target assignment applies to every target.
    for name in ["q", "k"] {
        assert_eq!(
            ann(output(&g, name)),
            Some(spec(&["dp", "_", "_"])),
            "{name}"
        );
    }
    assert_eq!(g.annotations().len(), 5);
    // Every annotation's span points at its `[...]` in the source.
    let text = "
mesh dp, tp
dim B = 2, S = 4, H = 8
input x : f32[B, S, H] @ [dp, _, _]
";
    let a = g.annotation(x).unwrap();
    assert_eq!(
        &text[a.span.start as usize..a.span.end as usize],
        "[dp, _, _]"
    );
    assert_eq!((a.span.line, a.span.col), (4, 26));
}

#[test]
fn annotations_inside_a_block_are_copied_to_every_instance() {
    let g = compile(LAYERS);
    for i in 0..3 {
        for j in 0..2 {
            let name = format!("layer.{i}.mlp.{j}.w");
            let (_, v) = g.params().find(|(n, _)| *n == name).unwrap();
            assert_eq!(
                g.annotation(v).map(|a| a.spec.clone()),
                Some(spec(&["_", "tp"])),
                "{name}"
            );
        }
    }
}

#[test]
fn the_same_annotation_twice_is_accepted() {
    let g = compile("mesh tp\ninput x : f32[4] @ [tp]\ny = x @ [tp]\noutput y\n");
    assert_eq!(g.annotations().len(), 1);
}

/// Inside a block, `y = x @ [tp]` annotates the block's argument; the annotation is recorded on
/// the template's placeholder, which stamping skips, so it vanishes from the program.
#[test]

fn an_annotation_on_a_block_argument_is_kept() {
    let g = compile(
        "
mesh tp
dim H = 4
block f(x: f32[H]) -> f32[H] {
    y = x @ [tp]
    return gelu(y)
}
input a : f32[H]
b = f(a)
output b
",
    );
    assert_eq!(g.annotations().len(), 1, "{}", tpc::emit::text::print(&g));
}

#[test]
fn outputs_keep_their_order() {
    let g = compile(
        "
input x : f32[2]
a = gelu(x)
b = relu(x)
c = tanh(x)
output c, a
output x
output b
",
    );
    let names: Vec<&str> = g.outputs().iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["c", "a", "x", "b"]);
    assert_eq!(output(&g, "x"), g.inputs().next().unwrap().1);
}

#[test]
fn an_output_named_twice_is_a_redefinition() {
    let (e, _) = lower_error("input x : f32[2]\noutput x, x\n");
    assert!(matches!(e, LowerError::Redefinition { .. }), "{e:?}");
}

#[test]
fn rebinding_an_assigned_name_is_allowed_but_not_a_leaf() {
    let g = compile("input x : f32[2]\nh = gelu(x)\nh = relu(h)\noutput h\n");
    assert_eq!(
        producer(&g, output(&g, "h")),
        &Op::Unary { op: UnaryOp::Relu }
    );
    let (e, _) = lower_error("input x : f32[2]\nx = gelu(x)\noutput x\n");
    assert!(matches!(e, LowerError::Redefinition { .. }), "{e:?}");
}

// ---------------------------------------------------------------------------------------------
// Size

#[test]
fn gpt_grows_linearly_with_the_number_of_layers() {
    let text = example("gpt.tpl");
    let count = |l: i64| {
        let g = compile_with(&text, &[("L", l)]);
        assert_eq!(
            g.regions().filter(|(_, r)| r.block == "layer").count() as i64,
            l
        );
        (
            g.num_nodes() as i64,
            g.num_values() as i64,
            g.params().count() as i64,
        )
    };
    let sizes: Vec<(i64, i64, i64)> = [1, 2, 4, 8].into_iter().map(count).collect();
    let (n1, v1, p1) = sizes[0];
    let (n2, v2, p2) = sizes[1];
    let per_layer = (n2 - n1, v2 - v1, p2 - p1);
    assert!(per_layer.0 > 0 && per_layer.2 > 0);
    for (l, &(n, v, p)) in [1i64, 2, 4, 8].iter().zip(&sizes) {
        assert_eq!(
            (n - n1, v - v1, p - p1),
            (
                per_layer.0 * (l - 1),
                per_layer.1 * (l - 1),
                per_layer.2 * (l - 1)
            ),
            "L={l}"
        );
    }
    // 4 norm params + 8 attention params + 4 mlp params per layer.
    assert_eq!(per_layer.2, 16);
}

/// `repeat` with the block given as the second positional argument after a keyword argument
/// (`repeat(x=h, 2, layer)`) binds correctly, but instance numbering only looks at the second
/// argument *as written*, so every instance is called `layer` and the verifier rejects the
/// duplicate param names as an internal error.
#[test]

fn repeat_with_a_keyword_argument_first_numbers_its_instances() {
    let g = compile(
        "
dim H = 4
block layer(x: f32[H]) -> f32[H] {
    param w : f32[H, H]
    return x @ w
}
input x : f32[H]
h = repeat(x=x, 2, layer)
output h
",
    );
    assert_eq!(param_names(&g), ["layer.0.w", "layer.1.w"]);
}

/// A chain of 70 distinct blocks (b0 calls b1 calls ... b69) hits the nesting limit of 64, which
/// is reported as recursion: "block `b64` calls itself (directly or through other blocks)".
#[test]

fn deep_block_nesting_is_not_reported_as_recursion() {
    let mut text = String::from("dim H = 4\n");
    for i in 0..70 {
        let body = if i < 69 {
            format!("b{}(x)", i + 1)
        } else {
            "gelu(x)".into()
        };
        text += &format!("block b{i}(x: f32[H]) -> f32[H] {{\n    return {body}\n}}\n");
    }
    text += "input a : f32[H]\ny = b0(a)\noutput y\n";
    let src = SourceFile::new("t.tpl", text);
    if let Err(e) = compile_global(&src, &[]) {
        let out = e.render(Some(&src));
        assert!(!out.contains("calls itself"), "{out}");
    }
}

#[test]
fn nested_blocks_below_the_limit_compile() {
    let mut text = String::from("dim H = 4\n");
    for i in 0..60 {
        let body = if i < 59 {
            format!("b{}(x)", i + 1)
        } else {
            "gelu(x)".into()
        };
        text += &format!("block b{i}(x: f32[H]) -> f32[H] {{\n    return {body}\n}}\n");
    }
    text += "input a : f32[H]\ny = b0(a)\noutput y\n";
    let g = compile(&text);
    let deepest = g
        .regions()
        .map(|(_, r)| r.path.clone())
        .max_by_key(|p| p.len())
        .unwrap();
    assert_eq!(deepest.split('.').count(), 60, "{deepest}");
}

// ---------------------------------------------------------------------------------------------
// Pipelined repeats

/// `LAYERS` on a mesh with a pipeline axis, its repeat pipelined over `pp`; the repeat's argument
/// is itself a block call, whose instance is not one of the pipeline's.
const PIPED: &str = "
mesh dp, pp, tp
dim B = 2, H = 8, L = 3
block mlp(x: f32[B, H]) -> f32[B, H] {
    param w : f32[H, H] @ [_, tp]
    return gelu(x @ w)
}
block attention(x: f32[B, H]) -> f32[B, H] {
    param wq : f32[H, H] @ [_, tp]
    return softmax(x @ wq)
}
block layer(x: f32[B, H]) -> f32[B, H] {
    param g : f32[H]
    h = x + attention(x * g)
    return mlp(h) + mlp(h)
}
input x : f32[B, H] @ [dp, _]
y = repeat(L, layer, mlp(x)) @ pp
output y
";

#[test]
fn a_pipelined_repeat_records_its_instances_in_order() {
    let g = compile(PIPED);
    let p = g.pipeline().expect("the repeat is pipelined");
    assert_eq!((p.axis.as_str(), p.block.as_str()), ("pp", "layer"));
    let paths: Vec<&str> = p
        .instances
        .iter()
        .map(|&r| g.region(r).path.as_str())
        .collect();
    assert_eq!(paths, ["layer.0", "layer.1", "layer.2"]);
    assert_eq!(p.output, output(&g, "y"));
    assert_eq!(g.node(g.value(p.output).node).region, p.instances[2]);
    assert_eq!((p.span.line, p.span.col), (18, 5));
    let text = &PIPED[p.span.start as usize..p.span.end as usize];
    assert_eq!(text, "repeat(L, layer, mlp(x)) @ pp");
}

/// The pipelined program is the unpipelined one, value for value.
#[test]
fn pipelining_changes_nothing_but_the_record() {
    let plain = compile(&PIPED.replace(" @ pp", ""));
    let piped = compile(PIPED);
    assert!(plain.pipeline().is_none());
    assert_eq!(tpc::emit::text::print(&plain), {
        let text = tpc::emit::text::print(&piped);
        let header: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("pipeline "))
            .collect();
        header.join("\n") + "\n"
    });
}

#[test]
fn the_pipeline_follows_the_repeat_count() {
    let g = compile_with(PIPED, &[("L", 5)]);
    assert_eq!(g.pipeline().unwrap().instances.len(), 5);
    let g = compile_with(PIPED, &[("L", 1)]);
    let p = g.pipeline().unwrap();
    assert_eq!(g.region(p.instances[0]).path, "layer.0");
}

/// A training step is built on the forward program: the record and its ids carry over, and so
/// do they through the program's JSON document and into a plan's global program.
#[test]
fn the_pipeline_survives_training_json_and_planning() {
    let g = compile(&example("gpt_pipe.tpl"));
    assert!(g.is_training_step());
    let p = g.pipeline().expect("pipelined");
    let paths: Vec<&str> = p
        .instances
        .iter()
        .map(|&r| g.region(r).path.as_str())
        .collect();
    assert_eq!(paths, ["layer.0", "layer.1", "layer.2", "layer.3"]);
    let back = tpc::emit::json::from_json(&tpc::emit::json::to_json(&g)).unwrap();
    assert_eq!(back.pipeline(), Some(p));
    let src = SourceFile::new("gpt_pipe.tpl", example("gpt_pipe.tpl"));
    let mesh = tpc::mesh::Mesh::parse("dp=2,pp=2,tp=2").unwrap();
    let plan = tpc::driver::compile_plan(&src, &[], mesh, Default::default()).unwrap();
    assert_eq!(plan.global.pipeline(), Some(p));
}

/// `@ name` with a tensor `name` is a matmul, even when a mesh axis has that name.
#[test]
fn matmul_by_a_tensor_named_like_an_axis_stays_a_matmul() {
    let src = "
mesh dp, pp
dim B = 2, H = 8, L = 2
block layer(x: f32[B, H]) -> f32[B, H] {
    param w : f32[H, H]
    return relu(x @ w)
}
input x : f32[B, H]
param pp : f32[H, H] @ [_, dp]
y = repeat(L, layer, x) @ pp
z = x @ pp
output y, z
";
    let g = compile(src);
    assert!(g.pipeline().is_none());
    for name in ["y", "z"] {
        assert!(
            matches!(producer(&g, output(&g, name)), Op::MatMul),
            "{name}"
        );
    }
}

/// The spec check sees specs after the pipelined repeat too, and in blocks.
#[test]
fn the_pipeline_axis_splits_no_tensor_anywhere() {
    let after = PIPED.replace("output y", "output y @ [pp, _]");
    let (e, out) = lower_error(&after);
    assert!(
        matches!(e, LowerError::PipelineAxisInSpec { ref axis, .. } if axis == "pp"),
        "{out}"
    );
    assert!(out.contains("t.tpl:19:13"), "{out}");
    let in_block = PIPED.replace("param g : f32[H]", "param g : f32[H] @ [pp]");
    let (e, out) = lower_error(&in_block);
    assert!(matches!(e, LowerError::PipelineAxisInSpec { .. }), "{out}");
    assert!(out.contains("t.tpl:13:25"), "{out}");
}

#[test]
fn a_pipelined_repeat_must_be_the_whole_right_side() {
    let (e, out) = lower_error(&PIPED.replace("@ pp", "@ pp + 1.0"));
    assert!(matches!(e, LowerError::MisplacedPipeline { .. }), "{out}");
    assert!(out.contains("must be the whole right side"), "{out}");
}

/// `return repeat(...) @ pp` in a block is a pipeline in a block, not a misplaced axis.
#[test]
fn a_block_cannot_return_a_pipelined_repeat() {
    let src = PIPED.replace(
        "return mlp(h) + mlp(h)\n}",
        "return mlp(h) + mlp(h)\n}\nblock stack(x: f32[B, H]) -> f32[B, H] {\n    return repeat(L, layer, x) @ pp\n}",
    );
    let src = src.replace("y = repeat(L, layer, mlp(x)) @ pp", "y = stack(x)");
    let (e, out) = lower_error(&src);
    assert!(
        matches!(e, LowerError::PipelineInBlock { ref block, .. } if block == "stack"),
        "{out}"
    );
}

/// A dim after `@` is a scalar operand, as before (not an axis): the usual matmul error.
#[test]
fn matmul_by_a_dim_is_not_a_pipeline() {
    let (e, out) = lower_error(&PIPED.replace("@ pp", "@ H"));
    assert!(matches!(e, LowerError::BadOp { .. }), "{out}");
    assert!(out.contains("`@` needs two tensors"), "{out}");
}
