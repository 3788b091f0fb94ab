//! The IR verifier. A failure here is a compiler bug, never a user error.

use super::graph::{Annotation, Graph, Node, PinState, Value};
use super::ids::{NodeId, RegionId, Space, ValueId};
use super::infer::infer;
use super::op::Op;
use super::types::{TensorType, MAX_PROGRAM_BYTES};
use std::collections::HashSet;

/// An internal inconsistency found in a graph.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("internal compiler error (verifier, after {stage}): {detail}")]
pub struct VerifyError {
    /// The pass after which the graph was checked.
    pub stage: &'static str,
    /// What is inconsistent.
    pub detail: String,
}

/// Checks every structural and typing invariant of `g`; `stage` names the pass that produced it.
pub fn verify<S: Space>(g: &Graph<S>, stage: &'static str) -> Result<(), VerifyError> {
    check_graph(g).map_err(|detail| VerifyError { stage, detail })
}

/// All checks, structure first so that later checks may index safely.
fn check_graph<S: Space>(g: &Graph<S>) -> Result<(), String> {
    check_regions(g)?;
    check_values(g)?;
    for (id, node) in g.nodes() {
        check_node_structure(g, id, node)?;
    }
    g.topo_order()
        .map_err(|n| format!("the graph has a cycle through {n}"))?;
    for (id, node) in g.nodes() {
        check_node_types(g, id, node)?;
    }
    check_annotations(g)?;
    check_pins(g)?;
    check_outputs(g)?;
    check_pipeline(g)?;
    check_leaf_names(g)?;
    check_state_inits(g)
}

/// The value `v`, if it exists.
fn value<S: Space>(g: &Graph<S>, v: ValueId<S>) -> Option<&Value<S>> {
    (v.index() < g.num_values()).then(|| g.value(v))
}

/// True when node `n` exists.
fn node_exists<S: Space>(g: &Graph<S>, n: NodeId<S>) -> bool {
    n.index() < g.num_nodes()
}

/// True when region `r` exists.
fn region_exists<S: Space>(g: &Graph<S>, r: RegionId<S>) -> bool {
    r.index() < g.regions().len()
}

/// Names a node with its op for messages: `n7 (softmax{axis=1})`.
fn describe<S: Space>(id: NodeId<S>, node: &Node<S>) -> String {
    format!("{id} ({})", node.op)
}

/// Formats a list of types as `[f32[2,3], i32[]]`.
fn types_list<'a>(tys: impl IntoIterator<Item = &'a TensorType>) -> String {
    let items: Vec<String> = tys.into_iter().map(|t| t.to_string()).collect();
    format!("[{}]", items.join(", "))
}

/// The root region exists and has no parent; every other region's parent exists and precedes it.
fn check_regions<S: Space>(g: &Graph<S>) -> Result<(), String> {
    let mut regions = g.regions();
    match regions.next() {
        None => return Err("the graph has no root region".into()),
        Some((id, r)) if r.parent.is_some() => {
            return Err(format!("root region {id} has a parent"));
        }
        Some(_) => {}
    }
    for (id, r) in regions {
        match r.parent {
            None => return Err(format!("region {id} ({}) has no parent", r.path)),
            Some(p) if p >= id => {
                return Err(format!(
                    "region {id} ({}) has parent {p}, which does not precede it",
                    r.path
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Each value is result `index` of the node it names, and within the size limit.
fn check_values<S: Space>(g: &Graph<S>) -> Result<(), String> {
    for (id, v) in g.values() {
        if !node_exists(g, v.node) {
            return Err(format!(
                "value {id} claims producer {}, which does not exist ({} nodes)",
                v.node,
                g.num_nodes()
            ));
        }
        if v.ty
            .checked_size_bytes()
            .is_none_or(|b| b > MAX_PROGRAM_BYTES)
        {
            return Err(format!(
                "value {id} has type {}, past the size limit of 2^60 bytes",
                v.ty
            ));
        }
        let producer = g.node(v.node);
        if producer.outputs.get(v.index as usize) != Some(&id) {
            return Err(format!(
                "value {id} claims to be result {} of {}, but that node's results are {}",
                v.index,
                describe(v.node, producer),
                ids_list(&producer.outputs)
            ));
        }
    }
    Ok(())
}

/// Formats a list of value ids as `[%1, %2]`.
fn ids_list<S: Space>(ids: &[ValueId<S>]) -> String {
    let items: Vec<String> = ids.iter().map(|v| v.to_string()).collect();
    format!("[{}]", items.join(", "))
}

/// Region, operands (defined by an earlier node), results (owned by this node), leaf shape.
fn check_node_structure<S: Space>(
    g: &Graph<S>,
    id: NodeId<S>,
    node: &Node<S>,
) -> Result<(), String> {
    let who = describe(id, node);
    if !region_exists(g, node.region) {
        return Err(format!(
            "{who} is in region {}, which does not exist",
            node.region
        ));
    }
    for (i, &v) in node.inputs.iter().enumerate() {
        check_operand(g, id, &who, i, v)?;
    }
    for (i, &v) in node.outputs.iter().enumerate() {
        check_result(g, id, &who, i, v)?;
    }
    if node.op.is_leaf() && (!node.inputs.is_empty() || node.outputs.len() != 1) {
        return Err(format!(
            "leaf {who} must have no operands and one result, has operands {} and results {}",
            ids_list(&node.inputs),
            ids_list(&node.outputs)
        ));
    }
    Ok(())
}

/// Operand `i` of node `id` exists and is produced by an earlier node.
fn check_operand<S: Space>(
    g: &Graph<S>,
    id: NodeId<S>,
    who: &str,
    i: usize,
    v: ValueId<S>,
) -> Result<(), String> {
    let Some(val) = value(g, v) else {
        return Err(format!(
            "{who}: operand {i} is {v}, which is not defined ({} values)",
            g.num_values()
        ));
    };
    if val.node >= id {
        return Err(format!(
            "{who}: operand {i} is {v}, produced by {}, which does not precede it (storage order is not topological)",
            val.node
        ));
    }
    Ok(())
}

/// Result `i` of node `id` exists and names this node and index as its producer.
fn check_result<S: Space>(
    g: &Graph<S>,
    id: NodeId<S>,
    who: &str,
    i: usize,
    v: ValueId<S>,
) -> Result<(), String> {
    let Some(val) = value(g, v) else {
        return Err(format!(
            "{who}: result {i} is {v}, which is not defined ({} values)",
            g.num_values()
        ));
    };
    if val.node != id || val.index as usize != i {
        return Err(format!(
            "{who}: result {i} is {v}, but {v} claims to be result {} of {}",
            val.index, val.node
        ));
    }
    Ok(())
}

/// For non-leaf nodes, re-inferred result types equal the stored ones.
fn check_node_types<S: Space>(g: &Graph<S>, id: NodeId<S>, node: &Node<S>) -> Result<(), String> {
    if node.op.is_leaf() {
        return Ok(());
    }
    let operands: Vec<&TensorType> = node.inputs.iter().map(|&v| g.ty(v)).collect();
    let stored: Vec<&TensorType> = node.outputs.iter().map(|&v| g.ty(v)).collect();
    // Formatted only on failure: this runs for every node after every pass.
    let who = || format!("{} {}", describe(id, node), ids_list(&node.inputs));
    let inferred = infer(&node.op, &operands).map_err(|e| {
        format!(
            "{}: inference fails on operand types {}: {e}",
            who(),
            types_list(operands.iter().copied())
        )
    })?;
    if inferred.iter().ne(stored.iter().copied()) {
        return Err(format!(
            "{}: stored result types {} of {} differ from inferred {}",
            who(),
            types_list(stored.iter().copied()),
            ids_list(&node.outputs),
            types_list(&inferred)
        ));
    }
    Ok(())
}

/// Every annotation is on an existing value and is well formed for its type.
fn check_annotations<S: Space>(g: &Graph<S>) -> Result<(), String> {
    for (&v, a) in g.annotations() {
        let Some(val) = value(g, v) else {
            return Err(format!("annotation on {v}, which is not defined"));
        };
        check_spec(g, a, &val.ty).map_err(|e| format!("annotation on {v}: {e}"))?;
    }
    Ok(())
}

/// Every pin is on an existing value, along a declared axis its annotation does not name, and
/// a pinned split names one of the value's dims.
fn check_pins<S: Space>(g: &Graph<S>) -> Result<(), String> {
    for p in g.pins() {
        let Some(val) = value(g, p.value) else {
            return Err(format!("pin on {}, which is not defined", p.value));
        };
        if !g.mesh_axes.contains(&p.axis) {
            return Err(format!(
                "pin on {} along `{}`, not a mesh axis (mesh axes: {})",
                p.value,
                p.axis,
                g.mesh_axes.join(", ")
            ));
        }
        if let Some(a) = g.annotation(p.value) {
            if a.spec.dims.iter().flatten().any(|x| *x == p.axis) {
                return Err(format!(
                    "pin on {} along `{}`, which its annotation {} already places",
                    p.value, p.axis, a.spec
                ));
            }
        }
        if let PinState::Shard(d) = p.state {
            if d >= val.ty.rank() {
                return Err(format!(
                    "pin on {} splits dim {d}, but the value has type {}",
                    p.value, val.ty
                ));
            }
        }
    }
    Ok(())
}

/// The spec has one entry per dim, names only mesh axes, and no axis twice.
fn check_spec<S: Space>(g: &Graph<S>, a: &Annotation, ty: &TensorType) -> Result<(), String> {
    let spec = &a.spec;
    if spec.dims.len() != ty.rank() {
        return Err(format!(
            "spec {spec} has {} entries but the value has type {ty} (rank {})",
            spec.dims.len(),
            ty.rank()
        ));
    }
    let mut seen = HashSet::new();
    for axis in spec.dims.iter().flatten() {
        if !g.mesh_axes.contains(axis) {
            return Err(format!(
                "spec {spec} names axis `{axis}`, not a mesh axis (mesh axes: {})",
                g.mesh_axes.join(", ")
            ));
        }
        if !seen.insert(axis) {
            return Err(format!("spec {spec} uses axis `{axis}` more than once"));
        }
    }
    Ok(())
}

/// Every output refers to an existing value, with a well-formed annotation.
fn check_outputs<S: Space>(g: &Graph<S>) -> Result<(), String> {
    for out in g.outputs() {
        let Some(val) = value(g, out.value) else {
            return Err(format!(
                "output `{}` is {}, which is not defined",
                out.name, out.value
            ));
        };
        if let Some(a) = &out.annotation {
            check_spec(g, a, &val.ty)
                .map_err(|e| format!("output `{}` ({}): {e}", out.name, out.value))?;
        }
    }
    Ok(())
}

/// The pipeline's axis is a mesh axis, its instances are distinct regions of its block, and its
/// output exists.
fn check_pipeline<S: Space>(g: &Graph<S>) -> Result<(), String> {
    let Some(p) = g.pipeline() else {
        return Ok(());
    };
    if !g.mesh_axes.contains(&p.axis) {
        return Err(format!(
            "the pipeline's axis `{}` is not a mesh axis",
            p.axis
        ));
    }
    let mut seen = HashSet::new();
    for &r in &p.instances {
        if !region_exists(g, r) || g.region(r).block != p.block {
            return Err(format!(
                "pipeline instance {r} is not a region of block `{}`",
                p.block
            ));
        }
        if !seen.insert(r) {
            return Err(format!("pipeline instance {r} is listed twice"));
        }
    }
    if value(g, p.output).is_none() {
        return Err(format!("the pipeline's output {} is not defined", p.output));
    }
    Ok(())
}

/// A state that starts as a param names a param of the graph, of the same dims count.
fn check_state_inits<S: Space>(g: &Graph<S>) -> Result<(), String> {
    let ranks: std::collections::HashMap<&str, usize> = g
        .nodes()
        .filter_map(|(_, n)| match &n.op {
            Op::Param { name } => Some((name.as_str(), g.ty(n.outputs[0]).rank())),
            _ => None,
        })
        .collect();
    for (id, node) in g.nodes() {
        let Op::State {
            name,
            init: crate::ir::StateInit::Param(p),
        } = &node.op
        else {
            continue;
        };
        if ranks.get(p.as_str()) != Some(&g.ty(node.outputs[0]).rank()) {
            return Err(format!(
                "state `{name}` ({id}) starts as `{p}`, not a param like it"
            ));
        }
    }
    Ok(())
}

/// Param names are unique, input names are unique, and state names are unique.
fn check_leaf_names<S: Space>(g: &Graph<S>) -> Result<(), String> {
    let mut params = HashSet::new();
    let mut inputs = HashSet::new();
    let mut states = HashSet::new();
    for (id, node) in g.nodes() {
        let (kind, name, seen) = match &node.op {
            Op::Param { name } => ("param", name, &mut params),
            Op::Input { name } => ("input", name, &mut inputs),
            Op::State { name, .. } => ("state", name, &mut states),
            _ => continue,
        };
        if !seen.insert(name.as_str()) {
            return Err(format!(
                "{kind} name `{name}` is declared twice (again by {id})"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::graph::{GraphParts, Output, PipelineSpec};
    use crate::ir::ids::Global;
    use crate::ir::types::{Dtype, Spec};
    use crate::span::Span;

    fn f(shape: &[u64]) -> TensorType {
        TensorType::new(Dtype::F32, shape.to_vec())
    }

    fn leaf(g: &mut Graph, op: Op, ty: TensorType) -> ValueId {
        let n = g.add_node(op, vec![], vec![ty], Span::default(), g.root());
        g.node(n).outputs[0]
    }

    fn spec(dims: &[&[&str]]) -> Annotation {
        let dims = dims
            .iter()
            .map(|d| d.iter().map(|s| s.to_string()).collect())
            .collect();
        Annotation {
            spec: Spec { dims },
            span: Span::default(),
        }
    }

    /// x: f32[2,3] input, w: f32[3,4] param, y = x @ w, output y; mesh (dp, tp).
    fn good() -> Graph {
        let mut g = Graph::new("test.tpl");
        g.mesh_axes = vec!["dp".into(), "tp".into()];
        let x = leaf(&mut g, Op::Input { name: "x".into() }, f(&[2, 3]));
        let w = leaf(&mut g, Op::Param { name: "w".into() }, f(&[3, 4]));
        let block = g.add_region("mlp".into(), "Mlp".into(), g.root(), 1);
        let n = g.add_node(
            Op::MatMul,
            vec![x, w],
            vec![f(&[2, 4])],
            Span::default(),
            block,
        );
        let y = g.node(n).outputs[0];
        g.annotate(w, spec(&[&[], &["tp"]]));
        g.add_output(Output {
            name: "y".into(),
            value: y,
            annotation: Some(spec(&[&["dp"], &[]])),
            span: Span::default(),
            like: None,
        });
        g
    }

    fn rejects(g: &Graph, needle: &str) {
        let e = verify(g, "test").expect_err("verifier accepted a bad graph");
        assert_eq!(e.stage, "test");
        assert!(e.detail.contains(needle), "`{}` lacks `{needle}`", e.detail);
    }

    fn from_parts(edit: impl FnOnce(&mut GraphParts)) -> Graph {
        let mut parts = good().to_parts();
        edit(&mut parts);
        Graph::from_parts(parts)
    }

    #[test]
    fn accepts_a_good_graph() {
        assert_eq!(verify(&good(), "test"), Ok(()));
        assert_eq!(verify(&Graph::<Global>::new("empty"), "test"), Ok(()));
        assert_eq!(
            verify(&Graph::from_parts(good().to_parts()), "roundtrip"),
            Ok(())
        );
    }

    #[test]
    fn rejects_a_value_past_the_size_limit() {
        let g = from_parts(|p| p.values[0].ty = f(&[1 << 32, 1 << 32]));
        rejects(
            &g,
            "value %0 has type f32[4294967296,4294967296], past the size limit",
        );
        let g = from_parts(|p| p.values[0].ty = f(&[(1 << 58) + 1]));
        rejects(&g, "past the size limit");
        let mut g = Graph::new("limit");
        leaf(&mut g, Op::Input { name: "x".into() }, f(&[1 << 58]));
        assert_eq!(verify(&g, "test"), Ok(()));
    }

    #[test]
    fn rejects_wrong_stored_type() {
        let mut g = good();
        let x = g.inputs().next().unwrap().1;
        let w = g.params().next().unwrap().1;
        g.add_node(
            Op::MatMul,
            vec![x, w],
            vec![f(&[2, 5])],
            Span::default(),
            g.root(),
        );
        rejects(&g, "n3 (matmul) [%0, %1]: stored result types [f32[2,5]]");
        let mut g = good();
        g.add_node(
            Op::MatMul,
            vec![w, w],
            vec![f(&[3, 4])],
            Span::default(),
            g.root(),
        );
        rejects(&g, "inference fails");
    }

    #[test]
    fn rejects_undefined_and_forward_operands() {
        let g = from_parts(|p| p.nodes[2].inputs[1] = ValueId::new(99));
        rejects(&g, "n2 (matmul): operand 1 is %99, which is not defined");
        let g = from_parts(|p| p.nodes[2].inputs[1] = ValueId::new(2));
        rejects(&g, "does not precede it");
        let g = from_parts(|p| {
            p.nodes.swap(0, 2);
            p.values[0].node = NodeId::new(2);
            p.values[2].node = NodeId::new(0);
        });
        rejects(&g, "n0 (matmul): operand 0 is %0, produced by n2");
    }

    #[test]
    fn rejects_bad_value_bookkeeping() {
        let g = from_parts(|p| p.values[1].index = 1);
        rejects(&g, "value %1 claims to be result 1 of n1");
        let g = from_parts(|p| p.values[1].node = NodeId::new(7));
        rejects(&g, "value %1 claims producer n7");
        let g = from_parts(|p| p.nodes[0].outputs.push(ValueId::new(1)));
        rejects(&g, "n0 (input x): result 1 is %1");
        let g = from_parts(|p| p.nodes[0].inputs.push(ValueId::new(0)));
        rejects(&g, "n0 (input x): operand 0 is %0");
    }

    #[test]
    fn rejects_bad_leaves_and_regions() {
        let g = from_parts(|p| {
            p.nodes[1].inputs.push(ValueId::new(0));
        });
        rejects(&g, "leaf n1 (param w) must have no operands");
        let g = from_parts(|p| p.nodes[2].region = RegionId::new(9));
        rejects(&g, "region r9, which does not exist");
        let g = from_parts(|p| p.regions[1].parent = Some(RegionId::new(1)));
        rejects(&g, "region r1 (mlp) has parent r1");
        let g = from_parts(|p| p.regions[0].parent = Some(RegionId::new(0)));
        rejects(&g, "root region r0 has a parent");
    }

    #[test]
    fn rejects_bad_annotations() {
        let mut g = good();
        g.annotate(ValueId::new(0), spec(&[&["dp"]]));
        rejects(&g, "annotation on %0: spec [dp] has 1 entries");
        g.annotate(ValueId::new(0), spec(&[&["pp"], &[]]));
        rejects(&g, "names axis `pp`, not a mesh axis");
        g.annotate(ValueId::new(0), spec(&[&["dp"], &["tp", "dp"]]));
        rejects(&g, "uses axis `dp` more than once");
        let mut g = good();
        g.annotate(ValueId::new(42), spec(&[]));
        rejects(&g, "annotation on %42, which is not defined");
    }

    #[test]
    fn rejects_bad_outputs() {
        let g = from_parts(|p| p.outputs[0].value = ValueId::new(5));
        rejects(&g, "output `y` is %5, which is not defined");
        let g = from_parts(|p| p.outputs[0].annotation = Some(spec(&[&["dp"], &["dp"]])));
        rejects(
            &g,
            "output `y` (%2): spec [dp, dp] uses axis `dp` more than once",
        );
    }

    #[test]
    fn checks_the_pipeline() {
        let pipe = |instances: Vec<usize>, output: usize| PipelineSpec {
            axis: "dp".into(),
            block: "Mlp".into(),
            instances: instances.into_iter().map(RegionId::new).collect(),
            output: ValueId::new(output),
            span: Span::default(),
        };
        let mut g = good();
        g.set_pipeline(Some(pipe(vec![1], 2)));
        assert_eq!(verify(&g, "test"), Ok(()));
        g.set_pipeline(Some(pipe(vec![1, 1], 2)));
        rejects(&g, "pipeline instance r1 is listed twice");
        g.set_pipeline(Some(pipe(vec![0], 2)));
        rejects(&g, "pipeline instance r0 is not a region of block `Mlp`");
        g.set_pipeline(Some(pipe(vec![7], 2)));
        rejects(&g, "pipeline instance r7 is not a region of block `Mlp`");
        g.set_pipeline(Some(pipe(vec![1], 9)));
        rejects(&g, "the pipeline's output %9 is not defined");
        g.set_pipeline(Some(PipelineSpec {
            axis: "pp".into(),
            ..pipe(vec![1], 2)
        }));
        rejects(&g, "the pipeline's axis `pp` is not a mesh axis");
        let back = Graph::from_parts(good_piped().to_parts());
        assert_eq!(back.pipeline(), good_piped().pipeline());
    }

    /// `good()` with its one block instance pipelined over `dp`.
    fn good_piped() -> Graph {
        let mut g = good();
        g.set_pipeline(Some(PipelineSpec {
            axis: "dp".into(),
            block: "Mlp".into(),
            instances: vec![RegionId::new(1)],
            output: ValueId::new(2),
            span: Span::default(),
        }));
        g
    }

    #[test]
    fn rejects_duplicate_leaf_names() {
        let mut g = good();
        leaf(&mut g, Op::Param { name: "w".into() }, f(&[3, 4]));
        rejects(&g, "param name `w` is declared twice (again by n3)");
        let mut g = good();
        leaf(&mut g, Op::Input { name: "x".into() }, f(&[1]));
        rejects(&g, "input name `x` is declared twice");
        let mut g = good();
        leaf(&mut g, Op::Input { name: "w".into() }, f(&[1]));
        assert_eq!(verify(&g, "test"), Ok(()));
    }

    #[test]
    fn error_display_names_the_stage() {
        let e = VerifyError {
            stage: "lower",
            detail: "x".into(),
        };
        assert_eq!(
            e.to_string(),
            "internal compiler error (verifier, after lower): x"
        );
    }
}
