//! The MPI backend (cargo feature `mpi`): `mpirun -n N tpc run ...` runs one rank per process,
//! and the ranks exchange messages by MPI point-to-point calls on `MPI_COMM_WORLD`.
//!
//! Reduction order: the collectives stay `comm`'s algorithms (ring, doubling, halving-doubling),
//! whose reduction order is fixed by the group and the length alone, run over
//! `MpiTransport::exchange_into` (one `MPI_Sendrecv` per step, into the caller's buffer). MPI's
//! own `MPI_Allreduce` is deliberately not used: its reduction order is the library's choice (it
//! varies with the implementation, message size and process count), while ours is fixed, so
//! an MPI run is bitwise identical to the thread backend's for the same plan and seed.
//!
//! Messages: each message is a header (its length and element type, two `u64`) followed by the
//! data as `MPI_FLOAT` or `MPI_INT` (integers move exactly), sent in pieces of at most `PIECE`
//! elements (MPI counts are `int`). Errors inside MPI are fatal (MPI's default
//! error handler aborts the whole job), so no rank is ever left blocked by a failed peer.

use super::comm::{put_message, CommError, Data, DataMut, Elem, Message, Sink, Transport};
use super::spmd::RankOutput;
use super::train::TrainedRank;
use super::Tensor;
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::point_to_point as p2p;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;
use ndarray::{ArrayD, IxDyn};
use std::collections::BTreeMap;
use std::marker::PhantomData;

/// The tag of every message of the transport.
const TAG: mpi::Tag = 17;

/// The largest number of elements in one MPI message (below `i32::MAX`).
const PIECE: usize = 1 << 30;

/// Environment variables that MPI launchers set in the processes they start (Open MPI's mpirun,
/// PMI-based launchers such as MPICH's Hydra, PMIx launchers such as Slurm's srun).
const LAUNCHER_VARS: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"];

/// Whether this process was started by an MPI launcher (`mpirun`, `mpiexec`, `srun`).
pub fn launched_by_mpirun() -> bool {
    LAUNCHER_VARS.iter().any(|v| std::env::var_os(v).is_some())
}

/// An initialized MPI environment; MPI is finalized when it is dropped.
pub struct Mpi {
    _universe: Universe,
    rank: usize,
    size: usize,
}

impl Mpi {
    /// Initializes MPI (funneled threading: only the calling thread makes MPI calls).
    pub fn init() -> Result<Mpi, String> {
        let (universe, _) = mpi::initialize_with_threading(Threading::Funneled)
            .ok_or("MPI was already initialized in this process")?;
        let world = universe.world();
        let (rank, size) = (world.rank(), world.size());
        if rank < 0 || size < 1 {
            return Err(format!("MPI reported rank {rank} of {size}"));
        }
        Ok(Mpi {
            _universe: universe,
            rank: rank as usize,
            size: size as usize,
        })
    }

    /// This process's rank in the world.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of processes in the world.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The transport of this rank (valid while `self` lives).
    pub fn transport(&self) -> MpiTransport<'_> {
        MpiTransport {
            rank: self.rank,
            size: self.size,
            defer_abort: false,
            _mpi: PhantomData,
        }
    }

    /// The smallest `value` over all ranks (`MPI_Allreduce` with `MPI_MIN`; for agreeing on a
    /// status, never for data).
    pub fn min_over_ranks(&self, value: u64) -> u64 {
        let mut out = u64::MAX;
        SimpleCommunicator::world().all_reduce_into(&value, &mut out, SystemOperation::min());
        out
    }

    /// Ends every process of the job with exit code `code` (`MPI_Abort`).
    pub fn abort_job(&self, code: i32) -> ! {
        abort_job(code)
    }
}

/// Ends every process of the job with exit code `code` (non-zero) by `MPI_Abort`.
fn abort_job(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    SimpleCommunicator::world().abort(code.max(1))
}

/// `Transport` over MPI point-to-point on the world communicator: `exchange` is `MPI_Sendrecv`
/// (so every ring step is deadlock-free), `send` and `recv` are blocking `MPI_Send`/`MPI_Recv`,
/// and `abort` is `MPI_Abort` with a non-zero code.
pub struct MpiTransport<'a> {
    rank: usize,
    size: usize,
    defer_abort: bool,
    _mpi: PhantomData<&'a Mpi>,
}

impl MpiTransport<'_> {
    /// Makes `abort` a no-op, so a failing rank can report its error before ending the job: the
    /// caller must then call `abort_job` itself (or no rank may wait for this one).
    pub fn with_deferred_abort(mut self) -> Self {
        self.defer_abort = true;
        self
    }

    /// Ends every process of the job with exit code `code` (`MPI_Abort`).
    pub fn abort_job(&self, code: i32) -> ! {
        abort_job(code)
    }

    /// Sends this rank's message header to `to` and receives `from`'s (one `MPI_Sendrecv`).
    fn header_exchange(&self, to: usize, send: Data<'_>, from: usize) -> Result<Header, CommError> {
        let (to_r, from_r) = (self.peer(to)?, self.peer(from)?);
        let world = SimpleCommunicator::world();
        let (dest, src) = (world.process_at_rank(to_r), world.process_at_rank(from_r));
        let mut got = [0u64; 2];
        p2p::send_receive_into_with_tags(&header(send), &dest, TAG, &mut got, &src, TAG);
        incoming(got, from)
    }

    /// After `header_exchange`: sends `data` to `to` and receives `out` (of the announced length
    /// and type) from `from`. Step `i` sends piece `i` and receives piece `i`; where one side has
    /// no piece `i` left, it is a plain blocking send or receive, whose peer is in the same step
    /// with its matching half posted.
    fn pieces_exchange(
        &self,
        to: usize,
        data: Data<'_>,
        from: usize,
        out: DataMut<'_>,
    ) -> Result<(), CommError> {
        match (data, out) {
            (Data::F32(d), DataMut::F32(o)) => self.pieces(to, d, from, o),
            (Data::F32(d), DataMut::I32(o)) => self.pieces(to, d, from, o),
            (Data::I32(d), DataMut::F32(o)) => self.pieces(to, d, from, o),
            (Data::I32(d), DataMut::I32(o)) => self.pieces(to, d, from, o),
        }
    }

    /// [`MpiTransport::pieces_exchange`] of typed slices.
    fn pieces<S: Equivalence, R: Equivalence>(
        &self,
        to: usize,
        data: &[S],
        from: usize,
        out: &mut [R],
    ) -> Result<(), CommError> {
        let (to_r, from_r) = (self.peer(to)?, self.peer(from)?);
        let world = SimpleCommunicator::world();
        let (dest, src) = (world.process_at_rank(to_r), world.process_at_rank(from_r));
        let (n_send, n_recv) = (pieces(data.len()), pieces(out.len()));
        for i in 0..n_send.max(n_recv) {
            match (i < n_send, i < n_recv) {
                (true, true) => {
                    p2p::send_receive_into_with_tags(
                        piece(data, i),
                        &dest,
                        TAG,
                        piece_mut(out, i),
                        &src,
                        TAG,
                    );
                }
                (true, false) => dest.send_with_tag(piece(data, i), TAG),
                (false, true) => {
                    src.receive_into_with_tag(piece_mut(out, i), TAG);
                }
                (false, false) => {}
            }
        }
        Ok(())
    }

    fn peer(&self, r: usize) -> Result<i32, CommError> {
        if r < self.size {
            Ok(r as i32)
        } else {
            Err(CommError::Disconnected(r))
        }
    }
}

/// The number of pieces of a message of `len` elements.
fn pieces(len: usize) -> usize {
    len.div_ceil(PIECE)
}

/// Piece `i` of `data`.
fn piece<T>(data: &[T], i: usize) -> &[T] {
    &data[(i * PIECE).min(data.len())..((i + 1) * PIECE).min(data.len())]
}

/// Piece `i` of `data`, mutably.
fn piece_mut<T>(data: &mut [T], i: usize) -> &mut [T] {
    let n = data.len();
    &mut data[(i * PIECE).min(n)..((i + 1) * PIECE).min(n)]
}

/// A message header as received: its length and whether it holds integers.
#[derive(Clone, Copy)]
struct Header {
    len: usize,
    int: bool,
}

impl Header {
    /// An owned buffer of the announced length and type, from the pool.
    fn buffer(self) -> Message {
        Message::pooled(self.int, self.len)
    }

    /// The element type's name.
    fn kind(self) -> &'static str {
        if self.int {
            i32::KIND
        } else {
            f32::KIND
        }
    }
}

/// The header of a message: its length and element type (0 float, 1 integer).
fn header(d: Data<'_>) -> [u64; 2] {
    [d.len() as u64, matches!(d, Data::I32(_)) as u64]
}

/// A received header, checked.
fn incoming(h: [u64; 2], from: usize) -> Result<Header, CommError> {
    let len = usize::try_from(h[0])
        .ok()
        .filter(|&n| n <= isize::MAX as usize / 4)
        .ok_or(CommError::Length {
            from,
            got: usize::MAX,
            want: isize::MAX as usize / 4,
        })?;
    match h[1] {
        0 | 1 => Ok(Header {
            len,
            int: h[1] == 1,
        }),
        _ => Err(CommError::Kind {
            from,
            got: "unknown",
            want: "f32 or i32",
        }),
    }
}

impl Transport for MpiTransport<'_> {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.size
    }

    fn send(&mut self, to: usize, msg: Message) -> Result<(), CommError> {
        let to_r = self.peer(to)?;
        let world = SimpleCommunicator::world();
        let dest = world.process_at_rank(to_r);
        dest.send_with_tag(&header(msg.as_data()), TAG);
        for i in 0..pieces(msg.len()) {
            match &msg {
                Message::F32(v) => dest.send_with_tag(piece(v, i), TAG),
                Message::I32(v) => dest.send_with_tag(piece(v, i), TAG),
            }
        }
        msg.recycle();
        Ok(())
    }

    fn recv(&mut self, from: usize) -> Result<Message, CommError> {
        let from_r = self.peer(from)?;
        let world = SimpleCommunicator::world();
        let src = world.process_at_rank(from_r);
        let mut h = [0u64; 2];
        src.receive_into_with_tag(&mut h, TAG);
        let mut out = incoming(h, from)?.buffer();
        for i in 0..pieces(out.len()) {
            match &mut out {
                Message::F32(v) => src.receive_into_with_tag(piece_mut(v, i), TAG),
                Message::I32(v) => src.receive_into_with_tag(piece_mut(v, i), TAG),
            };
        }
        Ok(out)
    }

    /// One `MPI_Sendrecv` of the headers, then one per piece of the data (see
    /// [`MpiTransport::pieces_exchange`]).
    fn exchange(&mut self, to: usize, msg: Message, from: usize) -> Result<Message, CommError> {
        let h = self.header_exchange(to, msg.as_data(), from)?;
        let mut out = h.buffer();
        self.pieces_exchange(to, msg.as_data(), from, out.as_data_mut())?;
        msg.recycle();
        Ok(out)
    }

    /// As `exchange`, received straight into the sink's buffer (a `Combine` sink through a
    /// pooled buffer), with no message buffers in between.
    fn exchange_into(
        &mut self,
        to: usize,
        send: Data<'_>,
        from: usize,
        sink: Sink<'_>,
    ) -> Result<(), CommError> {
        let h = self.header_exchange(to, send, from)?;
        sink.check(from, h.len, h.kind())?;
        match sink {
            Sink::Write(buf) => self.pieces_exchange(to, send, from, buf),
            sink => {
                let mut got = h.buffer();
                self.pieces_exchange(to, send, from, got.as_data_mut())?;
                put_message(got, from, sink)
            }
        }
    }

    /// `MPI_Abort` with exit code 1 (a no-op after `with_deferred_abort`).
    fn abort(&self) {
        if !self.defer_abort {
            abort_job(1)
        }
    }
}
/// One rank's outputs as a message of words, for rank 0 to assemble (collective counts are
/// not carried: the run's are rank 0's).
pub fn encode_rank_output(o: &RankOutput) -> Message {
    let mut w = Vec::new();
    put_rank(&mut w, o);
    Message::I32(w)
}

/// One rank's training results as a message of words: its last step's outputs and figures,
/// the kept first-step outputs and each step's loss (bit for bit).
pub fn encode_trained(o: &TrainedRank) -> Message {
    let mut w = Vec::new();
    put_rank(&mut w, &o.rank);
    put_tensors(&mut w, &o.first);
    put64(&mut w, o.losses.len() as u64);
    w.extend(o.losses.iter().map(|l| l.to_bits() as i32));
    put64(&mut w, o.skipped.len() as u64);
    w.extend(o.skipped.iter().map(|&s| s as i32));
    put64(&mut w, o.scales.len() as u64);
    w.extend(o.scales.iter().map(|l| l.to_bits() as i32));
    Message::I32(w)
}

fn put64(w: &mut Vec<i32>, v: u64) {
    w.push(v as u32 as i32);
    w.push((v >> 32) as u32 as i32);
}

fn put_rank(w: &mut Vec<i32>, o: &RankOutput) {
    put_tensors(w, &o.outputs);
    put64(w, o.step_times.len() as u64);
    for s in &o.step_times {
        put64(w, s.to_bits());
    }
    put64(w, o.peak_bytes);
    match &o.pipeline {
        None => w.push(0),
        Some(p) => {
            w.push(1);
            w.push(p.stage as i32);
            put64(w, p.sends);
            put64(w, p.send_bytes);
            put64(w, p.step_sends);
            w.push(p.max_in_flight as i32);
            put64(w, p.busy_s.to_bits());
            put64(w, p.schedule_s.to_bits());
        }
    }
}

/// A list of tensors: its length, then each one's kind, rank, dims and elements' bits.
fn put_tensors(w: &mut Vec<i32>, ts: &[Tensor]) {
    put64(w, ts.len() as u64);
    for t in ts {
        w.push(matches!(t, Tensor::I32(_)) as i32);
        put64(w, t.shape().len() as u64);
        for &d in t.shape() {
            put64(w, d as u64);
        }
        match t {
            Tensor::F32(x) => w.extend(x.iter().map(|v| v.to_bits() as i32)),
            Tensor::I32(x) => w.extend(x.iter().copied()),
        }
    }
}

/// Reads the words of a message in order.
struct Words<'m> {
    msg: &'m [i32],
    at: usize,
}

impl<'m> Words<'m> {
    /// The words of an integer message.
    fn of(msg: &'m Message) -> Result<Self, String> {
        match msg {
            Message::I32(msg) => Ok(Words { msg, at: 0 }),
            _ => Err("a rank output message of floats".into()),
        }
    }

    fn next(&mut self) -> Result<u32, String> {
        let w = self
            .msg
            .get(self.at)
            .ok_or("truncated rank output message")?;
        self.at += 1;
        Ok(*w as u32)
    }

    fn next64(&mut self) -> Result<u64, String> {
        let lo = self.next()? as u64;
        Ok(lo | (self.next()? as u64) << 32)
    }

    /// The next `n` words, if the message holds them.
    fn take(&mut self, n: u64) -> Result<&'m [i32], String> {
        let rest = self.msg.len() - self.at;
        let n = usize::try_from(n)
            .ok()
            .filter(|&n| n <= rest)
            .ok_or("truncated rank output message")?;
        self.at += n;
        Ok(&self.msg[self.at - n..self.at])
    }

    /// An error unless every word was read.
    fn end(&self) -> Result<(), String> {
        if self.at != self.msg.len() {
            return Err("trailing words in a rank output message".into());
        }
        Ok(())
    }

    /// `put_tensors`'s list.
    fn tensors(&mut self) -> Result<Vec<Tensor>, String> {
        let n = self.next64()?;
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(self.tensor()?);
        }
        Ok(out)
    }

    fn tensor(&mut self) -> Result<Tensor, String> {
        let int = self.next()? != 0;
        let ndim = self.next64()?;
        if ndim > 64 {
            return Err(format!("an output block of rank {ndim}"));
        }
        let shape = (0..ndim)
            .map(|_| self.next64().map(|d| d as usize))
            .collect::<Result<Vec<_>, _>>()?;
        let len = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
            .ok_or("an output block larger than its message")?;
        let data = self.take(len)?;
        let shape = IxDyn(&shape);
        Ok(if int {
            Tensor::I32(ArrayD::from_shape_vec(shape, data.to_vec()).map_err(|e| e.to_string())?)
        } else {
            let v = data.iter().map(|&v| f32::from_bits(v as u32)).collect();
            Tensor::F32(ArrayD::from_shape_vec(shape, v).map_err(|e| e.to_string())?)
        })
    }

    /// `put_rank`'s record.
    fn rank(&mut self) -> Result<RankOutput, String> {
        let outputs = self.tensors()?;
        let steps = self.next64()?;
        let step_times = self
            .take(steps.saturating_mul(2))?
            .chunks(2)
            .map(|p| f64::from_bits(p[0] as u32 as u64 | (p[1] as u32 as u64) << 32))
            .collect();
        let peak_bytes = self.next64()?;
        let pipeline = match self.next()? {
            0 => None,
            _ => Some(crate::exec::pipeline::StageRunStats {
                stage: self.next()?,
                sends: self.next64()?,
                send_bytes: self.next64()?,
                step_sends: self.next64()?,
                max_in_flight: self.next()?,
                busy_s: f64::from_bits(self.next64()?),
                schedule_s: f64::from_bits(self.next64()?),
            }),
        };
        Ok(RankOutput {
            outputs,
            step_times,
            collectives: BTreeMap::new(),
            peak_bytes,
            pipeline,
        })
    }
}

/// Reads back `encode_rank_output`'s message.
pub fn decode_rank_output(msg: &Message) -> Result<RankOutput, String> {
    let mut w = Words::of(msg)?;
    let o = w.rank()?;
    w.end()?;
    Ok(o)
}

/// Reads back `encode_trained`'s message.
pub fn decode_trained(msg: &Message) -> Result<TrainedRank, String> {
    let mut w = Words::of(msg)?;
    let rank = w.rank()?;
    let first = w.tensors()?;
    let n = w.next64()?;
    let losses = w
        .take(n)?
        .iter()
        .map(|&b| f32::from_bits(b as u32))
        .collect();
    let n = w.next64()?;
    let skipped = w.take(n)?.iter().map(|&b| b != 0).collect();
    let n = w.next64()?;
    let scales = w
        .take(n)?
        .iter()
        .map(|&b| f32::from_bits(b as u32))
        .collect();
    w.end()?;
    Ok(TrainedRank {
        rank,
        first,
        losses,
        skipped,
        scales,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_output_round_trips_bit_for_bit() {
        let f = ArrayD::from_shape_vec(
            IxDyn(&[2, 3]),
            vec![1.5, -0.0, f32::NAN, f32::INFINITY, 1e-45, -3.25],
        )
        .unwrap();
        let i = ArrayD::from_shape_vec(IxDyn(&[4]), vec![i32::MIN, -1, 0, i32::MAX]).unwrap();
        let o = RankOutput {
            outputs: vec![Tensor::F32(f.clone()), Tensor::I32(i.clone())],
            step_times: vec![0.25, 1e-9],
            collectives: BTreeMap::new(),
            peak_bytes: u64::MAX - 3,
            pipeline: None,
        };
        let d = decode_rank_output(&encode_rank_output(&o)).unwrap();
        let bits = |t: &Tensor| {
            t.as_f32()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(&d.outputs[0]), bits(&Tensor::F32(f)));
        assert_eq!(d.outputs[1].as_i32().unwrap(), &i);
        assert_eq!(d.step_times, o.step_times);
        assert_eq!(d.peak_bytes, o.peak_bytes);
        let Message::I32(mut msg) = encode_rank_output(&o) else {
            panic!("words travel as integers")
        };
        msg.pop();
        assert!(decode_rank_output(&Message::I32(msg)).is_err());
        assert!(decode_rank_output(&Message::I32(vec![])).is_err());
        assert!(decode_rank_output(&Message::F32(vec![])).is_err());
    }

    #[test]
    fn trained_rank_round_trips_bit_for_bit() {
        let t = |v: f32| Tensor::F32(ArrayD::from_elem(IxDyn(&[2]), v));
        let o = TrainedRank {
            rank: RankOutput {
                outputs: vec![t(1.5)],
                step_times: vec![0.5, 0.25],
                collectives: BTreeMap::new(),
                peak_bytes: 7,
                pipeline: Some(crate::exec::pipeline::StageRunStats {
                    stage: 3,
                    sends: u64::MAX,
                    send_bytes: 1 << 40,
                    step_sends: 2,
                    max_in_flight: 4,
                    busy_s: 0.125,
                    schedule_s: f64::MAX,
                }),
            },
            first: vec![t(-0.0), t(f32::NAN)],
            losses: vec![5.5, f32::from_bits(0x7f80_0001)],
            skipped: vec![false, true],
            scales: vec![65536.0, 65536.0],
        };
        let d = decode_trained(&encode_trained(&o)).unwrap();
        let bits = |ls: &[f32]| ls.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&d.losses), bits(&o.losses));
        assert_eq!(d.rank.pipeline, o.rank.pipeline);
        assert_eq!(d.first.len(), 2);
        assert_eq!(
            d.first[0].as_f32().unwrap()[[0]].to_bits(),
            (-0.0f32).to_bits()
        );
        assert_eq!(d.rank.step_times, o.rank.step_times);
        let Message::I32(mut msg) = encode_trained(&o) else {
            panic!("words travel as integers")
        };
        msg.push(0);
        assert!(decode_trained(&Message::I32(msg)).is_err());
    }
}
