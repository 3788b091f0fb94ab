//! The versioned JSON document of a per-device plan: `{"format": "tpc-plan", "version": 1,
//! "summary": {...}, "mesh": ..., "device": ..., "global": {...}, "local": {...}, "placements":
//! [...], "origin": [...], "provenance": [[node, {...}], ...]}`, where `global` and `local` are
//! the graphs' [`GraphParts`].
//!
//! Loading never panics and trusts nothing: it checks the tag and version, every id of both
//! graphs, the mesh and device constants, runs the IR verifier on both graphs and the plan
//! verifier (`plan::verify`: placements, origins, every local op against its origin, the
//! collectives, the outputs) on the whole (a failure there is a corrupt document, not a
//! compiler bug). The stored summary is only
//! shape-checked: the loaded plan gets a summary recomputed from its local program.

use super::json::{check_header, check_ids, DocError, JsonError};
use crate::cost::CollectiveKind;
use crate::ir::verify::verify;
use crate::ir::{Graph, GraphParts, IdVec, Local, NodeId, Op, Space, ValueId};
use crate::mesh::{Device, Mesh};
use crate::partition::Provenance;
use crate::pipeline::schedule::ScheduleKind;
use crate::pipeline::Pipeline;
use crate::plan::verify::{verify as verify_plan, PlanParts};
use crate::plan::{Plan, Summary};
use crate::sharding::Placement;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The `format` tag of a plan document.
pub const FORMAT: &str = "tpc-plan";
/// The plan document version this build writes and reads.
pub const VERSION: u32 = 1;

/// A plan document, field for field as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanDoc {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`VERSION`] when written by this build.
    pub version: u32,
    /// The cost summary when written (recomputed on load).
    pub summary: Summary,
    /// The mesh the plan runs on.
    pub mesh: Mesh,
    /// The device constants of the cost model.
    pub device: Device,
    /// The global program.
    pub global: GraphParts,
    /// The SPMD program every device runs.
    pub local: GraphParts<Local>,
    /// Per local value, its placement.
    pub placements: Vec<Placement>,
    /// Per local value, the global value it holds a piece of.
    pub origin: Vec<Option<ValueId>>,
    /// Why each collective or local slice is there, by node, in node order.
    pub provenance: Vec<(NodeId<Local>, Provenance)>,
    /// The pipeline's stages and schedule (recomputed on load).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<Pipeline>,
    /// With a pipeline: each stage's actions in order (`F0`, `SF0`, `SF1+RB0`, `B0`, ...), as
    /// `pipeline.actions` (recomputed on load).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Vec<StageActions>>,
}

/// One stage's actions in a plan document's `schedule`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageActions {
    /// The stage.
    pub stage: u32,
    /// Its actions in order.
    pub actions: Vec<crate::pipeline::schedule::Action>,
}

/// The `schedule` of a pipeline.
fn schedule_of(p: &Pipeline) -> Vec<StageActions> {
    p.actions
        .iter()
        .enumerate()
        .map(|(s, a)| StageActions {
            stage: s as u32,
            actions: a.clone(),
        })
        .collect()
}

/// Why a plan document could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanJsonError {
    /// Not valid JSON, or not shaped like a plan document.
    #[error("malformed plan document: {message}")]
    Json {
        /// 1-based line of the error (0 when unknown).
        line: usize,
        /// 1-based column of the error (0 when unknown).
        column: usize,
        /// serde_json's description, including the position.
        message: String,
    },
    /// The `format` tag is not [`FORMAT`].
    #[error("not a tpc plan document: format is {found:?}, expected {FORMAT:?}")]
    WrongFormat {
        /// The tag found.
        found: String,
    },
    /// A version this build cannot read.
    #[error("unsupported plan document version {found} (this tpc reads version {VERSION})")]
    UnsupportedVersion {
        /// The version found.
        found: u32,
    },
    /// Well-formed JSON whose parts do not fit together.
    #[error("corrupt plan document: {0}")]
    Corrupt(String),
}

impl From<serde_json::Error> for PlanJsonError {
    fn from(e: serde_json::Error) -> Self {
        Self::malformed(e)
    }
}

impl DocError for PlanJsonError {
    fn json(line: usize, column: usize, message: String) -> Self {
        PlanJsonError::Json {
            line,
            column,
            message,
        }
    }

    fn wrong_format(found: String) -> Self {
        PlanJsonError::WrongFormat { found }
    }

    fn unsupported_version(found: u32) -> Self {
        PlanJsonError::UnsupportedVersion { found }
    }
}

/// A plan document as read: the stored summary is only checked for its documented shape.
#[derive(Deserialize)]
struct Incoming {
    summary: SummaryShape,
    mesh: Mesh,
    device: Device,
    global: GraphParts,
    local: GraphParts<Local>,
    placements: Vec<Placement>,
    origin: Vec<Option<ValueId>>,
    provenance: Vec<(NodeId<Local>, Provenance)>,
    #[serde(default)]
    pipeline: Option<Pipeline>,
    #[serde(default)]
    schedule: Option<Vec<StageActions>>,
}

/// The documented shape of the stored summary (other keys are ignored).
#[derive(Deserialize)]
struct SummaryShape {
    collectives: BTreeMap<String, KindShape>,
    #[serde(rename = "flops_per_device")]
    _flops: f64,
    #[serde(rename = "peak_memory_bytes_per_device")]
    _peak: u64,
    #[serde(rename = "estimated_time_s")]
    _time: f64,
    /// ZeRO's layout, which the recomputed summary takes again.
    #[serde(default)]
    zero: Option<crate::plan::summary::ZeroMemory>,
}

/// The documented shape of one collective kind's entry in the stored summary.
#[derive(Deserialize)]
struct KindShape {
    #[serde(rename = "count")]
    _count: u64,
    #[serde(rename = "bytes_per_device")]
    _bytes: u64,
}

/// The document of `p`, pretty-printed.
pub fn to_json(p: &Plan) -> String {
    let doc = PlanDoc {
        format: FORMAT.into(),
        version: VERSION,
        summary: p.summary.clone(),
        mesh: p.mesh.clone(),
        device: p.device,
        global: p.global.to_parts(),
        local: p.local.to_parts(),
        placements: p.placements.clone().into_vec(),
        origin: p.origin.clone().into_vec(),
        provenance: p
            .provenance
            .iter()
            .map(|(n, pr)| (*n, pr.clone()))
            .collect(),
        pipeline: p.pipeline.clone(),
        schedule: p.pipeline.as_ref().map(schedule_of),
    };
    serde_json::to_string_pretty(&doc).expect("a plan document always serializes")
}

/// Loads a document written by [`to_json`], validating every part (see the module docs).
pub fn from_json(text: &str) -> Result<Plan, PlanJsonError> {
    check_header::<PlanJsonError>(text, FORMAT, VERSION)?;
    let doc: Incoming = serde_json::from_str(text)?;
    if let Some(k) = CollectiveKind::ALL
        .iter()
        .find(|k| !doc.summary.collectives.contains_key(k.name()))
    {
        return Err(corrupt(format!(
            "the summary lists no {} entry (every collective kind must be present)",
            k.name()
        )));
    }
    let mesh = doc
        .mesh
        .checked()
        .map_err(|e| corrupt(format!("mesh: {e}")))?;
    check_device(&doc.device)?;
    let global = load_graph(doc.global, "global")?;
    let local = load_graph(doc.local, "local")?;
    // The plan verifier checks the tables' lengths first.
    let placements = IdVec::from_vec(doc.placements);
    let origin = IdVec::from_vec(doc.origin);
    verify_plan(PlanParts {
        global: &global,
        local: &local,
        mesh: &mesh,
        placements: &placements,
        origin: &origin,
    })
    .map_err(|e| corrupt(e.to_string()))?;
    let provenance = check_provenance(&local, doc.provenance)?;
    check_traffic(&local)?;
    let mut summary = Summary::compute(&local, &mesh, &doc.device);
    let kind = doc
        .pipeline
        .as_ref()
        .map_or(ScheduleKind::OneFOneB, |p| p.schedule);
    let pipeline = crate::pipeline::plan(&global, &local, &mesh, &doc.device, kind)
        .map_err(|e| corrupt(format!("pipeline: {e}")))?;
    if let Some(field) = pipeline_mismatch(pipeline.as_ref(), doc.pipeline.as_ref()) {
        return Err(corrupt(format!(
            "its pipeline {field} is not the one of its program (the pipeline schedule and \
             stages are recomputed from the programs)"
        )));
    }
    if doc.schedule != pipeline.as_ref().map(schedule_of) {
        return Err(corrupt(
            "its schedule is not its pipeline's actions (the pipeline schedule and stages are \
             recomputed from the programs)",
        ));
    }
    summary.pipeline = pipeline.as_ref().map(|p| p.summary.clone());
    if let Some(z) = doc.summary.zero {
        summary.set_zero(&local, z.layout);
    }
    Ok(Plan {
        mesh,
        device: doc.device,
        global,
        local,
        placements,
        origin,
        provenance,
        summary,
        pipeline,
    })
}

/// The first field where the stored pipeline differs from the recomputed one.
fn pipeline_mismatch(want: Option<&Pipeline>, got: Option<&Pipeline>) -> Option<&'static str> {
    let (w, g) = match (want, got) {
        (None, None) => return None,
        (Some(w), Some(g)) => (w, g),
        _ => return Some("(present or absent)"),
    };
    let fields = [
        ("axis", w.axis == g.axis),
        ("stages", w.stages == g.stages),
        ("microbatches", w.microbatches == g.microbatches),
        (
            "schedule",
            w.schedule == g.schedule && w.actions == g.actions,
        ),
        ("instances", w.instances == g.instances),
        ("placement", w.place == g.place),
        ("transfers", w.transfers == g.transfers),
        ("summary", w.summary == g.summary),
    ];
    fields.iter().find(|(_, same)| !same).map(|(f, _)| *f)
}

/// A [`PlanJsonError::Corrupt`] with `msg`.
fn corrupt(msg: impl Into<String>) -> PlanJsonError {
    PlanJsonError::Corrupt(msg.into())
}

/// Device constants must be finite; rates positive, the rest non-negative.
fn check_device(d: &Device) -> Result<(), PlanJsonError> {
    let fields = [
        ("flops_f32", d.flops_f32, true),
        ("flops_half", d.flops_half, true),
        ("bandwidth", d.bandwidth, true),
        ("latency", d.latency, false),
        ("launch", d.launch, false),
        ("mem_weight", d.mem_weight, false),
        ("param_state_factor", d.param_state_factor, false),
    ];
    for (name, x, positive) in fields {
        let ok = x.is_finite() && if positive { x > 0.0 } else { x >= 0.0 };
        if !ok {
            let want = if positive { "positive" } else { "non-negative" };
            return Err(corrupt(format!(
                "device constant {name} is {x}, expected a finite {want} number"
            )));
        }
    }
    Ok(())
}

/// Checks the ids of `parts`, builds the graph, checks its value sizes and verifies it.
fn load_graph<S: Space>(parts: GraphParts<S>, which: &str) -> Result<Graph<S>, PlanJsonError> {
    check_ids(&parts).map_err(|e| match e {
        JsonError::Corrupt(m) => corrupt(format!("the {which} program: {m}")),
        other => corrupt(format!("the {which} program: {other}")),
    })?;
    let g = Graph::from_parts(parts);
    let mut total = 0u64;
    for (v, val) in g.values() {
        let bytes = val.ty.checked_size_bytes().ok_or_else(|| {
            corrupt(format!(
                "the {which} program's value {v} {} is too large (its size overflows 64 bits)",
                val.ty
            ))
        })?;
        total = total.checked_add(bytes).ok_or_else(|| {
            corrupt(format!(
                "the {which} program's values total more than 2^64 bytes"
            ))
        })?;
    }
    verify(&g, "load")
        .map_err(|e| corrupt(format!("the {which} program does not verify: {}", e.detail)))?;
    Ok(g)
}

/// Provenance names distinct collectives or local slices of the local program.
fn check_provenance(
    local: &Graph<Local>,
    list: Vec<(NodeId<Local>, Provenance)>,
) -> Result<BTreeMap<NodeId<Local>, Provenance>, PlanJsonError> {
    let mut map = BTreeMap::new();
    for (n, pr) in list {
        if n.index() >= local.num_nodes() {
            return Err(corrupt(format!(
                "provenance is given for {n}, but the local program has only {} nodes",
                local.num_nodes()
            )));
        }
        let op = &local.node(n).op;
        if !(op.is_collective() || matches!(op, Op::ShardSlice { .. } | Op::KeepOnFirst { .. })) {
            return Err(corrupt(format!(
                "provenance is given for {n} ({op}), which is not a collective or local slice"
            )));
        }
        if map.insert(n, pr).is_some() {
            return Err(corrupt(format!("provenance is given twice for {n}")));
        }
    }
    Ok(map)
}

/// The summary's byte counters (per kind) fit in 64 bits.
fn check_traffic(local: &Graph<Local>) -> Result<(), PlanJsonError> {
    let mut totals: BTreeMap<CollectiveKind, u64> = BTreeMap::new();
    for (id, n) in local.nodes() {
        let (Some((kind, size)), Some(&x)) = (CollectiveKind::of(&n.op), n.inputs.first()) else {
            continue;
        };
        let (sent, _) = kind.traffic(size, local.ty(x).size_bytes() as f64);
        let t = totals.entry(kind).or_default();
        *t = t.checked_add(sent.round() as u64).ok_or_else(|| {
            corrupt(format!(
                "the {} traffic overflows 64 bits (at {id})",
                kind.name()
            ))
        })?;
    }
    Ok(())
}

/// Plans of the examples and of small inline programs, shared by the plan emitter tests.
#[cfg(test)]
pub(crate) mod test_plans {
    use crate::diag::SourceFile;
    use crate::mesh::{Device, Mesh};
    use crate::plan::Plan;

    /// The names of the examples under `examples/`, sorted.
    pub(crate) fn examples() -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir("examples")
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().into_string().unwrap();
                name.strip_suffix(".tpl").map(str::to_string)
            })
            .collect();
        names.sort();
        assert!(names.len() >= 4, "{names:?}");
        names
    }

    /// The plan of `text` (named `name`) on `mesh` (`tp=8`, `dp=2,tp=4`) with dim overrides.
    pub(crate) fn plan_of(name: &str, text: &str, mesh: &str, overrides: &[(&str, i64)]) -> Plan {
        let src = SourceFile::new(name, text);
        let sets: Vec<(String, i64)> = overrides.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let g = crate::driver::compile_global(&src, &sets).unwrap();
        let mesh = Mesh::parse(mesh).unwrap();
        Plan::build(g, mesh, Device::default()).unwrap()
    }

    /// The plan of `examples/{name}.tpl`.
    pub(crate) fn example(name: &str, mesh: &str, overrides: &[(&str, i64)]) -> Plan {
        let path = format!("examples/{name}.tpl");
        let text = std::fs::read_to_string(&path).unwrap();
        plan_of(&path, &text, mesh, overrides)
    }

    /// A split with unequal pieces after a column-parallel matmul.
    pub(crate) fn split_plan() -> Plan {
        let text = "mesh tp\ndim B = 8, H = 64\ninput x : f32[B, H]\n\
                    param w : f32[H, H] @ [_, tp]\nh = x @ w\n\
                    a, b = split(h, [16, 48], axis=-1)\noutput a\noutput b\n";
        plan_of("split.tpl", text, "tp=8", &[])
    }

    /// A cross-entropy on vocab-split logits, lowered to the vocab-parallel loss.
    pub(crate) fn vocab_parallel_plan() -> Plan {
        let text = "mesh tp\ndim B = 8, S = 2048, H = 1024, V = 65536\n\
                    input x : f32[B, S, H]\ninput labels : i32[B, S]\n\
                    param w : f32[H, V] @ [_, tp]\nlogits = x @ w @ [_, _, tp]\n\
                    loss = cross_entropy(logits, labels)\noutput loss\n";
        plan_of("ce.tpl", text, "tp=8", &[])
    }

    /// Annotations forcing a reduce-scatter, an all-gather, a local slice and an all-to-all.
    pub(crate) fn reshard_plan() -> Plan {
        let text = "mesh tp\ndim B = 8, H = 64\ninput x : f32[B, H] @ [_, tp]\n\
                    param w : f32[H, H] @ [tp, _]\nh = x @ w @ [_, tp]\n\
                    r = gelu(h) @ [_, _]\ns = r * 2.0 @ [tp, _]\noutput s @ [_, tp]\n";
        plan_of("reshard.tpl", text, "tp=8", &[])
    }

    /// Every example at degree 8 and on `dp=2,tp=4`, plus the inline programs.
    pub(crate) fn all() -> Vec<Plan> {
        let mut v = Vec::new();
        for ex in examples() {
            v.push(example(&ex, "tp=8", &[]));
            v.push(example(&ex, "dp=2,tp=4", &[]));
        }
        v.push(split_plan());
        v.push(vocab_parallel_plan());
        v.push(reshard_plan());
        v
    }
}

#[cfg(test)]
mod tests {
    use super::test_plans::*;
    use super::*;
    use crate::ir::ReduceOp;
    use crate::sharding::PartialOp;
    use serde_json::Value as J;

    /// The fields of two plans that must agree after a round trip.
    fn assert_same(a: &Plan, b: &Plan) {
        assert_eq!(a.global.to_parts(), b.global.to_parts());
        assert_eq!(a.local.to_parts(), b.local.to_parts());
        assert_eq!(a.placements, b.placements);
        assert_eq!(a.origin, b.origin);
        assert_eq!(a.provenance, b.provenance);
        assert_eq!(a.summary, b.summary);
        assert_eq!(a.mesh, b.mesh);
        assert_eq!(a.device, b.device);
    }

    #[test]
    fn round_trips_every_example() {
        for p in all() {
            let text = to_json(&p);
            let back = from_json(&text).unwrap_or_else(|e| panic!("{}: {e}", p.global.source));
            assert_same(&p, &back);
            assert_eq!(to_json(&back), text);
            assert_eq!(
                crate::emit::plan::print(&back),
                crate::emit::plan::print(&p)
            );
        }
    }

    #[test]
    fn document_is_tagged_versioned_and_ordered() {
        let p = example("mlp", "tp=8", &[]);
        let text = to_json(&p);
        assert!(
            text.starts_with("{\n  \"format\": \"tpc-plan\",\n  \"version\": 1,\n  \"summary\": {"),
            "{text}"
        );
        let doc: J = serde_json::from_str(&text).unwrap();
        let keys: Vec<&str> = doc
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        let mut want = [
            "format",
            "version",
            "summary",
            "mesh",
            "device",
            "global",
            "local",
            "placements",
            "origin",
            "provenance",
        ];
        want.sort();
        assert_eq!(keys, want);
        assert_eq!(doc["mesh"], serde_json::json!({"axes": [["tp", 8]]}));
        assert_eq!(
            doc["placements"][0],
            serde_json::json!({"dims": [[], [0]], "partial": [null]})
        );
        assert_eq!(doc["origin"][0], serde_json::json!(1));
        let prov = &doc["provenance"];
        assert_eq!(prov.as_array().unwrap().len(), 1);
        assert_eq!(prov[0][0], serde_json::json!(8));
        assert_eq!(
            prov[0][1]["transition"],
            serde_json::json!("Partial(sum) -> Replicate over tp")
        );
        assert_eq!(prov[0][1]["user"], serde_json::json!("add"));
    }

    #[test]
    fn summary_has_the_documented_shape() {
        for p in [example("mlp", "tp=8", &[]), example("gpt", "tp=8", &[])] {
            let doc: J = serde_json::from_str(&to_json(&p)).unwrap();
            let s = &doc["summary"];
            let kinds = s["collectives"].as_object().unwrap();
            assert_eq!(kinds.len(), 4);
            for k in CollectiveKind::ALL {
                let e = &kinds[k.name()];
                assert!(e["count"].is_u64(), "{k:?}: {e}");
                assert!(e["bytes_per_device"].is_u64(), "{k:?}: {e}");
                assert_eq!(
                    e["count"].as_u64().unwrap(),
                    p.summary.collectives[k.name()].count
                );
            }
            for f in [
                "flops_per_device",
                "peak_memory_bytes_per_device",
                "estimated_time_s",
            ] {
                assert!(s[f].is_number(), "{f}: {s}");
            }
            assert!(s["peak_memory_bytes_per_device"].is_u64());
        }
        let doc: J = serde_json::from_str(&to_json(&example("mlp", "tp=8", &[]))).unwrap();
        let c = &doc["summary"]["collectives"];
        assert_eq!(c["all_reduce"]["count"], 1);
        assert_eq!(c["all_reduce"]["bytes_per_device"], 7340032);
        assert_eq!(
            c["all_gather"],
            serde_json::json!({"count": 0, "bytes_per_device": 0})
        );
        assert_eq!(c["reduce_scatter"]["count"], 0);
        assert_eq!(c["all_to_all"]["count"], 0);
    }

    #[test]
    fn stored_summary_is_recomputed() {
        let p = example("mlp", "tp=8", &[]);
        let mut doc: J = serde_json::from_str(&to_json(&p)).unwrap();
        doc["summary"]["flops_per_device"] = 1.0.into();
        doc["summary"]["collectives"]["all_reduce"]["count"] = 7.into();
        let back = from_json(&doc.to_string()).unwrap();
        assert_eq!(back.summary, p.summary);
        // Only the documented keys are required.
        let m = doc["summary"].as_object_mut().unwrap();
        for k in ["param_bytes_per_device", "comm_time_s", "compute_time_s"] {
            m.remove(k).unwrap();
        }
        m.insert("extra".into(), "ignored".into());
        assert_eq!(from_json(&doc.to_string()).unwrap().summary, p.summary);
        let mut missing = doc.clone();
        let kinds = missing["summary"]["collectives"].as_object_mut().unwrap();
        kinds.remove("all_to_all").unwrap();
        assert_eq!(
            corrupt_msg(&missing.to_string()),
            "the summary lists no all_to_all entry (every collective kind must be present)"
        );
        let mut missing = doc.clone();
        missing["summary"]
            .as_object_mut()
            .unwrap()
            .remove("estimated_time_s");
        assert!(matches!(
            from_json(&missing.to_string()),
            Err(PlanJsonError::Json { .. })
        ));
        // The shape is still checked.
        doc["summary"]["collectives"]["all_reduce"]["count"] = (-1).into();
        assert!(matches!(
            from_json(&doc.to_string()),
            Err(PlanJsonError::Json { .. })
        ));
    }

    #[test]
    fn rejects_other_formats_and_versions() {
        let text = to_json(&example("mlp", "tp=8", &[]));
        let other = text.replacen("\"tpc-plan\"", "\"tpc-program\"", 1);
        assert_eq!(
            from_json(&other).unwrap_err(),
            PlanJsonError::WrongFormat {
                found: "tpc-program".into()
            }
        );
        let v2 = text.replacen("\"version\": 1", "\"version\": 2", 1);
        let err = from_json(&v2).unwrap_err();
        assert_eq!(err, PlanJsonError::UnsupportedVersion { found: 2 });
        assert_eq!(
            err.to_string(),
            "unsupported plan document version 2 (this tpc reads version 1)"
        );
        let v2 = r#"{"format": "tpc-plan", "version": 2, "local": 3}"#;
        assert!(matches!(
            from_json(v2),
            Err(PlanJsonError::UnsupportedVersion { .. })
        ));
        // A program document is not a plan.
        let prog = crate::emit::json::to_json(&example("mlp", "tp=8", &[]).global);
        assert!(matches!(
            from_json(&prog),
            Err(PlanJsonError::WrongFormat { .. })
        ));
        for bad in ["", "[]", "{}", "null", "{\"format\": \"tpc-plan\"}"] {
            assert!(
                matches!(from_json(bad), Err(PlanJsonError::Json { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn truncated_documents_are_errors() {
        let text = to_json(&example("mlp", "tp=8", &[]));
        let n = text.len();
        let cuts = (0..n).filter(|&i| i < 300 || i > n - 300 || i % 7 == 0);
        for cut in cuts.filter(|&i| text.is_char_boundary(i)) {
            assert!(from_json(&text[..cut]).is_err(), "accepted a cut at {cut}");
        }
    }

    /// JSON pointers of every number in `v`.
    fn number_pointers(v: &J, at: String, out: &mut Vec<String>) {
        match v {
            J::Number(_) => out.push(at),
            J::Array(items) => {
                for (i, x) in items.iter().enumerate() {
                    number_pointers(x, format!("{at}/{i}"), out);
                }
            }
            J::Object(m) => {
                for (k, x) in m {
                    number_pointers(x, format!("{at}/{k}"), out);
                }
            }
            _ => {}
        }
    }

    /// True for numbers that may legitimately hold `x`: float attributes, dim constants and the
    /// summary's ignored or float entries; when positive also source positions, block body ids,
    /// device constants and the whole (recomputed) summary.
    fn may_hold(pointer: &str, x: i64) -> bool {
        let seg: Vec<&str> = pointer.split('/').collect();
        let float = ["value", "eps"].contains(seg.last().unwrap()) && seg.contains(&"op");
        let summary_unsigned = pointer.starts_with("/summary/collectives/")
            || pointer == "/summary/peak_memory_bytes_per_device";
        let graph_dim = seg.len() == 5 && seg[2] == "dims" && seg[4] == "1";
        if x < 0 {
            return float || graph_dim || (seg[1] == "summary" && !summary_unsigned);
        }
        seg[1] == "summary"
            || seg[1] == "device"
            || seg.contains(&"span")
            || float
            || graph_dim
            || (seg.len() == 5 && seg[2] == "regions" && seg[4] == "body")
    }

    #[test]
    fn replaced_numbers_are_errors_or_harmless() {
        for p in [
            example("mlp", "tp=8", &[]),
            example("gpt_layer", "tp=8", &[]),
        ] {
            let doc: J = serde_json::from_str(&to_json(&p)).unwrap();
            let mut pointers = Vec::new();
            number_pointers(&doc, String::new(), &mut pointers);
            assert!(pointers.len() > 300, "{}", pointers.len());
            let (mut loaded, mut refused) = (0, 0);
            for ptr in &pointers {
                for x in [999999i64, -1] {
                    let mut bad = doc.clone();
                    *bad.pointer_mut(ptr).unwrap() = x.into();
                    match from_json(&bad.to_string()) {
                        Err(_) => refused += 1,
                        Ok(q) => {
                            loaded += 1;
                            assert!(may_hold(ptr, x), "accepted {x} at {ptr}");
                            let _ = crate::emit::plan::print(&q);
                            let _ = crate::emit::plan_dot::print(&q);
                            assert_eq!(q.summary, Summary::compute(&q.local, &q.mesh, &q.device));
                        }
                    }
                }
            }
            // Spans and the like load; ids, shapes, placements and the mesh do not.
            assert!(
                loaded > 100 && refused > loaded,
                "{loaded} loaded, {refused} refused"
            );
        }
    }

    /// The corruption message for a document.
    fn corrupt_msg(text: &str) -> String {
        match from_json(text) {
            Err(PlanJsonError::Corrupt(m)) => m,
            Err(e) => panic!("expected Corrupt, got {e:?}"),
            Ok(_) => panic!("expected Corrupt, the plan loaded"),
        }
    }

    /// The document of `p` edited by `f`.
    fn edited(p: &Plan, f: impl FnOnce(&mut PlanDoc)) -> String {
        let mut doc: PlanDoc = serde_json::from_str(&to_json(p)).unwrap();
        f(&mut doc);
        serde_json::to_string(&doc).unwrap()
    }

    /// An edit of a stored plan.
    type Edit = Box<dyn FnOnce(&mut PlanDoc)>;

    #[test]
    fn corruption_is_reported_precisely() {
        let p = example("mlp", "tp=8", &[]);
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|d| d.local.nodes[4].inputs[0] = ValueId::new(99)),
                "the local program: node n4 (matmul) refers to %99, but the document has only 11 values",
            ),
            (
                Box::new(|d| d.global.values[0].node = NodeId::new(50)),
                "the global program: value %0 refers to n50, but the document has only 10 nodes",
            ),
            (
                Box::new(|d| {
                    d.placements.pop();
                }),
                "placements lists 10 entries, but the local program has 11 values",
            ),
            (
                Box::new(|d| d.origin.push(None)),
                "origin lists 12 entries, but the local program has 11 values",
            ),
            (
                Box::new(|d| d.origin[4] = Some(ValueId::new(70))),
                "the origin of local value %4 is %70, but the global program has only 10 values",
            ),
            (
                Box::new(|d| d.placements[0].dims[1] = vec![3]),
                "the placement of local value %0 f32[1024,512]: dim 1 is split by mesh axis 3, but the mesh has 1 axes",
            ),
            (
                Box::new(|d| d.placements[0].dims.push(vec![])),
                "the placement of local value %0 f32[1024,512]: 3 dim entries for a rank-2 value",
            ),
            (
                Box::new(|d| d.placements[0].partial.clear()),
                "the placement of local value %0 f32[1024,512]: 0 partial entries on a mesh of 1 axes",
            ),
            (
                Box::new(|d| d.placements[0].dims = vec![vec![0], vec![0]]),
                "the placement of local value %0 f32[1024,512]: mesh axis tp is used twice",
            ),
            (
                Box::new(|d| d.placements[0].partial = vec![Some(PartialOp::Sum)]),
                "the placement of local value %0 f32[1024,512]: mesh axis tp both splits a dim and holds partial terms",
            ),
            (
                Box::new(|d| d.placements[0].dims = vec![vec![0], vec![]]),
                "local value %0 is f32[1024,512] in [tp, _], but its origin %1 f32[1024,4096] in that placement is f32[128,4096]",
            ),
            (
                Box::new(|d| d.origin[0] = Some(ValueId::new(0))),
                "local value %0 is f32[1024,512] in [_, tp], but its origin %0 f32[8,128,1024] in that placement does not fit",
            ),
            (
                Box::new(|d| d.placements.swap(7, 8)),
                "local node n7 (matmul), origin %8, at 11:5: over tp it reads [Shard(2), Shard(0)] and gives Replicate, which no strategy of its rule does",
            ),
            (
                Box::new(|d| d.mesh = Mesh::parse("tp=4").unwrap()),
                "local value %0 is f32[1024,512] in [_, tp], but its origin %1 f32[1024,4096] in that placement is f32[1024,1024]",
            ),
            (
                Box::new(|d| d.mesh = Mesh::parse("xp=8").unwrap()),
                "the local program's mesh axes [tp] are not the mesh's [xp]",
            ),
            (
                Box::new(|d| d.provenance[0].0 = NodeId::new(40)),
                "provenance is given for n40, but the local program has only 11 nodes",
            ),
            (
                Box::new(|d| d.provenance[0].0 = NodeId::new(4)),
                "provenance is given for n4 (matmul), which is not a collective or local slice",
            ),
            (
                Box::new(|d| {
                    let e = d.provenance[0].clone();
                    d.provenance.push(e);
                }),
                "provenance is given twice for n8",
            ),
            (
                Box::new(|d| d.device.bandwidth = 0.0),
                "device constant bandwidth is 0, expected a finite positive number",
            ),
            (
                Box::new(|d| d.device.latency = -1.0),
                "device constant latency is -1, expected a finite non-negative number",
            ),
        ];
        for (edit, msg) in cases {
            let got = corrupt_msg(&edited(&p, edit));
            assert!(got.ends_with(msg), "{got}\n does not end with\n{msg}");
        }
        // Collectives must match the mesh.
        let text = edited(&p, |d| {
            d.local.nodes[8].op = Op::AllReduce {
                axis: "tp".into(),
                size: 4,
                reduce: ReduceOp::Sum,
                also: Vec::new(),
            }
        });
        assert_eq!(
            corrupt_msg(&text),
            "local node n8 (all_reduce{sum:tp=4}), origin %8, at 11:5: claims 4 devices along tp, but the mesh tp=8 has 8"
        );
        let text = edited(&p, |d| {
            d.local.nodes[8].op = Op::AllReduce {
                axis: "dp".into(),
                size: 8,
                reduce: ReduceOp::Sum,
                also: Vec::new(),
            }
        });
        assert!(corrupt_msg(&text).contains("names mesh axis \"dp\", which the mesh tp=8 lacks"));
        let text = edited(&p, |d| {
            d.local.nodes[8].op = Op::AllReduce {
                axis: "tp".into(),
                size: 8,
                reduce: ReduceOp::Max,
                also: Vec::new(),
            }
        });
        assert!(corrupt_msg(&text).contains("but it moves Partial(max) -> Replicate over tp"));
        // A bad mesh.
        let mut doc: J = serde_json::from_str(&to_json(&p)).unwrap();
        doc["mesh"]["axes"][0][1] = 0.into();
        assert_eq!(
            corrupt_msg(&doc.to_string()),
            "mesh: mesh axis `tp` has size 0"
        );
        doc["mesh"]["axes"] = serde_json::json!([["tp", 8], ["tp", 1]]);
        assert_eq!(
            corrupt_msg(&doc.to_string()),
            "mesh: mesh axis `tp` is given twice"
        );
    }

    #[test]
    fn verifier_failures_are_corruption_not_compiler_bugs() {
        let p = example("mlp", "tp=8", &[]);
        let text = edited(&p, |d| d.local.values[4].ty.shape[2] = 256);
        let msg = corrupt_msg(&text);
        assert!(
            msg.starts_with("the local program does not verify: n4 (matmul)"),
            "{msg}"
        );
        assert!(!msg.contains("internal compiler error"), "{msg}");
        let text = edited(&p, |d| d.global.nodes.swap(0, 1));
        assert!(corrupt_msg(&text).starts_with("the global program does not verify: "));
        // Shapes whose byte size overflows are refused before anything computes with them.
        let text = edited(&p, |d| {
            d.global.values[0].ty.shape = vec![u64::MAX, 2];
        });
        assert!(from_json(&text).is_err());
        let text = edited(&p, |d| {
            d.local.values[3].ty.shape = vec![1 << 40, 1 << 30];
            d.global.values[0].ty.shape = vec![1 << 40, 1 << 30];
        });
        assert!(
            corrupt_msg(&text).contains("too large"),
            "{}",
            corrupt_msg(&text)
        );
    }

    #[test]
    fn swapped_placements_are_errors() {
        for p in [
            example("mlp", "tp=8", &[]),
            example("attention", "dp=2,tp=4", &[]),
        ] {
            let n = p.placements.len();
            for i in 0..n {
                for j in i + 1..n {
                    if p.placements[ValueId::new(i)] == p.placements[ValueId::new(j)] {
                        continue;
                    }
                    let text = edited(&p, |d| d.placements.swap(i, j));
                    assert!(
                        matches!(from_json(&text), Err(PlanJsonError::Corrupt(_))),
                        "accepted swapping the placements of %{i} and %{j}"
                    );
                }
            }
        }
    }

    #[test]
    fn changed_mesh_sizes_are_errors() {
        for (ex, mesh) in [("mlp", "tp=8"), ("gpt", "tp=8"), ("attention", "dp=2,tp=4")] {
            let p = example(ex, mesh, &[]);
            let doc: J = serde_json::from_str(&to_json(&p)).unwrap();
            let tp = p.mesh.axis_index("tp").unwrap();
            for size in [0i64, 1, 2, 3, 4, 16, 999999, -1, 1 << 21] {
                if size as u64 == p.mesh.axis_size(tp) {
                    continue;
                }
                let mut bad = doc.clone();
                bad["mesh"]["axes"][tp][1] = size.into();
                assert!(from_json(&bad.to_string()).is_err(), "{ex}: tp={size}");
            }
        }
    }

    #[test]
    fn origins_of_split_results_and_loss_intermediates_are_accepted() {
        let p = split_plan();
        assert!(p.local.nodes().any(|(_, n)| n.outputs.len() == 2));
        assert_same(&p, &from_json(&to_json(&p)).unwrap());
        let p = vocab_parallel_plan();
        assert!(p
            .local
            .nodes()
            .any(|(_, n)| matches!(n.op, Op::TargetLogit { .. })));
        assert_same(&p, &from_json(&to_json(&p)).unwrap());
        // Outside the loss, a rank change is still caught.
        let text = edited(&p, |d| d.origin[2] = Some(ValueId::new(1)));
        let msg = corrupt_msg(&text);
        assert!(
            msg.contains(": local value %2 is f32[8,2048,8192]"),
            "{msg}"
        );
    }
}
