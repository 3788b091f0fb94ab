//! The `tpc` command line.

mod checkpoint_cmd;
mod run_cmd;

/// mimalloc: the compiler allocates many small vectors per value, and glibc's allocator spends
/// a third of a large compile consolidating free lists.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand, ValueEnum};
use std::io::Write;
use std::process::ExitCode;
use tpc::diag::SourceFile;
use tpc::driver::{self, Error};
use tpc::files::os_reason;
use tpc::mesh::{Device, Mesh, SequenceParallel};

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
    Run(Box<run_cmd::RunArgs>),
    /// Inspect or export a checkpoint saved by `tpc run --save`.
    #[command(subcommand)]
    Checkpoint(checkpoint_cmd::Args),
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
    /// For a program with `train`: compile only its forward pass.
    #[arg(long)]
    forward_only: bool,
    /// Microbatches per training step: dim 0 of every input split into M pieces run one after
    /// another, their gradients accumulated (the step equals the full batch's). Default: the
    /// pipeline axis's size for a pipelined program, else 1.
    #[arg(long, value_name = "M", value_parser = clap::value_parser!(u64).range(1..))]
    microbatches: Option<u64>,
    /// Pipeline schedule: 1f1b (Megatron's one-forward-one-backward) or gpipe.
    #[arg(long, value_name = "KIND", default_value = "1f1b", value_parser = clap::value_parser!(tpc::pipeline::schedule::ScheduleKind))]
    schedule: tpc::pipeline::schedule::ScheduleKind,
    /// Activation recompute for a training step: none, selective (the attention core:
    /// softmax back to the scores' matmul) or full (everything inside each outermost block
    /// instance, e.g. each layer, from its input).
    #[arg(long, value_name = "POLICY", default_value = "none", value_parser = clap::value_parser!(tpc::plan::remat::Recompute))]
    recompute: tpc::plan::remat::Recompute,
    /// ZeRO over the dp axis: 0 plain data parallelism, 1 optimizer state split, 2 gradients
    /// too, 3 params too (gathered before each use).
    #[arg(long, value_name = "STAGE", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=3))]
    zero: u8,
    /// For a program with `train`: the loss scale, instead of its `loss_scale` clause:
    /// dynamic, dynamic(N) (doubling after N steps in a row without an overflow) or a scale.
    #[arg(long, value_name = "SCALE", value_parser = parse_loss_scale)]
    loss_scale: Option<tpc::ir::LossScale>,
    /// Choose the placement of every param and input on the mesh: the fastest plan on the cost
    /// model within --memory-budget. `--auto` ignores the source's annotations (an output's
    /// required layout stays); `--auto=complete` keeps them and chooses the rest.
    #[arg(long, value_enum, value_name = "MODE", num_args = 0..=1, require_equals = true, default_missing_value = "ignore")]
    auto: Option<AutoMode>,
    /// With --auto: peak memory per device allowed, as bytes or with KiB, MiB, GiB, TiB
    /// (default: unlimited).
    #[arg(long, value_name = "SIZE", requires = "auto", value_parser = tpc::auto::parse_budget)]
    memory_budget: Option<u64>,
    #[command(flatten)]
    device: DeviceArgs,
}

/// `--auto`'s modes.
#[derive(Clone, Copy, ValueEnum)]
enum AutoMode {
    /// Ignore the source's annotations and choose every placement.
    Ignore,
    /// Keep the source's annotations and choose the unannotated params and inputs.
    Complete,
}

impl CompileArgs {
    /// The planner options of the command line.
    fn plan_options(&self) -> tpc::plan::Options {
        tpc::plan::Options {
            microbatches: self.microbatches,
            schedule: self.schedule,
            recompute: self.recompute,
            zero: self.zero,
        }
    }
}

/// A `--loss-scale` value.
pub(crate) fn parse_loss_scale(s: &str) -> Result<tpc::ir::LossScale, String> {
    s.parse()
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
    /// Fixed cost of one collective call (launch and synchronisation) in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = Device::default().launch)]
    launch: f64,
    /// Sequence parallelism: off (only annotations split the sequence), auto (the cost model
    /// decides: chosen when memory is priced high enough), on (a partial sum whose user can
    /// take it split is reduce-scattered, then gathered where a matmul needs it whole).
    #[arg(long, value_enum, value_name = "MODE", default_value_t = SeqPar::Off)]
    sequence_parallel: SeqPar,
    /// Price of one byte of per-device memory, in seconds (0: optimize time only).
    #[arg(long, value_name = "SECONDS", default_value_t = Device::default().mem_weight)]
    mem_weight: f64,
    /// Largest fused gradient all-reduce (bucket) in MiB, as PyTorch DDP's bucket_cap_mb; 0: no
    /// fusion.
    #[arg(long, value_name = "MIB", default_value_t = 25.0)]
    bucket_mb: f64,
}

impl DeviceArgs {
    pub(crate) fn device(&self) -> anyhow::Result<Device> {
        let d = Device {
            flops_f32: self.flops,
            flops_half: self.flops_half,
            bandwidth: self.bandwidth,
            latency: self.latency,
            launch: self.launch,
            sequence_parallel: self.sequence_parallel.into(),
            mem_weight: self.mem_weight,
            bucket_bytes: bucket_bytes(self.bucket_mb)?,
            ..Device::default()
        };
        d.check().map_err(|e| anyhow::anyhow!(e))?;
        Ok(d)
    }
}

/// `--sequence-parallel`'s values (see [`SequenceParallel`]).
#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum SeqPar {
    Off,
    Auto,
    On,
}

impl From<SeqPar> for SequenceParallel {
    fn from(s: SeqPar) -> Self {
        match s {
            SeqPar::Off => SequenceParallel::Off,
            SeqPar::Auto => SequenceParallel::Auto,
            SeqPar::On => SequenceParallel::On,
        }
    }
}

/// `--bucket-mb` in bytes: a finite number of MiB from 0 to 2^20 (1 TiB).
fn bucket_bytes(mb: f64) -> anyhow::Result<u64> {
    if !(mb.is_finite() && (0.0..=(1u64 << 20) as f64).contains(&mb)) {
        anyhow::bail!("--bucket-mb {mb}: must be a finite number of MiB from 0 to 1048576");
    }
    Ok((mb * (1u64 << 20) as f64).round() as u64)
}

#[derive(Clone, Copy, ValueEnum)]
enum Emit {
    /// Readable text IR.
    Text,
    /// Versioned JSON document.
    Json,
    /// Graphviz DOT.
    Dot,
    /// A pipelined plan's schedule as an SVG picture (stages, F/B boxes, messages).
    Timeline,
    /// With --auto: the source with the chosen annotations written in.
    Annotated,
}

/// Exit code for errors in the user's input.
const EXIT_USER: u8 = 1;
/// Exit code for compiler bugs.
const EXIT_INTERNAL: u8 = 70;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A panic is reported once, below, in words; the default hook's text is for developers.
    let panicked = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let record = panicked.clone();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        if std::thread::current().name() != Some(WORKER) {
            // A rank's thread: its run reports the failure; the message says where.
            let at = info
                .location()
                .map(|l| format!(" at {l}"))
                .unwrap_or_default();
            say_err(&format!("internal error in a worker thread{at}: {msg}"));
        } else if let Ok(mut m) = record.lock() {
            *m = msg;
        }
    }));
    // Deeply nested but valid programs recurse in the parser and lowering: give them room.
    let worker = std::thread::Builder::new()
        .name(WORKER.into())
        .stack_size(256 << 20)
        .spawn(move || run(cli));
    let handle = match worker {
        Ok(h) => h,
        Err(e) => {
            say_err(&format!(
                "error: cannot start the compiler thread (256 MiB of stack): {}; \
                 the machine (or a limit such as `ulimit -v`) has too little memory",
                os_reason(&e)
            ));
            return ExitCode::from(EXIT_USER);
        }
    };
    match handle.join() {
        Ok(code) => code,
        Err(_) => {
            let msg = panicked.lock().map(|m| m.clone()).unwrap_or_default();
            if is_out_of_memory(&msg) {
                say_err(&format!(
                    "error: out of memory ({msg}): the program's sizes need more memory than \
                     this machine has"
                ));
                return ExitCode::from(EXIT_USER);
            }
            say_err(&format!(
                "internal compiler error: {msg}\nthis is a bug in tpc; please report it with \
                 this input"
            ));
            ExitCode::from(EXIT_INTERNAL)
        }
    }
}

/// The name of the thread that runs the command.
const WORKER: &str = "tpc";

/// Panic messages of memory the OS refused (a thread or mapping it could not give, ENOMEM), as
/// opposed to a bug. "capacity overflow" is deliberately not here: sizes are validated before
/// anything is allocated, so an overflowing capacity is a compiler bug (an ICE, exit 70).
fn is_out_of_memory(msg: &str) -> bool {
    ["out of memory", "Cannot allocate memory"]
        .iter()
        .any(|s| msg.contains(s))
}

/// Writes `text` and a newline to stdout. A closed or full stdout is not an error worth dying
/// for (`tpc run | head`): the write is dropped quietly and the run goes on to its exit code.
pub(crate) fn say_out(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out
        .write_all(text.as_bytes())
        .and_then(|_| out.write_all(b"\n"))
        .and_then(|_| out.flush());
}

/// Writes `text` and a newline to stderr in one write; a closed stderr leaves nowhere to
/// complain, so failure is ignored.
pub(crate) fn say_err(text: &str) {
    let _ = std::io::stderr().write_all(format!("{text}\n").as_bytes());
}

fn run(cli: Cli) -> ExitCode {
    let result = match cli.cmd {
        Cmd::Compile(args) => compile(&args),
        Cmd::Run(args) => run_cmd::run(&args),
        Cmd::Checkpoint(args) => checkpoint_cmd::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Compile(b)) => {
            let (e, src) = *b;
            say_err(e.render(src.as_ref()).trim_end());
            ExitCode::from(if e.is_internal() {
                EXIT_INTERNAL
            } else {
                EXIT_USER
            })
        }
        Err(Failure::Other(e)) => {
            say_err(&format!("error: {e:#}"));
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

/// Compiles `src` and prints its warnings: a program with `train` to its whole training step
/// (forward, backward, update; the gradients as outputs too when `gradients`) unless
/// `forward_only`.
pub(crate) fn compile_source(
    src: &tpc::diag::SourceFile,
    overrides: &[(String, i64)],
    forward_only: bool,
    gradients: bool,
    scale: Option<tpc::ir::LossScale>,
) -> Result<driver::Compiled, Failure> {
    let c = if forward_only {
        driver::compile_program(src, overrides, true)
    } else {
        driver::compile_step_scaled(src, overrides, gradients, scale)
    }
    .map_err(|e| fail(e, Some(src.clone())))?;
    for w in &c.warnings {
        say_err(&format!("warning: {w}"));
    }
    Ok(c)
}

fn compile(args: &CompileArgs) -> Result<(), Failure> {
    if let Some(p) = &args.output {
        tpc::files::check_writable("-o", p).map_err(anyhow::Error::from)?;
    }
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
    if let Some(mode) = args.auto {
        let Some(mesh) = mesh else {
            return Err(anyhow::anyhow!(
                "--auto chooses placements over a mesh: give --degree N or --mesh dp=2,tp=4"
            )
            .into());
        };
        return compile_auto(args, mode, src, overrides, mesh, device);
    }
    if matches!(args.emit, Emit::Annotated) {
        return Err(anyhow::anyhow!(
            "--emit annotated writes the placements --auto chose: add --auto and a mesh"
        )
        .into());
    }
    let g = compile_source(&src, &overrides, args.forward_only, false, args.loss_scale)?.graph;
    if mesh.is_some() {
        let plan = driver::plan_declared(g, mesh, device, &args.plan_options())
            .map_err(|e| fail(e, Some(src.clone())))?;
        let text = plan_text(&plan, args.emit)?;
        write_output(args.output.as_deref(), &text)?;
        return Ok(());
    }
    let text = match args.emit {
        Emit::Text => tpc::emit::text::print(&g),
        Emit::Json => tpc::emit::json::to_json(&g),
        Emit::Dot => tpc::emit::dot::print_with(
            &g,
            tpc::emit::dot::DotOptions {
                collapse_repeats: true,
            },
        ),
        Emit::Timeline => {
            return Err(anyhow::anyhow!(
                "--emit timeline draws a plan's pipeline schedule: give a mesh (--mesh pp=...)"
            )
            .into())
        }
        Emit::Annotated => unreachable!("refused above"),
    };
    write_output(args.output.as_deref(), &text)?;
    Ok(())
}

/// The plan in the `emit` format (not `annotated`).
fn plan_text(plan: &tpc::plan::Plan, emit: Emit) -> anyhow::Result<String> {
    Ok(match emit {
        Emit::Text => tpc::emit::plan::print(plan),
        Emit::Json => tpc::emit::plan_json::to_json(plan),
        Emit::Dot => tpc::emit::plan_dot::print(plan),
        Emit::Timeline => tpc::emit::timeline::of_plan(plan).map_err(|e| anyhow::anyhow!("{e}"))?,
        Emit::Annotated => anyhow::bail!("--emit annotated needs --auto"),
    })
}

/// `compile --auto`: searches placements, then writes the plan with the chosen annotations
/// (text: as a table in its header; JSON: under `auto`), or the annotated source.
fn compile_auto(
    args: &CompileArgs,
    mode: AutoMode,
    src: SourceFile,
    overrides: Vec<(String, i64)>,
    mesh: Mesh,
    device: Device,
) -> Result<(), Failure> {
    let mode = match mode {
        AutoMode::Ignore => tpc::auto::Mode::Ignore,
        AutoMode::Complete => tpc::auto::Mode::Complete,
    };
    // The program's own errors (syntax, names, a `train` that cannot differentiate) first,
    // reported as without --auto.
    let c = compile_source(&src, &overrides, args.forward_only, false, args.loss_scale)?;
    let outputs = (c.loss.is_some() && !args.forward_only).then_some(tpc::autodiff::StepOutputs {
        gradients: false,
        update: true,
    });
    let req = tpc::auto::Request {
        source: src.clone(),
        overrides,
        mode,
        budget: args.memory_budget,
        mesh,
        device,
        plan: args.plan_options(),
        outputs,
        scale: args.loss_scale,
    };
    let found = tpc::auto::search(&req).map_err(|e| fail(e, Some(src.clone())))?;
    let text = match args.emit {
        Emit::Annotated => {
            let module = tpc::syntax::parse(&src.text).map_err(|e| fail(e, Some(src.clone())))?;
            found.annotated(&src.text, &module, mode)
        }
        Emit::Text => format!("{}{}", found.table(), plan_text(&found.plan, args.emit)?),
        Emit::Json => {
            // The plan's document as it is, with `auto` as its last key.
            let plan = plan_text(&found.plan, args.emit)?;
            let end = plan
                .rfind('}')
                .ok_or_else(|| anyhow::anyhow!("plan JSON is not an object"))?;
            let auto = serde_json::to_string(&found.to_json()).map_err(anyhow::Error::from)?;
            format!("{},\n  \"auto\": {auto}\n}}\n", plan[..end].trim_end())
        }
        Emit::Dot | Emit::Timeline => plan_text(&found.plan, args.emit)?,
    };
    write_output(args.output.as_deref(), &text)?;
    Ok(())
}

/// Writes `text` to `path` atomically, or to stdout (where a closed pipe ends the output
/// quietly, and any other failure, e.g. a full disk, is an error).
pub(crate) fn write_output(path: Option<&std::path::Path>, text: &str) -> anyhow::Result<()> {
    match path {
        Some(p) => Ok(tpc::files::write_bytes(p, text.as_bytes())?),
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
                .map_err(|e| anyhow::anyhow!("cannot write to stdout: {}", os_reason(&e)))
        }
    }
}
