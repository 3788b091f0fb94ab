//! The cost model shared by propagation and the plan summary: FLOPs per op, bytes and latency
//! steps of each collective (ring algorithms), and the alpha-beta time of both.

use crate::ir::{Dtype, Op, TensorType};
use crate::mesh::Device;
use serde::{Deserialize, Serialize};

/// The collectives tpc inserts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CollectiveKind {
    /// Partial → Replicate.
    AllReduce,
    /// Shard → Replicate.
    AllGather,
    /// Partial → Shard.
    ReduceScatter,
    /// Shard(i) → Shard(j).
    AllToAll,
}

impl CollectiveKind {
    /// All kinds, in summary order.
    pub const ALL: [CollectiveKind; 4] = [
        CollectiveKind::AllReduce,
        CollectiveKind::AllGather,
        CollectiveKind::ReduceScatter,
        CollectiveKind::AllToAll,
    ];

    /// The kind of a collective op and its group size (a redistribute is an all-to-all over the
    /// combined group of its axes); `None` for every other op.
    pub fn of(op: &Op) -> Option<(CollectiveKind, u64)> {
        Some(match op {
            Op::AllReduce { size, also, .. } => (
                CollectiveKind::AllReduce,
                also.iter().map(|(_, n)| n).product::<u64>() * size,
            ),
            Op::AllGather { size, .. } => (CollectiveKind::AllGather, *size),
            Op::ReduceScatter { size, .. } => (CollectiveKind::ReduceScatter, *size),
            Op::AllToAll { size, .. } => (CollectiveKind::AllToAll, *size),
            Op::Redistribute { axes, .. } => (
                CollectiveKind::AllToAll,
                axes.iter().map(|(_, n)| n).product(),
            ),
            _ => return None,
        })
    }

    /// snake_case name, as in the JSON summary.
    pub fn name(self) -> &'static str {
        match self {
            CollectiveKind::AllReduce => "all_reduce",
            CollectiveKind::AllGather => "all_gather",
            CollectiveKind::ReduceScatter => "reduce_scatter",
            CollectiveKind::AllToAll => "all_to_all",
        }
    }

    /// Bytes each device sends and latency steps, for a group of `n` devices each holding
    /// `bytes` before the step (ring algorithms).
    pub fn traffic(self, n: u64, bytes: f64) -> (f64, u64) {
        if n <= 1 {
            return (0.0, 0);
        }
        let nf = n as f64;
        match self {
            CollectiveKind::AllReduce => (2.0 * (nf - 1.0) / nf * bytes, 2 * (n - 1)),
            CollectiveKind::AllGather => ((nf - 1.0) * bytes, n - 1),
            CollectiveKind::ReduceScatter | CollectiveKind::AllToAll => {
                ((nf - 1.0) / nf * bytes, n - 1)
            }
        }
    }

    /// Estimated seconds: one launch, steps · latency and bytes / bandwidth (nothing on a
    /// group of one device: no collective runs).
    pub fn time(self, n: u64, bytes: f64, dev: &Device) -> f64 {
        if n <= 1 {
            return 0.0;
        }
        let (b, steps) = self.traffic(n, bytes);
        dev.launch + steps as f64 * dev.latency + b / dev.bandwidth
    }
}

/// Floating-point operations of one application of `op` (counted on the given types: global
/// types give global FLOPs, local types per-device FLOPs). Data movement ops count 0.
pub fn flops(op: &Op, ins: &[&TensorType], outs: &[&TensorType]) -> f64 {
    let out = outs.first().map(|t| t.numel() as f64).unwrap_or(0.0);
    let inp = ins.first().map(|t| t.numel() as f64).unwrap_or(0.0);
    match op {
        Op::MatMul => {
            let k = ins[0].shape.last().copied().unwrap_or(1) as f64;
            2.0 * out * k
        }
        Op::Binary { .. }
        | Op::Scalar { .. }
        | Op::CausalMask
        | Op::Equal
        | Op::Select
        | Op::OneHot { .. } => out,
        Op::ScatterAdd { .. } => ins.get(1).map_or(0.0, |t| t.numel() as f64),
        Op::UnaryGrad { op } => {
            out * if matches!(op, crate::ir::UnaryOp::Neg | crate::ir::UnaryOp::Relu) {
                1.0
            } else {
                10.0
            }
        }
        Op::Unary { op } => {
            out * if matches!(op, crate::ir::UnaryOp::Neg | crate::ir::UnaryOp::Relu) {
                1.0
            } else {
                8.0
            }
        }
        Op::Softmax { .. } => 5.0 * out,
        Op::LayerNorm { .. } | Op::RmsNorm { .. } => 8.0 * out,
        Op::Reduce { .. } => inp,
        Op::CrossEntropy => 5.0 * inp,
        Op::Embedding
        | Op::Input { .. }
        | Op::Param { .. }
        | Op::State { .. }
        | Op::Transpose { .. }
        | Op::Reshape { .. }
        | Op::Split { .. }
        | Op::Concat { .. }
        | Op::Slice { .. }
        | Op::Cast { .. }
        | Op::FullLike { .. }
        | Op::Fill { .. }
        | Op::BroadcastTo { .. }
        | Op::AllReduce { .. }
        | Op::AllGather { .. }
        | Op::ReduceScatter { .. }
        | Op::AllToAll { .. }
        | Op::Redistribute { .. }
        | Op::ShardSlice { .. }
        | Op::KeepOnFirst { .. }
        | Op::VocabEmbedding { .. }
        | Op::TargetLogit { .. } => 0.0,
    }
}

/// Seconds to run `flops` FLOPs in `dtype` on the device.
pub fn compute_time(flops: f64, dtype: Dtype, dev: &Device) -> f64 {
    let rate = match dtype {
        Dtype::F32 | Dtype::I32 => dev.flops_f32,
        Dtype::Bf16 | Dtype::F16 => dev.flops_half,
    };
    flops / rate
}

/// Parses a memory size: `512MiB`, `16GiB`, `1.5GB`, `1000000` (bytes); at least 1 byte
/// (`tpc run --max-memory`, `tpc compile --memory-budget`).
pub fn parse_size(text: &str) -> Result<u128, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    let scale: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        _ => {
            return Err(format!(
                "unknown unit `{unit}` (write e.g. 512MiB, 16GiB, 2GB or a number of bytes)"
            ))
        }
    };
    let n: f64 = num
        .parse()
        .map_err(|_| "not a size (write e.g. 512MiB, 16GiB, 2GB or a number of bytes)")?;
    let bytes = n * scale;
    if !((1.0..1e30).contains(&bytes)) {
        return Err("must be at least 1 byte and finite".into());
    }
    Ok(bytes as u128)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_reduce_moves_what_reduce_scatter_and_all_gather_move() {
        let (n, t) = (8, 1024.0);
        let (ar, _) = CollectiveKind::AllReduce.traffic(n, t);
        let (rs, _) = CollectiveKind::ReduceScatter.traffic(n, t);
        let (ag, _) = CollectiveKind::AllGather.traffic(n, t / n as f64);
        assert!((ar - (rs + ag)).abs() < 1e-9);
        // cost(S -> R) of the shard equals cost(P -> S) of the whole
        assert!((ag - rs).abs() < 1e-9);
        assert_eq!(CollectiveKind::AllReduce.traffic(1, t), (0.0, 0));
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("16GiB"), Ok(16 << 30));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("1.5 KiB"), Ok(1536));
        for bad in ["", "0", "-1GiB", "1XB", "GiB", "1e400", "nan"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
