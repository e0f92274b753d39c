//! Fixed-priority run queues, FIFO within a priority.
//!
//! One queue per priority and a 64-bit bitmap with bit `p` set while queue
//! `p` is non-empty, so the highest ready priority is one `leading_zeros`.

use alloc::collections::VecDeque;
use core::fmt;

/// Priorities run from 0 (lowest) to `PRIORITIES - 1` (highest).
pub const PRIORITIES: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedError {
    /// The priority is not below [`PRIORITIES`].
    BadPriority(u8),
    /// The item is already in a run queue.
    AlreadyQueued,
    /// The queue could not grow.
    OutOfMemory,
}

impl fmt::Display for SchedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::BadPriority(p) => write!(f, "priority {p} out of range (0..{PRIORITIES})"),
            Self::AlreadyQueued => write!(f, "already in a run queue"),
            Self::OutOfMemory => write!(f, "out of memory for the run queue"),
        }
    }
}

pub struct RunQueues<T> {
    queues: [VecDeque<T>; PRIORITIES],
    /// Bit `p` is set exactly when `queues[p]` is non-empty.
    ready: u64,
    len: usize,
    /// Items that may be queued at each priority ([`reserve`](Self::reserve)):
    /// each queue's capacity is at least this, so queueing one of them
    /// never allocates — an item cannot fall off every queue for want of
    /// memory.
    reserved: [usize; PRIORITIES],
}

impl<T: Copy + Eq> Default for RunQueues<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Copy + Eq> RunQueues<T> {
    pub fn new() -> Self {
        Self {
            queues: core::array::from_fn(|_| VecDeque::new()),
            ready: 0,
            len: 0,
            reserved: [0; PRIORITIES],
        }
    }

    /// Room for one more item at `priority`, for as long as it exists
    /// (until [`release`](Self::release)): the kernel reserves when it
    /// creates an SC, so making the SC ready later cannot fail.
    pub fn reserve(&mut self, priority: u8) -> Result<(), SchedError> {
        let p = usize::from(priority);
        let (Some(queue), Some(reserved)) = (self.queues.get_mut(p), self.reserved.get_mut(p))
        else {
            return Err(SchedError::BadPriority(priority));
        };
        let want = *reserved + 1;
        queue
            .try_reserve(want.saturating_sub(queue.len()))
            .map_err(|_| SchedError::OutOfMemory)?;
        *reserved = want;
        Ok(())
    }

    /// The item that [`reserve`](Self::reserve) made room for is gone.
    pub fn release(&mut self, priority: u8) {
        if let Some(reserved) = self.reserved.get_mut(usize::from(priority)) {
            *reserved = reserved.saturating_sub(1);
        }
    }

    /// Queues `item` behind everything else at `priority`.
    pub fn enqueue(&mut self, item: T, priority: u8) -> Result<(), SchedError> {
        self.queue_for(item, priority)?.push_back(item);
        self.mark_ready(priority);
        Ok(())
    }

    /// Queues `item` ahead of everything else at `priority`: for a preempted
    /// item with budget left.
    pub fn enqueue_front(&mut self, item: T, priority: u8) -> Result<(), SchedError> {
        self.queue_for(item, priority)?.push_front(item);
        self.mark_ready(priority);
        Ok(())
    }

    /// Removes and returns the head of the highest non-empty priority.
    pub fn pick(&mut self) -> Option<(T, u8)> {
        let priority = self.peek_priority()?;
        let queue = self.queues.get_mut(usize::from(priority))?;
        let item = queue.pop_front()?;
        if queue.is_empty() {
            self.ready &= !(1 << priority);
        }
        self.len -= 1;
        Some((item, priority))
    }

    /// The highest priority with a queued item.
    pub fn peek_priority(&self) -> Option<u8> {
        // At most 63, so the cast is exact.
        self.ready.checked_ilog2().map(|p| p as u8)
    }

    /// Takes `item` out of its queue; false if it was not queued.
    pub fn remove(&mut self, item: T) -> bool {
        let mut ready = self.ready;
        while let Some(p) = ready.checked_ilog2() {
            ready &= !(1 << p);
            let Some(queue) = self.queues.get_mut(p as usize) else {
                continue;
            };
            if let Some(index) = queue.iter().position(|&queued| queued == item) {
                queue.remove(index);
                if queue.is_empty() {
                    self.ready &= !(1 << p);
                }
                self.len -= 1;
                return true;
            }
        }
        false
    }

    pub fn contains(&self, item: T) -> bool {
        let mut ready = self.ready;
        while let Some(p) = ready.checked_ilog2() {
            ready &= !(1 << p);
            if self
                .queues
                .get(p as usize)
                .is_some_and(|queue| queue.contains(&item))
            {
                return true;
            }
        }
        false
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Every queued item with its priority, highest priority first, FIFO
    /// within one (the order [`pick`](Self::pick) takes them); for the
    /// kernel's state dump.
    pub fn iter(&self) -> impl Iterator<Item = (u8, T)> + '_ {
        (0..PRIORITIES as u8)
            .rev()
            .filter(|&p| self.ready & (1 << p) != 0)
            .flat_map(move |p| self.queues[usize::from(p)].iter().map(move |&t| (p, t)))
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The queue `item` may join at `priority`, with room for one more.
    fn queue_for(&mut self, item: T, priority: u8) -> Result<&mut VecDeque<T>, SchedError> {
        if usize::from(priority) >= PRIORITIES {
            return Err(SchedError::BadPriority(priority));
        }
        if self.contains(item) {
            return Err(SchedError::AlreadyQueued);
        }
        let queue = self
            .queues
            .get_mut(usize::from(priority))
            .ok_or(SchedError::BadPriority(priority))?;
        queue.try_reserve(1).map_err(|_| SchedError::OutOfMemory)?;
        Ok(queue)
    }

    /// Called after an item joined the (valid) queue at `priority`.
    fn mark_ready(&mut self, priority: u8) {
        self.ready |= 1 << priority;
        self.len += 1;
    }
}

/// Time left of a scheduling context's quantum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub quantum: u64,
    pub left: u64,
}

impl Budget {
    /// A full budget.
    pub const fn new(quantum: u64) -> Self {
        Self {
            quantum,
            left: quantum,
        }
    }

    /// Takes `used` off what is left; true once nothing is left.
    pub fn charge(&mut self, used: u64) -> bool {
        self.left = self.left.saturating_sub(used);
        self.left == 0
    }

    pub fn replenish(&mut self) {
        self.left = self.quantum;
    }

    pub const fn is_expired(&self) -> bool {
        self.left == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    fn drain(rq: &mut RunQueues<u32>) -> Vec<(u32, u8)> {
        core::iter::from_fn(|| rq.pick()).collect()
    }

    #[test]
    fn reserved_items_queue_without_growing() {
        let mut rq = RunQueues::new();
        for _ in 0..5 {
            rq.reserve(7).unwrap();
        }
        assert_eq!(rq.reserve(64), Err(SchedError::BadPriority(64)));
        let capacity = rq.queues[7].capacity();
        assert!(capacity >= 5);
        for item in 0..5u32 {
            rq.enqueue(item, 7).unwrap();
        }
        // Queueing what was reserved did not reallocate.
        assert_eq!(rq.queues[7].capacity(), capacity);
        rq.release(7);
        rq.release(7);
        assert_eq!(rq.reserved[7], 3);
    }

    #[test]
    fn highest_priority_first_fifo_within() {
        let mut rq = RunQueues::new();
        assert!(rq.is_empty());
        assert_eq!(rq.pick(), None);
        assert_eq!(rq.peek_priority(), None);
        for (item, priority) in [(1, 5), (2, 63), (3, 0), (4, 5), (5, 63), (6, 5)] {
            rq.enqueue(item, priority).unwrap();
        }
        assert_eq!(rq.len(), 6);
        assert_eq!(rq.peek_priority(), Some(63));
        assert_eq!(
            drain(&mut rq),
            [(2, 63), (5, 63), (1, 5), (4, 5), (6, 5), (3, 0)]
        );
        assert!(rq.is_empty());
        assert_eq!(rq.ready, 0);
        assert_eq!(rq.peek_priority(), None);
    }

    #[test]
    fn round_robin_by_requeueing_at_the_tail() {
        let mut rq = RunQueues::new();
        for item in 0..3 {
            rq.enqueue(item, 10).unwrap();
        }
        rq.enqueue(9, 2).unwrap();
        let mut order = Vec::new();
        for _ in 0..7 {
            let (item, priority) = rq.pick().unwrap();
            order.push(item);
            rq.enqueue(item, priority).unwrap();
        }
        assert_eq!(order, [0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(rq.len(), 4);
    }

    #[test]
    fn enqueue_front_resumes_first() {
        let mut rq = RunQueues::new();
        rq.enqueue(1, 7).unwrap();
        rq.enqueue(2, 7).unwrap();
        rq.enqueue_front(3, 7).unwrap();
        rq.enqueue_front(4, 8).unwrap();
        assert_eq!(drain(&mut rq), [(4, 8), (3, 7), (1, 7), (2, 7)]);
    }

    #[test]
    fn remove_from_the_middle_and_bitmap_upkeep() {
        let mut rq = RunQueues::new();
        for item in 1..=3 {
            rq.enqueue(item, 20).unwrap();
        }
        rq.enqueue(4, 40).unwrap();
        assert!(rq.remove(2));
        assert!(!rq.remove(2));
        assert!(!rq.contains(2));
        assert_eq!(rq.len(), 3);
        assert!(rq.remove(4));
        assert_eq!(rq.peek_priority(), Some(20));
        assert_eq!(rq.ready, 1 << 20);
        assert_eq!(drain(&mut rq), [(1, 20), (3, 20)]);
        assert_eq!(rq.ready, 0);
        assert!(!rq.remove(1));

        rq.enqueue(5, 0).unwrap();
        assert_eq!(rq.peek_priority(), Some(0));
        assert!(rq.remove(5));
        assert_eq!(rq.peek_priority(), None);
        assert!(rq.is_empty());
    }

    #[test]
    fn iter_shows_the_pick_order_without_taking() {
        let mut rq = RunQueues::new();
        rq.enqueue(1u32, 3).unwrap();
        rq.enqueue(2, 40).unwrap();
        rq.enqueue(3, 3).unwrap();
        rq.enqueue_front(4, 40).unwrap();
        let shown: Vec<(u8, u32)> = rq.iter().collect();
        assert_eq!(shown, [(40, 4), (40, 2), (3, 1), (3, 3)]);
        assert_eq!(rq.len(), 4);
        let picked: Vec<(u8, u32)> = drain(&mut rq).into_iter().map(|(t, p)| (p, t)).collect();
        assert_eq!(picked, shown);
        assert_eq!(rq.iter().count(), 0);
    }

    #[test]
    fn bad_priority_and_duplicates() {
        let mut rq = RunQueues::new();
        assert_eq!(rq.enqueue(1, 64), Err(SchedError::BadPriority(64)));
        assert_eq!(rq.enqueue_front(1, 255), Err(SchedError::BadPriority(255)));
        assert!(rq.is_empty());
        rq.enqueue(1, 3).unwrap();
        assert_eq!(rq.enqueue(1, 3), Err(SchedError::AlreadyQueued));
        assert_eq!(rq.enqueue(1, 4), Err(SchedError::AlreadyQueued));
        assert_eq!(rq.enqueue_front(1, 4), Err(SchedError::AlreadyQueued));
        assert_eq!(rq.len(), 1);
        assert_eq!(rq.ready, 1 << 3);
        assert!(rq.contains(1));
        assert!(SchedError::BadPriority(64).to_string().contains("64"));
    }

    #[test]
    fn every_priority_level() {
        let mut rq = RunQueues::new();
        for priority in 0..PRIORITIES as u8 {
            rq.enqueue(u32::from(priority), priority).unwrap();
        }
        assert_eq!(rq.ready, u64::MAX);
        let picked: Vec<u8> = drain(&mut rq).into_iter().map(|(_, p)| p).collect();
        assert!(picked.into_iter().eq((0..PRIORITIES as u8).rev()));
    }

    #[test]
    fn budget_expires_and_replenishes() {
        let mut budget = Budget::new(10);
        assert!(!budget.charge(4));
        assert_eq!(budget.left, 6);
        assert!(!budget.is_expired());
        assert!(budget.charge(6));
        assert!(budget.is_expired());
        assert!(budget.charge(u64::MAX));
        assert_eq!(budget.left, 0);
        budget.replenish();
        assert_eq!(budget, Budget::new(10));
        assert!(budget.charge(11));
        assert!(Budget::new(0).charge(0));
    }
}
