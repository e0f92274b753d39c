//! User tasks: loading an ELF boot module into a fresh address space and
//! running it in ring 3, and ending it when it exits or faults.
//!
//! For now there is exactly one task, the root task; the scheduler, threads
//! and protection domains replace this module's single slot.

use crate::arch::x86_64::entry::{self, TrapFrame};
use crate::arch::x86_64::layout::{phys_to_virt, USER_END, USER_START};
use crate::arch::x86_64::{cpu, trap};
use crate::memory::{self, KernelTables};
use crate::util::Name;
use crate::{stop, BootDirectMap, StopReason};
use core::fmt;
use moat_kernel::elf::{ElfError, ElfImage, SegmentFlags};
use moat_kernel::frame::PAGE_SIZE;
use moat_kernel::multiboot::{self, BootInfo, Module};
use moat_kernel::paging::{AddressSpace, MapError, MapFlags, PageSize, LOWER_HALF, UPPER_HALF};
use spin::Mutex;

const STACK_TOP: u64 = 0x0000_7fff_fff0_0000;
const STACK_PAGES: u64 = 16;
const MAX_ARGS: usize = 256;

pub struct Task {
    name: Name,
    space: AddressSpace,
    /// Free frames before the task was loaded: all must be back when it ends.
    frames_before: usize,
}

static CURRENT: Mutex<Option<Task>> = Mutex::new(None);
/// The context a new task starts from; `enter_user` pops it from here.
static mut START_FRAME: TrapFrame = TrapFrame {
    rax: 0,
    rbx: 0,
    rcx: 0,
    rdx: 0,
    rsi: 0,
    rdi: 0,
    rbp: 0,
    r8: 0,
    r9: 0,
    r10: 0,
    r11: 0,
    r12: 0,
    r13: 0,
    r14: 0,
    r15: 0,
    vector: 0,
    error_code: 0,
    rip: 0,
    cs: 0,
    rflags: 0,
    rsp: 0,
    ss: 0,
};

#[derive(Debug)]
pub enum LoadError {
    Elf(ElfError),
    Map(MapError),
    OutOfMemory,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Elf(error) => write!(f, "{error}"),
            LoadError::Map(error) => write!(f, "mapping it failed: {error}"),
            LoadError::OutOfMemory => f.write_str("out of memory while loading it"),
        }
    }
}

impl From<MapError> for LoadError {
    fn from(error: MapError) -> Self {
        match error {
            MapError::OutOfMemory => LoadError::OutOfMemory,
            other => LoadError::Map(other),
        }
    }
}

/// The bytes of a boot module.
fn module_bytes(module: &Module) -> &'static [u8] {
    let len = module.end.saturating_sub(module.start) as usize;
    // SAFETY: the boot loader placed the module at [start, end) in RAM, the
    // frame allocator reserved that range so nothing else reuses it, and the
    // multiboot parser checked end >= start; it is reached through the
    // direct map.
    unsafe { core::slice::from_raw_parts(phys_to_virt(module.start) as *const u8, len) }
}

/// Starts the first boot module as the root task; never returns. A missing
/// or broken module is reported by name and the kernel stops cleanly.
pub fn start_root_task(boot: &BootInfo) -> ! {
    let Some(module) = boot.modules().first() else {
        log::error!("root task module missing: the boot loader passed no modules (the root task must be the first)");
        stop(StopReason::NoTasks);
    };
    let mut cmdline = [0u8; 512];
    let line = module
        .cmdline
        .as_ref()
        .and_then(|s| multiboot::read_str(&BootDirectMap, s, &mut cmdline).ok())
        .unwrap_or("");
    let (name, args) = multiboot::split_module_cmdline(line);
    let name = if name.is_empty() { "module0" } else { name };
    let bytes = module_bytes(module);
    match load(name, bytes, args) {
        Ok(frame) => run(frame),
        Err(error) => {
            log::error!("boot module '{name}' ({} bytes): {error}", bytes.len());
            stop(StopReason::NoTasks);
        }
    }
}

/// Builds the task's address space and its first context; on failure frees
/// everything it took.
fn load(name: &str, bytes: &[u8], args: &str) -> Result<TrapFrame, LoadError> {
    let image = ElfImage::parse(bytes, USER_START..USER_END).map_err(LoadError::Elf)?;
    let frames_before = memory::free_frames();
    let mem = &mut KernelTables;
    let mut space = AddressSpace::new(mem)?;
    space.share_top_entries(mem, memory::kernel_root(), UPPER_HALF);
    let result = populate(&mut space, &image, args);
    match result {
        Ok(frame) => {
            log::info!(
                "task '{name}': entry {:#x}, {} segment(s), {} frames",
                image.entry,
                image.segments().count(),
                frames_before - memory::free_frames()
            );
            *CURRENT.lock() = Some(Task {
                name: Name::new(name),
                space,
                frames_before,
            });
            Ok(frame)
        }
        Err(error) => {
            release(space);
            Err(error)
        }
    }
}

fn populate(
    space: &mut AddressSpace,
    image: &ElfImage,
    args: &str,
) -> Result<TrapFrame, LoadError> {
    for segment in image.segments() {
        let mut flags = MapFlags::USER;
        if segment.flags.contains(SegmentFlags::WRITE) {
            flags |= MapFlags::WRITABLE;
        }
        if !segment.flags.contains(SegmentFlags::EXECUTE) {
            flags |= memory::no_execute();
        }
        let first = segment.vaddr & !(PAGE_SIZE - 1);
        let end = (segment.vaddr + segment.mem_size).next_multiple_of(PAGE_SIZE);
        for page in (first..end).step_by(PAGE_SIZE as usize) {
            let contents = map_fresh_page(space, page, flags)?;
            // Copy the part of the file that falls into this page.
            let file_start = segment.vaddr;
            let file_end = segment.vaddr + segment.data.len() as u64;
            let from = page.max(file_start);
            let to = (page + PAGE_SIZE).min(file_end);
            if from < to {
                let source =
                    &segment.data[(from - file_start) as usize..(to - file_start) as usize];
                contents[(from - page) as usize..(to - page) as usize].copy_from_slice(source);
            }
        }
    }

    let stack_flags = MapFlags::USER | MapFlags::WRITABLE | memory::no_execute();
    let mut top_page = None;
    for page in (STACK_TOP - STACK_PAGES * PAGE_SIZE..STACK_TOP).step_by(PAGE_SIZE as usize) {
        top_page = Some(map_fresh_page(space, page, stack_flags)?);
    }
    // The argument string sits at the top of the stack.
    let args = &args.as_bytes()[..args.len().min(MAX_ARGS)];
    let top_page = top_page.ok_or(LoadError::OutOfMemory)?;
    let offset = PAGE_SIZE as usize - MAX_ARGS;
    top_page[offset..offset + args.len()].copy_from_slice(args);
    let args_address = STACK_TOP - MAX_ARGS as u64;

    let mut frame = TrapFrame::new_user(image.entry, args_address - 64);
    frame.rdi = args_address;
    frame.rsi = args.len() as u64;
    Ok(frame)
}

fn map_fresh_page(
    space: &mut AddressSpace,
    virt: u64,
    flags: MapFlags,
) -> Result<&'static mut [u8; 4096], LoadError> {
    let (phys, contents) = memory::alloc_zeroed_page().ok_or(LoadError::OutOfMemory)?;
    if let Err(error) = space.map(&mut KernelTables, virt, phys, PageSize::Size4K, flags) {
        memory::free_frame(phys);
        return Err(error.into());
    }
    Ok(contents)
}

/// Frees every user page and page table of `space`.
fn release(space: AddressSpace) {
    let mem = &mut KernelTables;
    let mut space = space;
    let mut page = USER_START & !(PAGE_SIZE - 1);
    // Walk only what was mapped: the lower half in steps of what translate
    // reports, skipping unmapped top-level slots quickly.
    while page < USER_END {
        match space.translate(mem, page) {
            Some(_) => {
                if let Ok((phys, size)) = space.unmap(mem, page) {
                    memory::free_frame(phys);
                    page += size.bytes();
                } else {
                    page += PAGE_SIZE;
                }
            }
            None => page = next_candidate(&space, mem, page),
        }
    }
    space.free_tables(mem, LOWER_HALF);
}

/// The next address worth probing after the unmapped `page`: skips whole
/// regions whose table entry (512 GiB, 1 GiB, 2 MiB) is empty.
fn next_candidate(space: &AddressSpace, mem: &KernelTables, page: u64) -> u64 {
    use moat_kernel::paging::TableMemory;
    const ADDRESS: u64 = 0x000f_ffff_ffff_f000;
    let mut table = space.root();
    for shift in [39u32, 30, 21] {
        let entry = mem.read_entry(table, (page >> shift) as usize & 511);
        if entry & 1 == 0 {
            let span = 1u64 << shift;
            return (page / span + 1) * span;
        }
        table = entry & ADDRESS;
    }
    page + PAGE_SIZE
}

fn run(frame: TrapFrame) -> ! {
    let root = CURRENT.lock().as_ref().map(|task| task.space.root());
    let Some(root) = root else {
        stop(StopReason::NoTasks)
    };
    // SAFETY: START_FRAME is only written here, with interrupts off, before
    // the kernel leaves for user mode; nothing else references it.
    let start = unsafe {
        let start = core::ptr::addr_of_mut!(START_FRAME);
        start.write(frame);
        start
    };
    // SAFETY: the task's address space shares the kernel half with the
    // kernel's tables; the frame is a user context (built by new_user with
    // the ELF's validated entry) in static memory.
    unsafe {
        cpu::write_cr3(root);
        entry::enter_user(start)
    }
}

/// Copies `buffer.len()` bytes from the current task's memory at `address`;
/// false if any byte is not mapped readable for user mode.
pub fn copy_from_user(address: u64, buffer: &mut [u8]) -> bool {
    let task = CURRENT.lock();
    let Some(task) = task.as_ref() else {
        return false;
    };
    let mem = &KernelTables;
    let mut done = 0;
    while done < buffer.len() {
        let Some(virt) = address.checked_add(done as u64) else {
            return false;
        };
        if virt >= USER_END {
            return false;
        }
        let Some(translation) = task.space.translate(mem, virt) else {
            return false;
        };
        if !translation.flags.contains(MapFlags::USER) {
            return false;
        }
        let in_page = (PAGE_SIZE - (virt % PAGE_SIZE)) as usize;
        let take = in_page.min(buffer.len() - done);
        // SAFETY: the translation says [phys, phys + take) is a user page of
        // this task (RAM the kernel mapped for it), reached via the direct map.
        let source = unsafe {
            core::slice::from_raw_parts(phys_to_virt(translation.phys) as *const u8, take)
        };
        buffer[done..done + take].copy_from_slice(source);
        done += take;
    }
    true
}

/// The current task asked to end.
pub fn exit_current(code: i64) -> ! {
    finish(format_args!("exited with code {code}"))
}

/// An exception in user mode: report it and end the task; the kernel goes on.
pub fn user_exception(frame: &TrapFrame) -> ! {
    let name = CURRENT
        .lock()
        .as_ref()
        .map_or(Name::new("?"), |task| task.name);
    log::error!(
        "user fault in '{name}': {} at rip {:#x}, rsp {:#x}, error code {:#x}, cr2 {:#x}",
        trap::exception_name(frame.vector),
        frame.rip,
        frame.rsp,
        frame.error_code,
        cpu::read_cr2()
    );
    finish(format_args!("killed after the fault"))
}

fn finish(how: fmt::Arguments) -> ! {
    // SAFETY: the kernel's tables map everything the kernel uses.
    unsafe { cpu::write_cr3(memory::kernel_root()) };
    let task = CURRENT.lock().take();
    if let Some(task) = task {
        log::info!("task '{}' {how}", task.name);
        release(task.space);
        let lost = task.frames_before.saturating_sub(memory::free_frames());
        if lost == 0 {
            log::info!("task '{}': all its memory is free again", task.name);
        } else {
            log::error!("task '{}': {lost} frames leaked", task.name);
        }
    }
    stop(StopReason::NoTasks)
}
