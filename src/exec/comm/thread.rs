//! The thread backend: ranks of one process, each with one mailbox (a channel every rank sends
//! into), so a world of n ranks holds n channels, not n². Large exchanges are loans: the
//! receiver reads the sender's slice in place (one pass over the bytes instead of a copy into a
//! message and a copy out of it), and the sender waits until it has been read.

use super::{copy_exchange, CommError, Data, Message, Sink, Transport};
use std::collections::{HashMap, VecDeque};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
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
    fn wait(&self, aborted: &AtomicBool, to: usize) -> Result<(), CommError> {
        let mut state = self.loan.lock();
        loop {
            if *state == LoanState::Done {
                return Ok(());
            }
            if aborted.load(Ordering::Relaxed) {
                return Err(CommError::Aborted);
            }
            if Arc::strong_count(&self.loan) == 1 {
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

/// What the ranks of one world share: a mailbox sender per rank, a gone flag per rank (set when
/// its endpoint is dropped), and the abort flag.
struct World {
    mailboxes: Vec<Sender<(usize, Msg)>>,
    gone: Vec<AtomicBool>,
    aborted: AtomicBool,
}

/// The thread backend: ranks of one process, one mailbox each.
pub struct ThreadTransport {
    rank: usize,
    world: Arc<World>,
    inbox: Receiver<(usize, Msg)>,
    /// Messages received from ranks other than the one waited for, in arrival order per sender
    /// (created on first use, so memory stays linear in the ranks).
    early: HashMap<usize, VecDeque<Msg>>,
}

impl ThreadTransport {
    /// A world of `n` ranks; element `r` is rank `r`'s endpoint.
    pub fn world(n: usize) -> Vec<ThreadTransport> {
        let (mailboxes, inboxes): (Vec<_>, Vec<_>) = (0..n).map(|_| channel()).unzip();
        let world = Arc::new(World {
            mailboxes,
            gone: (0..n).map(|_| AtomicBool::new(false)).collect(),
            aborted: AtomicBool::new(false),
        });
        inboxes
            .into_iter()
            .enumerate()
            .map(|(rank, inbox)| ThreadTransport {
                rank,
                world: world.clone(),
                inbox,
                early: HashMap::new(),
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
        self.world
            .mailboxes
            .get(to)
            .ok_or(CommError::Disconnected(to))?
            .send((self.rank, msg))
            .map_err(|_| CommError::Disconnected(to))
    }

    /// The next message from `from`; messages from other ranks that arrive first are kept.
    fn next(&mut self, from: usize) -> Result<Msg, CommError> {
        loop {
            if let Some(m) = self.early.get_mut(&from).and_then(VecDeque::pop_front) {
                return Ok(m);
            }
            match self.inbox.recv_timeout(POLL) {
                Ok((f, m)) if f == from => return Ok(m),
                Ok((f, m)) => self.early.entry(f).or_default().push_back(m),
                Err(RecvTimeoutError::Timeout) => {
                    if self.aborted() {
                        return Err(CommError::Aborted);
                    }
                    if self.peer_gone(from) {
                        return self.last_from(from);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return Err(CommError::Disconnected(from)),
            }
        }
    }

    /// True when `from`'s endpoint was dropped (or `from` is no rank of the world).
    fn peer_gone(&self, from: usize) -> bool {
        self.world
            .gone
            .get(from)
            .is_none_or(|g| g.load(Ordering::Acquire))
    }

    /// After `from` is gone: a message it sent before, if any arrived, else `Disconnected`.
    fn last_from(&mut self, from: usize) -> Result<Msg, CommError> {
        loop {
            match self.inbox.try_recv() {
                Ok((f, m)) if f == from => return Ok(m),
                Ok((f, m)) => self.early.entry(f).or_default().push_back(m),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => {
                    return Err(CommError::Disconnected(from))
                }
            }
        }
    }
}

impl Drop for ThreadTransport {
    fn drop(&mut self) {
        // Every message this rank sent is in its peers' mailboxes before the flag is seen.
        self.world.gone[self.rank].store(true, Ordering::Release);
    }
}

impl Transport for ThreadTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world.mailboxes.len()
    }

    fn send(&mut self, to: usize, msg: Message) -> Result<(), CommError> {
        self.post(to, Msg::Data(msg))
    }

    fn recv(&mut self, from: usize) -> Result<Message, CommError> {
        match self.next(from)? {
            Msg::Data(m) => Ok(m),
            Msg::Loan(loan) => {
                let mut m = match loan.ptr {
                    LoanPtr::F32(_) => Message::F32(super::take(loan.len)),
                    LoanPtr::I32(_) => Message::I32(super::take(loan.len)),
                };
                let sink = match &mut m {
                    Message::F32(v) => Sink::Write(super::DataMut::F32(v)),
                    Message::I32(v) => Sink::Write(super::DataMut::I32(v)),
                };
                loan.read(from, sink)?;
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
        let read = lent.wait(&self.world.aborted, to);
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
            b.exchange_into(0, Data::F32(&send), 0, Sink::Combine(DataMut::F32(&mut acc), ReduceOp::Sum))
                .unwrap();
            acc
        });
        let send = vec![2.0f32; BIG];
        let mut got = vec![0.0f32; BIG];
        a.exchange_into(1, Data::F32(&send), 1, Sink::Write(DataMut::F32(&mut got))).unwrap();
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
