//! `tpc checkpoint`: look into a checkpoint saved by `tpc run --save` (`inspect`), and turn it
//! into one file of global tensors (`export`) that `tpc run --params` reads on any mesh.

use crate::{say_out, Failure};
use anyhow::anyhow;
use std::path::Path;
use tpc::emit::plan::bytes;
use tpc::exec::checkpoint::export::export;
use tpc::exec::checkpoint::load::Reader;

/// What to do with a checkpoint.
#[derive(clap::Subcommand)]
pub(crate) enum Args {
    /// Print a checkpoint's step, program, mesh and files, and per tensor its shape, dtype,
    /// placement when saved, blocks and bytes.
    Inspect {
        /// The --save directory (its latest checkpoint) or one step directory.
        dir: String,
        /// Print the index as JSON instead.
        #[arg(long)]
        json: bool,
        /// Also read every block and check its sha256 (exit 1 on the first mismatch).
        #[arg(long)]
        verify: bool,
    },
    /// Write the checkpoint's params as global tensors to one safetensors file.
    Export {
        /// The --save directory (its latest checkpoint) or one step directory.
        dir: String,
        /// The file to write (written to a temporary beside it, then renamed).
        #[arg(short = 'o', long = "output", value_name = "FULL.safetensors")]
        output: String,
        /// Also write the optimizer state (its moments and step).
        #[arg(long)]
        with_state: bool,
    },
}

/// Runs `tpc checkpoint ...`.
pub(crate) fn run(args: &Args) -> Result<(), Failure> {
    match args {
        Args::Inspect { dir, json, verify } => inspect(dir, *json, *verify),
        Args::Export {
            dir,
            output,
            with_state,
        } => {
            let r = open(dir)?;
            refuse_inside(output)?;
            let e = export(&r, Path::new(output), *with_state).map_err(|e| anyhow!("{e}"))?;
            say_out(&format!(
                "wrote {output}: {} tensors of step {}, {}",
                e.tensors,
                r.index.step,
                bytes(e.bytes)
            ));
            Ok(())
        }
    }
}

/// An error when `output` would be written into a checkpoint: a step directory (one holding an
/// `index.json`) or a save directory (one holding `latest`), where it could replace a rank
/// file or `latest`.
fn refuse_inside(output: &str) -> Result<(), Failure> {
    let parent = match Path::new(output).parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let ours = ["index.json", "latest"]
        .iter()
        .any(|f| std::fs::symlink_metadata(parent.join(f)).is_ok());
    if ours {
        return Err(anyhow!(
            "-o `{output}` is inside a checkpoint directory: export to another directory"
        )
        .into());
    }
    Ok(())
}

fn open(dir: &str) -> Result<Reader, Failure> {
    Ok(Reader::open(Path::new(dir)).map_err(|e| anyhow!("{e}"))?)
}

/// Prints the checkpoint at `dir`.
fn inspect(dir: &str, json: bool, verify: bool) -> Result<(), Failure> {
    let r = open(dir)?;
    if json {
        let text = serde_json::to_string_pretty(&r.index).map_err(|e| anyhow!("{e}"))?;
        say_out(&text);
    } else {
        say_out(&summary(&r));
    }
    if verify {
        let n = r.verify().map_err(|e| anyhow!("{e}"))?;
        say_out(&format!(
            "verified: every block's sha256 matches ({})",
            bytes(n)
        ));
    }
    Ok(())
}

/// The text of `inspect`: the checkpoint's facts, then one row per tensor.
fn summary(r: &Reader) -> String {
    let ix = &r.index;
    let total: u64 = ix.files.values().sum();
    let mut out = format!(
        "checkpoint {} (step {} of {})\nprogram {}\nsaved on {} (seed {}); {} files, {}\n",
        r.step_dir().display(),
        ix.step,
        ix.source,
        ix.program,
        ix.mesh,
        ix.seed,
        ix.files.len(),
        bytes(total)
    );
    for kind in ["param", "state"] {
        let of_kind = ix.tensors.values().filter(|t| t.kind == kind);
        let (n, held) = of_kind.fold((0, 0u64), |(n, b), t| {
            let held: u64 = t.blocks.iter().map(|b| b.data[1] - b.data[0]).sum();
            (n + 1, b + held)
        });
        let what = if kind == "param" {
            "params"
        } else {
            "optimizer state"
        };
        out.push_str(&format!("{what}: {n} tensors, {}\n", bytes(held)));
    }
    out.push('\n');
    let mut rows = vec![[
        "tensor".to_string(),
        "kind".into(),
        "type".into(),
        "placement".into(),
        "blocks".into(),
        "bytes".into(),
    ]];
    for (name, t) in &ix.tensors {
        let dims: Vec<String> = t.shape.iter().map(u64::to_string).collect();
        let held: u64 = t.blocks.iter().map(|b| b.data[1] - b.data[0]).sum();
        rows.push([
            name.clone(),
            t.kind.clone(),
            format!("{}[{}]", t.declared, dims.join(", ")),
            t.placement.clone(),
            t.blocks.len().to_string(),
            bytes(held),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out.trim_end().to_string()
}
