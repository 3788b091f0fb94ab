//! Typed entity ids. Their Display matches the text IR: `%7` for values, `n7` for nodes.
//!
//! Every id names an entity of one program, and its type says which: a plan holds the global
//! program ([`Global`], the default) and the SPMD program every device runs ([`Local`]), and
//! tables of one are indexed by ids of that one only. An id never changes program; a table that
//! relates the two (a local value's origin) holds ids of both.
//!
//! ```compile_fail
//! use tpc::ir::{IdVec, Local, ValueId};
//! let placements: IdVec<ValueId<Local>, u8> = IdVec::from_vec(vec![0]);
//! let global: ValueId = ValueId::new(0);
//! let _ = placements[global]; // a global id does not index a local table
//! ```

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;

mod sealed {
    /// Only the two programs of a plan are spaces.
    pub trait Sealed {}
    impl Sealed for super::Global {}
    impl Sealed for super::Local {}
}

/// The program an id belongs to: [`Global`] or [`Local`]. A zero-sized, uninhabited marker.
pub trait Space:
    sealed::Sealed + Copy + Eq + Ord + Hash + fmt::Debug + Send + Sync + 'static
{
}

/// The global (unsharded) program: what the source means and the reference runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Global {}

/// The SPMD program every device runs, on local shapes, with its collectives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Local {}

impl Space for Global {}
impl Space for Local {}

/// An id that names one entry of a dense per-entity table (see `IdVec`).
pub trait EntityId: Copy {
    /// The id as an index into its table.
    fn index(self) -> usize;
    /// The id of the entry at `index`.
    fn new(index: usize) -> Self;
}

// The trait impls are written out, not derived: a derive would require them of the marker.
macro_rules! entity_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        pub struct $name<S = Global>(pub u32, PhantomData<fn() -> S>);

        impl<S> $name<S> {
            /// The id of the entry at `index` of its program's table.
            pub fn new(index: usize) -> Self {
                $name(
                    u32::try_from(index).expect("entity index fits in u32"),
                    PhantomData,
                )
            }

            /// The id as an index into its graph's table.
            pub fn index(self) -> usize {
                self.0 as usize
            }
        }

        impl<S> EntityId for $name<S> {
            fn index(self) -> usize {
                self.0 as usize
            }
            fn new(index: usize) -> Self {
                $name::new(index)
            }
        }

        impl<S> Clone for $name<S> {
            fn clone(&self) -> Self {
                *self
            }
        }

        impl<S> Copy for $name<S> {}

        impl<S> PartialEq for $name<S> {
            fn eq(&self, other: &Self) -> bool {
                self.0 == other.0
            }
        }

        impl<S> Eq for $name<S> {}

        impl<S> PartialOrd for $name<S> {
            fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
                Some(self.cmp(other))
            }
        }

        impl<S> Ord for $name<S> {
            fn cmp(&self, other: &Self) -> Ordering {
                self.0.cmp(&other.0)
            }
        }

        impl<S> Hash for $name<S> {
            fn hash<H: Hasher>(&self, h: &mut H) {
                self.0.hash(h)
            }
        }

        impl<S> fmt::Debug for $name<S> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_tuple(stringify!($name)).field(&self.0).finish()
            }
        }

        impl<S> fmt::Display for $name<S> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }

        impl<S> Serialize for $name<S> {
            fn serialize<Z: Serializer>(&self, s: Z) -> Result<Z::Ok, Z::Error> {
                self.0.serialize(s)
            }
        }

        impl<'de, S> Deserialize<'de> for $name<S> {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                u32::deserialize(d).map(|n| $name(n, PhantomData))
            }
        }
    };
}

entity_id!(
    /// A value (one output of one node) of program `S`; printed `%7`.
    ValueId,
    "%"
);
entity_id!(
    /// A node (one op application) of program `S`; printed `n7`.
    NodeId,
    "n"
);
entity_id!(
    /// A region of program `S`: the root program or one block instance; printed `r7`.
    RegionId,
    "r"
);
