//! The pipeline as plain code: read the source, parse, lower, verify. Each stage's error type is
//! kept; `Error` only wraps them for the command line.

use crate::autodiff::{training_step, AutodiffError, StepOutputs};
use crate::diag::{self, SourceFile};
use crate::ir::verify::{verify, VerifyError};
use crate::ir::{Graph, LossScale};
use crate::lower::{LowerError, Lowered};
use crate::mesh::{Device, Mesh, MeshError};
use crate::partition::PartitionError;
use crate::pipeline::StageError;
use crate::plan::micro::MicroError;
use crate::plan::{Plan, PlanError};
use crate::sharding::ShardError;
use crate::span::{LineIndex, Span};
use crate::syntax::{parse, ParseError};

/// Reading a source file failed.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum SourceError {
    /// The file could not be read.
    #[error("cannot read `{path}`: {reason}")]
    #[diagnostic(code(tpc::io))]
    Io {
        /// The path.
        path: String,
        /// The OS error.
        reason: String,
    },
    /// The file is not UTF-8 text.
    #[error("`{path}` is not UTF-8 text (invalid byte at {line}:{col})")]
    #[diagnostic(code(tpc::encoding), help("a .tpl file is plain UTF-8 text"))]
    NotUtf8 {
        /// The path.
        path: String,
        /// Line of the first invalid byte.
        line: usize,
        /// Column of the first invalid byte.
        col: usize,
    },
}

/// Any error of the compile pipeline, by stage.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A syntax error.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// A semantic error found while lowering.
    #[error(transparent)]
    Lower(#[from] LowerError),
    /// A compiler bug caught by the verifier.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// A bad `--mesh` or `--degree`.
    #[error(transparent)]
    Mesh(#[from] MeshError),
    /// A sharding error in the user's annotations.
    #[error(transparent)]
    Shard(#[from] ShardError),
    /// A compiler bug in partitioning.
    #[error(transparent)]
    Partition(#[from] PartitionError),
    /// A program that cannot be differentiated (or a bug in autodiff).
    #[error(transparent)]
    Autodiff(#[from] AutodiffError),
    /// A program that cannot be split into microbatches.
    #[error(transparent)]
    Micro(Box<MicroError>),
    /// A pipeline that cannot be cut as asked.
    #[error(transparent)]
    Stage(Box<StageError>),
    /// A recompute policy the program cannot take.
    #[error(transparent)]
    Recompute(Box<crate::plan::remat::RematError>),
    /// `--zero` asked of a program it cannot apply to.
    #[error(transparent)]
    Zero(crate::plan::zero::ZeroError),
    /// `--auto` found no placement under `--memory-budget`.
    #[error(transparent)]
    Budget(Box<crate::auto::BudgetError>),
    /// `--loss-scale` given for a program without a `train` statement.
    #[error(
        "--loss-scale scales a training step's loss, but the program has no `train` statement"
    )]
    LossScale,
}

impl From<PlanError> for Error {
    fn from(e: PlanError) -> Self {
        match e {
            PlanError::Shard(e) => Error::Shard(e),
            PlanError::Partition(e) => Error::Partition(e),
            PlanError::Verify(e) => Error::Verify(e),
            PlanError::Micro(e) => Error::Micro(Box::new(e)),
            PlanError::Stage(StageError::Internal(e)) => Error::Verify(VerifyError {
                stage: "pipeline",
                detail: e,
            }),
            PlanError::Stage(e) => Error::Stage(Box::new(e)),
            PlanError::Recompute(e) => Error::Recompute(Box::new(e)),
            PlanError::Zero(e) => Error::Zero(e),
            PlanError::PlanVerify(e) => Error::Verify(VerifyError {
                stage: "partition (plan verifier)",
                detail: e.to_string(),
            }),
        }
    }
}

impl Error {
    /// True for compiler bugs (as opposed to errors in the user's input).
    pub fn is_internal(&self) -> bool {
        match self {
            Error::Verify(_) | Error::Partition(_) => true,
            Error::Autodiff(e) => e.is_internal(),
            _ => false,
        }
    }

    /// Renders the error as text, with a source snippet when it has a span in `src`.
    pub fn render(&self, src: Option<&SourceFile>) -> String {
        match self {
            Error::Source(e) => diag::render(e, None),
            Error::Parse(e) => diag::render(e, src),
            Error::Lower(e) => diag::render(e, src),
            Error::Mesh(e) => diag::render(e, None),
            Error::Shard(e) => diag::render(e, src),
            Error::Micro(e) => diag::render(e.as_ref(), src),
            Error::Stage(e) => diag::render(e.as_ref(), src),
            Error::Recompute(e) => diag::render(e.as_ref(), src),
            Error::Zero(e) => diag::render(e, None),
            Error::Budget(e) => diag::render(e.as_ref(), None),
            Error::LossScale => format!("error: {self}\n"),
            Error::Autodiff(e) if e.is_internal() => internal(e),
            Error::Autodiff(e) => diag::render(e, src),
            Error::Verify(e) => internal(e),
            Error::Partition(e) => internal(e),
        }
    }
}

fn internal(e: &dyn std::fmt::Display) -> String {
    format!("{e}\nthis is a bug in tpc, not in your program; please report it with the input\n")
}

/// Compiles `src` to a per-device plan on `mesh` (axes the program declares but the mesh does
/// not size get size 1).
pub fn compile_plan(
    src: &SourceFile,
    overrides: &[(String, i64)],
    mesh: Mesh,
    device: Device,
) -> Result<Plan, Error> {
    let g = compile_global(src, overrides)?;
    Ok(Plan::build(g, mesh, device)?)
}

/// Plans the global program `g` by the command line's rules: every axis of `mesh` must be one
/// the program declares (an undeclared axis is an error with a did-you-mean, where
/// [`compile_plan`] would replicate over it); declared axes the mesh does not size get size 1,
/// and no mesh at all means every declared axis at size 1. `options` set the microbatches and
/// the pipeline schedule.
pub fn plan_declared(
    g: Graph,
    mesh: Option<Mesh>,
    device: Device,
    options: &crate::plan::Options,
) -> Result<Plan, Error> {
    match mesh {
        Some(m) => plan_checked(g, m, device, options, true),
        None => Ok(Plan::build_with(
            g,
            Mesh::new(Vec::new())?,
            device,
            options,
        )?),
    }
}

/// [`plan_declared`] without the verifiers after each pass (a search's trial plans), or with
/// them when `checks`.
pub fn plan_checked(
    g: Graph,
    mesh: Mesh,
    device: Device,
    options: &crate::plan::Options,
    checks: bool,
) -> Result<Plan, Error> {
    mesh.check_declared(&g.mesh_axes)?;
    Ok(Plan::build_checked(g, mesh, device, options, checks)?)
}

/// Reads `path` as a UTF-8 source file.
pub fn read_source(path: &str) -> Result<SourceFile, SourceError> {
    source_from_bytes(path, read_bytes(path)?)
}

/// Reads the file `path` whole; the error names it and the OS's reason.
pub fn read_bytes(path: &str) -> Result<Vec<u8>, SourceError> {
    std::fs::read(path).map_err(|e| SourceError::Io {
        path: path.into(),
        reason: crate::files::os_reason(&e),
    })
}

/// Checks that `bytes` are UTF-8 and wraps them as the source file `name`.
pub fn source_from_bytes(name: &str, bytes: Vec<u8>) -> Result<SourceFile, SourceError> {
    match String::from_utf8(bytes) {
        Ok(text) => Ok(SourceFile::new(name, text)),
        Err(e) => {
            let valid = e.utf8_error().valid_up_to();
            let prefix = String::from_utf8_lossy(&e.as_bytes()[..valid]).into_owned();
            let sp: Span = LineIndex::new(&prefix).span(&prefix, valid, valid);
            Err(SourceError::NotUtf8 {
                path: name.into(),
                line: sp.line as usize,
                col: sp.col as usize,
            })
        }
    }
}

/// Parses, lowers and verifies `src` with the dim overrides: the global program (for a program
/// with `train`, the training step's forward and backward; see [`compile_program`]).
pub fn compile_global(src: &SourceFile, overrides: &[(String, i64)]) -> Result<Graph, Error> {
    compile_program(src, overrides, false).map(|c| c.graph)
}

/// A compiled global program and what it trains.
#[derive(Clone, Debug)]
pub struct Compiled {
    /// The program to plan and run.
    pub graph: Graph,
    /// For a training step: the output holding the loss.
    pub loss: Option<String>,
    /// For a training step: per trained param, its name and gradient output's name.
    pub grads: Vec<(String, String)>,
    /// For a training step with its update: each carried leaf (params, then optimizer state)
    /// and the output holding its next value.
    pub carried: Vec<(String, String)>,
    /// Things worth telling the user that do not stop compilation.
    pub warnings: Vec<String>,
}

/// Parses, lowers and verifies `src`. A program with `train` compiles to its training step's
/// forward and backward (gradients as outputs `grad(NAME)`), unless `forward_only`.
pub fn compile_program(
    src: &SourceFile,
    overrides: &[(String, i64)],
    forward_only: bool,
) -> Result<Compiled, Error> {
    let outputs = (!forward_only).then_some(StepOutputs {
        gradients: true,
        update: false,
    });
    compile_with(src, overrides, outputs, None)
}

/// Compiles `src`'s whole training step: forward, backward and the optimizer's update, whose
/// carried leaves' next values are outputs (and the gradients too when `gradients`). A program
/// without `train` compiles to its forward.
pub fn compile_step(
    src: &SourceFile,
    overrides: &[(String, i64)],
    gradients: bool,
) -> Result<Compiled, Error> {
    compile_step_scaled(src, overrides, gradients, None)
}

/// [`compile_step`] with the loss scale `scale` (`--loss-scale`) instead of the `train`
/// statement's own `loss_scale` clause, when given.
pub fn compile_step_scaled(
    src: &SourceFile,
    overrides: &[(String, i64)],
    gradients: bool,
    scale: Option<LossScale>,
) -> Result<Compiled, Error> {
    let outputs = StepOutputs {
        gradients,
        update: true,
    };
    compile_with(src, overrides, Some(outputs), scale)
}

/// Compiles `src`: [`lower_source`], then [`finish`].
fn compile_with(
    src: &SourceFile,
    overrides: &[(String, i64)],
    outputs: Option<StepOutputs>,
    scale: Option<LossScale>,
) -> Result<Compiled, Error> {
    finish(lower_source(src, overrides, None)?, outputs, scale)
}

/// Parses, lowers and verifies `src`'s forward program, each `repeat` stamping at most `cap`
/// instances when given.
pub fn lower_source(
    src: &SourceFile,
    overrides: &[(String, i64)],
    cap: Option<usize>,
) -> Result<Lowered, Error> {
    let module = parse(&src.text)?;
    let lowered = crate::lower::lower_program_capped(&module, &src.name, overrides, cap)?;
    verify(&lowered.graph, "lowering")?;
    Ok(lowered)
}

/// Compiles a lowered program: its forward when `outputs` is `None` or it does not train,
/// else its training step with `outputs` (and the loss scale `scale`, when given).
pub fn finish(
    lowered: Lowered,
    outputs: Option<StepOutputs>,
    scale: Option<LossScale>,
) -> Result<Compiled, Error> {
    finish_checked(lowered, outputs, scale, true)
}

/// [`finish`], verifying the training step only when `checks`.
pub fn finish_checked(
    lowered: Lowered,
    outputs: Option<StepOutputs>,
    scale: Option<LossScale>,
    checks: bool,
) -> Result<Compiled, Error> {
    if scale.is_some() && lowered.training.is_none() {
        return Err(Error::LossScale);
    }
    let (Some(mut training), Some(outputs)) = (lowered.training, outputs) else {
        return Ok(Compiled {
            graph: lowered.graph,
            loss: None,
            grads: Vec::new(),
            carried: Vec::new(),
            warnings: Vec::new(),
        });
    };
    if scale.is_some() {
        training.loss_scale = scale;
    }
    let d = training_step(&lowered.graph, &training, outputs)?;
    if checks {
        verify(&d.graph, "autodiff")?;
    }
    let warnings = d
        .unused
        .iter()
        .map(|p| format!("param `{p}` does not affect the loss; it is not trained"))
        .collect();
    let grads = d
        .grads
        .iter()
        .filter(|_| outputs.gradients)
        .map(|(name, _, _)| (name.clone(), crate::autodiff::grad_name(name)))
        .collect();
    Ok(Compiled {
        graph: d.graph,
        loss: Some(d.loss_output),
        grads,
        carried: d.carried,
        warnings,
    })
}

/// Parses `NAME=VALUE` of `--set` into a dim override.
pub fn parse_set(s: &str) -> Result<(String, i64), LowerError> {
    let bad = |message: String| LowerError::BadSet {
        message,
        hint: Some("write --set NAME=VALUE with a positive integer, e.g. --set H=4096".into()),
    };
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| bad(format!("`{s}` is not NAME=VALUE")))?;
    let name = name.trim();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(bad(format!("`{name}` is not a dim name")));
    }
    let v: i64 = value
        .trim()
        .parse()
        .map_err(|_| bad(format!("`{value}` is not an integer")))?;
    if v <= 0 {
        return Err(bad(format!("{name}={v}: a dim must be a positive integer")));
    }
    Ok((name.to_string(), v))
}
