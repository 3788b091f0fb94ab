//! The program graph: nodes, values, regions (block instances), annotations and outputs.
//! petgraph is an implementation detail of this file and never appears in the public API.

use super::ids::{Global, NodeId, RegionId, Space, ValueId};
use super::op::Op;
use super::types::{Spec, TensorType};
use crate::span::Span;
use petgraph::graph::{DiGraph, NodeIndex};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One op application: its operands, its results (in order) and where it came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Node<S = Global> {
    /// The operation.
    pub op: Op,
    /// Operand values, in the op's order.
    pub inputs: Vec<ValueId<S>>,
    /// Result values, in the op's order.
    pub outputs: Vec<ValueId<S>>,
    /// Source span of the expression that created the node.
    pub span: Span,
    /// The block instance (or the root) the node belongs to.
    pub region: RegionId<S>,
}

/// One SSA value: the result `index` of node `node`, with its static type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Value<S = Global> {
    /// Element type and shape.
    pub ty: TensorType,
    /// The producing node.
    pub node: NodeId<S>,
    /// Which result of that node.
    pub index: u32,
    /// The source name it was bound to, if any (for readable output only).
    pub name: Option<String>,
}

/// The root program or one instance of a block; instances stamped from the same lowered body
/// share `body`, and their nodes correspond one to one, in order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Region<S = Global> {
    /// Full dotted instance path (`layer.3.attention`); empty for the root.
    pub path: String,
    /// The block's name; empty for the root.
    pub block: String,
    /// The enclosing region; `None` only for the root.
    pub parent: Option<RegionId<S>>,
    /// Identifies the lowered body this instance was stamped from.
    pub body: u32,
    /// The phase of a training step its nodes belong to.
    #[serde(default, skip_serializing_if = "Phase::is_forward")]
    pub phase: Phase,
}

/// The phase of a training step: the forward (every node of a forward program), the backward
/// (the derivative of the forward), or the optimizer's update.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The forward pass.
    #[default]
    Forward,
    /// The backward pass.
    Backward,
    /// The optimizer's update.
    Update,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 3] = [Phase::Forward, Phase::Backward, Phase::Update];

    /// `forward`, `backward` or `update`.
    pub const fn name(self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::Backward => "backward",
            Phase::Update => "update",
        }
    }

    /// True for the forward.
    pub fn is_forward(&self) -> bool {
        *self == Phase::Forward
    }
}

/// A user sharding annotation on a value, with the span of the spec.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Annotation {
    /// The spec, one entry per dim.
    pub spec: Spec,
    /// Where the spec was written.
    pub span: Span,
}

/// The state a [`Pin`] fixes a value in along one mesh axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PinState {
    /// Split along this dim over the axis.
    Shard(usize),
    /// Whole on every device of the axis.
    Replicate,
    /// A term on each device of the axis; the value is their sum.
    Partial,
}

/// An axis-local placement constraint: `value` fixed in `state` along mesh axis `axis`, free
/// along the others (a compiler-made constraint, e.g. ZeRO's, never written by users).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Pin<S = Global> {
    /// The value pinned.
    pub value: ValueId<S>,
    /// The mesh axis it is fixed along.
    pub axis: String,
    /// Its state along that axis.
    pub state: PinState,
}

/// A program output: a name, the value, and its placement: the annotation's, or the placement
/// of the value it is `like` (a training step's next param or gradient, laid out as its param),
/// or Replicate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Output<S = Global> {
    /// The output's name.
    pub name: String,
    /// The value returned.
    pub value: ValueId<S>,
    /// Required placement of the output, if annotated.
    pub annotation: Option<Annotation>,
    /// Where the output was declared.
    pub span: Span,
    /// Without an annotation: laid out as this value (a param or optimizer state) is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub like: Option<ValueId<S>>,
}

/// The program's pipelined `repeat`: its instances are cut into stages over `axis`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct PipelineSpec<S = Global> {
    /// The mesh axis the stages are laid along.
    pub axis: String,
    /// The repeated block's name.
    pub block: String,
    /// The region of each instance, in order (instance `i` is `instances[i]`).
    pub instances: Vec<RegionId<S>>,
    /// The repeat's result: the last instance's result.
    pub output: ValueId<S>,
    /// The `repeat(...) @ axis` expression.
    pub span: Span,
}

/// A whole program: the global one (the default), or a plan's SPMD program (`Graph<Local>`).
/// Nodes are stored in a topological order (every operand is produced by an earlier node); the
/// verifier checks it.
#[derive(Clone, Debug)]
pub struct Graph<S = Global> {
    /// Source file name, for provenance.
    pub source: String,
    /// Mesh axes declared by the program, in order.
    pub mesh_axes: Vec<String>,
    /// Resolved dim constants, in declaration order.
    pub dims: Vec<(String, i64)>,
    nodes: Vec<Node<S>>,
    values: Vec<Value<S>>,
    regions: Vec<Region<S>>,
    annotations: BTreeMap<ValueId<S>, Annotation>,
    pins: BTreeMap<(ValueId<S>, String), PinState>,
    outputs: Vec<Output<S>>,
    // Set by lowering on the global program and kept by everything that extends a clone of it
    // (autodiff). The partitioner's local program does not carry it: a plan keeps its global
    // program, which does, and `Plan::origin` leads from local values back to global ones.
    pipeline: Option<PipelineSpec<S>>,
    uses: Vec<Vec<NodeId<S>>>,
    bytes: u64,
}

impl<S> Default for Graph<S> {
    fn default() -> Self {
        Graph {
            source: String::new(),
            mesh_axes: Vec::new(),
            dims: Vec::new(),
            nodes: Vec::new(),
            values: Vec::new(),
            regions: Vec::new(),
            annotations: BTreeMap::new(),
            pins: BTreeMap::new(),
            outputs: Vec::new(),
            pipeline: None,
            uses: Vec::new(),
            bytes: 0,
        }
    }
}

impl<S: Space> Graph<S> {
    /// An empty graph for `source` with only the root region.
    pub fn new(source: impl Into<String>) -> Self {
        let mut g = Graph {
            source: source.into(),
            ..Default::default()
        };
        g.regions.push(Region {
            path: String::new(),
            block: String::new(),
            parent: None,
            body: 0,
            phase: Phase::Forward,
        });
        g
    }

    /// The root region.
    pub fn root(&self) -> RegionId<S> {
        RegionId::new(0)
    }

    /// Adds a region (a block instance) under `parent`.
    pub fn add_region(
        &mut self,
        path: String,
        block: String,
        parent: RegionId<S>,
        body: u32,
    ) -> RegionId<S> {
        self.regions.push(Region {
            path,
            block,
            parent: Some(parent),
            body,
            phase: Phase::Forward,
        });
        RegionId::new(self.regions.len() - 1)
    }

    /// Puts region `r` in `phase`.
    pub fn set_phase(&mut self, r: RegionId<S>, phase: Phase) {
        if let Some(x) = self.regions.get_mut(r.index()) {
            x.phase = phase;
        }
    }

    /// True when some region is not in the forward phase: a training step.
    pub fn is_training_step(&self) -> bool {
        self.regions.iter().any(|r| !r.phase.is_forward())
    }

    /// Appends a node whose results have the given types; returns it. Operands must already exist.
    pub fn add_node(
        &mut self,
        op: Op,
        inputs: Vec<ValueId<S>>,
        result_types: Vec<TensorType>,
        span: Span,
        region: RegionId<S>,
    ) -> NodeId<S> {
        let id = NodeId::new(self.nodes.len());
        let outputs: Vec<ValueId<S>> = result_types
            .into_iter()
            .enumerate()
            .map(|(i, ty)| {
                self.bytes = self.bytes.saturating_add(ty.size_bytes());
                self.values.push(Value {
                    ty,
                    node: id,
                    index: i as u32,
                    name: None,
                });
                self.uses.push(Vec::new());
                ValueId::new(self.values.len() - 1)
            })
            .collect();
        for &v in &inputs {
            if let Some(u) = self.uses.get_mut(v.index()) {
                push_user(u, id);
            }
        }
        self.nodes.push(Node {
            op,
            inputs,
            outputs,
            span,
            region,
        });
        id
    }

    /// Reserves room for `nodes` more nodes and `values` more values.
    pub fn reserve(&mut self, nodes: usize, values: usize) {
        self.nodes.reserve(nodes);
        self.values.reserve(values);
        self.uses.reserve(values);
    }

    /// Sets the readable name of a value.
    pub fn set_value_name(&mut self, v: ValueId<S>, name: impl Into<String>) {
        self.values[v.index()].name = Some(name.into());
    }

    /// Records a user annotation on `v`; returns the previous one, if any.
    pub fn annotate(&mut self, v: ValueId<S>, a: Annotation) -> Option<Annotation> {
        self.annotations.insert(v, a)
    }

    /// Drops every user annotation on values (`tpc compile --auto` chooses placements afresh);
    /// the outputs' required placements stay.
    pub fn clear_annotations(&mut self) {
        self.annotations.clear();
    }

    /// Pins a value along one mesh axis, replacing an earlier pin of it on that axis.
    pub fn pin(&mut self, pin: Pin<S>) {
        self.pins.insert((pin.value, pin.axis), pin.state);
    }

    /// The axis-local pins, sorted by value and axis.
    pub fn pins(&self) -> impl ExactSizeIterator<Item = Pin<S>> + '_ {
        self.pins.iter().map(|((value, axis), state)| Pin {
            value: *value,
            axis: axis.clone(),
            state: *state,
        })
    }

    /// Appends a program output.
    pub fn add_output(&mut self, out: Output<S>) {
        self.outputs.push(out);
    }

    /// The node `id`. Panics on an id from another graph.
    pub fn node(&self, id: NodeId<S>) -> &Node<S> {
        &self.nodes[id.index()]
    }

    /// The value `id`. Panics on an id from another graph.
    pub fn value(&self, id: ValueId<S>) -> &Value<S> {
        &self.values[id.index()]
    }

    /// The value's type.
    pub fn ty(&self, id: ValueId<S>) -> &TensorType {
        &self.values[id.index()].ty
    }

    /// The region `id`.
    pub fn region(&self, id: RegionId<S>) -> &Region<S> {
        &self.regions[id.index()]
    }

    /// All nodes with their ids, in topological (insertion) order.
    pub fn nodes(&self) -> impl ExactSizeIterator<Item = (NodeId<S>, &Node<S>)> + '_ {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (NodeId::new(i), n))
    }

    /// All values with their ids.
    pub fn values(&self) -> impl ExactSizeIterator<Item = (ValueId<S>, &Value<S>)> + '_ {
        self.values
            .iter()
            .enumerate()
            .map(|(i, v)| (ValueId::new(i), v))
    }

    /// All regions with their ids; the root first.
    pub fn regions(&self) -> impl ExactSizeIterator<Item = (RegionId<S>, &Region<S>)> + '_ {
        self.regions
            .iter()
            .enumerate()
            .map(|(i, r)| (RegionId::new(i), r))
    }

    /// Number of nodes.
    pub fn num_nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Number of values.
    pub fn num_values(&self) -> usize {
        self.values.len()
    }

    /// The byte sizes of all values added together (saturating; see `MAX_PROGRAM_BYTES`).
    pub fn total_bytes(&self) -> u64 {
        self.bytes
    }

    /// The nodes that read `v`, each once, in insertion order.
    pub fn users(&self, v: ValueId<S>) -> &[NodeId<S>] {
        &self.uses[v.index()]
    }

    /// User annotations, sorted by value.
    pub fn annotations(&self) -> &BTreeMap<ValueId<S>, Annotation> {
        &self.annotations
    }

    /// The annotation of `v`, if any.
    pub fn annotation(&self, v: ValueId<S>) -> Option<&Annotation> {
        self.annotations.get(&v)
    }

    /// Program outputs in declaration order.
    pub fn outputs(&self) -> &[Output<S>] {
        &self.outputs
    }

    /// The program's pipelined `repeat`, if it has one.
    pub fn pipeline(&self) -> Option<&PipelineSpec<S>> {
        self.pipeline.as_ref()
    }

    /// Records (or clears) the program's pipelined `repeat`.
    pub fn set_pipeline(&mut self, spec: Option<PipelineSpec<S>>) {
        self.pipeline = spec;
    }

    /// The `Param` leaves with their names, in order.
    pub fn params(&self) -> impl Iterator<Item = (&str, ValueId<S>)> + '_ {
        self.nodes.iter().filter_map(|n| match &n.op {
            Op::Param { name } => Some((name.as_str(), n.outputs[0])),
            _ => None,
        })
    }

    /// The `Input` leaves with their names, in order.
    pub fn inputs(&self) -> impl Iterator<Item = (&str, ValueId<S>)> + '_ {
        self.nodes.iter().filter_map(|n| match &n.op {
            Op::Input { name } => Some((name.as_str(), n.outputs[0])),
            _ => None,
        })
    }

    /// A topological order computed from the edges (independent of storage order); `Err` names a
    /// node on a cycle. Used by the verifier.
    pub fn topo_order(&self) -> Result<Vec<NodeId<S>>, NodeId<S>> {
        let edges = self.nodes.iter().map(|n| n.inputs.len()).sum();
        let mut dag: DiGraph<NodeId<S>, ValueId<S>> =
            DiGraph::with_capacity(self.nodes.len(), edges);
        for i in 0..self.nodes.len() {
            dag.add_node(NodeId::new(i));
        }
        // Edges in node then operand order, from producers that exist (a stored document may
        // name values or nodes it lacks; the verifier reports those separately).
        for (i, n) in self.nodes.iter().enumerate() {
            for &v in &n.inputs {
                if let Some(val) = self.values.get(v.index()) {
                    if val.node.index() < self.nodes.len() {
                        dag.add_edge(NodeIndex::new(val.node.index()), NodeIndex::new(i), v);
                    }
                }
            }
        }
        petgraph::algo::toposort(&dag, None)
            .map(|v| v.into_iter().map(|ix| dag[ix]).collect())
            .map_err(|c| dag[c.node_id()])
    }

    /// Rebuilds a graph from its parts (as stored in a document); the user index is recomputed.
    /// The caller must run the verifier on the result.
    pub fn from_parts(parts: GraphParts<S>) -> Self {
        let mut g = Graph {
            source: parts.source,
            mesh_axes: parts.mesh_axes,
            dims: parts.dims,
            values: parts.values,
            regions: parts.regions,
            outputs: parts.outputs,
            pipeline: parts.pipeline,
            annotations: parts.annotations.into_iter().collect(),
            pins: parts
                .pins
                .into_iter()
                .map(|p| ((p.value, p.axis), p.state))
                .collect(),
            ..Default::default()
        };
        g.uses = vec![Vec::new(); g.values.len()];
        g.bytes = g
            .values
            .iter()
            .fold(0u64, |n, v| n.saturating_add(v.ty.size_bytes()));
        for (i, n) in parts.nodes.iter().enumerate() {
            let id = NodeId::new(i);
            for &v in &n.inputs {
                if let Some(u) = g.uses.get_mut(v.index()) {
                    push_user(u, id);
                }
            }
        }
        g.nodes = parts.nodes;
        g
    }

    /// Splits the graph into its serializable parts.
    pub fn to_parts(&self) -> GraphParts<S> {
        GraphParts {
            source: self.source.clone(),
            mesh_axes: self.mesh_axes.clone(),
            dims: self.dims.clone(),
            nodes: self.nodes.clone(),
            values: self.values.clone(),
            regions: self.regions.clone(),
            annotations: self
                .annotations
                .iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect(),
            outputs: self.outputs.clone(),
            pipeline: self.pipeline.clone(),
            pins: self.pins().collect(),
        }
    }
}

/// Records `id` as a user. Nodes are added in increasing id order, so a repeated operand of the
/// same node is always the last entry: one comparison keeps the list duplicate-free.
fn push_user<S>(users: &mut Vec<NodeId<S>>, id: NodeId<S>) {
    if users.last() != Some(&id) {
        users.push(id);
    }
}

/// The stored form of a graph (no derived indexes), for the JSON document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct GraphParts<S = Global> {
    /// Source file name.
    pub source: String,
    /// Declared mesh axes.
    pub mesh_axes: Vec<String>,
    /// Resolved dims.
    pub dims: Vec<(String, i64)>,
    /// Nodes in order.
    pub nodes: Vec<Node<S>>,
    /// Values in order.
    pub values: Vec<Value<S>>,
    /// Regions, root first.
    pub regions: Vec<Region<S>>,
    /// Annotations sorted by value.
    pub annotations: Vec<(ValueId<S>, Annotation)>,
    /// Outputs in order.
    pub outputs: Vec<Output<S>>,
    /// The pipelined `repeat`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<PipelineSpec<S>>,
    /// Axis-local pins (ZeRO's), if any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pins: Vec<Pin<S>>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::Dtype;

    /// Users stay unique and in node order when one node reads a value several times, in any
    /// operand position, and when nodes reading other values come in between.
    #[test]
    fn users_are_listed_once_per_node_in_order() {
        let mut g = Graph::new("t");
        let (root, ty) = (g.root(), TensorType::new(Dtype::F32, vec![2]));
        let leaf = |g: &mut Graph, name: &str| {
            let n = g.add_node(
                Op::Input { name: name.into() },
                vec![],
                vec![ty.clone()],
                Span::default(),
                root,
            );
            g.node(n).outputs[0]
        };
        let (x, y) = (leaf(&mut g, "x"), leaf(&mut g, "y"));
        let concat = |g: &mut Graph, ins: Vec<ValueId>| {
            let out = TensorType::new(Dtype::F32, vec![2 * ins.len() as u64]);
            g.add_node(
                Op::Concat { axis: 0 },
                ins,
                vec![out],
                Span::default(),
                root,
            )
        };
        let a = concat(&mut g, vec![x, y, x, x]);
        let b = concat(&mut g, vec![y]);
        let c = concat(&mut g, vec![y, x, y]);
        assert_eq!(g.users(x), [a, c]);
        assert_eq!(g.users(y), [a, b, c]);
        let back = Graph::from_parts(g.to_parts());
        assert_eq!((back.users(x), back.users(y)), (g.users(x), g.users(y)));
        assert_eq!(back.total_bytes(), g.total_bytes());
    }
}
