//! A first-fit allocator of `u64` numbers in ranges: the root's pool pages
//! and its own object selectors.

use alloc::vec::Vec;
use core::ops::Range;

/// Free numbers as sorted, disjoint, non-adjacent ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeAllocator {
    free: Vec<Range<u64>>,
}

/// A free of numbers that were (partly) free already.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DoubleFree(pub Range<u64>);

impl RangeAllocator {
    pub fn new(all: Range<u64>) -> Self {
        let mut free = Vec::new();
        if all.start < all.end {
            free.push(all);
        }
        Self { free }
    }

    /// How many numbers are free.
    pub fn available(&self) -> u64 {
        self.free.iter().map(|r| r.end - r.start).sum()
    }

    /// The start of the first free run of `count` numbers.
    pub fn alloc(&mut self, count: u64) -> Option<u64> {
        if count == 0 {
            return None;
        }
        let i = self.free.iter().position(|r| r.end - r.start >= count)?;
        Some(self.take(i, count).start)
    }

    /// The first free run of `count` numbers starting at a multiple of
    /// `align` (a power of two), splitting a free range around it.
    pub fn alloc_aligned(&mut self, count: u64, align: u64) -> Option<u64> {
        if count == 0 || !align.is_power_of_two() {
            return None;
        }
        let (i, start) = self.free.iter().enumerate().find_map(|(i, r)| {
            let start = r.start.checked_next_multiple_of(align)?;
            (start.checked_add(count)? <= r.end).then_some((i, start))
        })?;
        let range = self.free[i].clone();
        let before = range.start..start;
        let after = start + count..range.end;
        self.free.remove(i);
        for (offset, piece) in [before, after]
            .into_iter()
            .filter(|p| p.start < p.end)
            .enumerate()
        {
            self.free.insert(i + offset, piece);
        }
        Some(start)
    }

    /// The first free run, cut to at most `max` numbers.
    pub fn alloc_upto(&mut self, max: u64) -> Option<Range<u64>> {
        if max == 0 || self.free.is_empty() {
            return None;
        }
        let len = (self.free[0].end - self.free[0].start).min(max);
        Some(self.take(0, len))
    }

    fn take(&mut self, i: usize, count: u64) -> Range<u64> {
        let range = &mut self.free[i];
        let taken = range.start..range.start + count;
        range.start += count;
        if range.start == range.end {
            self.free.remove(i);
        }
        taken
    }

    /// Gives `range` back.
    pub fn free(&mut self, range: Range<u64>) -> Result<(), DoubleFree> {
        if range.start >= range.end {
            return Ok(());
        }
        let i = self.free.partition_point(|r| r.end <= range.start);
        if self.free.get(i).is_some_and(|next| next.start < range.end) {
            return Err(DoubleFree(range));
        }
        let merge_prev = i > 0 && self.free[i - 1].end == range.start;
        let merge_next = self.free.get(i).is_some_and(|next| next.start == range.end);
        match (merge_prev, merge_next) {
            (true, true) => {
                self.free[i - 1].end = self.free[i].end;
                self.free.remove(i);
            }
            (true, false) => self.free[i - 1].end = range.end,
            (false, true) => self.free[i].start = range.start,
            (false, false) => self.free.insert(i, range),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_and_merging() {
        let mut a = RangeAllocator::new(100..110);
        assert_eq!(a.alloc(3), Some(100));
        assert_eq!(a.alloc(3), Some(103));
        assert_eq!(a.alloc(5), None);
        assert_eq!(a.alloc(4), Some(106));
        assert_eq!(a.available(), 0);
        assert_eq!(a.alloc_upto(1), None);
        a.free(103..106).unwrap();
        a.free(100..103).unwrap();
        a.free(106..110).unwrap();
        assert_eq!(a, RangeAllocator::new(100..110));
    }

    #[test]
    fn runs_cut_to_what_is_free() {
        let mut a = RangeAllocator::new(0..10);
        assert_eq!(a.alloc(2), Some(0));
        assert_eq!(a.alloc(2), Some(2));
        a.free(0..2).unwrap();
        assert_eq!(a.alloc_upto(5), Some(0..2));
        assert_eq!(a.alloc_upto(5), Some(4..9));
        assert_eq!(a.alloc_upto(5), Some(9..10));
        assert_eq!(a.alloc(0), None);
    }

    #[test]
    fn aligned_runs_split_the_range_they_come_from() {
        let mut a = RangeAllocator::new(3..40);
        assert_eq!(a.alloc_aligned(8, 8), Some(8));
        assert_eq!(a.alloc_aligned(8, 8), Some(16));
        assert_eq!(a.alloc_aligned(24, 8), None, "24..40 holds only 16");
        assert_eq!(
            a.alloc_aligned(8, 16),
            Some(32),
            "24 is not a multiple of 16"
        );
        assert_eq!(a.available(), 5 + 8);
        assert_eq!(a.alloc(5), Some(3), "what came before the first run");
        assert_eq!(a.alloc_aligned(1, 3), None, "not a power of two");
        a.free(8..24).unwrap();
        a.free(32..40).unwrap();
        a.free(3..8).unwrap();
        assert_eq!(a, RangeAllocator::new(3..40));
    }

    #[test]
    fn double_frees_are_refused() {
        let mut a = RangeAllocator::new(0..10);
        a.alloc(4).unwrap();
        assert_eq!(a.free(3..5), Err(DoubleFree(3..5)));
        assert_eq!(a.free(5..6), Err(DoubleFree(5..6)));
        a.free(1..3).unwrap();
        assert_eq!(a.free(0..2), Err(DoubleFree(0..2)));
        assert_eq!(a.available(), 8);
        assert_eq!(RangeAllocator::new(5..5).available(), 0);
    }
}
