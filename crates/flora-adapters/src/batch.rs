//! `AdapterBatch`: the plain-data description of which adapter applies to each row of a batch.
//!
//! A row is one token. Consecutive rows that share a slot form a [`Segment`]; kernels work per
//! segment (a prefill chunk of one sequence, a run of decode tokens of sequences that share an
//! adapter, ...). Slots index the [`crate::LayerAdapters`] table of a projection.

/// Index of an adapter in a projection's slot table.
pub type SlotId = u32;

/// Consecutive rows `[start, start + len)` that use the same slot (`None`: base model only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub start: usize,
    pub len: usize,
    pub slot: Option<SlotId>,
}

impl Segment {
    pub fn rows(&self) -> std::ops::Range<usize> {
        self.start..self.start + self.len
    }
}

/// Per-row adapter slots of a batch, and their run-length segments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterBatch {
    row_slots: Vec<Option<SlotId>>,
    segments: Vec<Segment>,
}

impl AdapterBatch {
    /// From one slot per row; consecutive equal slots are merged into segments.
    pub fn from_row_slots(row_slots: Vec<Option<SlotId>>) -> Self {
        let mut segments: Vec<Segment> = Vec::new();
        for (row, &slot) in row_slots.iter().enumerate() {
            match segments.last_mut() {
                Some(seg) if seg.slot == slot => seg.len += 1,
                _ => segments.push(Segment { start: row, len: 1, slot }),
            }
        }
        Self { row_slots, segments }
    }

    /// From `(n_rows, slot)` runs, e.g. one per sequence of a step (sequences of equal slot
    /// that follow each other are merged).
    pub fn from_runs(runs: &[(usize, Option<SlotId>)]) -> Self {
        let rows = runs.iter().flat_map(|&(n, slot)| std::iter::repeat_n(slot, n)).collect();
        Self::from_row_slots(rows)
    }

    /// `n_rows` rows that all use the base model.
    pub fn base_only(n_rows: usize) -> Self {
        Self::from_row_slots(vec![None; n_rows])
    }

    /// `n_rows` rows that all use `slot`.
    pub fn uniform(n_rows: usize, slot: SlotId) -> Self {
        Self::from_row_slots(vec![Some(slot); n_rows])
    }

    pub fn n_rows(&self) -> usize {
        self.row_slots.len()
    }

    pub fn row_slots(&self) -> &[Option<SlotId>] {
        &self.row_slots
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Whether no row uses an adapter.
    pub fn is_base_only(&self) -> bool {
        self.row_slots.iter().all(Option::is_none)
    }

    /// Largest slot id used, if any.
    pub fn max_slot(&self) -> Option<SlotId> {
        self.row_slots.iter().flatten().copied().max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_merge_equal_neighbours() {
        let b = AdapterBatch::from_row_slots(vec![Some(1), Some(1), None, None, Some(2), Some(1)]);
        assert_eq!(
            b.segments(),
            &[
                Segment { start: 0, len: 2, slot: Some(1) },
                Segment { start: 2, len: 2, slot: None },
                Segment { start: 4, len: 1, slot: Some(2) },
                Segment { start: 5, len: 1, slot: Some(1) },
            ]
        );
        assert_eq!(AdapterBatch::from_runs(&[(2, Some(1)), (2, None), (1, Some(2)), (1, Some(1))]), b);
        assert!(AdapterBatch::base_only(3).is_base_only());
        assert_eq!(AdapterBatch::from_row_slots(vec![]).segments().len(), 0);
    }
}
