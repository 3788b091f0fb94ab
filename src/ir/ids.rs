//! Typed entity ids. Their Display matches the text IR: `%7` for values, `n7` for nodes.

use serde::{Deserialize, Serialize};
use std::fmt;

/// An id that names one entry of a dense per-entity table (see `IdVec`).
pub trait EntityId: Copy {
    /// The id as an index into its table.
    fn index(self) -> usize;
    /// The id of the entry at `index`.
    fn new(index: usize) -> Self;
}

macro_rules! entity_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub u32);

        impl $name {
            /// The id as an index into its graph's table.
            pub fn index(self) -> usize {
                self.0 as usize
            }
        }

        impl EntityId for $name {
            fn index(self) -> usize {
                self.0 as usize
            }
            fn new(index: usize) -> Self {
                $name(u32::try_from(index).expect("entity index fits in u32"))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

entity_id!(
    /// A value (one output of one node); printed `%7`.
    ValueId,
    "%"
);
entity_id!(
    /// A node (one op application); printed `n7`.
    NodeId,
    "n"
);
entity_id!(
    /// A region: the root program or one block instance; printed `r7`.
    RegionId,
    "r"
);
