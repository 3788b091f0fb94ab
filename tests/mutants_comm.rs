//! The message types of `src/exec/comm/mod.rs`, pinned where its lib tests do not look
//! (cargo-mutants survivors: `len`, `is_empty` and `kind` of messages and their views, which no lib test reads).

use tpc::exec::comm::{Data, DataMut, Message};

/// An empty message, and its borrowed views, report empty; a non-empty one does not.
#[test]
fn empty_messages_and_views_say_so() {
    let mut empty = Message::F32(Vec::new());
    assert!(empty.is_empty() && empty.as_data().is_empty());
    assert!(empty.as_data_mut().is_empty());
    let mut one = Message::I32(vec![7]);
    assert!(!one.is_empty() && !one.as_data().is_empty());
    assert!(!one.as_data_mut().is_empty());
    assert!(Data::F32(&[]).is_empty() && DataMut::I32(&mut []).is_empty());
}

/// Every view names its element type, as the kind errors do.
#[test]
fn messages_and_views_name_their_element_type() {
    let mut f = Message::F32(vec![1.0, 2.0]);
    let mut i = Message::I32(vec![1, 2, 3]);
    assert_eq!((f.kind(), i.kind()), ("f32", "i32"));
    assert_eq!((f.as_data().kind(), i.as_data().kind()), ("f32", "i32"));
    assert_eq!(
        (f.as_data_mut().kind(), i.as_data_mut().kind()),
        ("f32", "i32")
    );
    assert_eq!(
        (f.len(), i.as_data().len(), i.as_data_mut().len()),
        (2, 3, 3)
    );
}

/// A pooled message has the asked length and element type.
#[test]
fn a_pooled_message_has_the_asked_length_and_type() {
    let f = Message::pooled(false, 5);
    let i = Message::pooled(true, 3);
    assert_eq!((f.len(), f.kind()), (5, "f32"));
    assert_eq!((i.len(), i.kind()), (3, "i32"));
}

/// A transport that implements only the required methods, so the collectives go through the
/// trait's default `exchange` and `exchange_into` (both real backends override them).
struct Plain(tpc::exec::comm::ThreadTransport);

impl tpc::exec::comm::Transport for Plain {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world(&self) -> usize {
        self.0.world()
    }
    fn send(&mut self, to: usize, msg: Message) -> Result<(), tpc::exec::comm::CommError> {
        self.0.send(to, msg)
    }
    fn recv(&mut self, from: usize) -> Result<Message, tpc::exec::comm::CommError> {
        self.0.recv(from)
    }
    fn abort(&self) {
        self.0.abort()
    }
}

/// Every rank's all-reduced (sum) buffer of `len` elements over `n` ranks through [`Plain`],
/// rank r contributing `r + i` at element i, and its all-gather of `[r]`.
fn through_defaults(n: usize, len: usize) -> Vec<(Vec<f32>, Vec<i32>)> {
    use tpc::exec::comm::{all_gather, all_reduce, ThreadTransport};
    let group: Vec<usize> = (0..n).collect();
    let ranks: Vec<Plain> = ThreadTransport::world(n).into_iter().map(Plain).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|mut t| {
                let group = &group;
                s.spawn(move || {
                    let r = tpc::exec::comm::Transport::rank(&t);
                    let mut data: Vec<f32> = (0..len).map(|i| (r + i) as f32).collect();
                    all_reduce(&mut t, group, &mut data, tpc::ir::ReduceOp::Sum).unwrap();
                    let gathered = all_gather(&mut t, group, &[r as i32]).unwrap();
                    (data, gathered)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The collectives are right over the trait's default exchanges: ring (3 ranks), recursive
/// doubling (4 ranks, small) and halving-doubling (4 ranks, large) all-reduces, and the ring
/// all-gather (a default `exchange_into` that received nothing survived the suite).
#[test]
fn collectives_over_the_default_exchanges() {
    for (n, len) in [(3, 10), (4, 10), (4, 100_000)] {
        for (data, gathered) in through_defaults(n, len) {
            let base: usize = (0..n).sum();
            for (i, x) in data.iter().enumerate() {
                assert_eq!(
                    *x,
                    (base + n * i) as f32,
                    "{n} ranks, {len} elements, at {i}"
                );
            }
            assert_eq!(gathered, (0..n as i32).collect::<Vec<_>>());
        }
    }
}
