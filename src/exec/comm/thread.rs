//! The thread backend: ranks of one process, connected by channels created on first use (a
//! world of n ranks holds the channels its collectives use, not n²). Large exchanges are loans: the
//! receiver reads the sender's slice in place (one pass over the bytes instead of a copy into a
//! message and a copy out of it), and the sender waits until it has been read.

use super::{copy_exchange, CommError, Data, Message, Sink, Transport};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// How long a blocked rank waits between checks of the abort flag.
const POLL: Duration = Duration::from_millis(5);

/// Smallest exchange (bytes) sent as a loan: below it the reader's extra wake-up of the lender
/// costs more than the copies it saves.
const LOAN_MIN_BYTES: usize = 64 << 10;

/// What travels between two ranks.
enum Msg {
    /// An owned buffer.
    Data(Message),
    /// A slice of the sender's memory, to be read in place.
    Loan(Arc<Loan>),
}

/// Where a loan stands. Only `Pending` allows a read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LoanState {
    Pending,
    Done,
    Cancelled,
}

/// The address of a lent slice, with its element type.
#[derive(Clone, Copy)]
enum LoanPtr {
    F32(*const f32),
    I32(*const i32),
}

/// A slice lent by a rank blocked in `exchange_into`.
///
/// Invariant: while the state is `Pending` the slice is borrowed (shared) by a live
/// [`Lent`], whose drop sets `Cancelled` under the lock. The borrower reads only under the lock
/// while `Pending`, so every read happens inside the lender's borrow.
struct Loan {
    ptr: LoanPtr,
    len: usize,
    state: Mutex<LoanState>,
    read: Condvar,
}

// SAFETY: the pointer is only dereferenced under the invariant above (a shared borrow that the
// lender keeps alive while the loan is pending); f32 and i32 are Sync.
unsafe impl Send for Loan {}
// SAFETY: as for Send; the state is behind a mutex.
unsafe impl Sync for Loan {}

impl Loan {
    fn lock(&self) -> MutexGuard<'_, LoanState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads the lent slice into `sink` unless the lender cancelled.
    fn read(&self, from: usize, sink: Sink<'_>) -> Result<(), CommError> {
        let mut state = self.lock();
        if *state != LoanState::Pending {
            return Err(CommError::Aborted);
        }
        // SAFETY: the loan is pending and we hold its lock (see the invariant on `Loan`); the
        // data is not used past this block.
        let data = unsafe {
            match self.ptr {
                LoanPtr::F32(p) => Data::F32(std::slice::from_raw_parts(p, self.len)),
                LoanPtr::I32(p) => Data::I32(std::slice::from_raw_parts(p, self.len)),
            }
        };
        let result = sink.put(from, data);
        *state = LoanState::Done;
        self.read.notify_all();
        result
    }
}

/// The lender's side of a loan of a slice borrowed for `'a`: the borrow lasts as long as the
/// `Lent`, which waits for the read and cancels the loan when dropped unread.
struct Lent<'a> {
    loan: Arc<Loan>,
    _borrow: PhantomData<Data<'a>>,
}

impl<'a> Lent<'a> {
    fn new(src: Data<'a>) -> Self {
        let (ptr, len) = match src {
            Data::F32(s) => (LoanPtr::F32(s.as_ptr()), s.len()),
            Data::I32(s) => (LoanPtr::I32(s.as_ptr()), s.len()),
        };
        let loan = Arc::new(Loan {
            ptr,
            len,
            state: Mutex::new(LoanState::Pending),
            read: Condvar::new(),
        });
        Lent {
            loan,
            _borrow: PhantomData,
        }
    }

    /// Waits until the borrower has read the loan; gives up when the world aborts or the
    /// borrower can no longer read it (its endpoint is gone).
    fn wait(&self, world: &World, to: usize) -> Result<(), CommError> {
        let mut state = self.loan.lock();
        loop {
            if *state == LoanState::Done {
                return Ok(());
            }
            if world.aborted.load(Ordering::Relaxed) {
                return Err(CommError::Aborted);
            }
            if Arc::strong_count(&self.loan) == 1 || world.gone(to) {
                return Err(CommError::Disconnected(to));
            }
            state = (self.loan.read)
                .wait_timeout(state, POLL)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        let mut state = self.loan.lock();
        if *state == LoanState::Pending {
            *state = LoanState::Cancelled;
        }
    }
}

/// The end of a channel between two ranks that its owner has not picked up yet.
enum End {
    Sender(Sender<Msg>),
    Receiver(Receiver<Msg>),
}

/// What the ranks of one world share: the channel ends not yet picked up, by (sender,
/// receiver); a gone flag per rank (set when its endpoint is dropped); the abort flag.
struct World {
    size: usize,
    unclaimed: Mutex<HashMap<(usize, usize), End>>,
    gone: Vec<AtomicBool>,
    aborted: AtomicBool,
}

impl World {
    /// Rank `from`'s sender to `to`, creating the channel on first use.
    fn sender(&self, from: usize, to: usize) -> Sender<Msg> {
        let mut u = self
            .unclaimed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match u.remove(&(from, to)) {
            Some(End::Sender(s)) => s,
            _ => {
                let (s, r) = channel();
                u.insert((from, to), End::Receiver(r));
                s
            }
        }
    }

    /// Rank `to`'s receiver from `from`, creating the channel on first use.
    fn receiver(&self, from: usize, to: usize) -> Receiver<Msg> {
        let mut u = self
            .unclaimed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match u.remove(&(from, to)) {
            Some(End::Receiver(r)) => r,
            _ => {
                let (s, r) = channel();
                u.insert((from, to), End::Sender(s));
                r
            }
        }
    }

    /// True when `rank`'s endpoint was dropped (or `rank` is no rank of the world).
    fn gone(&self, rank: usize) -> bool {
        self.gone
            .get(rank)
            .is_none_or(|g| g.load(Ordering::Acquire))
    }
}

/// The thread backend: ranks of one process, connected by a channel per pair of ranks that
/// communicate, created on first use, so memory grows with the pairs a plan's groups use (for
/// a ring or doubling over the world, linearly or as n·log n), not with n².
pub struct ThreadTransport {
    rank: usize,
    world: Arc<World>,
    senders: HashMap<usize, Sender<Msg>>,
    receivers: HashMap<usize, Receiver<Msg>>,
}

impl ThreadTransport {
    /// A world of `n` ranks; element `r` is rank `r`'s endpoint.
    pub fn world(n: usize) -> Vec<ThreadTransport> {
        let world = Arc::new(World {
            size: n,
            unclaimed: Mutex::new(HashMap::new()),
            gone: (0..n).map(|_| AtomicBool::new(false)).collect(),
            aborted: AtomicBool::new(false),
        });
        (0..n)
            .map(|rank| ThreadTransport {
                rank,
                world: world.clone(),
                senders: HashMap::new(),
                receivers: HashMap::new(),
            })
            .collect()
    }

    fn aborted(&self) -> bool {
        self.world.aborted.load(Ordering::Relaxed)
    }

    fn post(&mut self, to: usize, msg: Msg) -> Result<(), CommError> {
        if self.aborted() {
            return Err(CommError::Aborted);
        }
        if to >= self.world.size {
            return Err(CommError::Disconnected(to));
        }
        let (world, rank) = (&self.world, self.rank);
        self.senders
            .entry(to)
            .or_insert_with(|| world.sender(rank, to))
            .send(msg)
            .map_err(|_| CommError::Disconnected(to))
    }

    /// The next message from `from`.
    fn next(&mut self, from: usize) -> Result<Msg, CommError> {
        if from >= self.world.size {
            return Err(CommError::Disconnected(from));
        }
        let (world, rank) = (&self.world, self.rank);
        let r = self
            .receivers
            .entry(from)
            .or_insert_with(|| world.receiver(from, rank));
        loop {
            match r.recv_timeout(POLL) {
                Ok(m) => return Ok(m),
                Err(RecvTimeoutError::Timeout) => {
                    if world.aborted.load(Ordering::Relaxed) {
                        return Err(CommError::Aborted);
                    }
                    // Every message `from` sent is in the channel before its gone flag is seen.
                    if world.gone(from) {
                        return r.try_recv().map_err(|_| CommError::Disconnected(from));
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return Err(CommError::Disconnected(from)),
            }
        }
    }
}

impl Drop for ThreadTransport {
    fn drop(&mut self) {
        self.world.gone[self.rank].store(true, Ordering::Release);
    }
}

impl Transport for ThreadTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world.size
    }

    fn send(&mut self, to: usize, msg: Message) -> Result<(), CommError> {
        self.post(to, Msg::Data(msg))
    }

    fn recv(&mut self, from: usize) -> Result<Message, CommError> {
        match self.next(from)? {
            Msg::Data(m) => Ok(m),
            Msg::Loan(loan) => {
                let mut m = Message::pooled(matches!(loan.ptr, LoanPtr::I32(_)), loan.len);
                loan.read(from, Sink::Write(m.as_data_mut()))?;
                Ok(m)
            }
        }
    }

    fn exchange_into(
        &mut self,
        to: usize,
        send: Data<'_>,
        from: usize,
        sink: Sink<'_>,
    ) -> Result<(), CommError> {
        if send.len() * 4 < LOAN_MIN_BYTES {
            return copy_exchange(self, to, send, from, sink);
        }
        let lent = Lent::new(send);
        self.post(to, Msg::Loan(lent.loan.clone()))?;
        let got = match self.next(from) {
            Ok(Msg::Data(m)) => super::put_message(m, from, sink),
            Ok(Msg::Loan(loan)) => loan.read(from, sink),
            Err(e) => Err(e),
        };
        let read = lent.wait(&self.world, to);
        got.and(read)
    }

    fn abort(&self) {
        self.world.aborted.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::comm::DataMut;
    use crate::ir::ReduceOp;

    const BIG: usize = LOAN_MIN_BYTES; // elements: 4x the loan threshold in bytes

    #[test]
    fn loans_are_read_in_place_and_combined() {
        let mut world = ThreadTransport::world(2);
        let mut b = world.pop().unwrap();
        let mut a = world.pop().unwrap();
        let h = std::thread::spawn(move || {
            let send: Vec<f32> = (0..BIG).map(|i| i as f32).collect();
            let mut acc = vec![1.0f32; BIG];
            b.exchange_into(
                0,
                Data::F32(&send),
                0,
                Sink::Combine(DataMut::F32(&mut acc), ReduceOp::Sum),
            )
            .unwrap();
            acc
        });
        let send = vec![2.0f32; BIG];
        let mut got = vec![0.0f32; BIG];
        a.exchange_into(1, Data::F32(&send), 1, Sink::Write(DataMut::F32(&mut got)))
            .unwrap();
        let acc = h.join().unwrap();
        assert!(got.iter().enumerate().all(|(i, &v)| v == i as f32));
        assert!(acc.iter().all(|&v| v == 3.0));
    }

    #[test]
    fn an_unread_loan_ends_on_abort_or_when_the_peer_is_gone() {
        let send = vec![1.0f32; BIG];
        let mut sink = vec![0.0f32; BIG];
        // The peer aborts without reading.
        let mut world = ThreadTransport::world(2);
        let b = world.pop().unwrap();
        let mut a = world.pop().unwrap();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            b.abort();
            b
        });
        let r = a.exchange_into(1, Data::F32(&send), 1, Sink::Write(DataMut::F32(&mut sink)));
        assert_eq!(r, Err(CommError::Aborted));
        drop(h.join().unwrap());
        // The peer's endpoint is dropped without reading.
        let mut world = ThreadTransport::world(2);
        let b = world.pop().unwrap();
        let mut a = world.pop().unwrap();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            drop(b);
        });
        let r = a.exchange_into(1, Data::F32(&send), 1, Sink::Write(DataMut::F32(&mut sink)));
        assert_eq!(r, Err(CommError::Disconnected(1)));
        h.join().unwrap();
    }

    #[test]
    fn a_loan_of_the_wrong_length_is_an_error_on_both_sides() {
        let mut world = ThreadTransport::world(2);
        let mut b = world.pop().unwrap();
        let mut a = world.pop().unwrap();
        let h = std::thread::spawn(move || {
            let send = vec![1.0f32; BIG + 1];
            let mut sink = vec![0.0f32; BIG];
            b.exchange_into(0, Data::F32(&send), 0, Sink::Write(DataMut::F32(&mut sink)))
        });
        let send = vec![1.0f32; BIG];
        let mut sink = vec![0.0f32; BIG];
        let r = a.exchange_into(1, Data::F32(&send), 1, Sink::Write(DataMut::F32(&mut sink)));
        assert_eq!(
            r,
            Err(CommError::Length {
                from: 1,
                got: BIG + 1,
                want: BIG
            })
        );
        assert_eq!(h.join().unwrap(), Ok(()));
    }
}
