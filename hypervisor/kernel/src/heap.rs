//! The kernel heap behind `alloc`: power-of-two size classes from 16 bytes to
//! 2 KiB carved out of whole frames, and whole contiguous frames for larger
//! blocks. Blocks of a class are kept on a free list threaded through the
//! free blocks themselves; pages given to a class stay with it.
//!
//! The heap does no accounting: kernel objects are charged to the quota of
//! the protection domain that causes them before they are allocated.

use crate::arch::x86_64::layout::{phys_to_virt, DIRECT_MAP_BASE};
use crate::memory;
use core::alloc::{GlobalAlloc, Layout};
use core::ptr::{null_mut, NonNull};
use core::sync::atomic::{AtomicUsize, Ordering};
use moat_kernel::frame::PAGE_SIZE;
use spin::Mutex;

/// Frames the heap holds: slab pages (kept for good) and large blocks.
static PAGES: AtomicUsize = AtomicUsize::new(0);

pub fn pages() -> usize {
    PAGES.load(Ordering::Relaxed)
}

const MIN_CLASS_SHIFT: u32 = 4;
const MAX_CLASS_SHIFT: u32 = 11;
const CLASSES: usize = (MAX_CLASS_SHIFT - MIN_CLASS_SHIFT + 1) as usize;

struct FreeBlock {
    next: Option<NonNull<FreeBlock>>,
}

struct Heap {
    free: [Option<NonNull<FreeBlock>>; CLASSES],
}

// SAFETY: the free lists point into frames owned by the heap; all access goes
// through the mutex.
unsafe impl Send for Heap {}

pub struct KernelHeap(Mutex<Heap>);

#[global_allocator]
static HEAP: KernelHeap = KernelHeap(Mutex::new(Heap {
    free: [None; CLASSES],
}));

/// The size class of a small allocation, None for a large one.
fn class_of(layout: Layout) -> Option<usize> {
    let size = layout.size().max(layout.align()).max(1 << MIN_CLASS_SHIFT);
    let shift = size.next_power_of_two().trailing_zeros();
    (shift <= MAX_CLASS_SHIFT).then(|| (shift - MIN_CLASS_SHIFT) as usize)
}

fn pages_for(layout: Layout) -> usize {
    layout.size().div_ceil(PAGE_SIZE as usize)
}

impl Heap {
    fn refill(&mut self, class: usize) -> bool {
        let Some((_, page)) = memory::alloc_zeroed_page() else {
            return false;
        };
        PAGES.fetch_add(1, Ordering::Relaxed);
        let block_size = 1usize << (class as u32 + MIN_CLASS_SHIFT);
        let base = page.as_mut_ptr();
        for offset in (0..PAGE_SIZE as usize).step_by(block_size).rev() {
            // SAFETY: `offset` is inside the fresh page, aligned to the block
            // size (a power of two no larger than the page), and the page now
            // belongs to this class alone.
            unsafe {
                let block = base.add(offset).cast::<FreeBlock>();
                block.write(FreeBlock {
                    next: self.free[class],
                });
                self.free[class] = Some(NonNull::new_unchecked(block));
            }
        }
        true
    }

    fn alloc_small(&mut self, class: usize) -> *mut u8 {
        if self.free[class].is_none() && !self.refill(class) {
            return null_mut();
        }
        match self.free[class] {
            Some(block) => {
                // SAFETY: blocks on the free list are valid FreeBlocks in heap
                // pages, written by `refill` or `dealloc`.
                self.free[class] = unsafe { block.as_ref().next };
                block.as_ptr().cast()
            }
            None => null_mut(),
        }
    }
}

// SAFETY: small blocks come from disjoint, aligned slots of heap-owned pages;
// large blocks are fresh contiguous frames; a block is handed out at most once
// until it is freed.
unsafe impl GlobalAlloc for KernelHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match class_of(layout) {
            Some(class) => self.0.lock().alloc_small(class),
            None if layout.align() <= PAGE_SIZE as usize => {
                match memory::alloc_contiguous(pages_for(layout)) {
                    Some(phys) => {
                        PAGES.fetch_add(pages_for(layout), Ordering::Relaxed);
                        phys_to_virt(phys) as *mut u8
                    }
                    None => null_mut(),
                }
            }
            None => null_mut(),
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match class_of(layout) {
            Some(class) => {
                let mut heap = self.0.lock();
                let block = ptr.cast::<FreeBlock>();
                // SAFETY: `ptr` came from `alloc` with this layout, so it is a
                // block of this class that nothing uses any more.
                unsafe {
                    block.write(FreeBlock {
                        next: heap.free[class],
                    })
                };
                heap.free[class] = NonNull::new(block);
            }
            None => {
                let phys = ptr as u64 - DIRECT_MAP_BASE;
                for page in 0..pages_for(layout) as u64 {
                    memory::free_frame(phys + page * PAGE_SIZE);
                }
                PAGES.fetch_sub(pages_for(layout), Ordering::Relaxed);
            }
        }
    }
}
