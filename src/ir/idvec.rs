//! `IdVec<K, V>`: a side table indexed by a typed entity id, one entry per entity of a graph.

use super::ids::EntityId;
use serde::{Deserialize, Serialize};
use std::marker::PhantomData;
use std::ops::{Index, IndexMut};

/// A dense table with one `V` per entity `K`; indexing needs the right id type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IdVec<K, V> {
    items: Vec<V>,
    #[serde(skip)]
    key: PhantomData<fn(K) -> K>,
}

impl<K: EntityId, V> IdVec<K, V> {
    /// Wraps `items` as is; entry `i` belongs to the entity with index `i`.
    pub fn from_vec(items: Vec<V>) -> Self {
        IdVec {
            items,
            key: PhantomData,
        }
    }

    /// A table of `n` copies of `v`.
    pub fn filled(n: usize, v: V) -> Self
    where
        V: Clone,
    {
        Self::from_vec(vec![v; n])
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the table has no entries.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The entry of `k`, if `k` is in range.
    pub fn get(&self, k: K) -> Option<&V> {
        self.items.get(k.index())
    }

    /// The entries in id order, with their ids.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (K, &V)> + '_ {
        self.items.iter().enumerate().map(|(i, v)| (K::new(i), v))
    }

    /// The entries in id order, without their ids.
    pub fn values(&self) -> std::slice::Iter<'_, V> {
        self.items.iter()
    }

    /// Appends the entry of the next id and returns that id.
    pub fn push(&mut self, v: V) -> K {
        self.items.push(v);
        K::new(self.items.len() - 1)
    }

    /// The underlying vector, entry `i` for the entity with index `i`.
    pub fn into_vec(self) -> Vec<V> {
        self.items
    }
}

impl<K: EntityId, V> Default for IdVec<K, V> {
    fn default() -> Self {
        Self::from_vec(Vec::new())
    }
}

impl<K: EntityId, V> Index<K> for IdVec<K, V> {
    type Output = V;
    fn index(&self, k: K) -> &V {
        &self.items[k.index()]
    }
}

impl<K: EntityId, V> IndexMut<K> for IdVec<K, V> {
    fn index_mut(&mut self, k: K) -> &mut V {
        &mut self.items[k.index()]
    }
}

impl<K: EntityId, V> FromIterator<V> for IdVec<K, V> {
    fn from_iter<I: IntoIterator<Item = V>>(iter: I) -> Self {
        Self::from_vec(iter.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::ValueId;

    #[test]
    fn indexes_by_typed_id() {
        let mut t: IdVec<ValueId, u8> = IdVec::from_vec(vec![1, 2]);
        t[ValueId::new(1)] = 5;
        assert_eq!(
            t.iter().collect::<Vec<_>>(),
            vec![(ValueId::new(0), &1), (ValueId::new(1), &5)]
        );
        assert_eq!(t.get(ValueId::new(2)), None);
    }

    #[test]
    fn serializes_as_a_plain_array() {
        let t: IdVec<ValueId, Option<u32>> = IdVec::from_vec(vec![Some(3), None]);
        let s = serde_json::to_string(&t).unwrap();
        assert_eq!(s, "[3,null]");
        let back: IdVec<ValueId, Option<u32>> = serde_json::from_str(&s).unwrap();
        assert_eq!(back, t);
    }
}
