//! Placements: how one tensor is laid out over the mesh. The canonical form lists, per tensor
//! dim, the mesh axes splitting it (major first), plus the axes over which the tensor is a
//! partial sum or max. The per-axis view (`Shard(d)`, `Replicate`, `Partial`) is derived from it.

use crate::ir::{Op, ReduceOp, Spec, TensorType};
use crate::mesh::Mesh;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

/// How the partial terms held by the devices of a group combine into the value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartialOp {
    /// The value is the sum of the terms.
    Sum,
    /// The value is the elementwise max of the terms.
    Max,
}

impl PartialOp {
    /// `sum` or `max`.
    pub fn name(self) -> &'static str {
        match self {
            PartialOp::Sum => "sum",
            PartialOp::Max => "max",
        }
    }
}

/// The state of a tensor along one mesh axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum AxisPl {
    /// Every device of the group holds the whole tensor.
    Replicate,
    /// Tensor dim `d` is split into contiguous blocks, one per device of the group.
    Shard(usize),
    /// Each device holds a term; the value is their reduction.
    Partial(PartialOp),
}

impl fmt::Display for AxisPl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AxisPl::Replicate => f.write_str("Replicate"),
            AxisPl::Shard(d) => write!(f, "Shard({d})"),
            AxisPl::Partial(op) => write!(f, "Partial({})", op.name()),
        }
    }
}

/// A tensor's placement over a mesh (canonical form).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Placement {
    /// Per tensor dim, the mesh axis indices splitting it, major first.
    pub dims: Vec<Vec<usize>>,
    /// Per mesh axis, `Some(op)` when the tensor is partial over that axis.
    pub partial: Vec<Option<PartialOp>>,
}

impl Placement {
    /// Fully replicated placement of a rank-`rank` tensor on a mesh of `axes` axes.
    pub fn replicated(rank: usize, axes: usize) -> Self {
        Placement {
            dims: vec![Vec::new(); rank],
            partial: vec![None; axes],
        }
    }

    /// Builds the placement from per-axis states; dims split by several axes get them in mesh
    /// order (earlier axis major).
    pub fn from_axes(rank: usize, states: &[AxisPl]) -> Self {
        let mut p = Placement::replicated(rank, states.len());
        for (a, s) in states.iter().enumerate() {
            match s {
                AxisPl::Replicate => {}
                AxisPl::Shard(d) => p.dims[*d].push(a),
                AxisPl::Partial(op) => p.partial[a] = Some(*op),
            }
        }
        p
    }

    /// The placement an annotation asks for (no partial axes; axes of size 1 split nothing and are
    /// dropped). Axis names must exist in `mesh`.
    pub fn from_spec(spec: &Spec, mesh: &Mesh) -> Option<Self> {
        let dims = spec
            .dims
            .iter()
            .map(|axes| {
                axes.iter()
                    .map(|a| mesh.axis_index(a))
                    .filter(|a| a.is_none_or(|a| mesh.axis_size(a) > 1))
                    .collect::<Option<Vec<_>>>()
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Placement {
            dims,
            partial: vec![None; mesh.rank()],
        })
    }

    /// The state along mesh axis `a`.
    pub fn axis(&self, a: usize) -> AxisPl {
        if let Some(op) = self.partial[a] {
            return AxisPl::Partial(op);
        }
        match self.dims.iter().position(|axes| axes.contains(&a)) {
            Some(d) => AxisPl::Shard(d),
            None => AxisPl::Replicate,
        }
    }

    /// Per-axis states.
    pub fn axis_states(&self) -> Vec<AxisPl> {
        (0..self.partial.len()).map(|a| self.axis(a)).collect()
    }

    /// True when no axis splits or partially holds the tensor.
    pub fn is_replicated(&self) -> bool {
        self.dims.iter().all(|d| d.is_empty()) && self.partial.iter().all(|p| p.is_none())
    }

    /// True when some axis holds partial terms.
    pub fn has_partial(&self) -> bool {
        self.partial.iter().any(|p| p.is_some())
    }

    /// The number of blocks dim `d` is split into.
    pub fn splits(&self, d: usize, mesh: &Mesh) -> u64 {
        self.dims[d].iter().map(|&a| mesh.axis_size(a)).product()
    }

    /// The number of blocks the tensor is split into (over all its dims).
    pub fn blocks(&self, mesh: &Mesh) -> u64 {
        (0..self.dims.len()).map(|d| self.splits(d, mesh)).product()
    }

    /// The per-device shape of a tensor of global type `ty`, or `None` when a split dim does
    /// not divide.
    pub fn local_shape(&self, ty: &TensorType, mesh: &Mesh) -> Option<Vec<u64>> {
        ty.shape
            .iter()
            .enumerate()
            .map(|(d, &n)| {
                let k = self.splits(d, mesh);
                (n % k == 0).then_some(n / k)
            })
            .collect()
    }

    /// The block index of device `coords` along dim `d` (axes major first) and the block count.
    pub fn block(&self, d: usize, coords: &[u64], mesh: &Mesh) -> (u64, u64) {
        self.dims[d].iter().fold((0, 1), |(idx, cnt), &a| {
            (idx * mesh.axis_size(a) + coords[a], cnt * mesh.axis_size(a))
        })
    }

    /// The placement after moving mesh axis `a` to state `to`, other axes unchanged: the axis
    /// leaves its partial entry or the minor end of the dim it splits, then joins `to` (a split
    /// at the minor end of its dim). `None` when `a` splits a dim but not at its minor end.
    pub fn moved(&self, a: usize, to: AxisPl) -> Option<Placement> {
        let mut p = self.clone();
        if p.partial[a].take().is_none() {
            if let Some(d) = p.dims.iter().position(|axes| axes.contains(&a)) {
                if p.dims[d].pop() != Some(a) {
                    return None;
                }
            }
        }
        match to {
            AxisPl::Replicate => {}
            AxisPl::Shard(d) => p.dims.get_mut(d)?.push(a),
            AxisPl::Partial(op) => p.partial[a] = Some(op),
        }
        Some(p)
    }

    /// Spec-style display with axis names: `[_, tp]`, plus ` partial(sum: tp)` when partial.
    pub fn display(&self, mesh: &Mesh) -> String {
        let dims: Vec<String> = self
            .dims
            .iter()
            .map(|axes| match axes.len() {
                0 => "_".to_string(),
                1 => mesh.axis_name(axes[0]).to_string(),
                _ => format!(
                    "({})",
                    axes.iter()
                        .map(|&a| mesh.axis_name(a))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
            .collect();
        let mut s = format!("[{}]", dims.join(", "));
        let partial: Vec<String> = self
            .partial
            .iter()
            .enumerate()
            .filter_map(|(a, p)| p.map(|op| format!("{}:{}", op.name(), mesh.axis_name(a))))
            .collect();
        if !partial.is_empty() {
            s.push_str(&format!("{{{}}}", partial.join(",")));
        }
        s
    }
}

/// For an SPMD op that moves its operand along one mesh axis: that axis's name and the states
/// it moves from and to (other axes unchanged, as `Placement::moved` applies it). `None` for
/// every other op.
pub fn transition(op: &Op) -> Option<(&str, AxisPl, AxisPl)> {
    let partial = |r: &ReduceOp| {
        AxisPl::Partial(match r {
            ReduceOp::Max => PartialOp::Max,
            ReduceOp::Sum | ReduceOp::Mean => PartialOp::Sum,
        })
    };
    Some(match op {
        Op::AllReduce { axis, reduce, .. } => (axis, partial(reduce), AxisPl::Replicate),
        Op::AllGather { axis, dim, .. } => (axis, AxisPl::Shard(*dim), AxisPl::Replicate),
        Op::ReduceScatter {
            axis, dim, reduce, ..
        } => (axis, partial(reduce), AxisPl::Shard(*dim)),
        Op::AllToAll {
            axis,
            split,
            concat,
            ..
        } => (axis, AxisPl::Shard(*concat), AxisPl::Shard(*split)),
        Op::ShardSlice { axis, dim, .. } => (axis, AxisPl::Replicate, AxisPl::Shard(*dim)),
        Op::KeepOnFirst { axis } => (axis, AxisPl::Replicate, AxisPl::Partial(PartialOp::Sum)),
        _ => return None,
    })
    .map(|(a, from, to)| (a.as_str(), from, to))
}

/// Index of a placement in a `PlacementTable`.
pub type PlId = u32;

/// Interned placements: a program has few distinct ones, so values refer to them by index
/// instead of each owning a `Placement` (several small heap blocks).
#[derive(Clone, Debug, Default)]
pub struct PlacementTable {
    list: Vec<Placement>,
    ids: HashMap<Placement, PlId, FxBuild>,
    by_axes: HashMap<Vec<AxisPl>, PlId, FxBuild>,
    key: Vec<AxisPl>,
}

impl PlacementTable {
    /// The id of `p`, adding it when new.
    pub fn intern(&mut self, p: &Placement) -> PlId {
        match self.ids.get(p) {
            Some(&id) => id,
            None => self.insert(p.clone()),
        }
    }

    /// The id of `p`, adding it when new (without cloning).
    pub fn intern_owned(&mut self, p: Placement) -> PlId {
        match self.ids.get(&p) {
            Some(&id) => id,
            None => self.insert(p),
        }
    }

    fn insert(&mut self, p: Placement) -> PlId {
        let id = self.list.len() as PlId;
        self.ids.insert(p.clone(), id);
        self.list.push(p);
        id
    }

    /// The id of `Placement::from_axes(rank, states)`, adding it when new.
    pub fn intern_axes(&mut self, rank: usize, states: impl IntoIterator<Item = AxisPl>) -> PlId {
        // The key is the rank (as a `Shard`) followed by the per-axis states.
        self.key.clear();
        self.key.push(AxisPl::Shard(rank));
        self.key.extend(states);
        if let Some(&id) = self.by_axes.get(self.key.as_slice()) {
            return id;
        }
        let id = self.intern_owned(Placement::from_axes(rank, &self.key[1..]));
        self.by_axes.insert(self.key.clone(), id);
        id
    }

    /// The number of distinct placements.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// True when the table holds no placement.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The placement `id`. Panics on an id from another table.
    pub fn get(&self, id: PlId) -> &Placement {
        &self.list[id as usize]
    }
}

/// Builds `FxHasher`s, for maps keyed by short structured keys that are never iterated.
pub(crate) type FxBuild = BuildHasherDefault<FxHasher>;

/// A small multiplicative hasher for short keys (lookups only: nothing iterates the maps, so
/// their order never shows).
#[derive(Default)]
pub(crate) struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.write_u64(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        for &b in chunks.remainder() {
            self.write_u64(b as u64);
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.write_u64(n as u64);
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(n as u64);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::Dtype;

    #[test]
    fn views_agree() {
        let mesh = Mesh::parse("dp=2,tp=4").unwrap();
        let p = Placement::from_axes(3, &[AxisPl::Shard(0), AxisPl::Shard(2)]);
        assert_eq!(p.display(&mesh), "[dp, _, tp]");
        assert_eq!(p.axis(0), AxisPl::Shard(0));
        assert_eq!(p.axis(1), AxisPl::Shard(2));
        let ty = TensorType::new(Dtype::F32, vec![8, 3, 16]);
        assert_eq!(p.local_shape(&ty, &mesh), Some(vec![4, 3, 4]));
        let q = Placement::from_axes(2, &[AxisPl::Shard(0), AxisPl::Shard(0)]);
        assert_eq!(q.display(&mesh), "[(dp, tp), _]");
        assert_eq!(q.block(0, &[1, 2], &mesh), (6, 8));
        let r = Placement::from_axes(1, &[AxisPl::Replicate, AxisPl::Partial(PartialOp::Sum)]);
        assert_eq!(r.display(&mesh), "[_]{sum:tp}");
        assert!(r.has_partial());
    }

    #[test]
    fn spec_round_trip() {
        let mesh = Mesh::parse("dp=2,tp=4").unwrap();
        let spec = Spec {
            dims: vec![vec!["tp".into(), "dp".into()], vec![]],
        };
        let p = Placement::from_spec(&spec, &mesh).unwrap();
        assert_eq!(p.display(&mesh), "[(tp, dp), _]");
        assert_eq!(p.block(0, &[1, 3], &mesh), (7, 8));
    }
}
