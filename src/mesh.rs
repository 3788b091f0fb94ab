//! The device mesh: named axes with sizes, row-major device ids, per-axis device groups, and the
//! device constants of the cost model.

use serde::{Deserialize, Serialize};

/// A mesh of devices with named axes; device ids are row-major over the axes (last axis fastest).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mesh {
    axes: Vec<(String, u64)>,
    /// The temporal axis, if any: microbatches, run one after another by every device (it adds
    /// no devices; its coordinate is the running microbatch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    temporal: Option<usize>,
}

/// Name of the microbatch axis `--microbatches` adds.
pub const MICROBATCH_AXIS: &str = "mb";

/// A bad mesh description.
#[derive(Debug, Clone, PartialEq, thiserror::Error, miette::Diagnostic)]
pub enum MeshError {
    /// `--mesh` text that is not `name=N,name=M`.
    #[error("bad --mesh `{text}`: {reason}")]
    #[diagnostic(
        code(tpc::bad_mesh),
        help("write --mesh dp=2,tp=4 (axis=size, comma-separated), or --degree N for tp=N")
    )]
    Syntax {
        /// The text given.
        text: String,
        /// What is wrong.
        reason: String,
    },
    /// An axis of size 0.
    #[error("mesh axis `{axis}` has size 0")]
    #[diagnostic(code(tpc::bad_mesh), help("every mesh axis needs at least one device"))]
    ZeroSize {
        /// The axis.
        axis: String,
    },
    /// An axis named twice.
    #[error("mesh axis `{axis}` is given twice")]
    #[diagnostic(code(tpc::bad_mesh))]
    Duplicate {
        /// The axis.
        axis: String,
    },
    /// An axis the program does not declare (it would silently replicate every value over it).
    #[error("mesh axis `{axis}` is not declared by the program ({declared})")]
    #[diagnostic(code(tpc::undeclared_axis))]
    Undeclared {
        /// The axis.
        axis: String,
        /// The program's axes, as a phrase.
        declared: String,
        /// A did-you-mean or what to write instead.
        #[help]
        hint: Option<String>,
    },
    /// A mesh with more devices than tpc supports.
    #[error("the mesh has {devices} devices; at most {max} are supported")]
    #[diagnostic(code(tpc::bad_mesh))]
    TooLarge {
        /// Device count.
        devices: u128,
        /// The limit.
        max: u64,
    },
}

/// Largest mesh accepted (the device count must fit comfortably in memory tables).
pub const MAX_DEVICES: u64 = 1 << 20;

impl Mesh {
    /// A mesh from `(axis, size)` pairs, validated.
    pub fn new(axes: Vec<(String, u64)>) -> Result<Mesh, MeshError> {
        let mut total: u128 = 1;
        for (i, (a, n)) in axes.iter().enumerate() {
            if *n == 0 {
                return Err(MeshError::ZeroSize { axis: a.clone() });
            }
            if axes[..i].iter().any(|(b, _)| b == a) {
                return Err(MeshError::Duplicate { axis: a.clone() });
            }
            total *= *n as u128;
            if total > MAX_DEVICES as u128 {
                return Err(MeshError::TooLarge {
                    devices: total,
                    max: MAX_DEVICES,
                });
            }
        }
        Ok(Mesh {
            axes,
            temporal: None,
        })
    }

    /// This mesh with a temporal axis `mb` of `count` microbatches first (none when `count` is
    /// 1). Placed first, a gradient partial over `mb` and `dp` is accumulated locally before
    /// the one `dp` reduction.
    pub fn with_microbatches(&self, count: u64) -> Result<Mesh, MeshError> {
        if count <= 1 {
            return Ok(self.clone());
        }
        if self.axis_index(MICROBATCH_AXIS).is_some() {
            return Err(MeshError::Duplicate {
                axis: MICROBATCH_AXIS.into(),
            });
        }
        // The microbatches add no devices, so only the device axes count toward the limit.
        let mut axes = vec![(MICROBATCH_AXIS.to_string(), count)];
        axes.extend(self.devices_mesh().axes);
        Ok(Mesh {
            axes,
            temporal: Some(0),
        })
    }

    /// This mesh validated again (as read from a document): its axes as [`Mesh::new`] checks
    /// them, and a temporal axis only as [`Mesh::with_microbatches`] makes it.
    pub fn checked(&self) -> Result<Mesh, MeshError> {
        let mut m = Mesh::new(self.devices_mesh().axes)?;
        if let Some(a) = self.temporal {
            let ok = a == 0
                && self
                    .axes
                    .first()
                    .is_some_and(|(n, s)| n == MICROBATCH_AXIS && *s > 1);
            if !ok {
                return Err(MeshError::Syntax {
                    text: self.to_string(),
                    reason: format!(
                        "the temporal axis must be the first, `{MICROBATCH_AXIS}`, of size > 1"
                    ),
                });
            }
            m = m.with_microbatches(self.axes[0].1)?;
        }
        Ok(m)
    }

    /// The temporal (microbatch) axis, if any.
    pub fn temporal(&self) -> Option<usize> {
        self.temporal
    }

    /// True when axis `a` is the temporal axis.
    pub fn is_temporal(&self, a: usize) -> bool {
        self.temporal == Some(a)
    }

    /// Microbatches per step: the temporal axis's size, else 1.
    pub fn microbatches(&self) -> u64 {
        self.temporal.map_or(1, |a| self.axes[a].1)
    }

    /// This mesh without its temporal axis (the devices it runs on).
    pub fn devices_mesh(&self) -> Mesh {
        let axes = (0..self.rank())
            .filter(|&a| !self.is_temporal(a))
            .map(|a| self.axes[a].clone())
            .collect();
        Mesh {
            axes,
            temporal: None,
        }
    }

    /// Parses `dp=2,tp=4`.
    pub fn parse(text: &str) -> Result<Mesh, MeshError> {
        let err = |reason: &str| MeshError::Syntax {
            text: text.into(),
            reason: reason.into(),
        };
        let mut axes = Vec::new();
        for part in text.split(',') {
            let (name, size) = part
                .split_once('=')
                .ok_or_else(|| err(&format!("`{part}` is not axis=size")))?;
            let name = name.trim();
            if name.is_empty()
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                || name.starts_with(|c: char| c.is_ascii_digit())
            {
                return Err(err(&format!("`{name}` is not an axis name")));
            }
            let size: u64 = size
                .trim()
                .parse()
                .map_err(|_| err(&format!("`{}` is not a size", size.trim())))?;
            axes.push((name.to_string(), size));
        }
        Mesh::new(axes)
    }

    /// The 1-D mesh `tp=n`.
    pub fn degree(n: u64) -> Result<Mesh, MeshError> {
        Mesh::new(vec![("tp".into(), n)])
    }

    /// Adds each axis in `names` that the mesh lacks, with size 1 (axes declared by the program
    /// but not sized on the command line).
    pub fn with_declared(mut self, names: &[String]) -> Mesh {
        for n in names {
            if !self.axes.iter().any(|(a, _)| a == n) {
                self.axes.push((n.clone(), 1));
            }
        }
        self
    }

    /// Checks that every axis of the mesh is one the program declares (`names`): an axis it
    /// does not declare is an error with a did-you-mean, not a silent replication.
    pub fn check_declared(&self, names: &[String]) -> Result<(), MeshError> {
        for (axis, _) in &self.axes {
            if names.contains(axis) {
                continue;
            }
            let unsized_: Vec<&str> = names
                .iter()
                .map(String::as_str)
                .filter(|n| self.axis_index(n).is_none())
                .collect();
            let hint = crate::diag::suggest(axis, unsized_.iter().copied())
                .or_else(|| match unsized_.as_slice() {
                    [only] => Some(format!("did you mean `{only}`?")),
                    _ => None,
                })
                .or_else(|| {
                    names.is_empty().then(|| {
                        "declare the axes with a `mesh` line, e.g. `mesh tp`, or run without \
                         --mesh/--degree"
                            .to_string()
                    })
                });
            let declared = match names {
                [] => "it declares no mesh axes".to_string(),
                _ => format!("it declares `mesh {}`", names.join(", ")),
            };
            return Err(MeshError::Undeclared {
                axis: axis.clone(),
                declared,
                hint,
            });
        }
        Ok(())
    }

    /// Axes with their sizes, in order.
    pub fn axes(&self) -> &[(String, u64)] {
        &self.axes
    }

    /// Number of axes.
    pub fn rank(&self) -> usize {
        self.axes.len()
    }

    /// Index of the axis called `name`.
    pub fn axis_index(&self, name: &str) -> Option<usize> {
        self.axes.iter().position(|(a, _)| a == name)
    }

    /// Name of axis `a`.
    pub fn axis_name(&self, a: usize) -> &str {
        &self.axes[a].0
    }

    /// Size of axis `a`.
    pub fn axis_size(&self, a: usize) -> u64 {
        self.axes[a].1
    }

    /// Names and sizes of axes `axes`, in the order given.
    pub fn named_axes(&self, axes: &[usize]) -> Vec<(String, u64)> {
        axes.iter().map(|&a| self.axes[a].clone()).collect()
    }

    /// Total number of devices (the temporal axis adds none).
    pub fn num_devices(&self) -> u64 {
        self.device_axes().map(|(_, n)| n).product()
    }

    /// The axes that are devices, with their indices.
    fn device_axes(&self) -> impl DoubleEndedIterator<Item = (usize, u64)> + '_ {
        (0..self.rank())
            .filter(|&a| !self.is_temporal(a))
            .map(|a| (a, self.axes[a].1))
    }

    /// Coordinates of `device` on each axis (0 on the temporal axis).
    pub fn coords(&self, device: u64) -> Vec<u64> {
        let mut c = vec![0; self.axes.len()];
        let mut rest = device;
        for (i, n) in self.device_axes().rev() {
            c[i] = rest % n;
            rest /= n;
        }
        c
    }

    /// The device at `coords` (the temporal coordinate is ignored).
    pub fn device(&self, coords: &[u64]) -> u64 {
        self.device_axes().fold(0, |acc, (i, n)| {
            acc * n + coords.get(i).copied().unwrap_or(0)
        })
    }

    /// The devices of `device`'s group along axis `a` (those differing only in coordinate `a`),
    /// ordered by that coordinate; on the temporal axis, the device alone.
    pub fn group(&self, device: u64, a: usize) -> Vec<u64> {
        if self.is_temporal(a) {
            return vec![device];
        }
        let mut c = self.coords(device);
        (0..self.axis_size(a))
            .map(|k| {
                c[a] = k;
                self.device(&c)
            })
            .collect()
    }

    /// The devices differing from `device` only along the axes `axes` (the temporal axis
    /// excluded: its steps are one device's), in mixed-radix order of their coordinates on
    /// `axes` (the first axis major): one order on every member. One axis gives `group`.
    pub fn product_group(&self, device: u64, axes: &[usize]) -> Vec<u64> {
        let mut out = vec![device];
        for &a in axes.iter().filter(|&&a| !self.is_temporal(a)) {
            out = out
                .iter()
                .flat_map(|&d| self.group(d, a))
                .collect::<Vec<_>>();
        }
        // Each member's own list starts from itself: order by coordinates instead.
        let key = |d: &u64| {
            let c = self.coords(*d);
            axes.iter().map(|&a| c[a]).collect::<Vec<_>>()
        };
        out.sort_by_key(key);
        out
    }

    /// All groups along axis `a`, each ordered by coordinate, sorted by their first device.
    pub fn groups(&self, a: usize) -> Vec<Vec<u64>> {
        (0..self.num_devices())
            .filter(|&d| self.coords(d)[a] == 0)
            .map(|d| self.group(d, a))
            .collect()
    }
}

impl std::fmt::Display for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .device_axes()
            .map(|(a, n)| format!("{}={n}", self.axes[a].0))
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// Device constants of the cost model (defaults: a GPU-like device; see the README).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// f32 FLOP/s.
    pub flops_f32: f64,
    /// bf16/f16 FLOP/s.
    pub flops_half: f64,
    /// Link bandwidth per device, bytes/s.
    pub bandwidth: f64,
    /// Latency per collective step, seconds.
    pub latency: f64,
    /// Fixed cost of one collective call (kernel launch and synchronisation), seconds: what
    /// a reduce-scatter plus an all-gather pays over the one all-reduce that moves the same
    /// bytes. (Plans saved before it existed read 0, the value they were costed with.)
    #[serde(default)]
    pub launch: f64,
    /// Whether propagation may split activations along the sequence (Megatron's sequence
    /// parallelism) where a partial sum meets a split-able result.
    #[serde(default)]
    pub sequence_parallel: SequenceParallel,
    /// Price of one byte of per-device memory, in seconds of step time.
    pub mem_weight: f64,
    /// Bytes of training state per parameter byte (weights, gradients, optimizer moments).
    pub param_state_factor: f64,
    /// Largest fused all-reduce of the backward (a gradient bucket), bytes per device; 0: no
    /// fusion. A planner option carried with the constants the plan was costed with.
    #[serde(default = "default_bucket_bytes")]
    pub bucket_bytes: u64,
}

/// The default launch cost of one collective: 5 µs, the order of a NCCL kernel launch and
/// its synchronisation.
pub const DEFAULT_LAUNCH: f64 = 5e-6;

/// Sequence parallelism: where the activations between tensor-parallel regions (the residual
/// stream, the norms) are split along the sequence instead of replicated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SequenceParallel {
    /// Never proposed (only annotations split along the sequence), as Megatron's default.
    #[default]
    Off,
    /// Proposed, and chosen when the cost model prices it cheaper (memory priced high enough).
    Auto,
    /// Proposed and preferred: a partial sum is reduce-scattered wherever its user can take
    /// the split.
    On,
}

/// PyTorch DDP's default bucket: 25 MiB.
pub const DEFAULT_BUCKET_BYTES: u64 = 25 << 20;

fn default_bucket_bytes() -> u64 {
    DEFAULT_BUCKET_BYTES
}

impl Device {
    /// The accepted range of each constant, by flag name: beyond these the cost model's products
    /// leave the range where its comparisons mean anything (or the value is a typo).
    pub const RANGES: [(&'static str, f64, f64); 6] = [
        ("--flops", 1e3, 1e21),
        ("--flops-half", 1e3, 1e21),
        ("--bandwidth", 1.0, 1e16),
        ("--latency", 0.0, 1e3),
        ("--launch", 0.0, 1e3),
        ("--mem-weight", 0.0, 1e3),
    ];

    /// Checks every constant against [`Device::RANGES`]; the error names the flag, the value
    /// and the range.
    pub fn check(&self) -> Result<(), String> {
        let values = [
            self.flops_f32,
            self.flops_half,
            self.bandwidth,
            self.latency,
            self.launch,
            self.mem_weight,
        ];
        for ((name, lo, hi), v) in Self::RANGES.iter().zip(values) {
            if !(v.is_finite() && *lo <= v && v <= *hi) {
                return Err(format!(
                    "{name} {v:e}: must be a finite number from {lo:e} to {hi:e}"
                ));
            }
        }
        if !(self.param_state_factor.is_finite() && (0.0..=1e3).contains(&self.param_state_factor))
        {
            return Err(format!(
                "param state factor {}: must be a finite number from 0 to 1e3",
                self.param_state_factor
            ));
        }
        Ok(())
    }
}

impl Default for Device {
    fn default() -> Self {
        Device {
            flops_f32: 60e12,
            flops_half: 300e12,
            bandwidth: 100e9,
            latency: 2e-6,
            launch: DEFAULT_LAUNCH,
            sequence_parallel: SequenceParallel::default(),
            mem_weight: 1e-9,
            param_state_factor: 4.0,
            bucket_bytes: DEFAULT_BUCKET_BYTES,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_product_group_is_every_device_differing_only_on_its_axes() {
        let m = Mesh::parse("pp=2,dp=2,tp=2").unwrap();
        assert_eq!(m.product_group(5, &[1, 2]), vec![4, 5, 6, 7]);
        assert_eq!(m.product_group(6, &[2, 1]), vec![4, 6, 5, 7]);
        assert_eq!(m.product_group(3, &[0, 2]), vec![2, 3, 6, 7]);
        assert_eq!(m.product_group(3, &[2]), m.group(3, 2));
    }

    #[test]
    fn coords_and_groups_are_row_major() {
        let m = Mesh::parse("dp=2,tp=4").unwrap();
        assert_eq!(m.num_devices(), 8);
        assert_eq!(m.coords(5), vec![1, 1]);
        assert_eq!(m.device(&[1, 1]), 5);
        assert_eq!(m.group(5, 1), vec![4, 5, 6, 7]);
        assert_eq!(m.group(5, 0), vec![1, 5]);
        assert_eq!(
            m.groups(0),
            vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]]
        );
        assert_eq!(m.groups(1), vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
    }

    #[test]
    fn bad_meshes_are_errors() {
        assert!(matches!(
            Mesh::parse("tp=0"),
            Err(MeshError::ZeroSize { .. })
        ));
        assert!(matches!(
            Mesh::parse("tp=2,tp=2"),
            Err(MeshError::Duplicate { .. })
        ));
        assert!(matches!(Mesh::parse("tp"), Err(MeshError::Syntax { .. })));
        assert!(matches!(Mesh::parse("tp=x"), Err(MeshError::Syntax { .. })));
        assert!(matches!(Mesh::parse(""), Err(MeshError::Syntax { .. })));
        assert!(matches!(
            Mesh::parse("a=4096,b=4096"),
            Err(MeshError::TooLarge { .. })
        ));
        assert!(matches!(Mesh::degree(0), Err(MeshError::ZeroSize { .. })));
    }

    #[test]
    fn device_constants_are_range_checked() {
        Device::default().check().unwrap();
        for bad in [f64::NAN, f64::INFINITY, -1.0, 0.0, 1e300] {
            let d = Device {
                flops_f32: bad,
                ..Device::default()
            };
            assert!(d.check().unwrap_err().starts_with("--flops "), "{bad}");
        }
        let d = Device {
            latency: 0.0,
            mem_weight: 0.0,
            ..Device::default()
        };
        d.check().unwrap();
    }

    #[test]
    fn undeclared_axes_are_errors_with_a_suggestion() {
        let tp = vec!["tp".to_string()];
        let e = Mesh::parse("xx=4")
            .unwrap()
            .check_declared(&tp)
            .unwrap_err();
        let text = crate::diag::render(&e, None);
        assert!(text.contains("mesh axis `xx` is not declared"), "{text}");
        assert!(text.contains("did you mean `tp`?"), "{text}");
        let dp_tp = vec!["dp".to_string(), "tp".to_string()];
        let e = Mesh::parse("dp=2,tpp=4").unwrap().check_declared(&dp_tp);
        assert!(format!("{:?}", e).contains("did you mean `tp`?"));
        Mesh::parse("tp=2").unwrap().check_declared(&dp_tp).unwrap();
        let e = Mesh::degree(2).unwrap().check_declared(&[]).unwrap_err();
        assert!(e.to_string().contains("declares no mesh axes"), "{e}");
        let text = crate::diag::render(&e, None);
        assert!(text.contains("or run without --mesh/--degree"), "{text}");
    }
}
