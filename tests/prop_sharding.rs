//! Property tests of tpc's central invariant: sharding annotations change cost, never results.
//!
//! 1. `random_models_equal_the_reference`: random `.tpl` programs written as text — matmuls
//!    (2-D, batched `[B,S,H] @ [H,N]`, a batched weight, a weight on the left, 2-D @ 3-D
//!    broadcasting, matrix @ vector, vector . vector, activation @ activation), add/sub/mul/
//!    div/maximum with broadcasting (biases, keepdims-shaped operands, scalar losses), scalar ops,
//!    gelu/relu/silu/tanh/neg/exp and rsqrt/log/sqrt/recip on positive arguments, softmax on any
//!    axis, layernorm (with and without bias) and rmsnorm, sum/mean/max over any axis with and
//!    without keepdims (rank 1 too), transposes, reshapes that split and merge dims, split
//!    (equal and uneven, several targets), slice, concat, embedding (param or computed table)
//!    and cross-entropy (often on a projection to a large vocab) with i32 inputs, causal masks,
//!    blocks (an MLP or multi-head attention, with a second argument sometimes) called once or
//!    through `repeat` — with random sharding annotations (`_`, `dp`, `tp`, `(dp, tp)`,
//!    `(tp, dp)`) on params, inputs, intermediates, aliases (`v = t @ [..]` annotates t itself)
//!    and outputs, on random meshes of up to 8 devices (1-D, 2-D in both axis orders, and 3-D
//!    with an axis the program does not name). Dims are mostly 2..16 powers of two, sometimes
//!    6 or 12; an annotation that does not divide is rare and deliberate.
//!    A user error is fine (it must not be internal and must render with a location); a plan must
//!    run (one thread per device) and give every output of the unsharded reference
//!    (numpy `allclose`, rtol 1e-4, atol 1e-5). An element outside that is accepted only within
//!    ten times its deviation in a run of the reference with every leaf and op result perturbed
//!    by a relative 1e-6 (see `prop_support::perturbed_reference`): a layernorm of a nearly
//!    constant row moves with any summation order, sharded or not. The generator keeps values
//!    near 1 (products of activations are scaled by 1/k), so this is rare.
//! 2. `random_annotations_of_the_examples_never_panic`: the examples with annotations added,
//!    removed or replaced (valid, wrong length, unknown axis, axis twice) on random meshes: the
//!    compiler returns a plan or a user error, never panics and never reports an internal error.
//!    The plans it returns are also run and compared with the reference.
//! 3. For every plan of (1) and (2): the summary's count and bytes per collective kind equal
//!    those recomputed from the collectives listed in the plan (`CollectiveKind::traffic`), no
//!    collective runs over a single device, and the collectives a run measures (count and bytes)
//!    equal the summary's.
//!
//! Knobs (environment variables):
//! - `TPC_PROP_CASES=N`: cases per property (default 200, a second or two per property in the
//!   test profile; `TPC_PROP_CASES=20000` takes about a minute per property on 2 cores).
//! - `PROPTEST_RNG_SEED=N`: a fixed seed (the default is random).
//! - `TPC_PROP_VERBOSE=1`: print every generated program.
//!
//! Every generated plan is run: nothing is skipped as the signature of a known bug.
//!
//! Failures print the minimized `.tpl` text and the mesh; pin them in `tests/regressions.rs`.

mod prop_support;

use prop_support::{check_plan, compile, Outcome};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Instant;
use tpc::diag::SourceFile;
use tpc::driver::{compile_global, Error};
use tpc::lower::LowerError;

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

fn cases() -> u32 {
    std::env::var("TPC_PROP_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

fn verbose() -> bool {
    std::env::var("TPC_PROP_VERBOSE").is_ok_and(|v| v != "0")
}

fn config() -> Config {
    Config {
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..Config::with_cases(cases())
    }
}

/// The meshes of the random cases (the simplest nontrivial first, for shrinking).
const MESHES: &[&str] = &[
    "tp=2",
    "tp=4",
    "dp=2,tp=2",
    "dp=2,tp=4",
    "dp=4,tp=2",
    "tp=8",
    "dp=8",
    "tp=3",
    "tp=1",
    "dp=2,tp=3",
    // Axes in the other order than declared, and an axis the program does not declare.
    "tp=4,dp=2",
    "tp=2,dp=4",
    "dp=2,pp=2,tp=2",
];

fn axis_size(mesh: &str, axis: &str) -> u64 {
    mesh.split(',')
        .filter_map(|p| p.split_once('='))
        .find(|(a, _)| *a == axis)
        .map(|(_, n)| n.parse().unwrap())
        .unwrap_or(1)
}

// ---------------------------------------------------------------------------------------------
// The random program generator (1)
// ---------------------------------------------------------------------------------------------

/// A stream of choices; past its end every choice is 0, the simplest option. Proptest shrinks
/// the bytes towards 0, so a shrunk case makes the simplest choices.
struct Choices<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Choices<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Choices { bytes, at: 0 }
    }

    fn byte(&mut self) -> u8 {
        let b = self.bytes.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    /// 0..n (0 when n is 0).
    fn pick(&mut self, n: usize) -> usize {
        let b = self.byte() as usize;
        if n == 0 {
            0
        } else {
            b % n
        }
    }

    /// True with probability k/8 (false for the byte 0).
    fn chance(&mut self, k: u8) -> bool {
        self.byte() % 8 >= 8 - k
    }

    /// A dim size: mostly powers of two that divide the meshes, sometimes 6 or 12.
    fn size(&mut self) -> u64 {
        [8, 4, 16, 2, 8, 4, 16, 12, 6, 8][self.pick(10)]
    }
}

#[derive(Clone, Debug)]
struct Val {
    name: String,
    shape: Vec<u64>,
    /// The value carries a sharding annotation (a second, different one is a user error).
    annotated: bool,
}

fn numel(shape: &[u64]) -> u64 {
    shape.iter().product()
}

fn shape_text(shape: &[u64]) -> String {
    shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// numpy broadcasting of two shapes.
fn broadcast(a: &[u64], b: &[u64]) -> Option<Vec<u64>> {
    let n = a.len().max(b.len());
    (0..n)
        .map(|i| {
            let x = if i + a.len() >= n {
                a[i + a.len() - n]
            } else {
                1
            };
            let y = if i + b.len() >= n {
                b[i + b.len() - n]
            } else {
                1
            };
            match (x, y) {
                _ if x == y => Some(x),
                (1, _) => Some(y),
                (_, 1) => Some(x),
                _ => None,
            }
        })
        .collect()
}

/// `1/k` as a literal: products of two activations are scaled by the contracted size, so values
/// stay near 1 and a float summation order (which sharding changes) never cancels to noise.
fn inv(k: u64) -> String {
    format!("{:?}", 1.0 / k as f64)
}

/// Largest tensor the generator builds (elements), so cases stay fast.
const MAX_NUMEL: u64 = 16384;
/// Largest rank.
const MAX_RANK: usize = 4;

struct Gen<'m> {
    mesh: &'m str,
    dp: u64,
    tp: u64,
    decls: Vec<String>,
    blocks: Vec<String>,
    body: Vec<String>,
    pool: Vec<Val>,
    losses: Vec<Val>,
    counter: usize,
    nblocks: usize,
}

impl<'m> Gen<'m> {
    fn new(mesh: &'m str) -> Self {
        Gen {
            mesh,
            dp: axis_size(mesh, "dp"),
            tp: axis_size(mesh, "tp"),
            decls: Vec::new(),
            blocks: Vec::new(),
            body: Vec::new(),
            pool: Vec::new(),
            losses: Vec::new(),
            counter: 0,
            nblocks: 0,
        }
    }

    fn fresh(&mut self, prefix: &str) -> String {
        self.counter += 1;
        format!("{prefix}{}", self.counter)
    }

    /// A random spec for `shape` (each mesh axis used at most once). Splits that do not divide
    /// the dim on this mesh are dropped, except rarely (a user error on purpose).
    fn spec(&self, c: &mut Choices, shape: &[u64]) -> String {
        let force = c.byte() % 16 == 15;
        let (mut dp_used, mut tp_used) = (false, false);
        let entries: Vec<String> = shape
            .iter()
            .map(|&n| {
                let (text, dp, tp) = match c.byte() % 12 {
                    4 | 5 => ("dp", true, false),
                    6..=8 => ("tp", false, true),
                    9 | 10 => ("(dp, tp)", true, true),
                    11 => ("(tp, dp)", true, true),
                    _ => ("_", false, false),
                };
                let parts = if dp { self.dp } else { 1 } * if tp { self.tp } else { 1 };
                if (dp && dp_used) || (tp && tp_used) || (!n.is_multiple_of(parts) && !force) {
                    return "_".to_string();
                }
                dp_used |= dp;
                tp_used |= tp;
                text.to_string()
            })
            .collect();
        format!("[{}]", entries.join(", "))
    }

    /// ` @ [spec]` with probability k/8, else "".
    fn maybe_spec(&self, c: &mut Choices, shape: &[u64], k: u8) -> String {
        if c.chance(k) {
            format!(" @ {}", self.spec(c, shape))
        } else {
            String::new()
        }
    }

    fn param(&mut self, c: &mut Choices, prefix: &str, shape: &[u64]) -> String {
        let name = self.fresh(prefix);
        let spec = self.maybe_spec(c, shape, 5);
        self.decls
            .push(format!("param {name} : f32[{}]{spec}", shape_text(shape)));
        name
    }

    fn input(&mut self, c: &mut Choices, prefix: &str, dtype: &str, shape: &[u64]) -> Val {
        let name = self.fresh(prefix);
        let spec = self.maybe_spec(c, shape, 5);
        self.decls.push(format!(
            "input {name} : {dtype}[{}]{spec}",
            shape_text(shape)
        ));
        Val {
            name,
            shape: shape.to_vec(),
            annotated: !spec.is_empty(),
        }
    }

    /// Emits `v = expr [@ spec]` and adds `v` to the pool.
    fn assign(&mut self, c: &mut Choices, expr: String, shape: Vec<u64>) -> Val {
        let name = self.fresh("v");
        let spec = self.maybe_spec(c, &shape, 3);
        self.body.push(format!("{name} = {expr}{spec}"));
        let v = Val {
            name,
            shape,
            annotated: !spec.is_empty(),
        };
        self.pool.push(v.clone());
        v
    }

    /// A pool value satisfying `ok`, the most recent ones most likely.
    fn pick_val(&self, c: &mut Choices, ok: impl Fn(&Val) -> bool) -> Option<Val> {
        let cands: Vec<&Val> = self.pool.iter().filter(|v| ok(v)).collect();
        if cands.is_empty() {
            return None;
        }
        let i = c.pick(cands.len());
        Some(cands[cands.len() - 1 - i].clone())
    }

    fn any(&self, c: &mut Choices, min_rank: usize) -> Option<Val> {
        self.pick_val(c, |v| v.shape.len() >= min_rank)
    }

    /// Interprets one instruction.
    fn step(&mut self, bytes: &[u8]) {
        let mut c = Choices::new(bytes);
        let op = c.pick(19);
        match op {
            0 => self.unary(&mut c),
            1 => self.scalar(&mut c),
            2 => self.matmul_param(&mut c),
            3 => self.matmul_act(&mut c),
            4 => self.binary(&mut c),
            5 => self.softmax(&mut c),
            6 => self.norm(&mut c),
            7 => self.reduce(&mut c),
            8 => self.transpose(&mut c),
            9 => self.reshape_split(&mut c),
            10 => self.reshape_merge(&mut c),
            11 => self.split_slice(&mut c),
            12 => self.concat(&mut c),
            13 => self.embedding(&mut c),
            14 => self.cross_entropy(&mut c),
            15 => self.causal(&mut c),
            16 => self.block(&mut c),
            17 => self.alias(&mut c),
            _ => self.new_input(&mut c),
        }
    }

    fn unary(&mut self, c: &mut Choices) {
        let Some(t) = self.any(c, 1) else { return };
        let n = &t.name;
        let e = match c.pick(10) {
            0 => format!("gelu({n})"),
            1 => format!("relu({n})"),
            2 => format!("silu({n})"),
            3 => format!("tanh({n})"),
            4 => format!("neg({n})"),
            5 => format!("exp(tanh({n}))"),
            // Functions with a restricted domain, on positive arguments.
            6 => format!("rsqrt({n} * {n} + 1.0)"),
            7 => format!("log({n} * {n} + 1.0)"),
            8 => format!("sqrt({n} * {n} + 0.5)"),
            _ => format!("recip({n} * {n} + 1.0)"),
        };
        self.assign(c, e, t.shape);
    }

    fn scalar(&mut self, c: &mut Choices) {
        let Some(t) = self.any(c, 1) else { return };
        let n = &t.name;
        let e = match c.pick(7) {
            0 => format!("{n} * 0.5"),
            1 => format!("{n} + 1.0"),
            2 => format!("1.0 - {n}"),
            3 => format!("{n} / 2.0"),
            4 => format!("2.0 * {n}"),
            5 => format!("scale({n}, 0.25)"),
            _ => format!("-{n}"),
        };
        self.assign(c, e, t.shape);
    }

    fn matmul_param(&mut self, c: &mut Choices) {
        let Some(t) = self.any(c, 1) else { return };
        let r = t.shape.len();
        let variant = c.pick(4);
        let n = c.size();
        if variant == 1 && r == 1 {
            // Matrix @ vector: [M, K] @ [K] -> [M].
            let w = self.param(c, "w", &[n, t.shape[0]]);
            self.assign(c, format!("{w} @ {}", t.name), vec![n]);
        } else if variant == 1 && r >= 2 {
            // The weight on the left: [M, S] @ [..., S, H] -> [..., M, H].
            let w = self.param(c, "w", &[n, t.shape[r - 2]]);
            let mut out = t.shape.clone();
            out[r - 2] = n;
            if numel(&out) <= MAX_NUMEL {
                self.assign(c, format!("{w} @ {}", t.name), out);
            }
        } else if variant == 3 && r == 2 {
            // A batched weight broadcast against a 2-D operand: [S, H] @ [B, H, N].
            let b = c.size();
            let w = self.param(c, "w", &[b, t.shape[1], n]);
            let out = vec![b, t.shape[0], n];
            if numel(&out) <= MAX_NUMEL {
                self.assign(c, format!("{} @ {w}", t.name), out);
            }
        } else if variant == 2 && r == 3 {
            // A batched weight: [B, S, H] @ [B, H, N].
            let w = self.param(c, "w", &[t.shape[0], t.shape[2], n]);
            let out = vec![t.shape[0], t.shape[1], n];
            if numel(&out) <= MAX_NUMEL {
                self.assign(c, format!("{} @ {w}", t.name), out);
            }
        } else {
            // [..., H] @ [H, N] -> [..., N] (a 1-D operand is promoted and the dim dropped).
            let w = self.param(c, "w", &[t.shape[r - 1], n]);
            let mut out = t.shape.clone();
            out[r - 1] = n;
            if numel(&out) <= MAX_NUMEL {
                self.assign(c, format!("{} @ {w}", t.name), out);
            }
        }
    }

    fn matmul_act(&mut self, c: &mut Choices) {
        let Some(t) = self.any(c, 1) else { return };
        if t.shape.len() == 1 {
            // Vector . vector: a scalar.
            let u = self
                .pick_val(c, |u| u.shape == t.shape)
                .unwrap_or_else(|| t.clone());
            let name = self.fresh("dot");
            let k = inv(t.shape[0]);
            self.body
                .push(format!("{name} = {} @ {} * {k}", t.name, u.name));
            self.losses.push(Val {
                name,
                shape: vec![],
                annotated: false,
            });
            return;
        }
        let r = t.shape.len();
        let batch = t.shape[..r - 2].to_vec();
        // u with the same shape: t @ transpose(u); else u: [..., K, N] with K = t's last dim.
        let same = self.pick_val(c, |u| u.shape == t.shape);
        let chained = self.pick_val(c, |u| {
            u.shape.len() == r && u.shape[..r - 2] == batch[..] && u.shape[r - 2] == t.shape[r - 1]
        });
        let (e, out) = match (c.pick(2), same, chained) {
            (1, _, Some(u)) | (_, None, Some(u)) => {
                let mut out = t.shape.clone();
                out[r - 1] = u.shape[r - 1];
                let k = inv(t.shape[r - 1]);
                (format!("{} @ {} * {k}", t.name, u.name), out)
            }
            (_, same, _) => {
                let u = same.unwrap_or_else(|| t.clone());
                let mut out = t.shape.clone();
                out[r - 1] = t.shape[r - 2];
                let k = inv(t.shape[r - 1]);
                (format!("{} @ transpose({}) * {k}", t.name, u.name), out)
            }
        };
        if numel(&out) <= MAX_NUMEL {
            self.assign(c, e, out);
        }
    }

    fn binary(&mut self, c: &mut Choices) {
        let Some(t) = self.any(c, 1) else { return };
        let existing = self.pick_val(c, |u| {
            u.name != t.name && broadcast(&t.shape, &u.shape).is_some_and(|s| s == t.shape)
        });
        let loss = self.losses.last().cloned();
        let u = match c.pick(4) {
            0 | 1 if existing.is_some() => existing.unwrap(),
            2 if loss.is_some() => loss.unwrap(),
            _ => {
                // A new bias: a suffix of t's shape, some dims possibly 1 (keepdims-like).
                let r = t.shape.len();
                let k = c.pick(r.min(2)) + 1;
                let mut shape = t.shape[r - k..].to_vec();
                if k == 2 && c.chance(2) {
                    shape[0] = 1;
                }
                let name = self.param(c, "b", &shape);
                Val {
                    name,
                    shape,
                    annotated: true,
                }
            }
        };
        let (a, b) = if c.chance(3) {
            (&u.name, &t.name)
        } else {
            (&t.name, &u.name)
        };
        let e = match c.pick(5) {
            0 => format!("{a} + {b}"),
            1 => format!("{a} - {b}"),
            2 => format!("{a} * {b}"),
            3 => format!("{a} / ({b} * {b} + 1.0)"),
            _ => format!("maximum({a}, {b})"),
        };
        self.assign(c, e, t.shape);
    }

    fn axis_arg(c: &mut Choices, rank: usize) -> (usize, String) {
        let a = c.pick(rank);
        let text = if c.chance(3) {
            format!("{}", a as i64 - rank as i64)
        } else {
            a.to_string()
        };
        (a, text)
    }

    fn softmax(&mut self, c: &mut Choices) {
        let Some(t) = self.any(c, 1) else { return };
        let e = if c.chance(4) {
            format!("softmax({})", t.name)
        } else {
            let (_, ax) = Self::axis_arg(c, t.shape.len());
            format!("softmax({}, axis={ax})", t.name)
        };
        self.assign(c, e, t.shape);
    }

    fn norm(&mut self, c: &mut Choices) {
        let Some(t) = self.any(c, 1) else { return };
        let h = *t.shape.last().unwrap();
        let kind = c.pick(3);
        let g = self.param(c, "n", &[h]);
        // Gains end in `_g` (initialized around 1): rename the declaration.
        let gname = format!("{g}_g");
        let last = self.decls.pop().unwrap();
        self.decls.push(last.replacen(&g, &gname, 1));
        let e = match kind {
            0 => {
                let b = self.param(c, "nb", &[h]);
                format!("layernorm({}, {gname}, {b})", t.name)
            }
            1 => format!("layernorm({}, {gname})", t.name),
            _ => format!("rmsnorm({}, {gname})", t.name),
        };
        self.assign(c, e, t.shape);
    }

    fn reduce(&mut self, c: &mut Choices) {
        // Rank 1 too: a scalar result (a partial sum over a split vector, say).
        let Some(t) = self.any(c, 1) else { return };
        let r = t.shape.len();
        let f = ["sum", "mean", "max"][c.pick(3)];
        let (a, ax) = Self::axis_arg(c, r);
        let keep = c.chance(4);
        let mut out = t.shape.clone();
        if keep {
            out[a] = 1;
        } else {
            out.remove(a);
        }
        // Positional negative axes of `max` are avoided: see the pinned frontend bug
        // `max_with_a_negative_positional_axis_is_a_reduction` in tests/regressions.rs.
        let positional_ok = !(f == "max" && ax.starts_with('-'));
        let e = match (keep, if positional_ok { c.pick(2) } else { 0 }) {
            (true, 0) => format!("{f}({}, axis={ax}, keepdims=true)", t.name),
            (true, _) => format!("{f}({}, {ax}, true)", t.name),
            (false, 0) => format!("{f}({}, axis={ax})", t.name),
            (false, _) => format!("{f}({}, {ax}, keepdims=false)", t.name),
        };
        self.assign(c, e, out);
    }

    fn transpose(&mut self, c: &mut Choices) {
        let Some(t) = self.any(c, 2) else { return };
        let r = t.shape.len();
        if c.chance(3) {
            let mut out = t.shape.clone();
            out.swap(r - 2, r - 1);
            self.assign(c, format!("transpose({})", t.name), out);
            return;
        }
        let mut perm: Vec<usize> = (0..r).collect();
        for i in (1..r).rev() {
            let j = c.pick(i + 1);
            perm.swap(i, j);
        }
        let out: Vec<u64> = perm.iter().map(|&p| t.shape[p]).collect();
        let p = perm
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        self.assign(c, format!("transpose({}, [{p}])", t.name), out);
    }

    fn reshape_to(&mut self, c: &mut Choices, t: &Val, out: Vec<u64>) {
        let e = format!("reshape({}, [{}])", t.name, shape_text(&out));
        self.assign(c, e, out);
    }

    fn reshape_split(&mut self, c: &mut Choices) {
        let Some(t) = self.pick_val(c, |v| !v.shape.is_empty() && v.shape.len() < MAX_RANK) else {
            return;
        };
        let d = c.pick(t.shape.len());
        let n = t.shape[d];
        let f = [2, 4, 3][c.pick(3)];
        if !n.is_multiple_of(f) || n == f {
            return self.reshape_merge_of(c, &t);
        }
        let mut out = t.shape.clone();
        let (x, y) = if c.chance(3) { (n / f, f) } else { (f, n / f) };
        out[d] = y;
        out.insert(d, x);
        self.reshape_to(c, &t, out);
    }

    fn reshape_merge(&mut self, c: &mut Choices) {
        let Some(t) = self.any(c, 2) else { return };
        self.reshape_merge_of(c, &t);
    }

    fn reshape_merge_of(&mut self, c: &mut Choices, t: &Val) {
        let r = t.shape.len();
        if r < 2 {
            return;
        }
        let d = c.pick(r - 1);
        let mut out = t.shape.clone();
        let m = out.remove(d + 1);
        out[d] *= m;
        self.reshape_to(c, t, out);
    }

    fn split_slice(&mut self, c: &mut Choices) {
        let Some(t) = self.pick_val(c, |v| v.shape.iter().any(|&n| n >= 2)) else {
            return;
        };
        let r = t.shape.len();
        let cands: Vec<usize> = (0..r).filter(|&d| t.shape[d] >= 2).collect();
        let d = cands[c.pick(cands.len())];
        let n = t.shape[d];
        let ax = if c.chance(2) {
            (d as i64 - r as i64).to_string()
        } else {
            d.to_string()
        };
        match c.pick(3) {
            0 if n.is_multiple_of(2) => {
                let (a, b) = (self.fresh("v"), self.fresh("v"));
                let mut out = t.shape.clone();
                out[d] = n / 2;
                let spec = self.maybe_spec(c, &out, 1);
                self.body
                    .push(format!("{a}, {b} = split({}, 2, axis={ax}){spec}", t.name));
                for name in [a, b] {
                    self.pool.push(Val {
                        name,
                        shape: out.clone(),
                        annotated: !spec.is_empty(),
                    });
                }
            }
            1 => {
                let k = 1 + c.pick(n as usize - 1) as u64;
                let (a, b) = (self.fresh("v"), self.fresh("v"));
                self.body.push(format!(
                    "{a}, {b} = split({}, [{k}, {}], axis={ax})",
                    t.name,
                    n - k
                ));
                for (name, len) in [(a, k), (b, n - k)] {
                    let mut out = t.shape.clone();
                    out[d] = len;
                    self.pool.push(Val {
                        name,
                        shape: out,
                        annotated: false,
                    });
                }
            }
            _ => {
                let start = c.pick(n as usize) as u64;
                let end = start + 1 + c.pick((n - start) as usize) as u64;
                let mut out = t.shape.clone();
                out[d] = end - start;
                self.assign(c, format!("slice({}, {ax}, {start}, {end})", t.name), out);
            }
        }
    }

    fn concat(&mut self, c: &mut Choices) {
        let Some(t) = self.any(c, 1) else { return };
        let r = t.shape.len();
        let d = c.pick(r);
        let u = self
            .pick_val(c, |u| {
                u.shape.len() == r && (0..r).all(|i| i == d || u.shape[i] == t.shape[i])
            })
            .unwrap_or_else(|| t.clone());
        let mut out = t.shape.clone();
        out[d] += u.shape[d];
        if numel(&out) <= MAX_NUMEL {
            self.assign(
                c,
                format!("concat([{}, {}], axis={d})", t.name, u.name),
                out,
            );
        }
    }

    fn embedding(&mut self, c: &mut Choices) {
        let ids_shape: Vec<u64> = (0..1 + c.pick(2)).map(|_| c.size()).collect();
        let (v, e) = (c.size(), c.size());
        let ids = self.input(c, "ids", "i32", &ids_shape).name;
        // The table: a new param, or a computed rank-2 value.
        let table = match self.pick_val(c, |t| t.shape.len() == 2) {
            Some(t) if c.chance(3) => t,
            _ => {
                let name = self.param(c, "emb", &[v, e]);
                Val {
                    name,
                    shape: vec![v, e],
                    annotated: true,
                }
            }
        };
        let mut out = ids_shape;
        out.push(table.shape[1]);
        if numel(&out) <= MAX_NUMEL {
            self.assign(c, format!("embedding({ids}, {})", table.name), out);
        }
    }

    fn cross_entropy(&mut self, c: &mut Choices) {
        let Some(t) = self.any(c, 1) else { return };
        let r = t.shape.len();
        let labels = self.input(c, "labels", "i32", &t.shape[..r - 1]).name;
        // The logits: t itself, or a projection to a vocab, most often split over it.
        let logits = if c.chance(5) {
            // Vocab-parallel loss pays off (in the cost model) for large vocabularies: the
            // largest power of two the size budget allows, sometimes three quarters of it.
            let rows = numel(&t.shape[..r - 1]);
            let mut v = 8;
            while v * 2 <= 4096 && rows * v * 2 <= MAX_NUMEL {
                v *= 2;
            }
            let v = if c.chance(2) { v / 4 * 3 } else { v };
            let w = self.fresh("head");
            let spec = match c.pick(4) {
                0 => " @ [_, tp]".to_string(),
                1 if v.is_multiple_of(self.dp * self.tp) => " @ [_, (dp, tp)]".to_string(),
                _ => self.maybe_spec(c, &[t.shape[r - 1], v], 5),
            };
            self.decls
                .push(format!("param {w} : f32[{}, {v}]{spec}", t.shape[r - 1]));
            format!("{} @ {w}", t.name)
        } else {
            t.name.clone()
        };
        let name = self.fresh("loss");
        self.body
            .push(format!("{name} = cross_entropy({logits}, {labels})"));
        self.losses.push(Val {
            name,
            shape: vec![],
            annotated: false,
        });
    }

    fn causal(&mut self, c: &mut Choices) {
        let sq = self.pick_val(c, |v| {
            let r = v.shape.len();
            r >= 2 && v.shape[r - 1] == v.shape[r - 2]
        });
        let s = match sq {
            Some(s) if c.chance(6) => s,
            _ => {
                let Some(t) = self.any(c, 2) else { return };
                let r = t.shape.len();
                let mut out = t.shape.clone();
                out[r - 1] = t.shape[r - 2];
                if numel(&out) > MAX_NUMEL {
                    return;
                }
                let k = inv(t.shape[r - 1]);
                self.assign(c, format!("{0} @ transpose({0}) * {k}", t.name), out)
            }
        };
        self.assign(
            c,
            format!("softmax(causal_mask({}), axis=-1)", s.name),
            s.shape.clone(),
        );
    }

    /// `v = t @ [spec]`: a second name for t, which annotates t itself (a leaf or not).
    fn alias(&mut self, c: &mut Choices) {
        let Some(t) = self.pick_val(c, |v| !v.annotated) else {
            return;
        };
        let name = self.fresh("v");
        let spec = self.spec(c, &t.shape);
        self.body.push(format!("{name} = {} @ {spec}", t.name));
        for v in &mut self.pool {
            if v.name == t.name {
                v.annotated = true;
            }
        }
        self.pool.push(Val {
            name,
            shape: t.shape,
            annotated: true,
        });
    }

    fn new_input(&mut self, c: &mut Choices) {
        let shape: Vec<u64> = (0..1 + c.pick(3)).map(|_| c.size()).collect();
        let v = self.input(c, "x", "f32", &shape);
        self.pool.push(v);
    }

    /// Defines a block (an MLP, or attention on rank-3 inputs) and calls it once or via repeat.
    fn block(&mut self, c: &mut Choices) {
        let Some(t) = self.any(c, 1) else { return };
        self.nblocks += 1;
        let bname = format!("blk{}", self.nblocks);
        let shape = t.shape.clone();
        let r = shape.len();
        let h = shape[r - 1];
        let ty = format!("f32[{}]", shape_text(&shape));
        let mut lines = Vec::new();
        let ps = |g: &Gen, c: &mut Choices, s: &[u64]| g.maybe_spec(c, s, 5);
        let attention = r == 3 && h.is_multiple_of(2) && c.chance(3);
        let mut extra: Option<String> = None;
        if attention {
            let nh = if h.is_multiple_of(4) && c.chance(4) {
                4
            } else {
                2
            };
            let (b, s, d) = (shape[0], shape[1], h / nh);
            for w in ["wq", "wk", "wv", "wo"] {
                let sp = ps(self, c, &[h, h]);
                lines.push(format!("param {w} : f32[{h}, {h}]{sp}"));
            }
            for (q, w) in [("q", "wq"), ("k", "wk"), ("v", "wv")] {
                let sp = ps(self, c, &[b, nh, s, d]);
                let sp = if c.chance(2) { sp } else { String::new() };
                lines.push(format!(
                    "{q} = transpose(reshape(x @ {w}, [{b}, {s}, {nh}, {d}]), [0, 2, 1, 3]){sp}"
                ));
            }
            let masked = if c.chance(5) {
                "causal_mask(q @ transpose(k) * 0.5)"
            } else {
                "q @ transpose(k) * 0.5"
            };
            let sp = if c.chance(2) {
                ps(self, c, &[b, nh, s, s])
            } else {
                String::new()
            };
            lines.push(format!("p = softmax({masked}){sp}"));
            lines.push(format!(
                "ctx = reshape(transpose(p @ v, [0, 2, 1, 3]), [{b}, {s}, {h}])"
            ));
            let res = if c.chance(4) { "x + " } else { "" };
            lines.push(format!("return {res}ctx @ wo"));
        } else {
            let f = c.size();
            // Megatron's column- then row-parallel split half the time, else random specs.
            let (sp1, sp2) = if c.chance(4) && f.is_multiple_of(self.tp) {
                (" @ [_, tp]".to_string(), " @ [tp, _]".to_string())
            } else {
                (ps(self, c, &[h, f]), ps(self, c, &[f, h]))
            };
            lines.push(format!("param w1 : f32[{h}, {f}]{sp1}"));
            lines.push(format!("param w2 : f32[{f}, {h}]{sp2}"));
            let x = match c.pick(3) {
                0 => "x".to_string(),
                1 => {
                    lines.push(format!("param ln_g : f32[{h}]"));
                    lines.push(format!("param ln_b : f32[{h}]"));
                    "layernorm(x, ln_g, ln_b)".to_string()
                }
                _ => {
                    lines.push(format!("param ln_g : f32[{h}]"));
                    "rmsnorm(x, ln_g)".to_string()
                }
            };
            let bias = if c.chance(4) {
                let sp = ps(self, c, &[f]);
                lines.push(format!("param b1 : f32[{f}]{sp}"));
                " + b1"
            } else {
                ""
            };
            let act = ["gelu", "relu", "silu", "tanh"][c.pick(4)];
            let mut hs = shape.clone();
            hs[r - 1] = f;
            let sp = if c.chance(2) {
                ps(self, c, &hs)
            } else {
                String::new()
            };
            lines.push(format!("h = {act}({x} @ w1{bias}){sp}"));
            let res = if c.chance(5) { "x + " } else { "" };
            // Sometimes a second argument, passed unchanged to every repeated instance.
            if c.chance(2) {
                let m = self
                    .pick_val(c, |u| u.shape == shape)
                    .unwrap_or_else(|| t.clone());
                extra = Some(m.name);
                lines.push(format!("return {res}h @ w2 + m"));
            } else {
                lines.push(format!("return {res}h @ w2"));
            }
        }
        let body = lines
            .iter()
            .map(|l| format!("    {l}\n"))
            .collect::<String>();
        let args = match extra {
            Some(_) => format!("x: {ty}, m: {ty}"),
            None => format!("x: {ty}"),
        };
        self.blocks
            .push(format!("block {bname}({args}) -> {ty} {{\n{body}}}"));
        let more = extra.map(|m| format!(", {m}")).unwrap_or_default();
        let call = match c.pick(3) {
            0 => format!("{bname}({}{more})", t.name),
            k => format!("repeat({}, {bname}, {}{more})", k + 1, t.name),
        };
        self.assign(c, call, shape);
    }

    /// The program text: the first input, the instructions, then the outputs.
    fn program(mesh: &str, header: &[u8], instrs: &[Vec<u8>]) -> String {
        Self::program_with(mesh, header, instrs, false)
    }

    /// The program of [`Gen::program`], trained (`train`) on the sum of its outputs' mean
    /// squares when `train`.
    fn program_with(mesh: &str, header: &[u8], instrs: &[Vec<u8>], train: bool) -> String {
        let mut g = Gen::new(mesh);
        let mut c = Choices::new(header);
        let rank = [3, 2, 3, 1][c.pick(4)];
        let shape: Vec<u64> = (0..rank).map(|_| c.size()).collect();
        let x = g.input(&mut c, "x", "f32", &shape);
        if train {
            // A trained scale on the input, so the loss depends on a param.
            let w = g.param(&mut c, "tw", &shape);
            g.assign(&mut c, format!("{} * {w}", x.name), shape.clone());
        } else {
            g.pool.push(x);
        }
        for i in instrs {
            g.step(i);
        }
        // Outputs: the last value, every loss, and a few others.
        let mut outs: Vec<Val> = vec![g.pool.last().unwrap().clone()];
        outs.extend(g.losses.iter().cloned());
        for _ in 0..c.pick(3) {
            if let Some(v) = g.pick_val(&mut c, |_| true) {
                if !outs.iter().any(|o| o.name == v.name) {
                    outs.push(v);
                }
            }
        }
        let mut lines: Vec<String> = outs
            .iter()
            .map(|o| {
                let spec = g.maybe_spec(&mut c, &o.shape, 3);
                format!("output {}{spec}", o.name)
            })
            .collect();
        if train {
            let terms: Vec<String> = outs
                .iter()
                .map(|o| {
                    let mut e = format!("{} * {}", o.name, o.name);
                    for _ in &o.shape {
                        e = format!("mean({e}, 0)");
                    }
                    e
                })
                .collect();
            lines.push(format!("train_loss = {}", terms.join(" + ")));
            lines.push("train train_loss with sgd(lr=0.1)".into());
        }
        let outs = lines;
        let mut text = format!("# generated on {}\nmesh dp, tp\n", g.mesh);
        for part in [&g.decls, &g.blocks, &g.body, &outs] {
            for l in part {
                text.push_str(l);
                text.push('\n');
            }
        }
        text
    }
}

fn instr() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 16)
}

fn program_strategy() -> impl Strategy<Value = (usize, Vec<u8>, Vec<Vec<u8>>)> {
    (
        0..MESHES.len(),
        prop::collection::vec(any::<u8>(), 16),
        prop::collection::vec(instr(), 1..16),
    )
}

// ---------------------------------------------------------------------------------------------
// Running a case
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Tally {
    plans: AtomicUsize,
    user_errors: AtomicUsize,
    collectives: AtomicUsize,
    ill: AtomicUsize,
    /// Per SPMD op, the number of plans using it.
    ops: std::sync::Mutex<std::collections::BTreeMap<&'static str, usize>>,
    /// Per error code, the number of user errors.
    errors: std::sync::Mutex<std::collections::BTreeMap<String, usize>>,
}

impl Tally {
    fn record(&self, o: &Outcome) {
        match o {
            Outcome::Ran {
                collectives,
                spmd_ops,
                ill_conditioned,
            } => {
                self.plans.fetch_add(1, Ordering::Relaxed);
                self.ill.fetch_add(*ill_conditioned, Ordering::Relaxed);
                self.collectives.fetch_add(*collectives, Ordering::Relaxed);
                let mut m = self.ops.lock().unwrap();
                for op in spmd_ops {
                    *m.entry(op).or_default() += 1;
                }
            }
            Outcome::UserError(text) => {
                self.user_errors.fetch_add(1, Ordering::Relaxed);
                let code = text
                    .strip_prefix("error[")
                    .and_then(|t| t.split(']').next())
                    .unwrap_or("?")
                    .to_string();
                *self.errors.lock().unwrap().entry(code).or_default() += 1;
            }
        }
    }

    fn report(&self, what: &str, secs: f64) -> (usize, usize) {
        let (p, u) = (
            self.plans.load(Ordering::Relaxed),
            self.user_errors.load(Ordering::Relaxed),
        );
        eprintln!(
            "{what}: {} cases in {secs:.1}s: {p} plans run and checked ({} collectives), {u} user errors",
            p + u,
            self.collectives.load(Ordering::Relaxed),
        );
        eprintln!(
            "{what}: plans using each SPMD op: {:?}; user errors by code: {:?}; outputs \
             within tolerance only once their conditioning was allowed for: {}",
            self.ops.lock().unwrap(),
            self.errors.lock().unwrap(),
            self.ill.load(Ordering::Relaxed)
        );
        (p, u)
    }
}

fn fail_report(e: TestError<impl std::fmt::Debug>, describe: impl Fn(&str) -> String) -> ! {
    match e {
        TestError::Fail(reason, value) => {
            let v = format!("{value:?}");
            panic!(
                "minimized failing case:\n{}\nreason: {reason}",
                describe(&v)
            )
        }
        TestError::Abort(reason) => panic!("aborted: {reason}"),
    }
}

#[test]
fn random_models_equal_the_reference() {
    random_models("random models", config(), false);
}

/// Random models trained on their outputs: the sharded training step (forward, backward, the
/// gradients laid out as their params) equals the reference's. Fewer cases: each runs a
/// program about three times the forward's size.
#[test]
fn random_trainable_models_equal_the_reference() {
    let mut cfg = config();
    cfg.cases = (cfg.cases / 3).max(1);
    random_models("random trainable models", cfg, true);
}

/// Random models (forward and trained) under `--auto` with no budget: the plan found runs equal
/// to the reference, and the source written back with its annotations compiles to a plan of the
/// same cost. Few cases: each search plans dozens to hundreds of candidates.
#[test]
fn random_models_under_auto_equal_the_reference() {
    let mut cfg = config();
    cfg.cases = (cfg.cases / 10).max(4);
    cfg.max_shrink_iters = 256;
    let cases = cfg.cases as usize;
    let mut runner = TestRunner::new(cfg);
    let searched = AtomicUsize::new(0);
    let result = runner.run(
        &(program_strategy(), any::<bool>()),
        |((m, header, instrs), train)| {
            let mesh = MESHES[m];
            let text = Gen::program_with(mesh, &header, &instrs, train);
            auto_case(mesh, &text, &searched).map_err(|msg| {
                TestCaseError::fail(format!(
                    "mesh {mesh}\n--- program ---\n{text}--- failure ---\n{msg}"
                ))
            })
        },
    );
    if let Err(e) = result {
        fail_report(e, |v| format!("{v:?}"));
    }
    // The generator is useful only if most cases get a plan.
    let n = searched.load(Ordering::Relaxed);
    assert!(2 * n >= cases, "{n} of {cases} cases found a plan");
}

/// One `--auto` case: search, run the plan against the reference, write the source back and
/// compile it.
fn auto_case(mesh: &str, text: &str, searched: &AtomicUsize) -> Result<(), String> {
    use tpc::auto::{Cost, Mode, Request};
    let src = SourceFile::new("gen.tpl", text);
    let req = Request {
        source: src.clone(),
        overrides: Vec::new(),
        mode: Mode::Ignore,
        budget: None,
        mesh: prop_support::mesh(mesh),
        device: tpc::mesh::Device::default(),
        plan: tpc::plan::Options::default(),
        outputs: Some(tpc::autodiff::StepOutputs {
            gradients: true,
            update: false,
        }),
        scale: None,
    };
    let found = match tpc::auto::search(&req) {
        Ok(f) => f,
        Err(e) if !e.is_internal() => return Ok(()),
        Err(e) => return Err(e.render(Some(&src))),
    };
    check_plan(&found.plan)?;
    searched.fetch_add(1, Ordering::Relaxed);
    let module = tpc::syntax::parse(text).map_err(|e| e.to_string())?;
    let written = found.annotated(text, &module, Mode::Ignore);
    let again = compile(&SourceFile::new("gen.tpl", written.as_str()), mesh, &[])?
        .map_err(|e| format!("the annotated source does not compile:\n{written}\n{e}"))?;
    match Cost::of(&again) == Cost::of(&found.plan) {
        true => Ok(()),
        false => Err(format!(
            "the annotated source costs {:?}, the plan found {:?}:\n{written}",
            Cost::of(&again),
            Cost::of(&found.plan)
        )),
    }
}

/// Runs `cfg`'s cases of random programs (trained on their outputs when `train`), each
/// compiled on its mesh and checked against the reference; reports them as `what`.
fn random_models(what: &str, cfg: Config, train: bool) {
    let tally = Tally::default();
    let t0 = Instant::now();
    let mut runner = TestRunner::new(cfg);
    let result = runner.run(&program_strategy(), |(m, header, instrs)| {
        let mesh = MESHES[m];
        let text = Gen::program_with(mesh, &header, &instrs, train);
        if verbose() {
            eprintln!("---- {mesh}\n{text}");
        }
        let src = SourceFile::new("gen.tpl", text.clone());
        // The generator only writes programs that lower; a lowering error is a generator bug.
        if !train {
            if let Err(e) = compile_global(&src, &[]) {
                return Err(TestCaseError::fail(format!(
                    "generator wrote a program that does not lower:\n{text}\n{}",
                    e.render(Some(&src))
                )));
            }
        }
        let outcome = compile(&src, mesh, &[]).and_then(|r| match r {
            Ok(plan) => check_plan(&plan),
            Err(e) => Ok(Outcome::UserError(e)),
        });
        match outcome {
            Ok(o) => {
                tally.record(&o);
                Ok(())
            }
            Err(msg) => Err(TestCaseError::fail(format!(
                "mesh {mesh}\n--- program ---\n{text}--- failure ---\n{msg}"
            ))),
        }
    });
    let secs = t0.elapsed().as_secs_f64();
    if let Err(e) = result {
        fail_report(e, |v| v.to_string());
    }
    let (plans, errors) = tally.report(what, secs);
    // The generator is useful only if most cases compile.
    assert!(
        plans >= 2 * errors,
        "too many user errors: {plans} plans, {errors} errors"
    );
}

// ---------------------------------------------------------------------------------------------
// Random annotations of the examples (2)
// ---------------------------------------------------------------------------------------------

/// The examples with dim overrides that keep runs small.
const EXAMPLES: &[(&str, &[(&str, i64)])] = &[
    ("examples/mlp.tpl", &[("B", 4), ("S", 8), ("H", 64)]),
    ("examples/mlp_2d.tpl", &[("B", 4), ("S", 8), ("H", 64)]),
    ("examples/attention.tpl", &[]),
    ("examples/gpt_layer.tpl", &[]),
    ("examples/gpt.tpl", &[("V", 512)]),
];

/// A line that may carry an annotation: its index, and the rank of the annotated value when a
/// compile with an empty spec there told it.
#[derive(Clone, Debug)]
struct Site {
    line: usize,
    rank: Option<usize>,
}

struct Example {
    path: &'static str,
    text: String,
    sets: Vec<(String, i64)>,
    sites: Vec<Site>,
}

/// Splits a line into code and comment.
fn code_of(line: &str) -> (&str, &str) {
    match line.find('#') {
        Some(i) => (&line[..i], &line[i..]),
        None => (line, ""),
    }
}

/// The code without its trailing `@ [spec]`, if any.
fn strip_spec(code: &str) -> &str {
    let t = code.trim_end();
    if t.ends_with(']') {
        if let Some(open) = t.rfind('[') {
            let before = t[..open].trim_end();
            if !t[open + 1..t.len() - 1].contains(['[', ']']) && before.ends_with('@') {
                return before[..before.len() - 1].trim_end();
            }
        }
    }
    t
}

fn with_spec(line: &str, spec: Option<&str>) -> String {
    let (code, comment) = code_of(line);
    let base = strip_spec(code);
    match spec {
        Some(s) => format!("{base} @ {s}  {comment}"),
        None => format!("{base}  {comment}"),
    }
}

fn is_site(code: &str) -> bool {
    let t = code.trim_start();
    if t.starts_with("param ") || t.starts_with("input ") {
        return true;
    }
    if let Some(rest) = t.strip_prefix("output ") {
        return !rest.contains(',');
    }
    if t.starts_with("dim ") || t.starts_with("mesh ") || t.starts_with("return ") {
        return false;
    }
    match t.find('=') {
        Some(i) => {
            let lhs = &t[..i];
            !lhs.is_empty()
                && lhs
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ',' || ch == ' ')
        }
        None => false,
    }
}

fn examples() -> &'static [Example] {
    static EX: OnceLock<Vec<Example>> = OnceLock::new();
    EX.get_or_init(|| {
        EXAMPLES
            .iter()
            .map(|(path, sets)| {
                let text = std::fs::read_to_string(path).unwrap();
                let sets: Vec<(String, i64)> =
                    sets.iter().map(|(k, v)| (k.to_string(), *v)).collect();
                let lines: Vec<&str> = text.lines().collect();
                let sites = lines
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| is_site(code_of(l).0))
                    .map(|(i, _)| {
                        let mut probe: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
                        probe[i] = with_spec(lines[i], Some("[]"));
                        let src = SourceFile::new(*path, probe.join("\n"));
                        let rank = match compile_global(&src, &sets) {
                            Err(Error::Lower(LowerError::SpecRank { rank, .. })) => Some(rank),
                            Ok(_) => Some(0),
                            Err(_) => None,
                        };
                        Site { line: i, rank }
                    })
                    .collect();
                Example {
                    path,
                    text,
                    sets,
                    sites,
                }
            })
            .collect()
    })
}

/// A spec for a value of `rank` (if known): valid, or deliberately broken.
fn mutated_spec(c: &mut Choices, rank: Option<usize>, has_dp: bool) -> String {
    let rank = rank.unwrap_or(1 + c.pick(4));
    let entry = |c: &mut Choices| {
        let e = ["_", "tp", "dp", "(dp, tp)", "(tp, dp)", "_", "_"][c.pick(7)];
        // A program without a dp axis rarely names it (an unknown axis is tested below).
        if !has_dp && e.contains("dp") && !c.chance(1) {
            "tp".to_string()
        } else {
            e.to_string()
        }
    };
    let mut e: Vec<String> = match c.pick(16) {
        // Wrong length.
        13 => (0..rank + 1).map(|_| entry(c)).collect(),
        14 if rank > 0 => (0..rank - 1).map(|_| entry(c)).collect(),
        // An axis used twice, or an unknown axis.
        15 if rank > 0 => {
            let mut v: Vec<String> = (0..rank).map(|_| "_".to_string()).collect();
            let i = c.pick(rank);
            match c.pick(3) {
                0 => v[i] = "(tp, tp)".into(),
                1 => v[i] = "pp".into(),
                _ => {
                    v[i] = "tp".into();
                    let j = c.pick(rank);
                    v[j] = if j == i {
                        "(tp, tp)".into()
                    } else {
                        "tp".into()
                    };
                }
            }
            v
        }
        // Valid for the rank (each axis at most once; divisibility is the compiler's business).
        _ => {
            let mut used = (false, false);
            (0..rank)
                .map(|_| {
                    let s = entry(c);
                    let (d, t) = (s.contains("dp"), s.contains("tp"));
                    if (d && used.0) || (t && used.1) {
                        "_".to_string()
                    } else {
                        used.0 |= d;
                        used.1 |= t;
                        s
                    }
                })
                .collect()
        }
    };
    if e.is_empty() && c.chance(1) {
        e.push("tp".into());
    }
    format!("[{}]", e.join(", "))
}

fn mutate_example(ex: &Example, declare_dp: bool, edits: &[(u8, Vec<u8>)]) -> String {
    let mut lines: Vec<String> = ex.text.lines().map(|l| l.to_string()).collect();
    let has_dp = declare_dp || ex.text.contains("mesh dp, tp");
    if declare_dp {
        for l in &mut lines {
            if code_of(l).0.trim() == "mesh tp" {
                *l = "mesh dp, tp".into();
            }
        }
    }
    for (which, bytes) in edits {
        let site = &ex.sites[*which as usize % ex.sites.len()];
        let mut c = Choices::new(bytes);
        let line = &lines[site.line];
        lines[site.line] = match c.pick(3) {
            0 => with_spec(line, None),
            _ => with_spec(line, Some(&mutated_spec(&mut c, site.rank, has_dp))),
        };
    }
    lines.join("\n") + "\n"
}

#[test]
fn random_annotations_of_the_examples_never_panic() {
    let ex = examples();
    for e in ex {
        assert!(
            e.sites.iter().all(|s| s.rank.is_some()) && e.sites.len() >= 5,
            "{}: too few annotation sites found",
            e.path
        );
    }
    let tally = Tally::default();
    let t0 = Instant::now();
    let strategy = (
        0..ex.len(),
        0..MESHES.len(),
        any::<bool>(),
        prop::collection::vec((any::<u8>(), prop::collection::vec(any::<u8>(), 8)), 0..6),
    );
    let mut runner = TestRunner::new(config());
    let result = runner.run(&strategy, |(i, m, declare_dp, edits)| {
        let e = &ex[i];
        let mesh = MESHES[m];
        let text = mutate_example(e, declare_dp, &edits);
        if verbose() {
            eprintln!("---- {} on {mesh}\n{text}", e.path);
        }
        let src = SourceFile::new(e.path, text.clone());
        let outcome = compile(&src, mesh, &e.sets).and_then(|r| match r {
            Ok(plan) => check_plan(&plan),
            Err(e) => Ok(Outcome::UserError(e)),
        });
        match outcome {
            Ok(o) => {
                tally.record(&o);
                Ok(())
            }
            Err(msg) => Err(TestCaseError::fail(format!(
                "{} (sets {:?}) on mesh {mesh}\n--- program ---\n{text}--- failure ---\n{msg}",
                e.path, e.sets
            ))),
        }
    });
    let secs = t0.elapsed().as_secs_f64();
    if let Err(e) = result {
        fail_report(e, |v| v.to_string());
    }
    let (plans, _) = tally.report("annotated examples", secs);
    assert!(plans > 0, "no annotated example compiled");
}

#[test]
fn the_generator_covers_every_op() {
    // Every op kind of the language appears in a sample of generated programs, and every
    // sample lowers.
    let mut runner = TestRunner::deterministic();
    let mut seen = String::new();
    for _ in 0..300 {
        let (m, header, instrs) = program_strategy().new_tree(&mut runner).unwrap().current();
        let text = Gen::program(MESHES[m], &header, &instrs);
        let src = SourceFile::new("gen.tpl", text.clone());
        if let Err(e) = compile_global(&src, &[]) {
            panic!("does not lower:\n{text}\n{}", e.render(Some(&src)));
        }
        seen.push_str(&text);
    }
    for op in [
        "gelu(",
        "relu(",
        "silu(",
        "tanh(",
        "exp(",
        "neg(",
        "softmax(",
        "layernorm(",
        "rmsnorm(",
        "sum(",
        "mean(",
        "max(",
        "maximum(",
        "transpose(",
        "reshape(",
        "split(",
        "slice(",
        "concat(",
        "embedding(",
        "cross_entropy(",
        "causal_mask(",
        "repeat(",
        "block ",
        " @ w",
        "rsqrt(",
        "log(",
        "sqrt(",
        "recip(",
        "m: f32",
        "dot",
        " + ",
        " - ",
        " * ",
        " / ",
        "(dp, tp)",
        "(tp, dp)",
        "keepdims=true",
        "output ",
    ] {
        assert!(seen.contains(op), "the generator never writes `{op}`");
    }
}
