//! The `tpc` command line.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use std::io::Write;
use std::process::ExitCode;
use tpc::diag::SourceFile;
use tpc::driver::{self, Error};

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
    /// Compile a .tpl program and emit it (the global program at degree 1).
    Compile(CompileArgs),
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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Compile(e, src)) => {
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

enum Failure {
    Compile(Error, Option<SourceFile>),
    Other(anyhow::Error),
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
        .map_err(|e| Failure::Compile(e.into(), None))?;
    if let Some(d) = args.degree.filter(|&d| d != 1) {
        return Err(anyhow::anyhow!("--degree {d}: sharding is not implemented yet; only the global program (degree 1) can be compiled").into());
    }
    if let Some(m) = &args.mesh {
        return Err(anyhow::anyhow!("--mesh {m}: sharding is not implemented yet; only the global program (degree 1) can be compiled").into());
    }
    let src = driver::read_source(&args.file).map_err(|e| Failure::Compile(e.into(), None))?;
    let g = driver::compile_global(&src, &overrides)
        .map_err(|e| Failure::Compile(e, Some(src.clone())))?;
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

fn write_output(path: Option<&std::path::Path>, text: &str) -> anyhow::Result<()> {
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
