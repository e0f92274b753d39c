//! The task's heap: a first-fit free list over a static 64 KiB arena, the
//! global allocator so tasks can use `alloc` (`Vec`, `String`, `Box`). A
//! task that needs more (a VMM) adds one region of its own memory with
//! [`Heap::extend`], e.g. a manifest `ram` mapping.
//!
//! Exhaustion is a null pointer, never a panic here (what `alloc` does with
//! it is its business). The free list lives in a fixed table of ranges
//! beside the arena, not in the arena, so a stray write into freed memory
//! cannot corrupt it. Blocks are multiples of [`GRANULE`] bytes.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;

/// The arena's size.
pub const ARENA_SIZE: usize = 64 * 1024;
/// Allocation unit and smallest alignment.
pub const GRANULE: usize = 16;
/// Free ranges the list can hold; a free that would need more leaks its
/// block (counted in [`FreeList::leaked`]).
pub const FREE_RANGES: usize = 128;
/// Attempts to take the heap lock before an allocation gives up (null).
/// The lock is only contended when ECs of one PD allocate concurrently; on a
/// single CPU a higher-priority EC would otherwise spin forever while the
/// holder cannot run.
const LOCK_ATTEMPTS: u32 = 1 << 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Range {
    start: usize,
    end: usize,
}

/// Free byte ranges of an arena of `size` bytes, by offset: sorted, disjoint
/// and never adjacent (neighbours are merged).
#[derive(Debug)]
pub struct FreeList {
    ranges: [Range; FREE_RANGES],
    len: usize,
    leaked: usize,
}

fn align_up(value: usize, align: usize) -> Option<usize> {
    Some(value.checked_add(align - 1)? & !(align - 1))
}

impl FreeList {
    /// All of an arena of `size` bytes free.
    pub const fn new(size: usize) -> Self {
        let mut ranges = [Range { start: 0, end: 0 }; FREE_RANGES];
        ranges[0].end = size - size % GRANULE;
        Self {
            ranges,
            len: 1,
            leaked: 0,
        }
    }

    /// Bytes lost because the table of free ranges was full.
    pub fn leaked(&self) -> usize {
        self.leaked
    }

    /// Bytes free.
    pub fn free_bytes(&self) -> usize {
        self.ranges[..self.len]
            .iter()
            .map(|r| r.end - r.start)
            .sum()
    }

    /// The rounded size of a block for `layout`, or `None` if it cannot be
    /// served (alignment beyond a page, size overflow).
    fn block_size(layout: Layout) -> Option<usize> {
        if layout.align() > 4096 {
            return None;
        }
        align_up(layout.size().max(1), GRANULE)
    }

    /// Offset of a new block for `layout` (the arena's start must be aligned
    /// to 4096), first fit.
    pub fn alloc(&mut self, layout: Layout) -> Option<usize> {
        let size = Self::block_size(layout)?;
        let align = layout.align().max(GRANULE);
        for i in 0..self.len {
            let range = self.ranges[i];
            let Some(start) = align_up(range.start, align) else {
                continue;
            };
            let Some(end) = start.checked_add(size).filter(|&end| end <= range.end) else {
                continue;
            };
            let before = Range {
                start: range.start,
                end: start,
            };
            let after = Range {
                start: end,
                end: range.end,
            };
            match (before.start < before.end, after.start < after.end) {
                (false, false) => self.remove(i),
                (true, false) => self.ranges[i] = before,
                (false, true) => self.ranges[i] = after,
                (true, true) => {
                    // The range splits in two: needs a free table entry.
                    if self.len == FREE_RANGES {
                        continue;
                    }
                    self.ranges[i] = after;
                    self.insert(i, before);
                }
            }
            return Some(start);
        }
        None
    }

    /// Gives back the block at `offset` allocated for `layout`.
    pub fn free(&mut self, offset: usize, layout: Layout) {
        let Some(size) = Self::block_size(layout) else {
            return;
        };
        let block = Range {
            start: offset,
            end: offset + size,
        };
        // The first range after the block.
        let i = self.ranges[..self.len].partition_point(|r| r.start < block.start);
        let merge_prev = i > 0 && self.ranges[i - 1].end == block.start;
        let merge_next = i < self.len && self.ranges[i].start == block.end;
        match (merge_prev, merge_next) {
            (true, true) => {
                self.ranges[i - 1].end = self.ranges[i].end;
                self.remove(i);
            }
            (true, false) => self.ranges[i - 1].end = block.end,
            (false, true) => self.ranges[i].start = block.start,
            (false, false) if self.len == FREE_RANGES => self.leaked += size,
            (false, false) => self.insert(i, block),
        }
    }

    fn remove(&mut self, i: usize) {
        self.ranges.copy_within(i + 1..self.len, i);
        self.len -= 1;
    }

    fn insert(&mut self, i: usize, range: Range) {
        self.ranges.copy_within(i..self.len, i + 1);
        self.ranges[i] = range;
        self.len += 1;
    }
}

#[repr(C, align(4096))]
struct Arena(UnsafeCell<[u8; ARENA_SIZE]>);

// SAFETY: the arena's bytes are only reached through pointers handed out by
// the allocator, each block to one owner at a time; the free list that
// decides ownership is behind a lock.
unsafe impl Sync for Arena {}

/// Zero-initialised, so it takes no room in the task's file (`.bss`).
static ARENA: Arena = Arena(UnsafeCell::new([0; ARENA_SIZE]));

/// A region added with [`Heap::extend`]: its address, length and list.
struct Extension {
    base: usize,
    len: usize,
    list: FreeList,
}

/// The global allocator: [`FreeList`] over a static arena, behind a lock,
/// and optionally a second list over an extension region.
pub struct Heap {
    list: spin::Mutex<FreeList>,
    extension: spin::Mutex<Option<Extension>>,
}

fn locked<T, R>(lock: &spin::Mutex<T>, f: impl FnOnce(&mut T) -> R) -> Option<R> {
    for _ in 0..LOCK_ATTEMPTS {
        if let Some(mut guard) = lock.try_lock() {
            return Some(f(&mut guard));
        }
        core::hint::spin_loop();
    }
    None
}

impl Heap {
    const fn new() -> Self {
        Self {
            list: spin::Mutex::new(FreeList::new(ARENA_SIZE)),
            extension: spin::Mutex::new(None),
        }
    }

    fn base(&self) -> *mut u8 {
        ARENA.0.get().cast()
    }

    fn with_list<R>(&self, f: impl FnOnce(&mut FreeList) -> R) -> Option<R> {
        locked(&self.list, f)
    }

    /// Bytes free now (`None` if the heap is busy).
    pub fn free_bytes(&self) -> Option<usize> {
        let arena = self.with_list(|list| list.free_bytes())?;
        let extension = locked(&self.extension, |e| {
            e.as_ref().map_or(0, |e| e.list.free_bytes())
        })?;
        Some(arena + extension)
    }

    /// Adds `region` (page aligned, at least a page) to the heap; once per
    /// task. False if the region is unfit or the heap already has one.
    pub fn extend(&self, region: &'static mut [u8]) -> bool {
        let base = region.as_mut_ptr() as usize;
        let len = region.len();
        if !base.is_multiple_of(4096) || len < 4096 {
            return false;
        }
        locked(&self.extension, |extension| {
            if extension.is_some() {
                return false;
            }
            *extension = Some(Extension {
                base,
                len,
                list: FreeList::new(len),
            });
            true
        })
        .unwrap_or(false)
    }
}

// SAFETY: `alloc` hands out disjoint blocks of the arena or of the
// extension (a `&'static mut` region given up to the heap for good); the
// free lists never give a range out twice, each block is at least
// `layout.size()` bytes and aligned to `layout.align()` (both regions are
// page-aligned and offsets are aligned by `FreeList::alloc`); `dealloc`
// returns exactly the block's range to the list it came from. Failure is
// null.
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if let Some(offset) = self.with_list(|list| list.alloc(layout)).flatten() {
            return self.base().wrapping_add(offset);
        }
        let extended = locked(&self.extension, |extension| {
            let e = extension.as_mut()?;
            Some(e.base + e.list.alloc(layout)?)
        });
        match extended.flatten() {
            Some(address) => address as *mut u8,
            None => core::ptr::null_mut(),
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // If a lock cannot be had the block leaks; never a panic.
        let offset = (ptr as usize).wrapping_sub(self.base() as usize);
        if offset < ARENA_SIZE {
            let _ = self.with_list(|list| list.free(offset, layout));
            return;
        }
        let _ = locked(&self.extension, |extension| {
            if let Some(e) = extension.as_mut() {
                let offset = (ptr as usize).wrapping_sub(e.base);
                if offset < e.len {
                    e.list.free(offset, layout);
                }
            }
        });
    }
}

/// The tasks' heap. Each task's crate makes it the global allocator
/// through [`Global`] (in [`crate::entry!`]), not this library: a host
/// program that links this library (the fuzz targets reach `common::net`
/// in a build where `common`'s `runtime`, and with it this crate, is on)
/// keeps the system's allocator, not a 64 KiB arena.
pub static HEAP: Heap = Heap::new();

/// [`HEAP`] as a global allocator (`#[global_allocator]` in `entry!`).
pub struct Global;

// SAFETY: every call is `HEAP`'s, whose implementation upholds the
// contract (above); `Global` holds no state of its own.
unsafe impl GlobalAlloc for Global {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's promises are passed on unchanged.
        unsafe { HEAP.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as in `alloc`: `ptr` came from `HEAP` through `Global`.
        unsafe { HEAP.dealloc(ptr, layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    #[test]
    fn an_extension_serves_what_the_arena_cannot() {
        let heap = Heap::new();
        let region_layout = layout(1 << 20, 4096);
        // SAFETY: a fresh allocation of a non-zero size, leaked for 'static.
        let region = unsafe {
            let ptr = std::alloc::alloc_zeroed(region_layout);
            assert!(!ptr.is_null());
            core::slice::from_raw_parts_mut(ptr, 1 << 20)
        };
        let start = region.as_ptr() as usize;
        assert!(!heap.extend(&mut []), "too small");
        assert!(heap.extend(region));
        let big = layout(ARENA_SIZE * 2, 8);
        // SAFETY: GlobalAlloc calls on a local heap with matching layouts.
        unsafe {
            let block = heap.alloc(big);
            assert!((start..start + (1 << 20)).contains(&(block as usize)));
            heap.dealloc(block, big);
            assert_eq!(heap.alloc(big), block, "freed into the extension's list");
            let small = heap.alloc(layout(64, 8));
            assert!(small as usize >= heap.base() as usize);
            assert!((small as usize) < heap.base() as usize + ARENA_SIZE);
        }
        // SAFETY: as above, a second page-aligned region.
        let second = unsafe {
            core::slice::from_raw_parts_mut(std::alloc::alloc_zeroed(region_layout), 1 << 20)
        };
        assert!(!heap.extend(second), "one extension per task");
    }

    #[test]
    fn allocates_first_fit_and_merges_on_free() {
        let mut list = FreeList::new(1024);
        let a = list.alloc(layout(10, 1)).unwrap();
        let b = list.alloc(layout(16, 8)).unwrap();
        let c = list.alloc(layout(100, 4)).unwrap();
        assert_eq!((a, b, c), (0, 16, 32));
        list.free(b, layout(16, 8));
        // The hole is reused by the next block that fits in it.
        assert_eq!(list.alloc(layout(5, 1)), Some(16));
        list.free(16, layout(5, 1));
        list.free(a, layout(10, 1));
        list.free(c, layout(100, 4));
        assert_eq!(list.len, 1);
        assert_eq!(list.free_bytes(), 1024);
    }

    #[test]
    fn aligns_and_keeps_the_gap() {
        let mut list = FreeList::new(8192);
        assert_eq!(list.alloc(layout(16, 16)), Some(0));
        assert_eq!(list.alloc(layout(64, 4096)), Some(4096));
        // The gap before the aligned block is still free.
        assert_eq!(list.alloc(layout(32, 16)), Some(16));
        assert_eq!(list.free_bytes(), 8192 - 16 - 64 - 32);
        assert_eq!(list.alloc(layout(1, 8192)), None);
    }

    #[test]
    fn exhaustion_is_none_not_a_panic() {
        let mut list = FreeList::new(256);
        assert_eq!(list.alloc(layout(257, 1)), None);
        assert_eq!(list.alloc(layout(256, 1)), Some(0));
        assert_eq!(list.alloc(layout(1, 1)), None);
        assert_eq!(list.alloc(layout(isize::MAX as usize, 1)), None);
    }

    #[test]
    fn a_full_range_table_leaks_instead_of_failing() {
        let size = GRANULE * (2 * FREE_RANGES + 4);
        let mut list = FreeList::new(size);
        let blocks: Vec<usize> = (0..2 * FREE_RANGES + 4)
            .map(|_| list.alloc(layout(GRANULE, 1)).unwrap())
            .collect();
        // Free every other block: each becomes its own range.
        for &offset in blocks.iter().step_by(2) {
            list.free(offset, layout(GRANULE, 1));
        }
        assert_eq!(list.len, FREE_RANGES);
        assert_eq!(list.leaked(), 2 * GRANULE);
        // Freeing the rest merges everything back (minus what leaked).
        for &offset in blocks.iter().skip(1).step_by(2) {
            list.free(offset, layout(GRANULE, 1));
        }
        assert!(list.len <= 3);
        assert_eq!(list.free_bytes(), size - list.leaked());
    }

    #[test]
    fn random_use_never_overlaps() {
        let mut list = FreeList::new(ARENA_SIZE);
        let mut live: Vec<(usize, Layout)> = Vec::new();
        let mut seed = 0x1234_5678_u64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            if seed.is_multiple_of(3) && !live.is_empty() {
                let (offset, l) = live.swap_remove(seed as usize / 3 % live.len());
                list.free(offset, l);
            } else {
                let l = layout(1 + (seed >> 8) as usize % 700, 1 << ((seed >> 20) % 7));
                if let Some(offset) = list.alloc(l) {
                    assert_eq!(offset % l.align(), 0);
                    live.push((offset, l));
                }
            }
            let mut spans: Vec<(usize, usize)> = live
                .iter()
                .map(|&(o, l)| (o, o + FreeList::block_size(l).unwrap()))
                .collect();
            spans.sort();
            assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0));
            assert!(spans.last().is_none_or(|s| s.1 <= ARENA_SIZE));
        }
        for (offset, l) in live {
            list.free(offset, l);
        }
        assert_eq!(list.free_bytes() + list.leaked(), ARENA_SIZE);
    }
}
