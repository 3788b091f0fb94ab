//! The versioned JSON document of a program: `{"format": "tpc-program", "version": 1, "graph":
//! {...}}`, where `graph` is the graph's [`GraphParts`]. Loading checks every id before building
//! the graph and never panics; the caller still runs the verifier on the result.

use crate::ir::{Graph, GraphParts, NodeId, RegionId, Space, ValueId};
use serde::{Deserialize, Serialize};
use std::marker::PhantomData;

/// The `format` tag of a program document.
pub const FORMAT: &str = "tpc-program";
/// The document version this build writes and reads.
pub const VERSION: u32 = 1;

/// A program document: format tag, version and the stored graph.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProgramDoc {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`VERSION`] when written by this build.
    pub version: u32,
    /// The graph's stored parts.
    pub graph: GraphParts,
}

/// Why a document could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// Not valid JSON, or not shaped like a program document.
    #[error("malformed program document: {message}")]
    Json {
        /// 1-based line of the error (0 when unknown).
        line: usize,
        /// 1-based column of the error (0 when unknown).
        column: usize,
        /// serde_json's description, including the position.
        message: String,
    },
    /// The `format` tag is not [`FORMAT`].
    #[error("not a tpc program document: format is {found:?}, expected {FORMAT:?}")]
    WrongFormat {
        /// The tag found.
        found: String,
    },
    /// A version this build cannot read.
    #[error("unsupported program document version {found} (this tpc reads version {VERSION})")]
    UnsupportedVersion {
        /// The version found.
        found: u32,
    },
    /// Well-formed JSON whose ids do not fit together.
    #[error("corrupt program document: {0}")]
    Corrupt(String),
}

impl From<serde_json::Error> for JsonError {
    fn from(e: serde_json::Error) -> Self {
        Self::malformed(e)
    }
}

impl DocError for JsonError {
    fn json(line: usize, column: usize, message: String) -> Self {
        JsonError::Json {
            line,
            column,
            message,
        }
    }

    fn wrong_format(found: String) -> Self {
        JsonError::WrongFormat { found }
    }

    fn unsupported_version(found: u32) -> Self {
        JsonError::UnsupportedVersion { found }
    }
}

/// The errors every versioned document loader reports before it reads the body.
pub(crate) trait DocError: Sized {
    /// Not valid JSON, or not shaped as expected, at 1-based `line` and `column` (0: unknown).
    fn json(line: usize, column: usize, message: String) -> Self;

    /// The `format` tag is `found`, not the loader's.
    fn wrong_format(found: String) -> Self;

    /// The document's version is `found`, which this build cannot read.
    fn unsupported_version(found: u32) -> Self;

    /// [`Self::json`] from serde_json's error and its position.
    fn malformed(e: serde_json::Error) -> Self {
        Self::json(e.line(), e.column(), e.to_string())
    }
}

/// The tag and version, read before the rest so that another format or version is reported as
/// such rather than as a shape mismatch.
#[derive(Deserialize)]
struct Header {
    format: String,
    version: u32,
}

/// Checks that `text` is a JSON object tagged `format` at `version`.
pub(crate) fn check_header<E: DocError>(text: &str, format: &str, version: u32) -> Result<(), E> {
    let header: Header = serde_json::from_str(text).map_err(E::malformed)?;
    if header.format != format {
        return Err(E::wrong_format(header.format));
    }
    if header.version != version {
        return Err(E::unsupported_version(header.version));
    }
    Ok(())
}

/// The document of `g`, pretty-printed.
pub fn to_json(g: &Graph) -> String {
    let doc = ProgramDoc {
        format: FORMAT.into(),
        version: VERSION,
        graph: g.to_parts(),
    };
    serde_json::to_string_pretty(&doc).expect("a program document always serializes")
}

/// Loads a document written by [`to_json`]; checks the tag, the version and every id.
pub fn from_json(text: &str) -> Result<Graph, JsonError> {
    check_header::<JsonError>(text, FORMAT, VERSION)?;
    let doc: ProgramDoc = serde_json::from_str(text)?;
    check_ids(&doc.graph)?;
    Ok(Graph::from_parts(doc.graph))
}

/// Checks that every id in `parts` names an existing entity, that the root region exists, and
/// that every leaf has exactly one result (graph accessors rely on it).
pub fn check_ids<S: Space>(parts: &GraphParts<S>) -> Result<(), JsonError> {
    let ids = Ids {
        nodes: parts.nodes.len(),
        values: parts.values.len(),
        regions: parts.regions.len(),
        space: PhantomData::<S>,
    };
    if parts.regions.is_empty() {
        return Err(corrupt("the region table is empty (no root region)"));
    }
    for (i, n) in parts.nodes.iter().enumerate() {
        let what = || format!("node n{i} ({})", n.op.name());
        for &v in n.inputs.iter().chain(&n.outputs) {
            ids.value(v, &what)?;
        }
        ids.region(n.region, &what)?;
        if n.op.is_leaf() && n.outputs.len() != 1 {
            let k = n.outputs.len();
            return Err(corrupt(&format!("{} has {k} results, expected 1", what())));
        }
    }
    for (i, v) in parts.values.iter().enumerate() {
        ids.node(v.node, &|| format!("value %{i}"))?;
    }
    for (i, r) in parts.regions.iter().enumerate() {
        if let Some(p) = r.parent {
            ids.region(p, &|| format!("region r{i} ({:?})", r.path))?;
        }
    }
    for (v, _) in &parts.annotations {
        ids.value(*v, &|| "an annotation".to_string())?;
    }
    for out in &parts.outputs {
        ids.value(out.value, &|| format!("output {:?}", out.name))?;
        if let Some(l) = out.like {
            ids.value(l, &|| {
                format!("output {:?} (the value it is laid out like)", out.name)
            })?;
        }
    }
    Ok(())
}

/// Table sizes of a program of `S`, for bounds checks with precise messages.
struct Ids<S> {
    nodes: usize,
    values: usize,
    regions: usize,
    space: PhantomData<S>,
}

impl<S: Space> Ids<S> {
    /// Checks a value id referenced by `what`.
    fn value(&self, v: ValueId<S>, what: &dyn Fn() -> String) -> Result<(), JsonError> {
        in_range(v.index(), self.values, &v, "values", what)
    }

    /// Checks a node id referenced by `what`.
    fn node(&self, n: NodeId<S>, what: &dyn Fn() -> String) -> Result<(), JsonError> {
        in_range(n.index(), self.nodes, &n, "nodes", what)
    }

    /// Checks a region id referenced by `what`.
    fn region(&self, r: RegionId<S>, what: &dyn Fn() -> String) -> Result<(), JsonError> {
        in_range(r.index(), self.regions, &r, "regions", what)
    }
}

/// `Ok` when `index < len`; otherwise names the referrer, the id and the table size.
fn in_range(
    index: usize,
    len: usize,
    id: &dyn std::fmt::Display,
    table: &str,
    what: &dyn Fn() -> String,
) -> Result<(), JsonError> {
    if index < len {
        return Ok(());
    }
    Err(corrupt(&format!(
        "{} refers to {id}, but the document has only {len} {table}",
        what()
    )))
}

/// A [`JsonError::Corrupt`] with `msg`.
fn corrupt(msg: &str) -> JsonError {
    JsonError::Corrupt(msg.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emit::fixtures::*;

    /// Typical float attributes, which must read back bit for bit.
    fn floats() -> Graph {
        use crate::ir::{BinaryOp, Op};
        let mut g = Graph::new("f.tpl");
        let root = g.root();
        let mut x = add1(
            &mut g,
            Op::Input { name: "x".into() },
            vec![],
            &[2, 2],
            root,
        );
        let consts = [
            1e-5,
            1e-6,
            1e-12,
            0.044715,
            0.7978845608028654,
            0.1,
            1.0 / 3.0,
            -3e38,
        ];
        for c in consts {
            let op = Op::Scalar {
                op: BinaryOp::Mul,
                value: c,
                scalar_lhs: false,
            };
            x = add1(&mut g, op, vec![x], &[2, 2], root);
            x = add1(&mut g, Op::LayerNorm { eps: c }, vec![x, x], &[2, 2], root);
        }
        g
    }

    #[test]
    fn round_trips_exactly() {
        for g in [sample(), layers(3, 2), Graph::new("e.tpl"), floats()] {
            let text = to_json(&g);
            let back = from_json(&text).unwrap();
            assert_eq!(back.to_parts(), g.to_parts());
            assert_eq!(to_json(&back), text);
            assert_eq!(
                crate::emit::text::print(&back),
                crate::emit::text::print(&g)
            );
        }
    }

    #[test]
    fn document_is_tagged_and_versioned() {
        let text = to_json(&sample());
        assert!(text.starts_with("{\n  \"format\": \"tpc-program\",\n  \"version\": 1,\n"));
        let doc: ProgramDoc = serde_json::from_str(&text).unwrap();
        assert_eq!(doc.graph, sample().to_parts());
    }

    #[test]
    fn rejects_other_formats_and_versions() {
        let text = to_json(&sample());
        let other = text.replacen("\"tpc-program\"", "\"tpc-plan\"", 1);
        assert_eq!(
            from_json(&other).unwrap_err(),
            JsonError::WrongFormat {
                found: "tpc-plan".into()
            }
        );
        let v2 = text.replacen("\"version\": 1", "\"version\": 2", 1);
        let err = from_json(&v2).unwrap_err();
        assert_eq!(err, JsonError::UnsupportedVersion { found: 2 });
        assert_eq!(
            err.to_string(),
            "unsupported program document version 2 (this tpc reads version 1)"
        );
        // A later version may change the graph's shape: the version is still what is reported.
        let v2 = r#"{"format": "tpc-program", "version": 2, "graph": []}"#;
        assert!(matches!(
            from_json(v2),
            Err(JsonError::UnsupportedVersion { .. })
        ));
    }

    #[test]
    fn syntax_errors_carry_positions() {
        let err = from_json("{\n  \"format\": \"tpc-program\",\n  oops\n}").unwrap_err();
        match err {
            JsonError::Json { line, column, .. } => assert_eq!((line, column), (3, 3)),
            e => panic!("{e:?}"),
        }
        assert!(matches!(from_json(""), Err(JsonError::Json { .. })));
        assert!(matches!(from_json("[]"), Err(JsonError::Json { .. })));
        assert!(matches!(from_json("{}"), Err(JsonError::Json { .. })));
    }

    #[test]
    fn truncated_documents_are_errors() {
        let text = to_json(&sample());
        for cut in (0..text.len()).filter(|&i| text.is_char_boundary(i)) {
            assert!(from_json(&text[..cut]).is_err(), "accepted a cut at {cut}");
        }
    }

    /// The document of `sample()` with the number at JSON `pointer` set to 999999.
    fn patched(pointer: &str) -> String {
        let mut doc: serde_json::Value = serde_json::from_str(&to_json(&sample())).unwrap();
        *doc.pointer_mut(pointer).expect("pointer present") = 999999.into();
        serde_json::to_string_pretty(&doc).unwrap()
    }

    /// The corruption message for a document.
    fn corrupt_msg(text: &str) -> String {
        match from_json(text) {
            Err(JsonError::Corrupt(m)) => m,
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn out_of_range_ids_are_reported_precisely() {
        let cases = [
            (
                "/graph/nodes/2/inputs/0",
                "node n2 (matmul) refers to %999999, but the document has only 8 values",
            ),
            (
                "/graph/nodes/4/outputs/1",
                "node n4 (split) refers to %999999, but the document has only 8 values",
            ),
            (
                "/graph/nodes/3/region",
                "node n3 (softmax) refers to r999999, but the document has only 3 regions",
            ),
            (
                "/graph/values/0/node",
                "value %0 refers to n999999, but the document has only 7 nodes",
            ),
            (
                "/graph/regions/2/parent",
                "region r2 (\"layer.0.attention\") refers to r999999, but the document has only 3 regions",
            ),
            (
                "/graph/annotations/0/0",
                "an annotation refers to %999999, but the document has only 8 values",
            ),
            (
                "/graph/outputs/0/value",
                "output \"y\" refers to %999999, but the document has only 8 values",
            ),
        ];
        for (pointer, msg) in cases {
            assert_eq!(corrupt_msg(&patched(pointer)), msg, "{pointer}");
        }
    }

    #[test]
    fn huge_numbers_anywhere_never_panic() {
        let text = to_json(&layers(2, 2));
        let starts: Vec<usize> = text
            .match_indices(|c: char| c.is_ascii_digit())
            .map(|(i, _)| i)
            .filter(|&i| !text.as_bytes()[i - 1].is_ascii_digit())
            .collect();
        for i in starts {
            let end = i + text[i..].find(|c: char| !c.is_ascii_digit()).unwrap();
            let bad = format!("{}999999{}", &text[..i], &text[end..]);
            // Sizes, spans and dims may legitimately be large: such documents load, and the
            // graph's accessors must then be safe to call.
            if let Ok(g) = from_json(&bad) {
                let _ = (g.params().count(), g.inputs().count(), g.topo_order());
                for (v, _) in g.values() {
                    let _ = g.users(v);
                }
                let _ = crate::emit::text::print(&g);
            }
        }
    }

    #[test]
    fn structural_corruption_is_reported() {
        let mut parts = sample().to_parts();
        parts.regions.clear();
        let doc = ProgramDoc {
            format: FORMAT.into(),
            version: VERSION,
            graph: parts,
        };
        let text = serde_json::to_string(&doc).unwrap();
        assert!(corrupt_msg(&text).contains("no root region"));
        let mut parts = sample().to_parts();
        parts.nodes[0].outputs.clear();
        assert_eq!(
            check_ids(&parts).unwrap_err().to_string(),
            "corrupt program document: node n0 (input) has 0 results, expected 1"
        );
    }
}
