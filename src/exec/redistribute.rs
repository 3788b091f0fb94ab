//! The direct multi-axis reshard (`Op::Redistribute`): one all-to-all over the combined group
//! of several mesh axes. Each device's old and new blocks are boxes of the group's sub-tensor
//! (the tensor as split by the axes outside the group); a device sends each peer the
//! intersection of its old box with the peer's new box, in a shifted pairwise order.

use super::comm::{self, CommError, Elem, Transport};
use super::kernels::give;
use crate::mesh::Mesh;
use ndarray::{ArrayD, ArrayViewD, IxDyn, Slice};
use std::ops::Range;

/// The group of a redistribute as seen by one device.
struct Group {
    /// Mesh axis index of each group axis.
    axes: Vec<usize>,
    /// Size of each group axis.
    sizes: Vec<u64>,
}

impl Group {
    /// The group of mesh axes `axes` (major first).
    fn new(mesh: &Mesh, axes: &[usize]) -> Group {
        let sizes = axes.iter().map(|&a| mesh.axis_size(a)).collect();
        Group {
            axes: axes.to_vec(),
            sizes,
        }
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
    /// The mesh axis index of each group axis, in mesh order.
    pub axes: &'a [usize],
    /// Per dim, the group axes splitting it before.
    pub from: &'a [Vec<usize>],
    /// Per dim, the group axes splitting it after.
    pub to: &'a [Vec<usize>],
}

/// Runs a redistribute on this device (`coords` on `mesh`): `x` is its old block; returns its
/// new block. Elements move exactly, in their own type, one peer's block at a time.
pub fn run<T: Elem>(
    t: &mut dyn Transport,
    mesh: &Mesh,
    coords: &[u64],
    spec: &Spec<'_>,
    x: ArrayViewD<'_, T>,
) -> Result<ArrayD<T>, CommError> {
    let g = Group::new(mesh, spec.axes);
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
    let group: Vec<usize> = (0..g.len()).map(|m| g.rank_of(mesh, coords, m)).collect();
    let mut out = ArrayD::<T>::default(IxDyn(&new_len));
    // To member m: my old box met with m's new one; from member m: m's old box met with mine.
    let make = |to: usize| {
        meet(&my_old, &block(spec.to, &g.sizes, &g.member(to), &new_len))
            .map(|b| extract(&x, &relative(&b, &my_old)))
            .unwrap_or_default()
    };
    let take = |from: usize, got: Vec<T>| {
        let want = meet(
            &block(spec.from, &g.sizes, &g.member(from), &old_len),
            &my_new,
        );
        let n = want
            .as_ref()
            .map_or(0, |b| b.iter().map(|r| r.len()).product());
        comm::check_len(group[from], got.len(), n)?;
        if let Some(b) = want {
            insert(&mut out, &relative(&b, &my_new), &got);
        }
        give(got);
        Ok(())
    };
    comm::all_to_all_with(t, &group, make, take)?;
    Ok(out)
}
