//! Physical memory and the kernel's own page tables.
//!
//! The frame allocator's bitmap lives in a free stretch of RAM chosen from the
//! Multiboot memory map. The kernel's page tables map all of physical memory
//! (at least the first 4 GiB, so MMIO below 4 GiB is reachable too) at the
//! direct map with 2 MiB pages, and the kernel image with 4 KiB pages whose
//! permissions follow its sections: text read-execute, rodata read-only,
//! data and bss read-write, never writable and executable at once.

use crate::arch::x86_64::cpu;
use crate::arch::x86_64::layout::{
    kernel_virt_to_phys, phys_to_virt, BOOT_DIRECT_MAP_SIZE, DIRECT_MAP_BASE, KERNEL_PML4_FIRST,
};
use crate::arch::x86_64::smp::TRAMPOLINE_PAGES;
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use moat_kernel::frame::{place_bitmap, FrameAllocator, FrameError, PhysRange, PAGE_SIZE};
use moat_kernel::multiboot::{BootInfo, RegionKind};
use moat_kernel::paging::{AddressSpace, MapError, MapFlags, TableMemory};
use moat_kernel::smp::place_trampoline;
use spin::Mutex;

static FRAMES: Mutex<Option<FrameAllocator<'static>>> = Mutex::new(None);
static KERNEL_ROOT: AtomicU64 = AtomicU64::new(0);
static NO_EXECUTE: AtomicBool = AtomicBool::new(false);
/// The memory map's usable RAM: everything else a device page may be.
static USABLE: Mutex<Ranges> = Mutex::new(Ranges::new());
/// The interrupt controllers' window (IOAPIC, HPET, local APIC): never a
/// device page for user space.
const INTERRUPT_WINDOW: PhysRange = PhysRange {
    start: 0xfec0_0000,
    end: 0xfef0_0000,
};
/// Low memory for the AP start-up trampoline; 0: none found.
static TRAMPOLINE: AtomicU64 = AtomicU64::new(0);

const MAX_RANGES: usize = 80;
const LOW_MEMORY: PhysRange = PhysRange {
    start: 0,
    end: 0x10_0000,
};
const CR4_PGE: u64 = 1 << 7;

extern "C" {
    static __load_start_phys: u8;
    static __bss_end_phys: u8;
    static __text_start: u8;
    static __text_end: u8;
    static __rodata_start: u8;
    static __rodata_end: u8;
    static __data_start: u8;
    static __data_end: u8;
}

/// The address of a linker-script symbol.
macro_rules! symbol {
    ($name:ident) => {
        core::ptr::addr_of!($name) as u64
    };
}

#[derive(Debug)]
pub enum MemoryError {
    NoUsableMemory,
    TooManyRanges,
    Bitmap(FrameError),
    BitmapAboveDirectMap,
    KernelTables(MapError),
}

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryError::NoUsableMemory => f.write_str("the memory map has no usable RAM"),
            MemoryError::TooManyRanges => write!(f, "more than {MAX_RANGES} memory ranges"),
            MemoryError::Bitmap(error) => write!(f, "no room for the frame bitmap: {error}"),
            MemoryError::BitmapAboveDirectMap => {
                f.write_str("the frame bitmap would lie above 4 GiB")
            }
            MemoryError::KernelTables(error) => {
                write!(f, "building the kernel page tables: {error}")
            }
        }
    }
}

/// A fixed-capacity list of physical ranges.
struct Ranges {
    items: [PhysRange; MAX_RANGES],
    len: usize,
}

impl Ranges {
    const fn new() -> Self {
        Self {
            items: [PhysRange { start: 0, end: 0 }; MAX_RANGES],
            len: 0,
        }
    }

    fn push(&mut self, range: PhysRange) -> Result<(), MemoryError> {
        let slot = self
            .items
            .get_mut(self.len)
            .ok_or(MemoryError::TooManyRanges)?;
        *slot = range;
        self.len += 1;
        Ok(())
    }

    fn as_slice(&self) -> &[PhysRange] {
        &self.items[..self.len]
    }
}

/// Page-table memory reached through the direct map, frames from the global
/// allocator.
pub struct KernelTables;

impl TableMemory for KernelTables {
    fn read_entry(&self, table: u64, index: usize) -> u64 {
        let entry = phys_to_virt(table) as *const u64;
        // SAFETY: `table` is a page-table frame the builder allocated (or the
        // root it was given), mapped through the direct map, and index < 512.
        unsafe { entry.add(index).read_volatile() }
    }

    fn write_entry(&mut self, table: u64, index: usize, value: u64) {
        let entry = phys_to_virt(table) as *mut u64;
        // SAFETY: as in `read_entry`; page tables are only written with
        // interrupts off, by the one CPU that runs the kernel.
        unsafe { entry.add(index).write_volatile(value) }
    }

    fn alloc_table(&mut self) -> Option<u64> {
        alloc_zeroed_page().map(|(phys, _)| phys)
    }

    fn free_table(&mut self, table: u64) {
        free_frame(table);
    }
}

/// A zeroed frame: its physical address and its bytes through the direct map.
pub fn alloc_zeroed_page() -> Option<(u64, &'static mut [u8; 4096])> {
    let phys = FRAMES.lock().as_mut()?.alloc()?;
    // SAFETY: the allocator just handed out this frame, so nothing else
    // refers to it; it is RAM reached through the direct map.
    let page = unsafe { &mut *(phys_to_virt(phys) as *mut [u8; 4096]) };
    page.fill(0);
    Some((phys, page))
}

/// `count` contiguous zeroed frames; the physical address of the first.
pub fn alloc_contiguous(count: usize) -> Option<u64> {
    alloc_contiguous_aligned(count, PAGE_SIZE)
}

/// `count` zeroed, physically contiguous frames starting at a multiple of
/// `align`.
pub fn alloc_contiguous_aligned(count: usize, align: u64) -> Option<u64> {
    let phys = FRAMES.lock().as_mut()?.alloc_contiguous(count, align)?;
    // SAFETY: the allocator just handed out these frames, so nothing else
    // refers to them; they are RAM reached through the direct map.
    unsafe { core::ptr::write_bytes(phys_to_virt(phys) as *mut u8, 0, count * PAGE_SIZE as usize) };
    Some(phys)
}

pub fn free_frame(phys: u64) {
    if let Some(frames) = FRAMES.lock().as_mut() {
        if let Err(error) = frames.free(phys) {
            log::error!("memory: freeing frame {phys:#x}: {error}");
        }
    }
}

pub fn free_frames() -> usize {
    FRAMES
        .lock()
        .as_ref()
        .map_or(0, |frames| frames.free_frames())
}

/// The kernel's page-table root, whose upper half every address space shares.
pub fn kernel_root() -> u64 {
    KERNEL_ROOT.load(Ordering::Relaxed)
}

/// `TRAMPOLINE_PAGES` pages of low RAM (below 1 MiB) that the kernel may
/// use to start the other CPUs; no one else uses them.
pub fn trampoline_area() -> Option<u64> {
    Some(TRAMPOLINE.load(Ordering::Relaxed)).filter(|&base| base != 0)
}

/// Whether `phys` is RAM (usable in the memory map, or below 1 MiB, where
/// firmware and the legacy areas are): memory the kernel hands out, never
/// a device's registers.
pub fn is_ram(phys: u64) -> bool {
    phys < LOW_MEMORY.end
        || USABLE
            .lock()
            .as_slice()
            .iter()
            .any(|r| (r.start..r.end).contains(&phys))
}

/// Whether the page at `phys` may be mapped into user space as a device's
/// registers (`map_device`): not RAM and not the interrupt controllers.
pub fn is_device_page(phys: u64) -> bool {
    !is_ram(phys)
        && !(INTERRUPT_WINDOW.start..INTERRUPT_WINDOW.end).contains(&phys)
        && phys < moat_kernel::paging::PHYS_LIMIT
}

/// NX if the CPU has it; the bit is reserved otherwise.
pub fn no_execute() -> MapFlags {
    if NO_EXECUTE.load(Ordering::Relaxed) {
        MapFlags::NO_EXECUTE
    } else {
        MapFlags::empty()
    }
}

pub fn init(boot: &BootInfo, has_no_execute: bool) -> Result<(), MemoryError> {
    NO_EXECUTE.store(has_no_execute, Ordering::Relaxed);
    let mut usable = Ranges::new();
    let mut top = 0;
    for region in boot.memory_map() {
        if region.kind == RegionKind::Usable {
            let range =
                PhysRange::from_len(region.start, region.len).ok_or(MemoryError::NoUsableMemory)?;
            top = top.max(range.end);
            usable.push(range)?;
        }
    }
    if usable.len == 0 {
        return Err(MemoryError::NoUsableMemory);
    }
    {
        let mut kept = USABLE.lock();
        for range in usable.as_slice() {
            kept.push(*range)?;
        }
    }

    let mut reserved = Ranges::new();
    reserved.push(LOW_MEMORY)?;
    reserved.push(PhysRange::new(
        symbol!(__load_start_phys),
        symbol!(__bss_end_phys),
    ))?;
    for range in boot.footprint() {
        reserved.push(range)?;
    }
    for module in boot.modules() {
        reserved.push(PhysRange::new(module.start, module.end))?;
    }

    // The trampoline goes into low RAM, which the allocator never hands
    // out (LOW_MEMORY, the first reserved range), clear of the boot
    // information and modules the kernel reads later.
    let trampoline = place_trampoline(
        usable.as_slice(),
        &reserved.as_slice()[1..],
        TRAMPOLINE_PAGES,
    );
    TRAMPOLINE.store(trampoline.unwrap_or(0), Ordering::Relaxed);

    let bitmap_range =
        place_bitmap(usable.as_slice(), reserved.as_slice()).map_err(MemoryError::Bitmap)?;
    if bitmap_range.end > BOOT_DIRECT_MAP_SIZE {
        return Err(MemoryError::BitmapAboveDirectMap);
    }
    let words = FrameAllocator::bitmap_words(top);
    // SAFETY: `place_bitmap` chose this range inside usable RAM and outside
    // everything reserved; it is below 4 GiB, so the direct map covers it,
    // and from now on only the allocator uses it.
    let bitmap = unsafe {
        core::slice::from_raw_parts_mut(phys_to_virt(bitmap_range.start) as *mut u64, words)
    };
    let mut frames = FrameAllocator::new(bitmap);
    for range in usable.as_slice() {
        frames.add_free(*range);
    }
    for range in reserved.as_slice() {
        frames.reserve(*range);
    }
    frames.reserve(bitmap_range);
    log::info!(
        "memory: {} MiB usable, {} MiB free, {} boot module(s)",
        usable.as_slice().iter().map(|r| r.len()).sum::<u64>() >> 20,
        (frames.free_frames() as u64 * PAGE_SIZE) >> 20,
        boot.modules().len()
    );
    *FRAMES.lock() = Some(frames);

    let root =
        build_kernel_tables(top.max(BOOT_DIRECT_MAP_SIZE)).map_err(MemoryError::KernelTables)?;
    KERNEL_ROOT.store(root, Ordering::Relaxed);
    // SAFETY: the new tables map the kernel image, its stacks and statics
    // (all in the image) and the direct map at the same addresses as the boot
    // tables, so execution continues unchanged.
    unsafe {
        cpu::write_cr3(root);
        cpu::write_cr4(cpu::read_cr4() | CR4_PGE);
    }
    Ok(())
}

fn build_kernel_tables(direct_map_size: u64) -> Result<u64, MapError> {
    let mem = &mut KernelTables;
    let mut space = AddressSpace::new(mem)?;
    let size = direct_map_size.next_multiple_of(2 << 20);
    let data = MapFlags::WRITABLE | MapFlags::GLOBAL | no_execute();
    space.map_range(mem, DIRECT_MAP_BASE, 0, size, data, true)?;

    let sections = [
        (symbol!(__text_start), symbol!(__text_end), MapFlags::GLOBAL),
        (
            symbol!(__rodata_start),
            symbol!(__rodata_end),
            MapFlags::GLOBAL | no_execute(),
        ),
        (symbol!(__data_start), symbol!(__data_end), data),
    ];
    for (start, end, flags) in sections {
        space.map_range(
            mem,
            start,
            kernel_virt_to_phys(start),
            end - start,
            flags,
            false,
        )?;
    }
    debug_assert!(DIRECT_MAP_BASE >> 39 & 511 >= KERNEL_PML4_FIRST as u64);
    Ok(space.root())
}
