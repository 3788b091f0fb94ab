//! The direct multi-axis reshard (`Op::Redistribute`): one all-to-all over the combined group
//! of several mesh axes. Each device's old and new blocks are boxes of the group's sub-tensor
//! (the tensor as split by the axes outside the group); a device sends each peer the
//! intersection of its old box with the peer's new box, in a shifted pairwise order.

use super::comm::{CommError, Elem, Transport};
use crate::mesh::Mesh;
use ndarray::{ArrayD, ArrayViewD, IxDyn, Slice};
use std::ops::Range;

/// Why a redistribute could not run.
#[derive(Debug, thiserror::Error)]
pub enum RedistributeError {
    /// The op names an axis the mesh lacks or its sizes disagree with the mesh.
    #[error("redistribute: {0}")]
    Group(String),
    /// A message failed.
    #[error(transparent)]
    Comm(#[from] CommError),
}

/// The group of a redistribute as seen by one device.
struct Group {
    /// Mesh axis index of each group axis.
    axes: Vec<usize>,
    /// Size of each group axis.
    sizes: Vec<u64>,
}

impl Group {
    /// Resolves the op's axes on `mesh`.
    fn new(mesh: &Mesh, axes: &[(String, u64)]) -> Result<Group, RedistributeError> {
        let mut idx = Vec::with_capacity(axes.len());
        for (name, size) in axes {
            let a = mesh
                .axis_index(name)
                .ok_or_else(|| RedistributeError::Group(format!("no mesh axis `{name}`")))?;
            if mesh.axis_size(a) != *size {
                return Err(RedistributeError::Group(format!(
                    "axis {name} has {} devices, not {size}",
                    mesh.axis_size(a)
                )));
            }
            idx.push(a);
        }
        let sizes = axes.iter().map(|(_, n)| *n).collect();
        Ok(Group { axes: idx, sizes })
    }

    /// Number of devices in the group.
    fn len(&self) -> usize {
        self.sizes.iter().product::<u64>() as usize
    }

    /// The group coordinates of member `m` (mixed radix, first axis major).
    fn member(&self, mut m: usize) -> Vec<u64> {
        let mut c = vec![0; self.sizes.len()];
        for (i, &n) in self.sizes.iter().enumerate().rev() {
            c[i] = m as u64 % n;
            m /= n as usize;
        }
        c
    }

    /// The world rank of member `m`, given this device's mesh coordinates.
    fn rank_of(&self, mesh: &Mesh, coords: &[u64], m: usize) -> usize {
        let mut c = coords.to_vec();
        for (&a, g) in self.axes.iter().zip(self.member(m)) {
            c[a] = g;
        }
        mesh.device(&c) as usize
    }
}

/// Per dim, the box of the sub-tensor that group coordinates `gc` hold when the dims are split
/// by `split` (group axis indices, major first) into blocks of `len`.
fn block(split: &[Vec<usize>], sizes: &[u64], gc: &[u64], len: &[usize]) -> Vec<Range<usize>> {
    split
        .iter()
        .zip(len)
        .map(|(axes, &n)| {
            let i = axes.iter().fold(0u64, |i, &a| i * sizes[a] + gc[a]) as usize;
            i * n..(i + 1) * n
        })
        .collect()
}

/// The intersection of two boxes, `None` when empty.
fn meet(a: &[Range<usize>], b: &[Range<usize>]) -> Option<Vec<Range<usize>>> {
    let r: Vec<Range<usize>> = a
        .iter()
        .zip(b)
        .map(|(x, y)| x.start.max(y.start)..x.end.min(y.end))
        .collect();
    r.iter().all(|x| x.start < x.end).then_some(r)
}

/// `b` relative to the origin of box `at`.
fn relative(b: &[Range<usize>], at: &[Range<usize>]) -> Vec<Range<usize>> {
    b.iter()
        .zip(at)
        .map(|(x, o)| x.start - o.start..x.end - o.start)
        .collect()
}

/// The elements of `x` in box `b` (relative to `x`), row-major.
fn extract<T: Copy>(x: &ArrayViewD<'_, T>, b: &[Range<usize>]) -> Vec<T> {
    x.slice_each_axis(|ax| Slice::from(b[ax.axis.index()].clone()))
        .iter()
        .copied()
        .collect()
}

/// Writes row-major `data` into box `b` of `out`.
fn insert<T: Copy>(out: &mut ArrayD<T>, b: &[Range<usize>], data: &[T]) {
    let shape: Vec<usize> = b.iter().map(|r| r.len()).collect();
    let src = ArrayViewD::from_shape(IxDyn(&shape), data).expect("the box's element count");
    out.slice_each_axis_mut(|ax| Slice::from(b[ax.axis.index()].clone()))
        .assign(&src);
}

/// The op's attributes.
pub struct Spec<'a> {
    /// The group's axes with their sizes, in mesh order.
    pub axes: &'a [(String, u64)],
    /// Per dim, the group axes splitting it before.
    pub from: &'a [Vec<usize>],
    /// Per dim, the group axes splitting it after.
    pub to: &'a [Vec<usize>],
}

/// Runs a redistribute on this device (`coords` on `mesh`): `x` is its old block; returns its
/// new block. Elements move exactly, in their own type.
pub fn run<T: Elem + Copy + Default>(
    t: &mut dyn Transport,
    mesh: &Mesh,
    coords: &[u64],
    spec: &Spec<'_>,
    x: ArrayViewD<'_, T>,
) -> Result<ArrayD<T>, RedistributeError> {
    let g = Group::new(mesh, spec.axes)?;
    let count = |split: &[usize]| {
        split
            .iter()
            .map(|&a| g.sizes[a] as usize)
            .product::<usize>()
    };
    let old_len: Vec<usize> = x.shape().to_vec();
    let new_len: Vec<usize> = (0..old_len.len())
        .map(|d| old_len[d] * count(&spec.from[d]) / count(&spec.to[d]))
        .collect();
    let mine: Vec<u64> = g.axes.iter().map(|&a| coords[a]).collect();
    let my_old = block(spec.from, &g.sizes, &mine, &old_len);
    let my_new = block(spec.to, &g.sizes, &mine, &new_len);
    let mut out = ArrayD::<T>::default(IxDyn(&new_len));
    if let Some(b) = meet(&my_old, &my_new) {
        let data = extract(&x, &relative(&b, &my_old));
        insert(&mut out, &relative(&b, &my_new), &data);
    }
    let k = g.len();
    let me = (0..k).find(|&m| g.member(m) == mine).unwrap_or(0);
    for s in 1..k {
        let (to, from) = ((me + s) % k, (me + k - s) % k);
        let send = meet(&my_old, &block(spec.to, &g.sizes, &g.member(to), &new_len))
            .map(|b| extract(&x, &relative(&b, &my_old)))
            .unwrap_or_default();
        let from_rank = g.rank_of(mesh, coords, from);
        let msg = t.exchange(g.rank_of(mesh, coords, to), T::message(send), from_rank)?;
        let got = T::from_message(msg, from_rank)?;
        let want = meet(
            &block(spec.from, &g.sizes, &g.member(from), &old_len),
            &my_new,
        );
        let n = want
            .as_ref()
            .map_or(0, |b| b.iter().map(|r| r.len()).product());
        if got.len() != n {
            return Err(CommError::Length {
                from: from_rank,
                got: got.len(),
                want: n,
            }
            .into());
        }
        if let Some(b) = want {
            insert(&mut out, &relative(&b, &my_new), &got);
        }
    }
    Ok(out)
}
