//! Memo of the forward pass over block instances. An instance whose decisions would read exactly
//! what an earlier instance of the same pass read gets that instance's choices and states copied
//! instead of recomputed, so the outcome is the same node for node.
//!
//! What `choose`, `candidates` and `cost` read at a node: its rule, its compute time, the
//! strategies of the earlier axes, its own choice in the previous pass, and per operand and
//! result the bytes, param, free and held flags, fixed state, current state and demands (with
//! their counts). The key of an instance holds all of it, relative to the instance: a static
//! part (structure, rules, compute, earlier-axis strategies, per-value bytes, flags and fixed
//! states, interned into a class per axis) and a dynamic part read at the instance's start in
//! each pass (the states of the values entering it and of its leaves, the demands on every value
//! it produces or reads from outside, its nodes' previous choices). States produced inside
//! follow from these by induction.

use super::{AxisCtx, Demands, Strategy};
use crate::ir::{Graph, NodeId, RegionId, ValueId};
use crate::sharding::placement::{AxisPl, FxBuild, PartialOp};
use std::collections::HashMap;

/// A block instance with its sub-instances, occupying the contiguous nodes `start..end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Instance {
    start: u32,
    end: u32,
    body: u32,
}

/// The block instances of `g` whose nodes are contiguous in storage order, sorted by start and
/// outermost first.
pub(super) fn instances(g: &Graph) -> Vec<Instance> {
    let nr = g.regions().len();
    let (mut lo, mut hi, mut count) = (vec![u32::MAX; nr], vec![0u32; nr], vec![0u32; nr]);
    for (id, node) in g.nodes() {
        let mut r = Some(node.region);
        // At most `nr` steps up: a stored document could hold a cycle of parents.
        for _ in 0..nr {
            let Some(x) = r.filter(|x| x.index() != 0 && x.index() < nr) else {
                break;
            };
            let i = x.index();
            lo[i] = lo[i].min(id.0);
            hi[i] = hi[i].max(id.0 + 1);
            count[i] += 1;
            r = g.region(x).parent;
        }
    }
    let mut out: Vec<Instance> = (1..nr)
        .filter(|&i| count[i] > 0 && hi[i] - lo[i] == count[i])
        .map(|i| Instance {
            start: lo[i],
            end: hi[i],
            body: g.region(RegionId::new(i)).body,
        })
        .collect();
    out.sort_by_key(|x| (x.start, std::cmp::Reverse(x.end)));
    out
}

/// One word per axis state, distinct for distinct states.
fn state_word(s: AxisPl) -> u64 {
    match s {
        AxisPl::Replicate => 0,
        AxisPl::Partial(PartialOp::Sum) => 1,
        AxisPl::Partial(PartialOp::Max) => 2,
        AxisPl::Shard(d) => 3 + d as u64,
    }
}

/// One word per strategy, distinct for distinct strategies.
fn strategy_word(s: Strategy) -> u64 {
    match s {
        Strategy::Replicate => 0,
        Strategy::Split(l) => 1 + 2 * l as u64,
        Strategy::Linear(k) => 2 + 2 * k as u64,
    }
}

/// The memo along one mesh axis.
pub(super) struct Memo<'i> {
    inst: &'i [Instance],
    /// Per instance, its class: instances with equal static keys share one.
    class: Vec<u32>,
    /// Per instance, `watch[watch_at[i]..watch_at[i + 1]]`: the values entering it (in first
    /// use order), then the results of its nodes without a rule.
    watch_at: Vec<u32>,
    watch: Vec<ValueId>,
    /// The first instance not yet passed in this pass.
    next: usize,
    /// Dynamic key to the instance of this pass that had it first.
    seen: HashMap<Vec<u64>, u32, FxBuild>,
    key: Vec<u64>,
    /// The first node of each instance copied so far.
    pub(super) copied: Vec<NodeId>,
}

impl Memo<'_> {
    /// Forgets the instances seen: their states are rewritten by the next pass.
    pub(super) fn begin_pass(&mut self) {
        self.seen.clear();
        self.next = 0;
    }
}

impl AxisCtx<'_> {
    /// The memo of `inst` along this axis; `earlier` holds the strategies of the previous axes.
    pub(super) fn memo<'i>(
        &self,
        inst: &'i [Instance],
        earlier: &[Strategy],
        rank: usize,
    ) -> Memo<'i> {
        let mut classes: HashMap<Vec<u64>, u32, FxBuild> = HashMap::default();
        let mut m = Memo {
            inst,
            class: Vec::with_capacity(inst.len()),
            watch_at: vec![0],
            watch: Vec::new(),
            next: 0,
            seen: HashMap::default(),
            key: Vec::new(),
            copied: Vec::new(),
        };
        let mut key = Vec::new();
        for &it in inst {
            self.static_key(it, earlier, rank, &mut key, &mut m.watch);
            let class = match classes.get(key.as_slice()) {
                Some(&c) => c,
                None => {
                    let c = classes.len() as u32;
                    classes.insert(key.clone(), c);
                    c
                }
            };
            m.class.push(class);
            m.watch_at.push(m.watch.len() as u32);
        }
        m
    }

    /// Into `key`: everything about instance `it` that is the same in every pass. Appends to
    /// `watch` the values entering it, then the results of its nodes without a rule.
    fn static_key(
        &self,
        it: Instance,
        earlier: &[Strategy],
        rank: usize,
        key: &mut Vec<u64>,
        watch: &mut Vec<ValueId>,
    ) {
        let first = watch.len();
        key.clear();
        key.extend([it.body as u64, (it.end - it.start) as u64]);
        for i in it.start as usize..it.end as usize {
            let id = NodeId::new(i);
            match self.rule_of[id] {
                Some(r) => {
                    key.extend([r as u64, self.compute[id].to_bits()]);
                    let prior = &earlier[i * rank..i * rank + self.a];
                    key.extend(prior.iter().map(|&s| strategy_word(s)));
                }
                None => key.push(u64::MAX),
            }
            let inputs = self.edges.inputs(id);
            key.push(inputs.len() as u64);
            for &v in inputs {
                self.operand_words(it, id, v, key, watch, first);
            }
            let outputs = self.edges.outputs(id);
            key.push(outputs.len() as u64);
            for &o in outputs {
                key.extend(self.value_words(o));
                key.push(self.fixed_state(o).map_or(u64::MAX, state_word));
            }
        }
        for &e in &watch[first..] {
            key.extend(self.value_words(e));
        }
        for i in it.start as usize..it.end as usize {
            let id = NodeId::new(i);
            if self.rule_of[id].is_none() {
                watch.extend_from_slice(self.edges.outputs(id));
            }
        }
    }

    /// Into `key`: where operand `v` of node `user` of `it` comes from, relative to `it`: a
    /// result of an earlier node of it (offset, index), or the n-th value entering it (recorded
    /// in `watch[first..]`, in first use order).
    fn operand_words(
        &self,
        it: Instance,
        user: NodeId,
        v: ValueId,
        key: &mut Vec<u64>,
        watch: &mut Vec<ValueId>,
        first: usize,
    ) {
        let val = self.g.value(v);
        // A later producer (only in an unverified graph) has not run yet: its state is read as
        // it was at the start, like a value entering.
        if (it.start..user.0).contains(&val.node.0) {
            key.extend([0, (val.node.0 - it.start) as u64, val.index as u64]);
            return;
        }
        let at = watch[first..].iter().position(|&w| w == v);
        let at = at.unwrap_or_else(|| {
            watch.push(v);
            watch.len() - first - 1
        });
        key.extend([1, at as u64]);
    }

    /// The static facts about value `v` the cost model reads.
    fn value_words(&self, v: ValueId) -> [u64; 4] {
        [
            self.bytes[v].to_bits(),
            self.param[v] as u64,
            self.free[v] as u64,
            self.held[v] as u64,
        ]
    }

    /// Into `memo.key`: the class of instance `k` and what it reads that changes between passes.
    fn dynamic_key(
        &self,
        memo: &mut Memo,
        k: usize,
        st: &[AxisPl],
        demand: Option<&Demands>,
        choice: &[Option<Strategy>],
    ) {
        let it = memo.inst[k];
        let key = &mut memo.key;
        key.clear();
        key.extend([memo.class[k] as u64, demand.is_some() as u64]);
        let watch = &memo.watch[memo.watch_at[k] as usize..memo.watch_at[k + 1] as usize];
        key.extend(watch.iter().map(|v| state_word(st[v.index()])));
        if let Some(d) = demand {
            let at = &self.edges.outs_at;
            let outs =
                &self.edges.outs[at[it.start as usize] as usize..at[it.end as usize] as usize];
            for &o in outs.iter().chain(watch) {
                let want = d.of(o);
                key.push(want.len() as u64);
                key.extend(want.iter().map(|&s| state_word(s)));
                key.extend(d.counts(o).iter().map(|&n| n as u64));
            }
            key.extend(
                (it.start as usize..it.end as usize)
                    .map(|i| choice[i].map_or(u64::MAX, strategy_word)),
            );
        }
    }

    /// At node `i`: the first instance starting there whose dynamic key an earlier, finished
    /// instance of this pass had gets that instance's choices and states; returns its end. The
    /// instances tried and missed are remembered for later ones.
    pub(super) fn copy_instance(
        &self,
        memo: &mut Memo,
        i: usize,
        st: &mut [AxisPl],
        choice: &mut [Option<Strategy>],
        demand: Option<&Demands>,
        changed: &mut bool,
    ) -> Option<usize> {
        while memo.next < memo.inst.len() && (memo.inst[memo.next].start as usize) < i {
            memo.next += 1;
        }
        while memo.next < memo.inst.len() && memo.inst[memo.next].start as usize == i {
            let k = memo.next;
            memo.next += 1;
            self.dynamic_key(memo, k, st, demand, choice);
            match memo.seen.get(memo.key.as_slice()) {
                Some(&src) if memo.inst[src as usize].end as usize <= i => {
                    let (from, to) = (memo.inst[src as usize], memo.inst[k]);
                    self.copy_nodes(from.start as usize, to, st, choice, changed);
                    memo.copied.push(NodeId::new(to.start as usize));
                    return Some(to.end as usize);
                }
                Some(_) => {}
                None => {
                    memo.seen.insert(memo.key.clone(), k as u32);
                }
            }
        }
        None
    }

    /// Copies the choices and result states of the nodes from `from` on onto instance `to`.
    fn copy_nodes(
        &self,
        from: usize,
        to: Instance,
        st: &mut [AxisPl],
        choice: &mut [Option<Strategy>],
        changed: &mut bool,
    ) {
        for (k, dst) in (to.start as usize..to.end as usize).enumerate() {
            if self.rule_of[NodeId::new(dst)].is_none() {
                continue;
            }
            let src = from + k;
            let outs = self.edges.outputs(NodeId::new(src));
            for (o, &p) in self.edges.outputs(NodeId::new(dst)).iter().zip(outs) {
                st[o.index()] = st[p.index()];
            }
            if choice[dst] != choice[src] {
                *changed = true;
                choice[dst] = choice[src];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{propagate_with, Sharding};
    use crate::diag::SourceFile;
    use crate::driver::compile_global;
    use crate::ir::{Graph, NodeId};
    use crate::mesh::{Device, Mesh};
    use crate::sharding::AxisPl;

    fn graph(name: &str, text: String, sets: &[(&str, i64)]) -> Graph {
        let sets: Vec<(String, i64)> = sets.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        compile_global(&SourceFile::new(name, text), &sets).unwrap()
    }

    fn mesh(g: &Graph, spec: &str) -> Mesh {
        let m = match spec.parse() {
            Ok(n) => Mesh::degree(n).unwrap(),
            Err(_) => Mesh::parse(spec).unwrap(),
        };
        m.with_declared(&g.mesh_axes)
    }

    /// Propagates with and without the memo, checks the outcomes agree, returns the first.
    fn both(g: &Graph, m: &Mesh, dev: &Device) -> Sharding {
        let (a, b) = (
            propagate_with(g, m, dev, true).unwrap(),
            propagate_with(g, m, dev, false).unwrap(),
        );
        assert_eq!(a.rule_of, b.rule_of);
        assert_eq!(a.strategies, b.strategies);
        assert_eq!(a.free, b.free);
        for (v, _) in g.values() {
            assert_eq!(a.placement(v), b.placement(v), "placement of {v}");
        }
        assert!(b.copied_instances.is_empty());
        a
    }

    /// The first node of instance `path`.
    fn first_node(g: &Graph, path: &str) -> NodeId {
        g.nodes()
            .find(|(_, n)| g.region(n.region).path == path)
            .map(|(id, _)| id)
            .unwrap()
    }

    #[test]
    fn gpt_layers_are_copied_and_agree_with_node_by_node() {
        let text = std::fs::read_to_string("examples/gpt.tpl").unwrap();
        let g = graph("gpt.tpl", text, &[("L", 12)]);
        for spec in ["8", "2", "dp=2,tp=4"] {
            for dev in [
                Device::default(),
                Device {
                    mem_weight: 0.0,
                    flops_f32: 1e18,
                    ..Device::default()
                },
            ] {
                let sh = both(&g, &mesh(&g, spec), &dev);
                for k in 2..12 {
                    let first = first_node(&g, &format!("layer.{k}"));
                    assert!(sh.copied_instances.contains(&first), "{spec}: layer.{k}");
                }
            }
        }
    }

    const STACK: &str = "mesh tp
dim B = 8, S = 8, H = 32
block layer(x: f32[B, S, H]) -> f32[B, S, H] {
    param w1 : f32[H, 4*H] @ [_, tp]
    param w2 : f32[4*H, H] @ [tp, _]
    return x + gelu(x @ w1) @ w2
}
input x : f32[B, S, H]
h = layer(layer(layer(x)))
h = layer(h)MARK
h = layer(layer(layer(h)))
output h
";

    #[test]
    fn a_differently_constrained_layer_is_not_copied() {
        let dev = Device::default();
        let plain = graph("stack.tpl", STACK.replace("MARK", ""), &[]);
        let sh = both(&plain, &mesh(&plain, "8"), &dev);
        assert!(sh.copied_instances.contains(&first_node(&plain, "layer.3")));
        let g = graph("stack.tpl", STACK.replace("MARK", " @ [tp, _, _]"), &[]);
        let sh = both(&g, &mesh(&g, "8"), &dev);
        assert!(!sh.copied_instances.contains(&first_node(&g, "layer.3")));
        assert!(sh.copied_instances.contains(&first_node(&g, "layer.6")));
        // The constrained value: the last one layer.3 produces, as computed node by node.
        let out = g
            .values()
            .filter(|(_, v)| g.region(g.node(v.node).region).path == "layer.3")
            .last()
            .map(|(v, _)| v)
            .unwrap();
        assert!(g.annotation(out).is_some());
        assert_eq!(sh.placement(out).axis(0), AxisPl::Shard(0));
    }
}
