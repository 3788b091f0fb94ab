//! The direct path for shard-to-shard moves across several mesh axes: one `Redistribute` over
//! the combined group of the axes that move, instead of gathering one axis at a time (which
//! holds several shards at once and moves more bytes). Chosen when it moves fewer bytes.

use super::Step;
use crate::cost::CollectiveKind;
use crate::ir::Op;
use crate::mesh::Mesh;
use crate::sharding::Placement;

/// The one-step direct move from `from` to `to`, when it applies: the partial states agree, and
/// per dim the axes that stay form a common major prefix while the rest (at least two axes in
/// all) are split in both placements.
pub fn step(from: &Placement, to: &Placement, mesh: &Mesh) -> Option<Step> {
    if from.partial != to.partial || from.dims.len() != to.dims.len() {
        return None;
    }
    let moved = |p: &Placement| -> Vec<Vec<usize>> {
        p.dims
            .iter()
            .zip(&from.dims)
            .zip(&to.dims)
            .map(|((mine, f), t)| {
                let keep = f.iter().zip(t).take_while(|(a, b)| a == b).count();
                mine[keep..].to_vec()
            })
            .collect()
    };
    let (old, new) = (moved(from), moved(to));
    let mut group: Vec<usize> = old.iter().flatten().copied().collect();
    group.sort_unstable();
    let mut check: Vec<usize> = new.iter().flatten().copied().collect();
    check.sort_unstable();
    if group != check || group.len() < 2 {
        return None;
    }
    let pos = |a: &usize| group.iter().position(|g| g == a).expect("a group axis");
    let index = |dims: &[Vec<usize>]| -> Vec<Vec<usize>> {
        dims.iter().map(|d| d.iter().map(pos).collect()).collect()
    };
    Some(Step {
        op: Some(Op::Redistribute {
            axes: mesh.named_axes(&group),
            from: index(&old),
            to: index(&new),
        }),
        axis: group[0],
        before: from.clone(),
        after: to.clone(),
    })
}

/// The fraction of the global tensor one device holds in `p`.
fn held(p: &Placement, mesh: &Mesh) -> f64 {
    1.0 / p.blocks(mesh) as f64
}

/// Bytes each device sends along `steps`, as a fraction of the global tensor's bytes.
pub fn sent(steps: &[Step], mesh: &Mesh) -> f64 {
    steps
        .iter()
        .filter_map(|s| {
            let (kind, n) = CollectiveKind::of(s.op.as_ref()?)?;
            Some(kind.traffic(n, held(&s.before, mesh)).0)
        })
        .sum()
}
