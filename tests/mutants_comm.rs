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
