//! Building the root task from the first boot module, and ending the
//! system when the root task ends.

use crate::arch::x86_64::layout::{phys_to_virt, USER_END, USER_START};
use crate::heap;
use crate::kernel::{Cap, Kernel, Object, PdId};
use crate::memory;
use crate::util::Name;
use crate::{stop, BootDirectMap, StopReason};
use core::sync::atomic::{AtomicUsize, Ordering};
use moat_abi::{
    layout, rights, selectors, BootInfo, BootModule, Space, Status, BOOT_INFO_MAGIC,
    BOOT_MODULES_MAX, PAGE_SIZE,
};
use moat_kernel::cap::{Rights, SlotRef};
use moat_kernel::elf::{ElfImage, SegmentFlags};
use moat_kernel::multiboot::{self, BootInfo as Multiboot, Module};

const ROOT_PRIORITY: u8 = 32;
const ROOT_BUDGET_US: u64 = 10_000;
const ROOT_CAPACITY: usize = 1 << 16;
const MAX_ARGS: usize = 256;
/// Frames left free for the kernel after the pool and the quota are set.
const KERNEL_RESERVE_FRAMES: usize = 2048;

/// Free frames (plus heap pages) before the root task existed: all must
/// be back once it is gone.
static FRAMES_BEFORE: AtomicUsize = AtomicUsize::new(0);

/// The bytes of a boot module.
fn module_bytes(module: &Module) -> &'static [u8] {
    let len = module.end.saturating_sub(module.start) as usize;
    // SAFETY: the boot loader placed the module at [start, end) in RAM, the
    // frame allocator reserved that range, and the Multiboot parser checked
    // end >= start; it is reached through the direct map.
    unsafe { core::slice::from_raw_parts(phys_to_virt(module.start) as *const u8, len) }
}

fn module_name<'a>(module: &Module, buffer: &'a mut [u8]) -> (&'a str, &'a str) {
    let line = module
        .cmdline
        .as_ref()
        .and_then(|s| multiboot::read_str(&BootDirectMap, s, buffer).ok())
        .unwrap_or("");
    multiboot::split_module_cmdline(line)
}

fn copy_padded(target: &mut [u8], text: &str) {
    let len = text.len().min(target.len() - 1);
    target[..len].copy_from_slice(&text.as_bytes()[..len]);
}

/// Starts the root task; never returns. A missing or broken first module is
/// reported by name and the kernel stops cleanly.
/// `pool_mib`: the root's memory pool in MiB (the kernel command line's
/// `pool=`); by default a quarter of free memory, at most 64 MiB.
pub fn start(boot: &Multiboot, tsc_hz: u64, pool_mib: Option<u64>) -> ! {
    let Some(module) = boot.modules().first() else {
        log::error!("root task module missing: the boot loader passed no modules (the root task must be the first)");
        stop(StopReason::NoTasks);
    };
    let mut line = [0u8; 512];
    let (name, args) = module_name(module, &mut line);
    let name = Name::new(if name.is_empty() { "module0" } else { name });
    let bytes = module_bytes(module);
    let image = match ElfImage::parse(bytes, USER_START..USER_END) {
        Ok(image) => image,
        Err(error) => {
            log::error!("boot module '{name}' ({} bytes): {error}", bytes.len());
            stop(StopReason::NoTasks);
        }
    };
    FRAMES_BEFORE.store(memory::free_frames() + heap::pages(), Ordering::Relaxed);
    let mut kernel = Kernel::new();
    let mut args_buffer = [0u8; MAX_ARGS];
    let args = &args[..args.len().min(MAX_ARGS)];
    args_buffer[..args.len()].copy_from_slice(args.as_bytes());
    match build(
        &mut kernel,
        boot,
        &image,
        &args_buffer[..args.len()],
        tsc_hz,
        pool_mib,
    ) {
        Ok(pool) => log::info!(
            "task '{name}': entry {:#x}, {} segment(s), pool {} MiB, kernel quota {} KiB",
            image.entry,
            image.segments().count(),
            pool >> 20,
            kernel
                .root_pd
                .and_then(|pd| kernel.pds.get(pd))
                .map_or(0, |p| p.quota.limit >> 10)
        ),
        Err(status) => {
            log::error!("boot module '{name}': cannot build the root task: {status}");
            stop(StopReason::NoTasks);
        }
    }
    crate::scheduler::join_boot_cpu();
    *crate::kernel::lock() = Some(kernel);
    let frame = crate::scheduler::leave();
    // SAFETY: `leave` returned the saved context of the root task's EC,
    // prepared for entry.
    unsafe { crate::arch::x86_64::entry::enter_user(frame) }
}

/// Gives the root PD a fresh page at `vpn` (an original memory capability).
fn give_page(
    kernel: &mut Kernel,
    pd: PdId,
    vpn: u64,
    rights_bits: u8,
) -> Result<&'static mut [u8; 4096], Status> {
    give_page_as(kernel, pd, vpn, rights_bits, rights_bits)
}

/// A fresh page whose capability has `cap_rights` (what the root may pass
/// on) and whose mapping in the root has `map_rights`.
fn give_page_as(
    kernel: &mut Kernel,
    pd: PdId,
    vpn: u64,
    cap_rights: u8,
    map_rights: u8,
) -> Result<&'static mut [u8; 4096], Status> {
    let (phys, page) = memory::alloc_zeroed_page().ok_or(Status::QuotaExceeded)?;
    if let Err(status) = give_frame(kernel, pd, vpn, phys, true, cap_rights, map_rights) {
        memory::free_frame(phys);
        return Err(status);
    }
    Ok(page)
}

pub(crate) fn give_frame(
    kernel: &mut Kernel,
    pd: PdId,
    vpn: u64,
    phys: u64,
    owned: bool,
    cap_rights: u8,
    map_rights: u8,
) -> Result<(), Status> {
    let space = kernel.space_of(pd, Space::Memory)?;
    kernel.charge(pd, crate::kernel::CAP_SLOT_COST)?;
    if let Err(status) = kernel.map_page(pd, vpn, phys, map_rights) {
        kernel.refund(pd, crate::kernel::CAP_SLOT_COST);
        return Err(status);
    }
    // The capability owns the frame only once it exists (the caller frees
    // the frame on failure).
    let cap = Cap::Frame { phys, owned };
    let inserted = kernel.caps.insert_root(
        SlotRef::new(space, vpn),
        cap,
        Rights::from_bits_retain(cap_rights),
    );
    if let Err(error) = inserted {
        kernel.unmap_page(pd, vpn);
        kernel.refund(pd, crate::kernel::CAP_SLOT_COST);
        return Err(crate::kernel::status_of(error));
    }
    Ok(())
}

fn rights_of(flags: SegmentFlags) -> u8 {
    let mut bits = rights::MEM_READ;
    if flags.contains(SegmentFlags::WRITE) {
        bits |= rights::MEM_WRITE;
    }
    if flags.contains(SegmentFlags::EXECUTE) {
        bits |= rights::MEM_EXECUTE;
    }
    bits
}

/// Frames of a 2 MiB page.
const LARGE_FRAMES: usize = 512;
const LARGE_PAGE: u64 = 2 << 20;

/// Builds the root PD; returns the pool size.
fn build(
    kernel: &mut Kernel,
    boot: &Multiboot,
    image: &ElfImage,
    args: &[u8],
    tsc_hz: u64,
    pool_mib: Option<u64>,
) -> Result<u64, Status> {
    let free = memory::free_frames().saturating_sub(KERNEL_RESERVE_FRAMES);
    // At most three quarters: the rest is the kernel's, half of it the
    // root's quota.
    let pool_pages = match pool_mib {
        Some(mib) => mib.saturating_mul(1 << 20) / PAGE_SIZE,
        None => 16384,
    }
    .min(free as u64 / 4 * 3);
    let quota = (free as u64 - pool_pages) * PAGE_SIZE / 2;
    let pd = kernel.new_pd(None, quota, ROOT_CAPACITY, false)?;
    kernel.root_pd = Some(pd);

    for segment in image.segments() {
        let first = segment.vaddr & !(PAGE_SIZE - 1);
        let end = (segment.vaddr + segment.mem_size).next_multiple_of(PAGE_SIZE);
        for page in (first..end).step_by(PAGE_SIZE as usize) {
            let contents = give_page(kernel, pd, page / PAGE_SIZE, rights_of(segment.flags))?;
            let file_end = segment.vaddr + segment.data.len() as u64;
            let from = page.max(segment.vaddr);
            let to = (page + PAGE_SIZE).min(file_end);
            if from < to {
                let source =
                    &segment.data[(from - segment.vaddr) as usize..(to - segment.vaddr) as usize];
                contents[(from - page) as usize..(to - page) as usize].copy_from_slice(source);
            }
        }
    }

    // Stack, with the argument string (length first) at its top.
    let stack_rights = rights::MEM_READ | rights::MEM_WRITE;
    let stack_pages = layout::ROOT_STACK_SIZE / PAGE_SIZE;
    let mut top = None;
    for i in 0..stack_pages {
        let vpn = layout::STACK_TOP / PAGE_SIZE - stack_pages + i;
        top = Some(give_page(kernel, pd, vpn, stack_rights)?);
    }
    let top = top.ok_or(Status::BadParameter)?;
    let args_offset = (PAGE_SIZE as usize - 8 - args.len()) & !15;
    top[args_offset..args_offset + 8].copy_from_slice(&(args.len() as u64).to_le_bytes());
    top[args_offset + 8..args_offset + 8 + args.len()].copy_from_slice(args);
    let rsp = layout::STACK_TOP - PAGE_SIZE + args_offset as u64;

    // Boot information, modules, pool.
    let info_page = give_page(kernel, pd, layout::BOOT_INFO / PAGE_SIZE, rights::MEM_READ)?;
    let empty = BootModule {
        address: 0,
        size: 0,
        name: [0; 32],
        args: [0; 128],
    };
    let ecam = crate::arch::x86_64::acpi::ecam();
    let mut info = BootInfo {
        magic: BOOT_INFO_MAGIC,
        tsc_hz,
        pool_address: layout::ROOT_POOL,
        pool_size: pool_pages * PAGE_SIZE,
        kernel_quota: quota,
        ecam_base: ecam.map_or(0, |e| e.0),
        ecam_bus_end: ecam.map_or(0, |e| e.1),
        module_count: 0,
        modules: [empty; BOOT_MODULES_MAX],
    };
    let mut next = layout::ROOT_MODULES;
    for (module, slot) in boot.modules().iter().skip(1).zip(info.modules.iter_mut()) {
        let mut line = [0u8; 512];
        let (name, args) = module_name(module, &mut line);
        copy_padded(&mut slot.name, name);
        copy_padded(&mut slot.args, args);
        slot.address = next;
        slot.size = module.end.saturating_sub(module.start);
        let first = module.start & !(PAGE_SIZE - 1);
        for (i, phys) in (first..module.end).step_by(PAGE_SIZE as usize).enumerate() {
            give_frame(
                kernel,
                pd,
                next / PAGE_SIZE + i as u64,
                phys,
                false,
                rights::MEM_READ,
                rights::MEM_READ,
            )?;
        }
        slot.address += module.start - first;
        next += (module.end - first).next_multiple_of(PAGE_SIZE) + PAGE_SIZE;
        info.module_count += 1;
    }
    // SAFETY: BootInfo is plain old data (integers and byte arrays) that fits
    // in the page (checked at compile time in moat-abi).
    let bytes = unsafe {
        core::slice::from_raw_parts(
            &info as *const BootInfo as *const u8,
            core::mem::size_of::<BootInfo>(),
        )
    };
    info_page[..bytes.len()].copy_from_slice(bytes);
    // In aligned 2 MiB runs where memory allows: a VM given such a run at
    // an aligned guest address gets a 2 MiB page.
    let pool_first = layout::ROOT_POOL / PAGE_SIZE;
    let mut i = 0;
    while i < pool_pages {
        let aligned = (pool_first + i).is_multiple_of(LARGE_FRAMES as u64);
        let run = (aligned && pool_pages - i >= LARGE_FRAMES as u64)
            .then(|| memory::alloc_contiguous_aligned(LARGE_FRAMES, LARGE_PAGE))
            .flatten();
        match run {
            Some(phys) => {
                for j in 0..LARGE_FRAMES as u64 {
                    let given = give_frame(
                        kernel,
                        pd,
                        pool_first + i + j,
                        phys + j * PAGE_SIZE,
                        true,
                        rights::MEM_READ
                            | rights::MEM_WRITE
                            | rights::MEM_EXECUTE
                            | rights::MEM_DMA,
                        rights::MEM_READ | rights::MEM_WRITE,
                    );
                    if let Err(status) = given {
                        for rest in j..LARGE_FRAMES as u64 {
                            memory::free_frame(phys + rest * PAGE_SIZE);
                        }
                        return Err(status);
                    }
                }
                i += LARGE_FRAMES as u64;
            }
            None => {
                give_page_as(
                    kernel,
                    pd,
                    pool_first + i,
                    rights::MEM_READ | rights::MEM_WRITE | rights::MEM_EXECUTE | rights::MEM_DMA,
                    rights::MEM_READ | rights::MEM_WRITE,
                )?;
                i += 1;
            }
        }
    }

    let ec = kernel.new_ec(
        pd,
        crate::ec::EcKind::Global,
        crate::arch::x86_64::percpu::BOOT_CPU,
        image.entry,
        rsp,
        layout::MAIN_UTCB,
        u64::MAX,
        0,
    )?;
    kernel.install_object(pd, selectors::ROOT_EC, Object::Ec(ec))?;
    let sc = kernel.new_sc(pd, ec, ROOT_PRIORITY, ROOT_BUDGET_US)?;
    kernel.install_object(pd, selectors::ROOT_SC, Object::Sc(sc))?;
    kernel.root_ec = Some(ec);
    Ok(pool_pages * PAGE_SIZE)
}

impl Kernel {
    /// The root task has ended, said once: the CPU that hears it stops
    /// the system.
    #[inline]
    pub fn root_ended(&mut self) -> bool {
        self.root_dead && core::mem::take(&mut self.root_dead)
    }
}

/// The root task ended: tear everything down, check that every frame came
/// back, and stop.
pub fn finish() -> ! {
    {
        let mut guard = crate::kernel::lock();
        if let Some(kernel) = guard.as_mut() {
            kernel.root_ec = None;
            if let Some(pd) = kernel.root_pd.take() {
                kernel.destroy_pd(pd);
            }
            kernel.sync_tlbs();
        }
    }
    crate::scheduler::await_zombies();
    // SAFETY: the kernel's tables map everything the kernel uses.
    unsafe { crate::arch::x86_64::cpu::write_cr3(memory::kernel_root()) };
    let now = memory::free_frames() + heap::pages();
    let before = FRAMES_BEFORE.load(Ordering::Relaxed);
    if now == before {
        log::info!("task 'roottask': all its memory is free again");
    } else {
        log::error!(
            "task 'roottask': {} frames leaked",
            before.saturating_sub(now)
        );
    }
    stop(StopReason::NoTasks)
}
