//! Gradient buckets: the backward's all-reduces of one group, reduce op and dtype that are ready
//! together become one all-reduce of several operands, reduced as one message and placed right
//! after its last operand is made (PyTorch DDP's buckets; XLA's all-reduce combiner).

use super::summary::moved_phase;
use crate::ir::{Dtype, Graph, Local, Node, NodeId, Op, Phase};
use crate::partition::{Partitioned, Provenance};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

/// One bucket being filled: its members and the two bounds that keep the fused graph acyclic.
struct Open {
    members: Vec<NodeId<Local>>,
    bytes: u64,
    /// Smallest position of a member.
    min_pos: usize,
    /// Largest position of an all-reduce some member's operand depends on (`None`: none).
    max_dep: Option<usize>,
}

/// Fuses the backward's all-reduces into buckets of at most `cap` bytes per device (a larger
/// one stays alone); `cap` 0 leaves the program as it is.
pub fn fuse(p: Partitioned, cap: u64, temporal: Option<&str>) -> Partitioned {
    if cap == 0 {
        return p;
    }
    let buckets = buckets(&p.local, cap, temporal);
    if buckets.is_empty() {
        return p;
    }
    rebuild(p, &buckets)
}

/// The all-reduces worth fusing: one operand, made by the backward, not over the temporal axis
/// (a microbatch's accumulation moves nothing).
fn candidate(g: &Graph<Local>, n: &Node<Local>, temporal: Option<&str>) -> bool {
    matches!(&n.op, Op::AllReduce { axis, also, .. } if Some(axis.as_str()) != temporal && also.is_empty())
        && n.inputs.len() == 1
        && moved_phase(g, n.inputs[0]) == Phase::Backward
}

/// Per value, the largest position of a candidate all-reduce it depends on.
fn dependencies(g: &Graph<Local>, temporal: Option<&str>) -> Vec<Option<usize>> {
    let mut dep: Vec<Option<usize>> = vec![None; g.num_values()];
    for (id, n) in g.nodes() {
        let mut d = n.inputs.iter().map(|v| dep[v.index()]).max().flatten();
        if candidate(g, n, temporal) {
            d = Some(id.index());
        }
        for o in &n.outputs {
            dep[o.index()] = d;
        }
    }
    dep
}

/// Per value, whether it is made after a microbatch accumulation (reads, directly or not, an
/// all-reduce over the temporal axis): such values exist once per step, the others once per
/// microbatch, and one bucket never holds both.
fn per_step(g: &Graph<Local>, temporal: Option<&str>) -> Vec<bool> {
    let mut step = vec![false; g.num_values()];
    let Some(t) = temporal else {
        return step;
    };
    for (_, n) in g.nodes() {
        let accumulates = matches!(&n.op, Op::AllReduce { axis, .. } if axis == t);
        let s = accumulates || n.inputs.iter().any(|v| step[v.index()]);
        for o in &n.outputs {
            step[o.index()] = s;
        }
    }
    step
}

/// The buckets of two or more all-reduces, in the order they close.
///
/// Invariant (why the fused graph has no cycle): every bucket B keeps `max_dep(B) < min_pos(B)`.
/// A path in the fused graph from bucket B to bucket B' passes some member X of B's result on to
/// some member Y of B''s operand, so `min_pos(B) <= pos(X) <= dep(Y) <= max_dep(B') < min_pos(B')`:
/// `min_pos` grows strictly along every path, so no path returns to where it started.
fn buckets(g: &Graph<Local>, cap: u64, temporal: Option<&str>) -> Vec<Vec<NodeId<Local>>> {
    let dep = dependencies(g, temporal);
    let step = per_step(g, temporal);
    let ready = |id: NodeId<Local>| g.value(g.node(id).inputs[0]).node.index();
    let mut cands: Vec<NodeId<Local>> = g
        .nodes()
        .filter(|(_, n)| candidate(g, n, temporal))
        .map(|(id, _)| id)
        .collect();
    cands.sort_by_key(|&id| (ready(id), id.index()));
    let mut open: BTreeMap<(String, &'static str, Dtype, bool), Open> = BTreeMap::new();
    let mut done = Vec::new();
    for id in cands {
        let n = g.node(id);
        let Op::AllReduce { axis, reduce, .. } = &n.op else {
            continue;
        };
        let x = n.inputs[0];
        let key = (axis.clone(), reduce.name(), g.ty(x).dtype, step[x.index()]);
        let (bytes, d) = (g.ty(x).size_bytes(), dep[x.index()]);
        if let Some(b) = open.get(&key) {
            let fits = b.bytes.saturating_add(bytes) <= cap
                && d.is_none_or(|d| d < b.min_pos)
                && b.max_dep.is_none_or(|m| m < id.index());
            if !fits {
                done.push(open.remove(&key).expect("present").members);
            }
        }
        let b = open.entry(key).or_insert(Open {
            members: Vec::new(),
            bytes: 0,
            min_pos: usize::MAX,
            max_dep: None,
        });
        b.members.push(id);
        b.bytes = b.bytes.saturating_add(bytes);
        b.min_pos = b.min_pos.min(id.index());
        b.max_dep = b.max_dep.max(d);
    }
    done.extend(open.into_values().map(|b| b.members));
    done.retain(|m| m.len() > 1);
    done
}

/// The program with each bucket's members replaced by one all-reduce of all their operands,
/// ordered right after the last of those operands is made; values keep their ids.
fn rebuild(mut p: Partitioned, buckets: &[Vec<NodeId<Local>>]) -> Partitioned {
    let g = &p.local;
    let mut parts = g.to_parts();
    let old = g.num_nodes();
    // Node slots: the old nodes, then one per bucket; members are dropped.
    let mut nodes: Vec<Option<Node<Local>>> = parts.nodes.drain(..).map(Some).collect();
    let mut key: Vec<(usize, usize)> = (0..old).map(|i| (i, 0)).collect();
    let mut provenance: BTreeMap<usize, Provenance> = p
        .provenance
        .iter()
        .map(|(id, pr)| (id.index(), pr.clone()))
        .collect();
    for members in buckets {
        let (node, pr) = fused(g, &p.provenance, members);
        let last = members
            .iter()
            .map(|&m| g.value(g.node(m).inputs[0]).node.index())
            .max()
            .expect("a bucket has members");
        for &m in members {
            nodes[m.index()] = None;
            provenance.remove(&m.index());
        }
        provenance.insert(nodes.len(), pr);
        nodes.push(Some(node));
        key.push((last, 1));
    }
    let order = schedule(&parts.values, &nodes, &key);
    let mut new_id = vec![usize::MAX; nodes.len()];
    for (k, &i) in order.iter().enumerate() {
        new_id[i] = k;
    }
    let mut out = Vec::with_capacity(order.len());
    for &i in &order {
        let n = nodes[i].take().expect("scheduled once");
        for (k, v) in n.outputs.iter().enumerate() {
            let val = &mut parts.values[v.index()];
            val.node = NodeId::new(new_id[i]);
            val.index = k as u32;
        }
        out.push(n);
    }
    parts.nodes = out;
    p.local = Graph::from_parts(parts);
    p.provenance = provenance
        .into_iter()
        .map(|(i, pr)| (NodeId::new(new_id[i]), pr))
        .collect();
    p
}

/// One bucket's node and provenance: the members' operands and results in readiness order,
/// in the region and at the span of the last one.
fn fused(
    g: &Graph<Local>,
    provenance: &BTreeMap<NodeId<Local>, Provenance>,
    members: &[NodeId<Local>],
) -> (Node<Local>, Provenance) {
    let last = g.node(*members.last().expect("a bucket has members"));
    let producer = g.node(g.value(last.inputs[0]).node);
    let node = Node {
        op: last.op.clone(),
        inputs: members.iter().map(|&m| g.node(m).inputs[0]).collect(),
        outputs: members.iter().map(|&m| g.node(m).outputs[0]).collect(),
        span: last.span,
        region: producer.region,
    };
    let member_pr: Vec<Provenance> = members
        .iter()
        .filter_map(|m| provenance.get(m).cloned())
        .collect();
    let bytes: u64 = node.inputs.iter().map(|&v| g.ty(v).size_bytes()).sum();
    let first = member_pr.first().cloned();
    let pr = Provenance {
        transition: first.map(|f| f.transition).unwrap_or_default(),
        user: format!("a bucket of {} ({bytes} bytes)", members.len()),
        span: last.span,
        value: member_pr
            .iter()
            .map(|m| m.value.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        members: member_pr,
    };
    (node, pr)
}

/// A topological order of the slots in `nodes`, smallest `key` first among the ready ones.
fn schedule(
    values: &[crate::ir::Value<Local>],
    nodes: &[Option<Node<Local>>],
    key: &[(usize, usize)],
) -> Vec<usize> {
    // Producer slot of each value.
    let mut producer = vec![usize::MAX; values.len()];
    for (i, n) in nodes.iter().enumerate() {
        for o in n.iter().flat_map(|n| &n.outputs) {
            producer[o.index()] = i;
        }
    }
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    let mut indegree = vec![0usize; nodes.len()];
    for (i, n) in nodes.iter().enumerate() {
        for v in n.iter().flat_map(|n| &n.inputs) {
            let p = producer[v.index()];
            if p != usize::MAX {
                users[p].push(i);
                indegree[i] += 1;
            }
        }
    }
    let mut heap: BinaryHeap<Reverse<((usize, usize), usize)>> = nodes
        .iter()
        .enumerate()
        .filter(|(i, n)| n.is_some() && indegree[*i] == 0)
        .map(|(i, _)| Reverse((key[i], i)))
        .collect();
    let mut order = Vec::with_capacity(nodes.len());
    while let Some(Reverse((_, i))) = heap.pop() {
        order.push(i);
        for &u in &users[i] {
            indegree[u] -= 1;
            if indegree[u] == 0 {
                heap.push(Reverse((key[u], u)));
            }
        }
    }
    order
}
