//! The program hash a checkpoint records: what its params and optimizer state mean. It covers
//! the computation that makes the loss and every carried value (ops with their constants,
//! leaf names, types, the wiring), and nothing of how the program is laid out: sharding
//! annotations, the mesh, microbatches, pipeline stages, source locations, and outputs that are
//! only reported (`grad(...)`). So the same program resumes on any mesh, and another program
//! (other dims, another optimizer or learning rate) is refused.

use crate::ir::{Graph, NodeId, ValueId};
use sha2::{Digest, Sha256};

/// `sha256:<hex>` of the computation of `loss` and of each carried pair's next value in `g`.
pub fn program_hash(g: &Graph, loss: &str, carried: &[(String, String)]) -> String {
    let roots: Vec<ValueId> = g
        .outputs()
        .iter()
        .filter(|o| o.name == loss || carried.iter().any(|(_, next)| *next == o.name))
        .map(|o| o.value)
        .collect();
    let live = live_nodes(g, &roots);
    let mut dense = vec![usize::MAX; g.num_values()];
    let mut next = 0usize;
    let mut h = Sha256::new();
    for (id, n) in g.nodes().filter(|(id, _)| live[id.index()]) {
        let op = serde_json::to_string(&n.op).unwrap_or_else(|_| n.op.name().to_string());
        let ins: Vec<String> = n
            .inputs
            .iter()
            .map(|v| dense[v.index()].to_string())
            .collect();
        let mut outs = Vec::with_capacity(n.outputs.len());
        for &v in &n.outputs {
            dense[v.index()] = next;
            next += 1;
            outs.push(g.ty(v).to_string());
        }
        let _ = id;
        h.update(format!("{op}|{}|{}\n", ins.join(","), outs.join(",")));
    }
    for o in g.outputs() {
        if roots.contains(&o.value) {
            h.update(format!("out {}={}\n", o.name, dense[o.value.index()]));
        }
    }
    for (leaf, next) in carried {
        h.update(format!("carry {leaf}<-{next}\n"));
    }
    let digest = h.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The nodes the values `roots` depend on.
fn live_nodes(g: &Graph, roots: &[ValueId]) -> Vec<bool> {
    let mut live = vec![false; g.num_nodes()];
    let mut stack: Vec<NodeId> = roots.iter().map(|&v| g.value(v).node).collect();
    while let Some(id) = stack.pop() {
        if std::mem::replace(&mut live[id.index()], true) {
            continue;
        }
        stack.extend(g.node(id).inputs.iter().map(|&v| g.value(v).node));
    }
    live
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diag::SourceFile;
    use crate::driver::compile_step;

    const MLP: &str = "mesh dp, tp
input x : f32[8, 16] @ [dp, _]
param w1 : f32[16, 32] @ [_, tp]
param w2 : f32[32, 16] @ [tp, _]
y = gelu(x @ w1) @ w2
loss = mean(mean(y * y, 1), 0)
train loss with adamw(lr=0.01)
";

    fn hash_of(text: &str, sets: &[(&str, i64)], grads: bool) -> String {
        let src = SourceFile::new("t.tpl", text.to_string());
        let sets: Vec<(String, i64)> = sets.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let c =
            compile_step(&src, &sets, grads).unwrap_or_else(|e| panic!("{}", e.render(Some(&src))));
        program_hash(&c.graph, "loss", &c.carried)
    }

    #[test]
    fn the_hash_follows_the_math_not_the_layout() {
        let base = hash_of(MLP, &[], false);
        assert!(base.starts_with("sha256:") && base.len() == 7 + 64);
        // Layout: annotations, reported gradients, blank lines and comments change nothing.
        let unannotated = MLP.replace(" @ [_, tp]", "").replace(" @ [tp, _]", "");
        assert_eq!(hash_of(&unannotated, &[], false), base);
        assert_eq!(hash_of(MLP, &[], true), base);
        let spaced = MLP.replace("y = ", "# a comment\n\ny = ");
        assert_eq!(hash_of(&spaced, &[], false), base);
        // Math: the learning rate, the optimizer, a dim.
        assert_ne!(
            hash_of(&MLP.replace("lr=0.01", "lr=0.02"), &[], false),
            base
        );
        assert_ne!(
            hash_of(&MLP.replace("adamw(lr=0.01)", "sgd(lr=0.01)"), &[], false),
            base
        );
        assert_ne!(
            hash_of(
                &MLP.replace("f32[16, 32]", "f32[16, 64]")
                    .replace("f32[32, 16]", "f32[64, 16]"),
                &[],
                false
            ),
            base
        );
    }
}
