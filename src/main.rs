//! The `tpc` command line.

mod run_cmd;

/// mimalloc: the compiler allocates many small vectors per value, and glibc's allocator spends
/// a third of a large compile consolidating free lists.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use std::io::Write;
use std::process::ExitCode;
use tpc::diag::SourceFile;
use tpc::driver::{self, Error};
use tpc::mesh::{Device, Mesh};

/// tpc: a tensor-parallel compiler. Describe a model in .tpl, mark how a few weights are split
/// across a mesh of devices, and get the per-device program with every collective explained.
#[derive(Parser)]
#[command(name = "tpc", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Compile a .tpl program: the global program, or with --degree/--mesh the per-device plan.
    Compile(CompileArgs),
    /// Run a program or saved plan on N simulated devices (threads) with real collectives.
    Run(run_cmd::RunArgs),
}

#[derive(clap::Args)]
struct CompileArgs {
    /// The .tpl source file.
    file: String,
    /// Override a dim, e.g. --set H=4096 (repeatable).
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Emit::Text)]
    emit: Emit,
    /// Write the output to PATH instead of stdout.
    #[arg(short = 'o', long = "output", value_name = "PATH")]
    output: Option<std::path::PathBuf>,
    /// Tensor-parallel degree: the 1-D mesh tp=N.
    #[arg(long, conflicts_with = "mesh")]
    degree: Option<u64>,
    /// An n-D mesh, e.g. dp=2,tp=4.
    #[arg(long)]
    mesh: Option<String>,
    #[command(flatten)]
    device: DeviceArgs,
}

/// Device constants of the cost model (defaults: a GPU-like device; see the README).
#[derive(clap::Args)]
pub(crate) struct DeviceArgs {
    /// f32 FLOP/s per device.
    #[arg(long, value_name = "FLOP/S", default_value_t = Device::default().flops_f32)]
    flops: f64,
    /// bf16/f16 FLOP/s per device.
    #[arg(long, value_name = "FLOP/S", default_value_t = Device::default().flops_half)]
    flops_half: f64,
    /// Link bandwidth per device in bytes/s.
    #[arg(long, value_name = "BYTES/S", default_value_t = Device::default().bandwidth)]
    bandwidth: f64,
    /// Latency of one collective step in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = Device::default().latency)]
    latency: f64,
    /// Price of one byte of per-device memory, in seconds (0: optimize time only).
    #[arg(long, value_name = "SECONDS", default_value_t = Device::default().mem_weight)]
    mem_weight: f64,
}

impl DeviceArgs {
    pub(crate) fn device(&self) -> anyhow::Result<Device> {
        let d = Device {
            flops_f32: self.flops,
            flops_half: self.flops_half,
            bandwidth: self.bandwidth,
            latency: self.latency,
            mem_weight: self.mem_weight,
            ..Device::default()
        };
        for (name, v, positive) in [
            ("--flops", d.flops_f32, true),
            ("--flops-half", d.flops_half, true),
            ("--bandwidth", d.bandwidth, true),
            ("--latency", d.latency, false),
            ("--mem-weight", d.mem_weight, false),
        ] {
            if !v.is_finite() || v < 0.0 || (positive && v == 0.0) {
                anyhow::bail!(
                    "{name} {v}: must be a finite {} number",
                    if positive { "positive" } else { "non-negative" }
                );
            }
        }
        Ok(d)
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Emit {
    /// Readable text IR.
    Text,
    /// Versioned JSON document.
    Json,
    /// Graphviz DOT.
    Dot,
}

/// Exit code for errors in the user's input.
const EXIT_USER: u8 = 1;
/// Exit code for compiler bugs.
const EXIT_INTERNAL: u8 = 70;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Deeply nested but valid programs recurse in the parser and lowering: give them room.
    let worker = std::thread::Builder::new()
        .stack_size(256 << 20)
        .spawn(move || run(cli));
    match worker.map(|h| h.join()) {
        Ok(Ok(code)) => code,
        _ => {
            eprintln!(
                "internal compiler error: the compiler thread failed; please report this input"
            );
            ExitCode::from(EXIT_INTERNAL)
        }
    }
}

fn run(cli: Cli) -> ExitCode {
    let result = match cli.cmd {
        Cmd::Compile(args) => compile(&args),
        Cmd::Run(args) => run_cmd::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Compile(b)) => {
            let (e, src) = *b;
            eprint!("{}", e.render(src.as_ref()));
            ExitCode::from(if e.is_internal() {
                EXIT_INTERNAL
            } else {
                EXIT_USER
            })
        }
        Err(Failure::Other(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_USER)
        }
    }
}

pub(crate) enum Failure {
    Compile(Box<(Error, Option<SourceFile>)>),
    Other(anyhow::Error),
}

pub(crate) fn fail(e: impl Into<Error>, src: Option<SourceFile>) -> Failure {
    Failure::Compile(Box::new((e.into(), src)))
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Other(e)
    }
}

fn compile(args: &CompileArgs) -> Result<(), Failure> {
    let overrides = args
        .set
        .iter()
        .map(|s| driver::parse_set(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(e, None))?;
    let mesh = match (args.degree, &args.mesh) {
        (Some(d), _) => Some(Mesh::degree(d).map_err(|e| fail(e, None))?),
        (None, Some(m)) => Some(Mesh::parse(m).map_err(|e| fail(e, None))?),
        (None, None) => None,
    };
    let device = args.device.device()?;
    let src = driver::read_source(&args.file).map_err(|e| fail(e, None))?;
    if let Some(mesh) = mesh {
        let plan = driver::compile_plan(&src, &overrides, mesh, device)
            .map_err(|e| fail(e, Some(src.clone())))?;
        let text = match args.emit {
            Emit::Text => tpc::emit::plan::print(&plan),
            Emit::Json => tpc::emit::plan_json::to_json(&plan),
            Emit::Dot => tpc::emit::plan_dot::print(&plan),
        };
        write_output(args.output.as_deref(), &text)?;
        return Ok(());
    }
    let g = driver::compile_global(&src, &overrides).map_err(|e| fail(e, Some(src.clone())))?;
    let text = match args.emit {
        Emit::Text => tpc::emit::text::print(&g),
        Emit::Json => tpc::emit::json::to_json(&g),
        Emit::Dot => tpc::emit::dot::print_with(
            &g,
            tpc::emit::dot::DotOptions {
                collapse_repeats: true,
            },
        ),
    };
    write_output(args.output.as_deref(), &text)?;
    Ok(())
}

pub(crate) fn write_output(path: Option<&std::path::Path>, text: &str) -> anyhow::Result<()> {
    match path {
        Some(p) => {
            std::fs::write(p, text).with_context(|| format!("cannot write `{}`", p.display()))
        }
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())
                .and_then(|_| out.flush())
                .or_else(|e| {
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .context("cannot write to stdout")
        }
    }
}
