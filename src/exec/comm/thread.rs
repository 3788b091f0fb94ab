//! The thread backend: ranks of one process connected by channels. Large exchanges are loans:
//! the receiver reads the sender's slice in place (one pass over the bytes instead of a copy
//! into a message and a copy out of it), and the sender waits until it has been read.

use super::{copy_exchange, CommError, Sink, Transport};
use crate::exec::kernels::take_f32;
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
    Data(Vec<f32>),
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

/// A slice lent by a rank blocked in `exchange_into`.
///
/// Invariant: while the state is `Pending` the lender is inside `exchange_into` with the slice
/// borrowed (shared) and does not return before the state is `Done` or it has set `Cancelled`,
/// both under the lock. The borrower reads only under the lock while `Pending`, so every read
/// happens inside the lender's borrow.
struct Loan {
    ptr: *const f32,
    len: usize,
    state: Mutex<LoanState>,
    read: Condvar,
}

// SAFETY: the pointer is only dereferenced under the invariant above (a shared borrow that the
// lender keeps alive while the loan is pending); f32 is Sync.
unsafe impl Send for Loan {}
// SAFETY: as for Send; the state is behind a mutex.
unsafe impl Sync for Loan {}

impl Loan {
    fn lock(&self) -> MutexGuard<'_, LoanState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads the lent slice into `sink` (of the same length) unless the lender cancelled.
    fn read(&self, from: usize, sink: Sink<'_>) -> Result<(), CommError> {
        let mut state = self.lock();
        if *state != LoanState::Pending {
            return Err(CommError::Aborted);
        }
        let result = if self.len == sink.expected_len() {
            // SAFETY: the loan is pending and we hold its lock (see the invariant on `Loan`).
            let src = unsafe { std::slice::from_raw_parts(self.ptr, self.len) };
            sink.put(src);
            Ok(())
        } else {
            Err(CommError::Length {
                from,
                got: self.len,
                want: sink.expected_len(),
            })
        };
        *state = LoanState::Done;
        self.read.notify_all();
        result
    }
}

/// The lender's side of a loan: waits for the read, and cancels the loan when dropped unread.
struct Lent(Arc<Loan>);

impl Lent {
    fn new(src: &[f32]) -> Self {
        Lent(Arc::new(Loan {
            ptr: src.as_ptr(),
            len: src.len(),
            state: Mutex::new(LoanState::Pending),
            read: Condvar::new(),
        }))
    }

    /// Waits until the borrower has read the loan; gives up when the world aborts or the
    /// borrower can no longer read it (its endpoint is gone).
    fn wait(&self, aborted: &AtomicBool, to: usize) -> Result<(), CommError> {
        let mut state = self.0.lock();
        loop {
            if *state == LoanState::Done {
                return Ok(());
            }
            if aborted.load(Ordering::Relaxed) {
                return Err(CommError::Aborted);
            }
            if Arc::strong_count(&self.0) == 1 {
                return Err(CommError::Disconnected(to));
            }
            state = (self.0.read)
                .wait_timeout(state, POLL)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        if *state == LoanState::Pending {
            *state = LoanState::Cancelled;
        }
    }
}

/// The thread backend: ranks of one process connected by channels.
pub struct ThreadTransport {
    rank: usize,
    senders: Vec<Sender<Msg>>,
    receivers: Vec<Receiver<Msg>>,
    aborted: Arc<AtomicBool>,
}

impl ThreadTransport {
    /// A fully connected world of `n` ranks; element `r` is rank `r`'s endpoint.
    pub fn world(n: usize) -> Vec<ThreadTransport> {
        let aborted = Arc::new(AtomicBool::new(false));
        let mut senders: Vec<Vec<Sender<Msg>>> = (0..n).map(|_| Vec::new()).collect();
        let mut receivers: Vec<Vec<Receiver<Msg>>> = (0..n).map(|_| Vec::new()).collect();
        // senders[from][to] pairs with receivers[to][from].
        for sends in senders.iter_mut() {
            for recvs in receivers.iter_mut() {
                let (s, r) = channel();
                sends.push(s);
                recvs.push(r);
            }
        }
        senders
            .into_iter()
            .zip(receivers)
            .enumerate()
            .map(|(rank, (senders, receivers))| ThreadTransport {
                rank,
                senders,
                receivers,
                aborted: aborted.clone(),
            })
            .collect()
    }

    fn post(&mut self, to: usize, msg: Msg) -> Result<(), CommError> {
        if self.aborted.load(Ordering::Relaxed) {
            return Err(CommError::Aborted);
        }
        self.senders[to]
            .send(msg)
            .map_err(|_| CommError::Disconnected(to))
    }

    fn next(&mut self, from: usize) -> Result<Msg, CommError> {
        loop {
            match self.receivers[from].recv_timeout(POLL) {
                Ok(m) => return Ok(m),
                Err(RecvTimeoutError::Timeout) => {
                    if self.aborted.load(Ordering::Relaxed) {
                        return Err(CommError::Aborted);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return Err(CommError::Disconnected(from)),
            }
        }
    }
}

impl Transport for ThreadTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.senders.len()
    }

    fn send(&mut self, to: usize, data: Vec<f32>) -> Result<(), CommError> {
        self.post(to, Msg::Data(data))
    }

    fn recv(&mut self, from: usize) -> Result<Vec<f32>, CommError> {
        match self.next(from)? {
            Msg::Data(v) => Ok(v),
            Msg::Loan(loan) => {
                let mut v = take_f32(loan.len);
                loan.read(from, Sink::Write(&mut v))?;
                Ok(v)
            }
        }
    }

    fn exchange_into(
        &mut self,
        to: usize,
        send: &[f32],
        from: usize,
        sink: Sink<'_>,
    ) -> Result<(), CommError> {
        if send.len() * 4 < LOAN_MIN_BYTES {
            return copy_exchange(self, to, send, from, sink);
        }
        let lent = Lent::new(send);
        self.post(to, Msg::Loan(lent.0.clone()))?;
        let got = match self.next(from) {
            Ok(Msg::Data(v)) => super::put_message(v, from, sink),
            Ok(Msg::Loan(loan)) => loan.read(from, sink),
            Err(e) => Err(e),
        };
        let read = lent.wait(&self.aborted, to);
        got.and(read)
    }

    fn abort(&self) {
        self.aborted.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
            b.exchange_into(0, &send, 0, Sink::Combine(&mut acc, ReduceOp::Sum))
                .unwrap();
            acc
        });
        let send = vec![2.0f32; BIG];
        let mut got = vec![0.0f32; BIG];
        a.exchange_into(1, &send, 1, Sink::Write(&mut got)).unwrap();
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
        let r = a.exchange_into(1, &send, 1, Sink::Write(&mut sink));
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
        let r = a.exchange_into(1, &send, 1, Sink::Write(&mut sink));
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
            b.exchange_into(0, &send, 0, Sink::Write(&mut sink))
        });
        let send = vec![1.0f32; BIG];
        let mut sink = vec![0.0f32; BIG];
        let r = a.exchange_into(1, &send, 1, Sink::Write(&mut sink));
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
