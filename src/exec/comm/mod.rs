//! Communication between ranks. A backend provides point-to-point messages between the ranks
//! of one world (`Transport`); the collectives are ring, doubling and halving-doubling
//! algorithms over it, with a reduction order fixed by the group and the length alone, so
//! results are bitwise identical whatever the timing. The thread backend connects ranks of one
//! process by channels; the MPI backend serves the same trait.

mod thread;

use super::kernels::{combine_from, combine_symmetric, give, take, take_vec, Pooled};
use crate::ir::ReduceOp;

pub use thread::ThreadTransport;

/// Why a communication failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommError {
    /// Another rank failed; this one stopped waiting for it.
    #[error("stopped because another rank failed")]
    Aborted,
    /// The peer is gone (its endpoint was dropped).
    #[error("rank {0} disconnected")]
    Disconnected(usize),
    /// A message of an unexpected length arrived (a corrupt plan or a backend bug).
    #[error("message from rank {from} has {got} elements, expected {want}")]
    Length {
        /// Sender.
        from: usize,
        /// Received length.
        got: usize,
        /// Expected length.
        want: usize,
    },
    /// A message of another element type arrived (a corrupt plan or a backend bug).
    #[error("message from rank {from} holds {got} elements, expected {want}")]
    Kind {
        /// Sender.
        from: usize,
        /// Received element type.
        got: &'static str,
        /// Expected element type.
        want: &'static str,
    },
}

/// An owned message: its elements keep their type end to end, so integers move exactly.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// Float elements.
    F32(Vec<f32>),
    /// Integer elements.
    I32(Vec<i32>),
}

/// A borrowed run of elements to send.
#[derive(Clone, Copy, Debug)]
pub enum Data<'a> {
    /// Float elements.
    F32(&'a [f32]),
    /// Integer elements.
    I32(&'a [i32]),
}

/// A borrowed buffer to receive into.
#[derive(Debug)]
pub enum DataMut<'a> {
    /// Float elements.
    F32(&'a mut [f32]),
    /// Integer elements.
    I32(&'a mut [i32]),
}

impl Message {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.as_data().len()
    }

    /// True when the message has no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type's name.
    pub fn kind(&self) -> &'static str {
        self.as_data().kind()
    }

    /// The elements, borrowed.
    pub fn as_data(&self) -> Data<'_> {
        match self {
            Message::F32(v) => Data::F32(v),
            Message::I32(v) => Data::I32(v),
        }
    }

    /// A message of `len` elements (integers when `int`) in a pooled buffer, to receive into.
    pub fn pooled(int: bool, len: usize) -> Message {
        if int {
            Message::I32(take(len))
        } else {
            Message::F32(take(len))
        }
    }

    /// The elements, mutably borrowed.
    pub fn as_data_mut(&mut self) -> DataMut<'_> {
        match self {
            Message::F32(v) => DataMut::F32(v),
            Message::I32(v) => DataMut::I32(v),
        }
    }

    /// Returns the message's buffer to the pool.
    pub fn recycle(self) {
        match self {
            Message::F32(v) => give(v),
            Message::I32(v) => give(v),
        }
    }
}

impl Data<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Data::F32(s) => s.len(),
            Data::I32(s) => s.len(),
        }
    }

    /// True when there is no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type's name.
    pub fn kind(&self) -> &'static str {
        match self {
            Data::F32(_) => f32::KIND,
            Data::I32(_) => i32::KIND,
        }
    }

    /// An owned copy, in a pooled buffer.
    pub fn to_message(&self) -> Message {
        match *self {
            Data::F32(s) => Message::F32(copy(s)),
            Data::I32(s) => Message::I32(copy(s)),
        }
    }
}

impl DataMut<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            DataMut::F32(s) => s.len(),
            DataMut::I32(s) => s.len(),
        }
    }

    /// True when there is no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type's name.
    pub fn kind(&self) -> &'static str {
        match self {
            DataMut::F32(_) => f32::KIND,
            DataMut::I32(_) => i32::KIND,
        }
    }
}

/// An element type that travels between ranks: f32 or i32. Sums and maxima of integers are
/// exact (sums wrap as numpy's int32 sums do).
pub trait Elem: Pooled + PartialEq + std::fmt::Debug {
    /// The type's name in messages and errors.
    const KIND: &'static str;
    /// An owned buffer as a message.
    fn message(v: Vec<Self>) -> Message;
    /// A message's buffer, if it holds this type.
    fn from_message(m: Message, from: usize) -> Result<Vec<Self>, CommError>;
    /// A slice as data to send.
    fn data(s: &[Self]) -> Data<'_>;
    /// A buffer to receive into.
    fn data_mut(s: &mut [Self]) -> DataMut<'_>;
    /// `acc = acc ⊕ other` elementwise, `⊕` symmetric bitwise.
    fn combine_from(acc: &mut [Self], other: &[Self], op: ReduceOp);
    /// As `combine_from`; with `copy`, `other` receives the result too.
    fn combine_symmetric(acc: &mut [Self], other: &mut [Self], op: ReduceOp, copy: bool);
}

impl Elem for f32 {
    const KIND: &'static str = "f32";
    fn message(v: Vec<f32>) -> Message {
        Message::F32(v)
    }
    fn from_message(m: Message, from: usize) -> Result<Vec<f32>, CommError> {
        match m {
            Message::F32(v) => Ok(v),
            m => Err(kind_error(from, m.kind(), Self::KIND)),
        }
    }
    fn data(s: &[f32]) -> Data<'_> {
        Data::F32(s)
    }
    fn data_mut(s: &mut [f32]) -> DataMut<'_> {
        DataMut::F32(s)
    }
    fn combine_from(acc: &mut [f32], other: &[f32], op: ReduceOp) {
        combine_from(acc, other, op)
    }
    fn combine_symmetric(acc: &mut [f32], other: &mut [f32], op: ReduceOp, copy: bool) {
        combine_symmetric(acc, other, op, copy)
    }
}

impl Elem for i32 {
    const KIND: &'static str = "i32";
    fn message(v: Vec<i32>) -> Message {
        Message::I32(v)
    }
    fn from_message(m: Message, from: usize) -> Result<Vec<i32>, CommError> {
        match m {
            Message::I32(v) => Ok(v),
            m => Err(kind_error(from, m.kind(), Self::KIND)),
        }
    }
    fn data(s: &[i32]) -> Data<'_> {
        Data::I32(s)
    }
    fn data_mut(s: &mut [i32]) -> DataMut<'_> {
        DataMut::I32(s)
    }
    fn combine_from(acc: &mut [i32], other: &[i32], op: ReduceOp) {
        assert_eq!(acc.len(), other.len(), "combine: lengths");
        match op {
            ReduceOp::Sum | ReduceOp::Mean => int_combine(acc, other, i32::wrapping_add),
            ReduceOp::Max => int_combine(acc, other, std::cmp::max),
        }
    }
    fn combine_symmetric(acc: &mut [i32], other: &mut [i32], op: ReduceOp, copy: bool) {
        assert_eq!(acc.len(), other.len(), "combine: lengths");
        match op {
            ReduceOp::Sum | ReduceOp::Mean => int_symmetric(acc, other, copy, i32::wrapping_add),
            ReduceOp::Max => int_symmetric(acc, other, copy, std::cmp::max),
        }
    }
}

/// `acc[i] = f(acc[i], other[i])`: the exact integer `⊕` of a reduction (wrapping sum, which
/// mean sums too, as for floats; or max), chosen once by the caller and inlined.
fn int_combine(acc: &mut [i32], other: &[i32], f: impl Fn(i32, i32) -> i32) {
    acc.iter_mut().zip(other).for_each(|(a, &b)| *a = f(*a, b));
}

/// As `int_combine`; with `copy`, `other` receives the result too.
fn int_symmetric(acc: &mut [i32], other: &mut [i32], copy: bool, f: impl Fn(i32, i32) -> i32) {
    for (a, b) in acc.iter_mut().zip(other.iter_mut()) {
        *a = f(*a, *b);
        if copy {
            *b = *a;
        }
    }
}

fn kind_error(from: usize, got: &'static str, want: &'static str) -> CommError {
    CommError::Kind { from, got, want }
}

/// Point-to-point messaging between the ranks of one world. Messages between a pair of ranks
/// arrive in the order sent.
pub trait Transport: Send {
    /// This rank's id in the world.
    fn rank(&self) -> usize;
    /// Number of ranks in the world.
    fn world(&self) -> usize;
    /// Sends `msg` to rank `to` (does not wait for the receiver).
    fn send(&mut self, to: usize, msg: Message) -> Result<(), CommError>;
    /// Receives the next message from rank `from`.
    fn recv(&mut self, from: usize) -> Result<Message, CommError>;
    /// Sends `msg` to `to` and receives the next message from `from`, as one step (MPI's
    /// sendrecv): the ring steps of the collectives, safe when every rank sends at once.
    fn exchange(&mut self, to: usize, msg: Message, from: usize) -> Result<Message, CommError> {
        self.send(to, msg)?;
        self.recv(from)
    }
    /// `exchange` of slices: sends `send` to `to` and puts the next message from `from` into
    /// `sink` (a message of another length or type is an error). The default copies through
    /// `exchange`; a backend that can read the peer's memory in place overrides it.
    fn exchange_into(
        &mut self,
        to: usize,
        send: Data<'_>,
        from: usize,
        sink: Sink<'_>,
    ) -> Result<(), CommError> {
        copy_exchange(self, to, send, from, sink)
    }
    /// Tells every rank to stop: this rank failed.
    fn abort(&self);
}

/// Where an exchanged message goes.
pub enum Sink<'a> {
    /// Written over the buffer.
    Write(DataMut<'a>),
    /// Combined into the buffer: `buf[i] = buf[i] ⊕ msg[i]`, `⊕` symmetric.
    Combine(DataMut<'a>, ReduceOp),
}

impl Sink<'_> {
    /// The buffer.
    fn buf(&self) -> &DataMut<'_> {
        match self {
            Sink::Write(b) | Sink::Combine(b, _) => b,
        }
    }

    /// The length the message must have.
    pub fn expected_len(&self) -> usize {
        self.buf().len()
    }

    /// The element type the message must have.
    pub fn expected_kind(&self) -> &'static str {
        self.buf().kind()
    }

    /// An error unless a message from rank `from` of `len` elements of type `kind` fits the
    /// buffer.
    pub fn check(&self, from: usize, len: usize, kind: &'static str) -> Result<(), CommError> {
        check_len(from, len, self.expected_len())?;
        if kind != self.expected_kind() {
            return Err(kind_error(from, kind, self.expected_kind()));
        }
        Ok(())
    }

    /// Puts `msg` from rank `from` into the buffer; a message of another length or element
    /// type is an error.
    pub fn put(self, from: usize, msg: Data<'_>) -> Result<(), CommError> {
        self.check(from, msg.len(), msg.kind())?;
        match (self, msg) {
            (Sink::Write(DataMut::F32(b)), Data::F32(m)) => b.copy_from_slice(m),
            (Sink::Write(DataMut::I32(b)), Data::I32(m)) => b.copy_from_slice(m),
            (Sink::Combine(DataMut::F32(b), op), Data::F32(m)) => f32::combine_from(b, m, op),
            (Sink::Combine(DataMut::I32(b), op), Data::I32(m)) => i32::combine_from(b, m, op),
            _ => unreachable!("the kinds were checked"),
        }
        Ok(())
    }
}

/// [`Transport::exchange_into`] through owned messages: a copy of `send` goes out, the reply is
/// put into `sink`, and both buffers come from and return to the pool.
pub(crate) fn copy_exchange<T: Transport + ?Sized>(
    t: &mut T,
    to: usize,
    send: Data<'_>,
    from: usize,
    sink: Sink<'_>,
) -> Result<(), CommError> {
    let got = t.exchange(to, send.to_message(), from)?;
    put_message(got, from, sink)
}

/// Puts a received message into `sink`, checking its length and type, and pools its buffer.
pub(crate) fn put_message(got: Message, from: usize, sink: Sink<'_>) -> Result<(), CommError> {
    let r = sink.put(from, got.as_data());
    got.recycle();
    r
}

/// Position of `rank` in `group` (the group lists world ranks in coordinate order).
fn position(group: &[usize], rank: usize) -> usize {
    group
        .iter()
        .position(|&r| r == rank)
        .expect("a rank belongs to its own groups")
}

/// Chunk boundaries splitting `n` elements into `k` nearly equal contiguous parts.
fn bounds(n: usize, k: usize) -> Vec<(usize, usize)> {
    (0..k).map(|i| (i * n / k, (i + 1) * n / k)).collect()
}

/// An error unless a message of `got` elements from rank `from` has the `want` expected.
pub(crate) fn check_len(from: usize, got: usize, want: usize) -> Result<(), CommError> {
    if got == want {
        Ok(())
    } else {
        Err(CommError::Length { from, got, want })
    }
}

/// The buffer of a message from rank `from` that must hold `want` elements of `T`.
fn expect_len<T: Elem>(got: Message, want: usize, from: usize) -> Result<Vec<T>, CommError> {
    let got = T::from_message(got, from)?;
    check_len(from, got.len(), want)?;
    Ok(got)
}

/// A copy of `src`, in a pooled buffer.
fn copy<T: Pooled>(src: &[T]) -> Vec<T> {
    let mut m = take_vec::<T>(src.len());
    m.extend_from_slice(src);
    m
}

/// Disjoint borrows of two non-overlapping ranges of `data`: `src` to read, `dst` to write.
fn split_pair<T>(data: &mut [T], src: (usize, usize), dst: (usize, usize)) -> (&[T], &mut [T]) {
    if src.1 <= dst.0 {
        let (a, b) = data.split_at_mut(dst.0);
        (&a[src.0..src.1], &mut b[..dst.1 - dst.0])
    } else {
        assert!(dst.1 <= src.0, "split_pair: ranges overlap");
        let (a, b) = data.split_at_mut(src.0);
        (&b[..src.1 - src.0], &mut a[dst.0..dst.1])
    }
}

/// The k-1 steps of a ring over chunks `b` of `data`: step s sends chunk (me - s - shift) to the
/// next rank and receives chunk (me - s - shift - 1) from the previous one, combining it with
/// `op` or, without one, writing it.
fn ring<T: Elem>(
    t: &mut dyn Transport,
    group: &[usize],
    data: &mut [T],
    b: &[(usize, usize)],
    shift: usize,
    op: Option<ReduceOp>,
) -> Result<(), CommError> {
    let k = group.len();
    let me = position(group, t.rank());
    let (next, prev) = (group[(me + 1) % k], group[(me + k - 1) % k]);
    for s in 0..k.saturating_sub(1) {
        let src = b[(me + 2 * k - s - shift) % k];
        let dst = b[(me + 2 * k - s - shift - 1) % k];
        let (send, recv) = split_pair(data, src, dst);
        let sink = match op {
            Some(op) => Sink::Combine(T::data_mut(recv), op),
            None => Sink::Write(T::data_mut(recv)),
        };
        t.exchange_into(next, T::data(send), prev, sink)?;
    }
    Ok(())
}

/// Ring reduce-scatter of `data` over `group` (chunks `b`, one per position): afterwards this
/// rank's chunk `position` holds the reduction (every chunk reduced in ring order); the other
/// chunks hold partial results.
fn ring_reduce_scatter<T: Elem>(
    t: &mut dyn Transport,
    group: &[usize],
    data: &mut [T],
    b: &[(usize, usize)],
    op: ReduceOp,
) -> Result<(), CommError> {
    ring(t, group, data, b, 1, Some(op))
}

/// Ring all-gather in place: on entry chunk `position` of `data` (chunks `b`) holds this rank's
/// part; on return every chunk holds its owner's part.
fn ring_all_gather<T: Elem>(
    t: &mut dyn Transport,
    group: &[usize],
    data: &mut [T],
    b: &[(usize, usize)],
) -> Result<(), CommError> {
    ring(t, group, data, b, 0, None)
}

/// All-reduce over 2^j ranks by recursive halving then doubling (Rabenseifner): in halving
/// round i a rank exchanges half of its current segment with the rank whose position differs in
/// bit i and reduces the half it keeps; the doubling rounds gather the segments back in reverse.
/// 2j rounds (the ring takes 2(k-1)) moving 2(k-1)/k of the data per rank, as the ring does.
/// Every element is reduced by the same tree, (x0 ⊕ x1) ⊕ (x2 ⊕ x3) ..., on whichever rank
/// holds it, and `⊕` is symmetric, so all ranks end bitwise equal.
fn halving_doubling<T: Elem>(
    t: &mut dyn Transport,
    group: &[usize],
    data: &mut [T],
    op: ReduceOp,
) -> Result<(), CommError> {
    let k = group.len();
    let me = position(group, t.rank());
    let (mut lo, mut hi) = (0, data.len());
    let mut splits = Vec::new();
    let mut bit = 1;
    while bit < k {
        let peer = group[me ^ bit];
        let mid = lo + (hi - lo) / 2;
        // The lower position keeps the lower half.
        let (keep, away) = if me & bit == 0 {
            ((lo, mid), (mid, hi))
        } else {
            ((mid, hi), (lo, mid))
        };
        let (send, acc) = split_pair(data, away, keep);
        t.exchange_into(
            peer,
            T::data(send),
            peer,
            Sink::Combine(T::data_mut(acc), op),
        )?;
        splits.push((lo, mid, hi));
        (lo, hi) = keep;
        bit <<= 1;
    }
    while let Some((plo, mid, phi)) = splits.pop() {
        bit >>= 1;
        let peer = group[me ^ bit];
        let other = if me & bit == 0 {
            (mid, phi)
        } else {
            (plo, mid)
        };
        let (send, recv) = split_pair(data, (lo, hi), other);
        t.exchange_into(peer, T::data(send), peer, Sink::Write(T::data_mut(recv)))?;
        (lo, hi) = (plo, phi);
    }
    Ok(())
}

/// All-reduce over 2^j ranks by recursive doubling: in round i every rank exchanges its whole
/// buffer with the rank whose position differs in bit i and combines the two. j rounds instead
/// of halving-doubling's 2j, for more bytes: the choice for small buffers, where a round's
/// wake-ups cost more than its bytes. The same tree as [`halving_doubling`], so the same bits.
fn doubling<T: Elem>(
    t: &mut dyn Transport,
    group: &[usize],
    data: &mut [T],
    op: ReduceOp,
) -> Result<(), CommError> {
    let k = group.len();
    let me = position(group, t.rank());
    let mut send = copy(data);
    let mut bit = 1;
    while bit < k {
        let peer = group[me ^ bit];
        let mut got: Vec<T> =
            expect_len(t.exchange(peer, T::message(send), peer)?, data.len(), peer)?;
        let more = bit * 2 < k;
        // The received buffer becomes the next round's message, written in the same pass.
        T::combine_symmetric(data, &mut got, op, more);
        bit <<= 1;
        if !more {
            give(got);
            break;
        }
        send = got;
    }
    Ok(())
}

/// Largest buffer (bytes) that a 2^j group all-reduces by recursive doubling rather than halving
/// and doubling: below it the rounds' wake-ups cost more than the extra bytes (a gpt layer's
/// 128 KiB all-reduce over 8 ranks on 2 cores: half the context switches).
const DOUBLING_MAX_BYTES: usize = 256 << 10;

/// Reduces `data` over `group` in place: on groups of 2^j ranks by recursive doubling (small
/// buffers) or halving and doubling (large ones; the same reduction tree), on other groups by
/// the ring (reduce-scatter, then all-gather). The reduction order depends on the group and the
/// length alone, so the result is bitwise the same on every run and every backend.
pub fn all_reduce<T: Elem>(
    t: &mut dyn Transport,
    group: &[usize],
    data: &mut [T],
    op: ReduceOp,
) -> Result<(), CommError> {
    let k = group.len();
    if k == 1 {
        return Ok(());
    }
    if k.is_power_of_two() {
        if data.len() * 4 <= DOUBLING_MAX_BYTES {
            return doubling(t, group, data, op);
        }
        return halving_doubling(t, group, data, op);
    }
    let b = bounds(data.len(), k);
    ring_reduce_scatter(t, group, data, &b, op)?;
    ring_all_gather(t, group, data, &b)
}

/// Concatenates every rank's `mine` (all the same length) in group order.
pub fn all_gather<T: Elem>(
    t: &mut dyn Transport,
    group: &[usize],
    mine: &[T],
) -> Result<Vec<T>, CommError> {
    let (k, n) = (group.len(), mine.len());
    let me = position(group, t.rank());
    let mut out = take::<T>(k * n);
    out[me * n..(me + 1) * n].copy_from_slice(mine);
    let b: Vec<(usize, usize)> = (0..k).map(|i| (i * n, (i + 1) * n)).collect();
    ring_all_gather(t, group, &mut out, &b)?;
    Ok(out)
}

/// Reduces `data` (k equal contiguous chunks, chunk i for the i-th rank of the group) and returns
/// this rank's reduced chunk; `data` is left with partial results.
pub fn reduce_scatter<T: Elem>(
    t: &mut dyn Transport,
    group: &[usize],
    data: &mut [T],
    op: ReduceOp,
) -> Result<Vec<T>, CommError> {
    let b = bounds(data.len(), group.len());
    ring_reduce_scatter(t, group, data, &b, op)?;
    let (a, e) = b[position(group, t.rank())];
    Ok(copy(&data[a..e]))
}

/// Sends `chunks[i]` to the i-th rank of the group; returns the chunks received, in group order.
pub fn all_to_all<T: Elem>(
    t: &mut dyn Transport,
    group: &[usize],
    mut chunks: Vec<Vec<T>>,
) -> Result<Vec<Vec<T>>, CommError> {
    let mut out: Vec<Vec<T>> = vec![Vec::new(); group.len()];
    let make = |to: usize| std::mem::take(&mut chunks[to]);
    let take = |from: usize, got: Vec<T>| {
        out[from] = got;
        Ok(())
    };
    all_to_all_with(t, group, make, take)?;
    Ok(out)
}

/// An all-to-all over `group`, one block at a time: `make(p)` is the block for the rank at
/// position `p`, `take(p, block)` receives the block of the rank at position `p` (this rank's
/// own block first). Shifted pairwise exchange: step s sends to position me+s and receives from
/// me-s, so every step pairs each rank with one sender and one receiver.
pub fn all_to_all_with<T: Elem>(
    t: &mut dyn Transport,
    group: &[usize],
    mut make: impl FnMut(usize) -> Vec<T>,
    mut take: impl FnMut(usize, Vec<T>) -> Result<(), CommError>,
) -> Result<(), CommError> {
    let k = group.len();
    let me = position(group, t.rank());
    take(me, make(me))?;
    for s in 1..k {
        let (to, from) = ((me + s) % k, (me + k - s) % k);
        let got = t.exchange(group[to], T::message(make(to)), group[from])?;
        take(from, T::from_message(got, group[from])?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on every rank of a thread world and returns the results in rank order.
    fn on_world<T: Send + 'static>(
        n: usize,
        f: impl Fn(&mut ThreadTransport) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let f = std::sync::Arc::new(f);
        let handles: Vec<_> = ThreadTransport::world(n)
            .into_iter()
            .map(|mut t| {
                let f = f.clone();
                std::thread::spawn(move || f(&mut t))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    fn data(rank: usize, len: usize) -> Vec<f32> {
        (0..len).map(|i| (rank * 1000 + i) as f32 * 0.5).collect()
    }

    #[test]
    fn all_reduce_at_odd_sizes_and_groups() {
        for n in [1usize, 2, 3, 5, 8] {
            for len in [0usize, 1, 3, 7, 13, 64] {
                let out = on_world(n, move |t| {
                    let group: Vec<usize> = (0..n).collect();
                    let mut d = data(t.rank(), len);
                    all_reduce(t, &group, &mut d, ReduceOp::Sum).unwrap();
                    d
                });
                let want: Vec<f32> = (0..len)
                    .map(|i| (0..n).map(|r| data(r, len)[i]).sum())
                    .collect();
                for o in &out {
                    assert_eq!(o, &out[0], "every rank gets the same bits");
                    for (a, b) in o.iter().zip(&want) {
                        assert!((a - b).abs() <= 1e-3 * b.abs().max(1.0));
                    }
                }
            }
        }
    }

    #[test]
    fn all_reduce_max_and_subgroups() {
        // World of 6 as a 2x3 mesh: reduce over the groups of the second axis.
        let out = on_world(6, |t| {
            let r = t.rank();
            let group: Vec<usize> = (0..3).map(|k| (r / 3) * 3 + k).collect();
            let mut d = vec![r as f32, -(r as f32)];
            all_reduce(t, &group, &mut d, ReduceOp::Max).unwrap();
            d
        });
        assert_eq!(out[0], vec![2.0, 0.0]);
        assert_eq!(out[4], vec![5.0, -3.0]);
    }

    #[test]
    fn gather_scatter_and_all_to_all() {
        let out = on_world(3, |t| {
            let group = vec![0, 1, 2];
            let r = t.rank();
            let g = all_gather(t, &group, &[r as f32, 10.0 + r as f32]).unwrap();
            let mut d: Vec<f32> = (0..6).map(|i| (i + r) as f32).collect();
            let s = reduce_scatter(t, &group, &mut d, ReduceOp::Sum).unwrap();
            let a = all_to_all(
                t,
                &group,
                (0..3)
                    .map(|to| vec![(r * 10 + to) as f32; to + 1])
                    .collect(),
            )
            .unwrap();
            (g, s, a)
        });
        assert_eq!(out[1].0, vec![0.0, 10.0, 1.0, 11.0, 2.0, 12.0]);
        // chunk 1 of [i + r] summed over r = 0..3: (2+3)+(3+4)... per element: 3*i + 3
        assert_eq!(out[1].1, vec![9.0, 12.0]);
        assert_eq!(out[2].2, vec![vec![2.0; 3], vec![12.0; 3], vec![22.0; 3]]);
    }

    /// Integers that f32 cannot hold (above 2^24), each rank's shifted by its rank.
    fn big(rank: usize, len: usize) -> Vec<i32> {
        let base = [16_777_217, i32::MAX - 1, -16_777_217, 16_777_219];
        (0..len)
            .map(|i| base[i % 4] - (rank as i32) * (i % 3 == 0) as i32)
            .collect()
    }

    #[test]
    fn integers_move_exactly_through_every_collective() {
        // Lengths below and above the loan threshold; groups of 2^j (doubling, halving-doubling)
        // and others (ring).
        for n in [2usize, 3, 4] {
            for len in [4usize, 40_000] {
                let out = on_world(n, move |t| {
                    let group: Vec<usize> = (0..n).collect();
                    let r = t.rank();
                    let mut max = big(r, len);
                    all_reduce(t, &group, &mut max, ReduceOp::Max).unwrap();
                    let mut sum: Vec<i32> = big(r, len)
                        .iter()
                        .map(|&v| if r == 0 { v } else { (v % 2).abs() })
                        .collect();
                    all_reduce(t, &group, &mut sum, ReduceOp::Sum).unwrap();
                    let gathered = all_gather(t, &group, &big(r, len)).unwrap();
                    let mut rs = big(r, len * n);
                    rs.iter_mut().for_each(|v| *v = if r == 0 { *v } else { 0 });
                    let scattered = reduce_scatter(t, &group, &mut rs, ReduceOp::Sum).unwrap();
                    let chunks = (0..n).map(|to| big(r + to, len)).collect();
                    let swapped = all_to_all(t, &group, chunks).unwrap();
                    (max, sum, gathered, scattered, swapped)
                });
                for (r, (max, sum, gathered, scattered, swapped)) in out.iter().enumerate() {
                    assert_eq!(max, &big(0, len), "{n} ranks, {len}: max");
                    let inputs: Vec<Vec<i32>> = (0..n).map(|q| big(q, len)).collect();
                    let want: Vec<i32> = (0..len)
                        .map(|i| {
                            let odd: i32 = inputs[1..].iter().map(|b| (b[i] % 2).abs()).sum();
                            inputs[0][i].wrapping_add(odd)
                        })
                        .collect();
                    assert_eq!(sum, &want, "{n} ranks, {len}: sum");
                    let all: Vec<i32> = (0..n).flat_map(|q| big(q, len)).collect();
                    assert_eq!(gathered, &all, "{n} ranks, {len}: all-gather");
                    let b = bounds(len * n, n)[r];
                    assert_eq!(scattered[..], big(0, len * n)[b.0..b.1], "reduce-scatter");
                    for (from, got) in swapped.iter().enumerate() {
                        assert_eq!(got, &big(from + r, len), "all-to-all");
                    }
                }
            }
        }
    }

    #[test]
    fn a_message_of_the_other_element_type_is_an_error() {
        let out = on_world(2, |t| {
            let peer = 1 - t.rank();
            if t.rank() == 0 {
                let mut buf = vec![0i32; 3];
                t.exchange_into(
                    peer,
                    Data::I32(&[1, 2, 3]),
                    peer,
                    Sink::Write(DataMut::I32(&mut buf)),
                )
            } else {
                let mut buf = vec![0f32; 3];
                t.exchange_into(
                    peer,
                    Data::F32(&[1.0, 2.0, 3.0]),
                    peer,
                    Sink::Write(DataMut::F32(&mut buf)),
                )
            }
        });
        let kind = |from, got, want| Err(CommError::Kind { from, got, want });
        assert_eq!(out[0], kind(1, "f32", "i32"));
        assert_eq!(out[1], kind(0, "i32", "f32"));
    }

    #[test]
    fn abort_wakes_blocked_ranks() {
        let out = on_world(3, |t| {
            if t.rank() == 1 {
                t.abort();
                return Err(CommError::Aborted);
            }
            let mut d = vec![1.0; 4];
            all_reduce(t, &[0, 1, 2], &mut d, ReduceOp::Sum)
        });
        assert!(out.iter().all(|r| r.is_err()));
    }

    #[test]
    fn abort_during_large_all_reduces_stops_every_rank() {
        // Large buffers travel as loans; the failing rank stops after a few rounds of a
        // halving-doubling (4 ranks) or ring (3 ranks) all-reduce, so peers are waiting on it.
        for n in [3usize, 4] {
            let out = on_world(n, move |t| {
                let group: Vec<usize> = (0..n).collect();
                let mut d = vec![1.0f32; 1 << 20];
                if t.rank() == 1 {
                    let r = all_reduce(t, &group, &mut d, ReduceOp::Sum);
                    assert!(r.is_ok());
                    std::thread::sleep(std::time::Duration::from_millis(30));
                    t.abort();
                    return Err(CommError::Aborted);
                }
                all_reduce(t, &group, &mut d, ReduceOp::Sum)?;
                assert!(d.iter().all(|&v| v == n as f32));
                all_reduce(t, &group, &mut d, ReduceOp::Sum)
            });
            assert!(out.iter().all(|r| r.is_err()), "{n} ranks: {out:?}");
        }
    }

    /// Runs the all-reduce on every rank of a world of `n` over `group`; the data of
    /// rank r is `data(r)`. Returns the results of the group's ranks.
    fn reduce_group(
        n: usize,
        group: Vec<usize>,
        op: ReduceOp,
        data: fn(usize) -> Vec<f32>,
    ) -> Vec<Vec<f32>> {
        let group = &group;
        std::thread::scope(|s| {
            let hs: Vec<_> = ThreadTransport::world(n)
                .into_iter()
                .filter(|t| group.contains(&t.rank()))
                .map(|mut t| {
                    s.spawn(move || {
                        let mut d = data(t.rank());
                        all_reduce(&mut t, group, &mut d, op).unwrap();
                        d
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    type AllReduceFn =
        fn(&mut dyn Transport, &[usize], &mut [f32], ReduceOp) -> Result<(), CommError>;

    /// Runs `algo` on every rank of a world of `n` (one group); rank r holds `data(r, len)`.
    fn run_algo(n: usize, len: usize, op: ReduceOp, algo: AllReduceFn) -> Vec<Vec<u32>> {
        on_world(n, move |t| {
            let group: Vec<usize> = (0..n).collect();
            let mut d: Vec<f32> = (0..len)
                .map(|i| ((i * 31 + t.rank() * 17) % 23) as f32 * 0.37 - 4.1)
                .collect();
            if op == ReduceOp::Max {
                d.iter_mut().step_by(3).for_each(|v| *v = -0.0);
            }
            algo(t, &group, &mut d, op).unwrap();
            d.iter().map(|v| v.to_bits()).collect()
        })
    }

    #[test]
    fn large_ring_all_reduces_agree_with_the_sum() {
        for n in [3, 6] {
            let len = 100_003;
            let got = on_world(n, move |t| {
                let group: Vec<usize> = (0..n).collect();
                let mut d = data(t.rank(), len);
                all_reduce(t, &group, &mut d, ReduceOp::Sum).unwrap();
                d
            });
            let inputs: Vec<Vec<f32>> = (0..n).map(|r| data(r, len)).collect();
            for (i, &g) in got[0].iter().enumerate() {
                let want: f32 = inputs.iter().map(|d| d[i]).sum();
                assert!((g - want).abs() <= want.abs() * 1e-6, "{n} ranks at {i}");
            }
            assert!(got.iter().all(|g| g == &got[0]));
        }
    }

    #[test]
    fn halving_doubling_gives_the_bits_of_doubling() {
        for n in [2, 4, 8] {
            for len in [0, 1, 5, 7, 64, 1001, 100_003] {
                for op in [ReduceOp::Sum, ReduceOp::Max] {
                    let a = run_algo(n, len, op, halving_doubling);
                    let b = run_algo(n, len, op, doubling);
                    assert!(
                        a.iter().all(|r| r == &a[0]),
                        "{n} ranks, {len}: ranks differ"
                    );
                    assert_eq!(a, b, "{n} ranks, {len} elements, {op:?}");
                }
            }
        }
    }

    #[test]
    fn every_rank_of_a_group_ends_bitwise_equal() {
        let data = |r: usize| {
            (0..1000)
                .map(|i| ((i * 7 + r * 13) % 29) as f32 * 0.1 - 1.3)
                .collect()
        };
        for (n, group) in [
            (8, vec![0, 1, 2, 3, 4, 5, 6, 7]),
            (8, vec![1, 3, 5, 7]),
            (4, vec![2, 3]),
            (1, vec![0]),
            (6, vec![0, 2, 4]),
            (6, vec![0, 1, 2, 3, 4, 5]),
        ] {
            let got = reduce_group(n, group.clone(), ReduceOp::Sum, data);
            for g in &got {
                assert_eq!(
                    g.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    got[0].iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
            }
            for (i, &g) in got[0].iter().enumerate() {
                let want: f32 = group.iter().map(|&r| data(r)[i]).sum();
                assert!((g - want).abs() < 1e-5, "{group:?} at {i}");
            }
        }
        let signed = |r: usize| {
            vec![
                if r.is_multiple_of(2) { 0.0 } else { -0.0 },
                if r == 1 { f32::NAN } else { r as f32 },
            ]
        };
        let got = reduce_group(4, vec![0, 1, 2, 3], ReduceOp::Max, signed);
        for g in &got {
            assert_eq!(g[0].to_bits(), 0.0f32.to_bits());
            assert_eq!(g[1], 3.0);
        }
    }
}
