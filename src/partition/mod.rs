//! Partitioning: the global graph plus its placements become the per-device (SPMD) program.
//! Every op runs on local shapes; where a user needs another placement than its producer has,
//! `reshard` inserts the collectives, each recorded with its provenance.

mod ops;
pub mod reshard;

use crate::ir::infer::infer;
use crate::ir::{Graph, IdVec, Local, NodeId, Op, Output, Phase, RegionId, TensorType, ValueId};
use crate::mesh::Mesh;
use crate::sharding::placement::{PlId, PlacementTable};
use crate::sharding::{Placement, Sharding};
use crate::span::Span;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// Why a collective (or local slice) is in the program.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// The transition, e.g. `Partial(sum) -> Replicate over tp`.
    pub transition: String,
    /// The op that required it (`add`, `output y`, `cross_entropy (vocab-parallel max)`).
    pub user: String,
    /// Where that op is in the source.
    pub span: Span,
    /// The global value moved (`%12 h`).
    pub value: String,
    /// For a bucket (an all-reduce of several operands): each operand's own provenance; for a
    /// merged reduction (`plan::merge`), each term's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<Provenance>,
}

/// The per-device program and what relates it to the global one.
#[derive(Clone, Debug)]
pub struct Partitioned {
    /// The SPMD program: local shapes, with collectives.
    pub local: Graph<Local>,
    /// Per local value, its placement (how the local array relates to the global tensor).
    pub placements: IdVec<ValueId<Local>, Placement>,
    /// Per local value, the global value it holds a piece of, if any.
    pub origin: IdVec<ValueId<Local>, Option<ValueId>>,
    /// Per collective or slice node, why it is there.
    pub provenance: BTreeMap<NodeId<Local>, Provenance>,
}

/// A compiler bug found while partitioning.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PartitionError {
    /// An op whose local shapes do not infer, or a value that does not divide.
    #[error("internal compiler error (partition): {0}")]
    Local(String),
    /// Two placements no sequence of collectives connects.
    #[error("internal compiler error (partition): {0}")]
    Reshard(Box<reshard::ReshardError>),
}

impl From<Box<reshard::ReshardError>> for PartitionError {
    fn from(e: Box<reshard::ReshardError>) -> Self {
        PartitionError::Reshard(e)
    }
}

/// Partitions `g` with the placements of `sh`.
pub fn partition(g: &Graph, sh: &Sharding) -> Result<Partitioned, PartitionError> {
    let mut p = Partitioner::new(g, sh);
    for (id, node) in g.nodes() {
        if node.op.is_leaf() {
            let v = node.outputs[0];
            if !sh.free[v] {
                p.materialize(v, sh.placement_of[v])?;
            }
            continue;
        }
        p.node(id)?;
    }
    for o in g.outputs() {
        let user = Use {
            user: User::Output(&o.name),
            span: o.span,
            region: p.out.root(),
        };
        let (want, like) = match (&o.annotation, o.like) {
            (Some(a), _) => {
                let pl =
                    Placement::from_spec(&a.spec, &sh.mesh).expect("axes checked by propagation");
                (p.table.intern_owned(pl), None)
            }
            (None, Some(l)) => {
                let pl = sh.placement_of[l];
                (pl, Some(p.get(l, pl, &user)?))
            }
            (None, None) => {
                let pl = Placement::replicated(g.ty(o.value).rank(), sh.mesh.rank());
                (p.table.intern_owned(pl), None)
            }
        };
        let v = p.get(o.value, want, &user)?;
        p.out.add_output(Output {
            name: o.name.clone(),
            value: v,
            annotation: o.annotation.clone(),
            span: o.span,
            like,
        });
    }
    let placements = p
        .placements
        .values()
        .map(|&id| p.table.get(id).clone())
        .collect();
    Ok(Partitioned {
        local: p.out,
        placements,
        origin: p.origin,
        provenance: p.provenance,
    })
}

/// The op of the forward pass at each span (the first, when several share one), or nothing
/// for a program without a backward pass.
fn forward_ops(g: &Graph) -> HashMap<Span, &'static str> {
    if !g.is_training_step() {
        return HashMap::new();
    }
    let mut m = HashMap::new();
    for (_, n) in g.nodes() {
        if g.region(n.region).phase.is_forward() && !n.op.is_leaf() {
            m.entry(n.span).or_insert(n.op.name());
        }
    }
    m
}

/// Who asks for a value, for provenance (formatted only when a collective records it).
struct Use<'g> {
    user: User<'g>,
    span: Span,
    /// The local region the collectives go in.
    region: RegionId<Local>,
}

/// The kinds of users.
enum User<'g> {
    /// An op, by name.
    Op(&'static str),
    /// An op of the backward pass, by the name of the forward op it differentiates.
    Backward(&'static str),
    /// A program output.
    Output(&'g str),
    /// The sharding constraint on a (named) value.
    Constraint(Option<&'g str>),
}

impl User<'_> {
    fn describe(&self) -> String {
        match self {
            User::Op(name) => name.to_string(),
            User::Backward(name) => format!("backward of {name}"),
            User::Output(name) => format!("output {name}"),
            User::Constraint(name) => {
                format!("sharding constraint on {}", name.unwrap_or("value"))
            }
        }
    }
}

struct Partitioner<'a> {
    g: &'a Graph,
    sh: &'a Sharding,
    mesh: &'a Mesh,
    out: Graph<Local>,
    /// Per global region, the local region standing for it.
    regions: IdVec<RegionId, RegionId<Local>>,
    table: PlacementTable,
    /// Per local value, its placement in `table`.
    placements: IdVec<ValueId<Local>, PlId>,
    origin: IdVec<ValueId<Local>, Option<ValueId>>,
    provenance: BTreeMap<NodeId<Local>, Provenance>,
    /// Per global value, its home: the first local value holding it, and that placement.
    home: IdVec<ValueId, Option<(PlId, ValueId<Local>)>>,
    /// The other local values holding a global value, by (global value, placement).
    copies: HashMap<(ValueId, PlId), ValueId<Local>>,
    /// The forward op written at each span, naming what a backward op differentiates.
    forward_ops: HashMap<Span, &'static str>,
}

impl<'a> Partitioner<'a> {
    fn new(g: &'a Graph, sh: &'a Sharding) -> Self {
        let mut out = Graph::new(g.source.clone());
        // The local program is the global one plus its collectives (a few percent more).
        let (nodes, values) = (g.num_nodes() * 9 / 8 + 16, g.num_values() * 9 / 8 + 16);
        out.reserve(nodes, values);
        out.mesh_axes = sh.mesh.axes().iter().map(|(a, _)| a.clone()).collect();
        out.dims = g.dims.clone();
        let regions = local_regions(g, &mut out);
        Partitioner {
            g,
            sh,
            mesh: &sh.mesh,
            out,
            regions,
            table: sh.table.clone(),
            placements: IdVec::from_vec(Vec::with_capacity(values)),
            origin: IdVec::from_vec(Vec::with_capacity(values)),
            provenance: BTreeMap::new(),
            home: IdVec::filled(g.num_values(), None),
            copies: HashMap::new(),
            forward_ops: forward_ops(g),
        }
    }

    /// Interns a placement built while lowering an op.
    fn intern(&mut self, p: Placement) -> PlId {
        self.table.intern_owned(p)
    }

    /// Appends a local node; its result types are inferred from the local operand types.
    fn emit(
        &mut self,
        op: Op,
        inputs: Vec<ValueId<Local>>,
        span: Span,
        region: RegionId<Local>,
        placement: PlId,
        origin: Option<ValueId>,
    ) -> Result<Vec<ValueId<Local>>, PartitionError> {
        let tys: Vec<&TensorType> = inputs.iter().map(|v| self.out.ty(*v)).collect();
        let outs = infer(&op, &tys).map_err(|e| {
            PartitionError::Local(format!("{op} at {}:{}: {e}", span.line, span.col))
        })?;
        let id = self.out.add_node(op, inputs, outs, span, region);
        let results = self.out.node(id).outputs.clone();
        for _ in &results {
            self.placements.push(placement);
            self.origin.push(origin);
        }
        Ok(results)
    }

    /// Loads a leaf (param or input) directly in `pl`: tpc owns its loading, so this moves nothing.
    fn materialize(&mut self, v: ValueId, pl: PlId) -> Result<ValueId<Local>, PartitionError> {
        let node = self.g.node(self.g.value(v).node);
        let ty = self.g.ty(v);
        let placement = self.table.get(pl);
        let shape = placement.local_shape(ty, self.mesh).ok_or_else(|| {
            PartitionError::Local(format!(
                "{v} {ty} does not divide in {}",
                placement.display(self.mesh)
            ))
        })?;
        let id = self.out.add_node(
            node.op.clone(),
            vec![],
            vec![ty.with_shape(shape)],
            node.span,
            self.regions[node.region],
        );
        let l = self.out.node(id).outputs[0];
        if let Some(name) = &self.g.value(v).name {
            self.out.set_value_name(l, name.clone());
        }
        self.placements.push(pl);
        self.origin.push(Some(v));
        self.home[v] = Some((pl, l));
        Ok(l)
    }

    /// The local value holding global `v` in placement `want`, resharding if needed.
    fn get(
        &mut self,
        v: ValueId,
        want: PlId,
        user: &Use,
    ) -> Result<ValueId<Local>, PartitionError> {
        let Some((from, l)) = self.home[v] else {
            // A free leaf is loaded in the split it is wanted in; partial terms are not data
            // that exists anywhere, so they come from the loaded value by resharding (a
            // Replicate -> Partial(sum) keeps it on the first device only).
            let mut whole = self.table.get(want).clone();
            whole.partial.iter_mut().for_each(|p| *p = None);
            let whole = self.table.intern_owned(whole);
            let l = self.materialize(v, whole)?;
            if whole == want {
                return Ok(l);
            }
            let r = self.reshard(l, v, whole, want, user)?;
            self.copies.insert((v, want), r);
            return Ok(r);
        };
        if from == want {
            return Ok(l);
        }
        if let Some(&r) = self.copies.get(&(v, want)) {
            return Ok(r);
        }
        let r = self.reshard(l, v, from, want, user)?;
        self.copies.insert((v, want), r);
        Ok(r)
    }

    /// Emits the collectives moving local `l` (global `v`) from `from` to `to`.
    fn reshard(
        &mut self,
        l: ValueId<Local>,
        v: ValueId,
        from: PlId,
        to: PlId,
        user: &Use,
    ) -> Result<ValueId<Local>, PartitionError> {
        let mut cur = l;
        if from == to {
            return Ok(cur);
        }
        let steps = reshard::plan_reshard(self.table.get(from), self.table.get(to), self.mesh)?;
        for step in steps {
            let Some(op) = step.op.clone() else { continue };
            let after = self.table.intern(&step.after);
            cur = self.emit(op, vec![cur], user.span, user.region, after, Some(v))?[0];
            let id = self.out.value(cur).node;
            let value = describe_value(self.g, v);
            self.provenance.insert(
                id,
                Provenance {
                    transition: reshard::describe(&step, self.mesh),
                    user: user.user.describe(),
                    span: user.span,
                    value,
                    members: Vec::new(),
                },
            );
        }
        Ok(cur)
    }

    /// Partitions one non-leaf node.
    fn node(&mut self, id: NodeId) -> Result<(), PartitionError> {
        let g = self.g;
        let node = g.node(id);
        let region = self.regions[node.region];
        let user = Use {
            user: if g.region(node.region).phase == Phase::Backward {
                User::Backward(self.forward_ops.get(&node.span).copied().unwrap_or("an op"))
            } else {
                User::Op(node.op.name())
            },
            span: node.span,
            region,
        };
        let mut ins = Vec::with_capacity(node.inputs.len());
        let mut reqs = Vec::with_capacity(node.inputs.len());
        for (i, &v) in node.inputs.iter().enumerate() {
            let req = self.sh.operand_placement(g, id, i, &mut self.table);
            ins.push(self.get(v, req, &user)?);
            reqs.push(req);
        }
        let computed = self.sh.computed_placement(g, id, &mut self.table);
        let outs = self.lower_op(id, ins, &reqs, computed)?;
        for (&o, l) in node.outputs.iter().zip(outs) {
            self.origin[l] = Some(o);
            if let Some(name) = &g.value(o).name {
                self.out.set_value_name(l, name.clone());
            }
            let placed = self.sh.placement_of[o];
            let l = if placed != computed {
                let u = Use {
                    user: User::Constraint(g.value(o).name.as_deref()),
                    span: g.annotation(o).map(|a| a.span).unwrap_or(node.span),
                    region,
                };
                self.reshard(l, o, computed, placed, &u)?
            } else {
                l
            };
            self.home[o] = Some((placed, l));
        }
        Ok(())
    }
}

/// Adds a region of `out` for every region of `g` but the root, in order, under the regions
/// standing for their parents; returns which local region stands for which global one. A
/// verified `g` lists parents before their children.
fn local_regions(g: &Graph, out: &mut Graph<Local>) -> IdVec<RegionId, RegionId<Local>> {
    let mut map = IdVec::from_vec(vec![out.root()]);
    for (_, r) in g.regions().skip(1) {
        let parent = map[r.parent.unwrap_or(g.root())];
        let l = out.add_region(r.path.clone(), r.block.clone(), parent, r.body);
        out.set_phase(l, r.phase);
        map.push(l);
    }
    map
}

/// `h` for a named value, else `the matmul result` (for provenance).
pub(crate) fn describe_value(g: &Graph, v: ValueId) -> String {
    match &g.value(v).name {
        Some(n) => n.clone(),
        None => format!("the {} result", g.node(g.value(v).node).op.name()),
    }
}
