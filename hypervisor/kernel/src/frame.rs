//! Physical frame allocator: one bit per 4 KiB frame, set while the frame is
//! in use.
//!
//! The bitmap covers physical addresses from 0 up to `bitmap.len() * 64`
//! frames. Every frame starts out used; the boot code frees the usable RAM
//! from the memory map and then reserves what is already taken (kernel image,
//! modules, boot information, the low 1 MiB, the bitmap itself). Frame 0 is
//! never handed out, so physical address 0 can keep meaning "none".

use core::fmt;

pub const PAGE_SIZE: u64 = 4096;

const BITS_PER_WORD: usize = u64::BITS as usize;

/// A half-open physical address range `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhysRange {
    pub start: u64,
    pub end: u64,
}

impl PhysRange {
    pub const fn new(start: u64, end: u64) -> Self {
        Self { start, end }
    }

    /// `[start, start + len)`, or `None` if that wraps past the top of the
    /// address space.
    pub const fn from_len(start: u64, len: u64) -> Option<Self> {
        match start.checked_add(len) {
            Some(end) => Some(Self { start, end }),
            None => None,
        }
    }

    pub const fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    pub const fn is_empty(&self) -> bool {
        self.start >= self.end
    }

    pub const fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    pub const fn overlaps(&self, other: &PhysRange) -> bool {
        !self.is_empty() && !other.is_empty() && self.start < other.end && other.start < self.end
    }

    /// The whole pages inside this range (may be empty).
    pub const fn page_align_inward(&self) -> Self {
        let start = match align_up(self.start, PAGE_SIZE) {
            Some(start) => start,
            None => return Self { start: 0, end: 0 },
        };
        let end = align_down(self.end, PAGE_SIZE);
        if start >= end {
            Self { start, end: start }
        } else {
            Self { start, end }
        }
    }

    /// The pages touching this range. A range reaching into the last page of
    /// the 64-bit space stops short of it, since its end is not representable.
    pub const fn page_align_outward(&self) -> Self {
        if self.is_empty() {
            return Self {
                start: self.start,
                end: self.start,
            };
        }
        let start = align_down(self.start, PAGE_SIZE);
        let end = match align_up(self.end, PAGE_SIZE) {
            Some(end) => end,
            None => align_down(u64::MAX, PAGE_SIZE),
        };
        Self { start, end }
    }
}

/// `value` rounded up to a multiple of `align` (a power of two).
pub const fn align_up(value: u64, align: u64) -> Option<u64> {
    match value.checked_add(align - 1) {
        Some(v) => Some(v & !(align - 1)),
        None => None,
    }
}

/// `value` rounded down to a multiple of `align` (a power of two).
pub const fn align_down(value: u64, align: u64) -> u64 {
    value & !(align - 1)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The address handed to `free` is not the start of a frame.
    Misaligned(u64),
    /// The address lies beyond what the bitmap covers.
    OutOfRange(u64),
    /// Frame 0 is never allocated, so it cannot be freed.
    FrameZero,
    /// The frame is already free.
    DoubleFree(u64),
    /// The memory map lists no usable RAM at all.
    NoUsableMemory,
    /// No usable range has room for the bitmap outside the reserved ranges.
    NoRoomForBitmap { bytes: u64 },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Misaligned(addr) => {
                write!(f, "cannot free {addr:#x}: not aligned to a 4 KiB frame")
            }
            Self::OutOfRange(addr) => write!(
                f,
                "cannot free {addr:#x}: beyond the physical memory the allocator covers"
            ),
            Self::FrameZero => write!(f, "cannot free frame 0: it is never allocated"),
            Self::DoubleFree(addr) => write!(f, "double free of frame {addr:#x}"),
            Self::NoUsableMemory => write!(f, "the memory map lists no usable RAM"),
            Self::NoRoomForBitmap { bytes } => write!(
                f,
                "no usable RAM range has {bytes} free bytes for the frame bitmap"
            ),
        }
    }
}

pub struct FrameAllocator<'a> {
    bitmap: &'a mut [u64],
    /// Number of frames the bitmap covers.
    frames: usize,
    free: usize,
    /// Every word below this one is full: single-frame searches start
    /// here (a search that wrapped around crossed the whole bitmap, ~0.4 ms
    /// of Bochs per allocation inside kernel calls).
    hint: usize,
}

impl<'a> FrameAllocator<'a> {
    /// Words of bitmap needed to cover physical addresses `[0, top)`.
    pub const fn bitmap_words(top: u64) -> usize {
        top.div_ceil(PAGE_SIZE).div_ceil(BITS_PER_WORD as u64) as usize
    }

    /// All frames start as used; covers `[0, bitmap.len() * 64 * PAGE_SIZE)`.
    pub fn new(bitmap: &'a mut [u64]) -> Self {
        bitmap.fill(u64::MAX);
        let frames = bitmap.len().saturating_mul(BITS_PER_WORD);
        Self {
            bitmap,
            frames,
            free: 0,
            hint: 0,
        }
    }

    /// First address past what the bitmap covers.
    pub fn covered_top(&self) -> u64 {
        (self.frames as u64).saturating_mul(PAGE_SIZE)
    }

    pub fn free_frames(&self) -> usize {
        self.free
    }

    pub fn total_frames(&self) -> usize {
        self.frames
    }

    /// Marks the whole pages inside `r` free. Frame 0 and anything beyond the
    /// bitmap are ignored.
    pub fn add_free(&mut self, r: PhysRange) {
        let (first, last) = self.frame_span(r.page_align_inward());
        self.set_span(first.max(1), last, false);
    }

    /// Marks every page touching `r` used.
    pub fn reserve(&mut self, r: PhysRange) {
        let (first, last) = self.frame_span(r.page_align_outward());
        self.set_span(first, last, true);
    }

    /// One free frame, or `None` when memory is exhausted. Never returns 0.
    pub fn alloc(&mut self) -> Option<u64> {
        if self.free == 0 {
            return None;
        }
        for index in self.hint..self.bitmap.len() {
            let word = self.bitmap.get_mut(index)?;
            if *word != u64::MAX {
                let bit = word.trailing_ones() as usize;
                *word |= 1 << bit;
                self.free -= 1;
                self.hint = index;
                return Some(frame_addr(index * BITS_PER_WORD + bit));
            }
        }
        None
    }

    /// `count` physically contiguous free frames starting at a multiple of
    /// `align` (a power of two; anything below `PAGE_SIZE` means `PAGE_SIZE`).
    /// Returns the first address, or `None` if no such run exists.
    pub fn alloc_contiguous(&mut self, count: usize, align: u64) -> Option<u64> {
        if count == 0 || !align.is_power_of_two() || count > self.free {
            return None;
        }
        let step = usize::try_from(align.max(PAGE_SIZE) / PAGE_SIZE).ok()?;
        // Nothing is free below the hint.
        let mut start = step.max(self.hint.saturating_mul(BITS_PER_WORD));
        loop {
            // Past used frames a word at a time: a mostly used bitmap is
            // crossed in a few thousand steps, not one per frame (this runs
            // inside kernel calls that are not preempted).
            start = self.next_free(start)?.div_ceil(step).checked_mul(step)?;
            let end = start.checked_add(count)?;
            if end > self.frames {
                return None;
            }
            match (start..end).rev().find(|&frame| self.is_used(frame)) {
                None => {
                    self.set_span(start, end, true);
                    return Some(frame_addr(start));
                }
                Some(used) => {
                    start = (used / step).checked_add(1)?.checked_mul(step)?;
                }
            }
        }
    }

    /// The first free frame at or after `from`.
    fn next_free(&self, from: usize) -> Option<usize> {
        let mut frame = from;
        while frame < self.frames {
            let word = *self.bitmap.get(frame / BITS_PER_WORD)?;
            let free_here = !word >> (frame % BITS_PER_WORD);
            if free_here != 0 {
                let found = frame + free_here.trailing_zeros() as usize;
                return (found < self.frames).then_some(found);
            }
            frame = (frame / BITS_PER_WORD + 1) * BITS_PER_WORD;
        }
        None
    }

    pub fn free(&mut self, addr: u64) -> Result<(), FrameError> {
        if !addr.is_multiple_of(PAGE_SIZE) {
            return Err(FrameError::Misaligned(addr));
        }
        let frame = usize::try_from(addr / PAGE_SIZE).map_err(|_| FrameError::OutOfRange(addr))?;
        if frame == 0 {
            return Err(FrameError::FrameZero);
        }
        if frame >= self.frames {
            return Err(FrameError::OutOfRange(addr));
        }
        if !self.is_used(frame) {
            return Err(FrameError::DoubleFree(addr));
        }
        self.set_span(frame, frame + 1, false);
        Ok(())
    }

    /// The frame indices `[first, last)` of an aligned range, clipped to the
    /// bitmap.
    fn frame_span(&self, r: PhysRange) -> (usize, usize) {
        let to_frame = |addr: u64| {
            usize::try_from(addr / PAGE_SIZE)
                .unwrap_or(usize::MAX)
                .min(self.frames)
        };
        (to_frame(r.start), to_frame(r.end))
    }

    fn is_used(&self, frame: usize) -> bool {
        self.bitmap
            .get(frame / BITS_PER_WORD)
            .is_none_or(|word| word & (1 << (frame % BITS_PER_WORD)) != 0)
    }

    /// Sets frames `[first, last)` to `used`, keeping the free count exact.
    fn set_span(&mut self, first: usize, last: usize, used: bool) {
        if !used && first < last {
            self.hint = self.hint.min(first / BITS_PER_WORD);
        }
        let mut frame = first;
        while frame < last {
            let bit = frame % BITS_PER_WORD;
            let n = (BITS_PER_WORD - bit).min(last - frame);
            let mask = if n == BITS_PER_WORD {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            let Some(word) = self.bitmap.get_mut(frame / BITS_PER_WORD) else {
                return;
            };
            if used {
                self.free -= (!*word & mask).count_ones() as usize;
                *word |= mask;
            } else {
                self.free += (*word & mask).count_ones() as usize;
                *word &= !mask;
            }
            frame += n;
        }
    }
}

fn frame_addr(frame: usize) -> u64 {
    frame as u64 * PAGE_SIZE
}

/// Chooses where the bitmap itself goes: the lowest page-aligned range large
/// enough to cover every usable range, inside one usable range and clear of
/// every reserved one. The caller builds the allocator over that memory,
/// `add_free`s the usable ranges, then `reserve`s the reserved ones and the
/// returned range.
pub fn place_bitmap(usable: &[PhysRange], reserved: &[PhysRange]) -> Result<PhysRange, FrameError> {
    let top = usable
        .iter()
        .filter(|r| !r.is_empty())
        .map(|r| r.end)
        .max()
        .ok_or(FrameError::NoUsableMemory)?;
    let words = top.div_ceil(PAGE_SIZE).div_ceil(BITS_PER_WORD as u64);
    let bytes = words * 8;
    let size = align_up(bytes, PAGE_SIZE).ok_or(FrameError::NoRoomForBitmap { bytes })?;

    usable
        .iter()
        .find_map(|range| first_fit(range.page_align_inward(), reserved, size))
        .ok_or(FrameError::NoRoomForBitmap { bytes })
}

/// The lowest `size` bytes, page-aligned, inside `range` (whole pages)
/// that overlap no `reserved` range.
pub fn first_fit(range: PhysRange, reserved: &[PhysRange], size: u64) -> Option<PhysRange> {
    let mut start = range.start;
    while let Some(candidate) = PhysRange::from_len(start, size) {
        if candidate.end > range.end {
            return None;
        }
        let blocker = reserved
            .iter()
            .map(PhysRange::page_align_outward)
            .filter(|r| r.overlaps(&candidate))
            .map(|r| r.end)
            .max();
        match blocker {
            None => return Some(candidate),
            // Every reserved range overlapping the candidate ends above
            // `start`, so the search always moves forward.
            Some(end) => start = end,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn alloc_free_round_trip_and_exhaustion() {
        let mut bitmap = [0u64; 1];
        let mut fa = FrameAllocator::new(&mut bitmap);
        assert_eq!(fa.free_frames(), 0);
        assert_eq!(fa.alloc(), None);

        // Includes frame 0, which must stay out of reach.
        fa.add_free(PhysRange::new(0, 8 * PAGE_SIZE));
        assert_eq!(fa.free_frames(), 7);
        let mut got = std::vec::Vec::new();
        while let Some(frame) = fa.alloc() {
            got.push(frame);
        }
        got.sort();
        let expected: std::vec::Vec<u64> = (1..8).map(|f| f * PAGE_SIZE).collect();
        assert_eq!(got, expected);
        assert_eq!(fa.free_frames(), 0);

        fa.free(3 * PAGE_SIZE).unwrap();
        assert_eq!(fa.free_frames(), 1);
        assert_eq!(fa.alloc(), Some(3 * PAGE_SIZE));
        assert_eq!(fa.alloc(), None);
    }

    #[test]
    fn free_errors() {
        let mut bitmap = [0u64; 1];
        let mut fa = FrameAllocator::new(&mut bitmap);
        fa.add_free(PhysRange::new(PAGE_SIZE, 4 * PAGE_SIZE));
        let frame = fa.alloc().unwrap();
        assert_eq!(fa.free(frame + 8), Err(FrameError::Misaligned(frame + 8)));
        assert_eq!(
            fa.free(64 * PAGE_SIZE),
            Err(FrameError::OutOfRange(64 * PAGE_SIZE))
        );
        assert_eq!(fa.free(!0xfff), Err(FrameError::OutOfRange(!0xfff)));
        assert_eq!(fa.free(0), Err(FrameError::FrameZero));
        fa.free(frame).unwrap();
        assert_eq!(fa.free(frame), Err(FrameError::DoubleFree(frame)));
        assert_eq!(fa.free_frames(), 3);
        assert!(FrameError::DoubleFree(frame)
            .to_string()
            .contains("double free"));
    }

    #[test]
    fn reserve_and_unaligned_ranges() {
        let mut bitmap = [0u64; 2];
        let mut fa = FrameAllocator::new(&mut bitmap);
        // Inward: only frames 2..=5 are wholly inside.
        fa.add_free(PhysRange::new(PAGE_SIZE + 1, 6 * PAGE_SIZE + 100));
        assert_eq!(fa.free_frames(), 4);
        // Outward: touches frames 3 and 4.
        fa.reserve(PhysRange::new(3 * PAGE_SIZE + 5, 4 * PAGE_SIZE + 1));
        assert_eq!(fa.free_frames(), 2);
        // Reserving again changes nothing; a range past the bitmap is ignored.
        fa.reserve(PhysRange::new(3 * PAGE_SIZE, 5 * PAGE_SIZE));
        fa.reserve(PhysRange::new(u64::MAX - 10, u64::MAX));
        fa.add_free(PhysRange::new(u64::MAX - 10, u64::MAX));
        fa.add_free(PhysRange::new(10, 20));
        assert_eq!(fa.free_frames(), 2);
        let a = fa.alloc().unwrap();
        let b = fa.alloc().unwrap();
        let mut got = [a, b];
        got.sort();
        assert_eq!(got, [2 * PAGE_SIZE, 5 * PAGE_SIZE]);
        assert_eq!(fa.alloc(), None);

        // A range spanning a word boundary.
        fa.add_free(PhysRange::new(60 * PAGE_SIZE, 70 * PAGE_SIZE));
        assert_eq!(fa.free_frames(), 10);
        fa.reserve(PhysRange::new(0, u64::MAX));
        assert_eq!(fa.free_frames(), 0);
    }

    #[test]
    fn single_frames_come_from_the_lowest_free_word() {
        let mut bitmap = [0u64; 64];
        let mut fa = FrameAllocator::new(&mut bitmap);
        fa.add_free(PhysRange::new(0, 16 * MIB));
        let first: Vec<u64> = (0..200).map(|_| fa.alloc().unwrap()).collect();
        assert_eq!(first[0], PAGE_SIZE, "frame 0 is never handed out");
        assert!(first.windows(2).all(|w| w[1] == w[0] + PAGE_SIZE));
        // A frame freed below the search start is found again first.
        fa.free(5 * PAGE_SIZE).unwrap();
        assert_eq!(fa.alloc(), Some(5 * PAGE_SIZE));
        assert_eq!(fa.alloc(), Some(201 * PAGE_SIZE));
        // Full: None, and every frame handed out once.
        let rest: Vec<u64> = core::iter::from_fn(|| fa.alloc()).collect();
        assert_eq!(rest.len(), 4096 - 202);
        assert_eq!(fa.alloc(), None);
        fa.free(4095 * PAGE_SIZE).unwrap();
        assert_eq!(fa.alloc(), Some(4095 * PAGE_SIZE));
    }

    #[test]
    fn contiguous_runs_past_used_words_and_scattered_frames() {
        let mut bitmap = [0u64; 64]; // 4096 frames = 16 MiB
        let mut fa = FrameAllocator::new(&mut bitmap);
        fa.add_free(PhysRange::new(0, 16 * MIB));
        // Everything below 12 MiB used but one frame in each 64 (too
        // short a run), then one frame used at 12 MiB + 8 frames.
        fa.reserve(PhysRange::new(0, 12 * MIB));
        for frame in (100..3072).step_by(64) {
            fa.free(frame * PAGE_SIZE).unwrap();
        }
        fa.reserve(PhysRange::new(
            12 * MIB + 8 * PAGE_SIZE,
            12 * MIB + 9 * PAGE_SIZE,
        ));
        assert_eq!(
            fa.alloc_contiguous(16, PAGE_SIZE),
            Some(12 * MIB + 9 * PAGE_SIZE)
        );
        assert_eq!(fa.alloc_contiguous(8, PAGE_SIZE), Some(12 * MIB));
        // A single frame still finds the first scattered one.
        assert_eq!(fa.alloc_contiguous(1, PAGE_SIZE), Some(100 * PAGE_SIZE));
        // Aligned: the next 1 MiB boundary with 256 free frames after it.
        assert_eq!(fa.alloc_contiguous(256, MIB), Some(13 * MIB));
        assert_eq!(fa.alloc_contiguous(4096, PAGE_SIZE), None);
    }

    #[test]
    fn contiguous_alignment() {
        let mut bitmap = [0u64; 16]; // 1024 frames = 4 MiB
        let mut fa = FrameAllocator::new(&mut bitmap);
        fa.add_free(PhysRange::new(0, 4 * MIB));
        fa.reserve(PhysRange::new(
            2 * MIB + 3 * PAGE_SIZE,
            2 * MIB + 4 * PAGE_SIZE,
        ));

        let a = fa.alloc_contiguous(4, 16 * PAGE_SIZE).unwrap();
        assert_eq!(
            a,
            16 * PAGE_SIZE,
            "frame 0 is never free, so the first 64K slot is skipped"
        );
        // 2 MiB aligned, 512 frames: the first slot at 0 is blocked by frame 0
        // and the allocation above, the second by the reservation.
        assert_eq!(fa.alloc_contiguous(512, 2 * MIB), None);
        let b = fa.alloc_contiguous(256, 2 * MIB);
        assert_eq!(b, None, "the slots at 0 and 2 MiB are blocked");
        fa.free(2 * MIB + 3 * PAGE_SIZE).unwrap();
        assert_eq!(fa.alloc_contiguous(512, 2 * MIB), Some(2 * MIB));

        let before = fa.free_frames();
        assert_eq!(fa.alloc_contiguous(0, PAGE_SIZE), None);
        assert_eq!(fa.alloc_contiguous(1, 3 * PAGE_SIZE), None);
        assert_eq!(fa.alloc_contiguous(usize::MAX, PAGE_SIZE), None);
        assert_eq!(fa.free_frames(), before);
        // Sub-page alignment means page alignment.
        let c = fa.alloc_contiguous(2, 1).unwrap();
        assert_eq!(c % PAGE_SIZE, 0);
        assert_eq!(fa.free_frames(), before - 2);
    }

    #[test]
    fn bitmap_words_rounds_up() {
        assert_eq!(FrameAllocator::bitmap_words(0), 0);
        assert_eq!(FrameAllocator::bitmap_words(1), 1);
        assert_eq!(FrameAllocator::bitmap_words(64 * PAGE_SIZE), 1);
        assert_eq!(FrameAllocator::bitmap_words(64 * PAGE_SIZE + 1), 2);
        assert_eq!(FrameAllocator::bitmap_words(4 << 30), 16384);
    }

    #[test]
    fn range_helpers() {
        let r = PhysRange::new(0x1001, 0x3fff);
        assert_eq!(r.page_align_inward(), PhysRange::new(0x2000, 0x3000));
        assert_eq!(r.page_align_outward(), PhysRange::new(0x1000, 0x4000));
        assert!(PhysRange::new(0x1001, 0x1fff)
            .page_align_inward()
            .is_empty());
        assert!(PhysRange::new(u64::MAX - 5, u64::MAX)
            .page_align_inward()
            .is_empty());
        assert_eq!(
            PhysRange::new(u64::MAX - 5, u64::MAX)
                .page_align_outward()
                .end,
            !0xfff
        );
        assert!(PhysRange::new(5, 3).page_align_outward().is_empty());
        assert_eq!(PhysRange::new(5, 3).len(), 0);
        assert!(r.overlaps(&PhysRange::new(0x3ffe, 0x5000)));
        assert!(!r.overlaps(&PhysRange::new(0x3fff, 0x5000)));
        assert!(!r.overlaps(&PhysRange::new(0x2000, 0x2000)));
        assert_eq!(PhysRange::from_len(u64::MAX, 2), None);
    }

    #[test]
    fn place_bitmap_avoids_reserved() {
        // 1 GiB of RAM: 262144 frames, 32 KiB of bitmap.
        let usable = [PhysRange::new(0, 0x9f000), PhysRange::new(MIB, 1 << 30)];
        let reserved = [
            PhysRange::new(0, MIB),
            PhysRange::new(MIB, 3 * MIB + 17), // kernel image, unaligned end
            PhysRange::new(3 * MIB + 0x8000, 3 * MIB + 0x9000), // boot info
        ];
        let placed = place_bitmap(&usable, &reserved).unwrap();
        // The 28 KiB hole between kernel and boot info is too small.
        assert_eq!(placed, PhysRange::new(3 * MIB + 0x9000, 3 * MIB + 0x11000));
        for r in &reserved {
            assert!(!placed
                .page_align_outward()
                .overlaps(&r.page_align_outward()));
        }

        // The allocator the caller builds over it.
        let mut bitmap = std::vec![0u64; FrameAllocator::bitmap_words(1 << 30)];
        assert_eq!(bitmap.len() as u64 * 8, placed.len());
        let mut fa = FrameAllocator::new(&mut bitmap);
        usable.iter().for_each(|&r| fa.add_free(r));
        reserved.iter().for_each(|&r| fa.reserve(r));
        fa.reserve(placed);
        // Low 1 MiB, kernel (513 frames), boot info, bitmap (8 frames).
        assert_eq!(fa.free_frames(), 262_144 - 256 - 513 - 1 - 8);
    }

    #[test]
    fn place_bitmap_fails_cleanly() {
        assert_eq!(place_bitmap(&[], &[]), Err(FrameError::NoUsableMemory));
        assert_eq!(
            place_bitmap(&[PhysRange::new(5, 5)], &[]),
            Err(FrameError::NoUsableMemory)
        );
        // Everything reserved.
        let usable = [PhysRange::new(0, 64 * MIB)];
        let err = place_bitmap(&usable, &[PhysRange::new(0, 64 * MIB)]).unwrap_err();
        assert_eq!(err, FrameError::NoRoomForBitmap { bytes: 2048 });
        assert!(err.to_string().contains("2048"));
        // A bogus map claiming RAM at the top of the address space.
        let usable = [
            PhysRange::new(MIB, 2 * MIB),
            PhysRange::new(u64::MAX - 1, u64::MAX),
        ];
        assert!(matches!(
            place_bitmap(&usable, &[]),
            Err(FrameError::NoRoomForBitmap { .. })
        ));
        // Holes too small between reservations.
        let usable = [PhysRange::new(MIB, MIB + 4 * PAGE_SIZE)];
        let reserved = [
            PhysRange::new(MIB + PAGE_SIZE, MIB + PAGE_SIZE + 1),
            PhysRange::new(MIB + 3 * PAGE_SIZE, MIB + 3 * PAGE_SIZE + 1),
        ];
        assert_eq!(
            place_bitmap(&usable, &reserved),
            Ok(PhysRange::new(MIB, MIB + PAGE_SIZE))
        );
        let reserved = [
            PhysRange::new(MIB, MIB + 1),
            PhysRange::new(MIB + 2 * PAGE_SIZE - 1, MIB + 2 * PAGE_SIZE),
        ];
        assert_eq!(
            place_bitmap(&usable, &reserved),
            Ok(PhysRange::new(MIB + 2 * PAGE_SIZE, MIB + 3 * PAGE_SIZE))
        );
    }
}
