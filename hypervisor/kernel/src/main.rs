//! The Moat kernel: boots from Multiboot, discovers the platform, turns on
//! VMX or SVM and starts the root task in ring 3.
#![no_std]
#![no_main]

mod arch;
mod console;
mod dump;
mod ec;
mod heap;
mod kernel;
mod memory;
mod pd;
mod pt;
mod root;
mod sc;
mod scheduler;
mod sm;
mod syscall;
mod util;
mod vcpu;

extern crate alloc;

use arch::x86_64::{
    acpi, boot, cpu, entry, features, gdt, idt, ioapic, lapic, layout, percpu, pit, smp, svm, trap,
    vmx,
};
use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use features::Virtualization;
use moat_kernel::multiboot::{self, BootInfo, PhysRead, Unreadable};

/// Set by the `debug-exit` command-line word: when the kernel stops it ends
/// the emulator through QEMU's isa-debug-exit port and Bochs' 0x8900 port.
static DEBUG_EXIT: AtomicBool = AtomicBool::new(false);
const QEMU_DEBUG_EXIT_PORT: u16 = 0xf4;
const QEMU_EXIT_SUCCESS: u8 = 0x10;
const QEMU_EXIT_FAILURE: u8 = 0x11;
const BOCHS_SHUTDOWN_PORT: u16 = 0x8900;
/// What the kernel writes to the isa-debug-exit port when every task has
/// ended: its own "done", or what the root task asked for by its exit code
/// (`moat_abi::EXIT_WITH_VALUE`).
static EXIT_VALUE: AtomicU8 = AtomicU8::new(QEMU_EXIT_SUCCESS);

/// The root task asked to end the machine with `value` (see [`EXIT_VALUE`]).
pub fn set_exit_value(value: u8) {
    EXIT_VALUE.store(value, Ordering::Relaxed);
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Every task has ended.
    NoTasks,
    /// The kernel cannot go on (bad boot information, no memory).
    Fatal,
    /// An exception in kernel mode.
    KernelFault,
    /// A Rust panic in the kernel.
    Panic,
}

/// Physical memory as the boot page tables show it (the first 4 GiB).
pub struct BootDirectMap;

impl PhysRead for BootDirectMap {
    fn read(&self, phys: u64, buf: &mut [u8]) -> Result<(), Unreadable> {
        let end = phys.checked_add(buf.len() as u64).ok_or(Unreadable)?;
        if end > layout::BOOT_DIRECT_MAP_SIZE {
            return Err(Unreadable);
        }
        // SAFETY: [phys, end) is inside the direct map, which maps the first
        // 4 GiB for the kernel's whole life; reading RAM there is harmless.
        let source = unsafe {
            core::slice::from_raw_parts(layout::phys_to_virt(phys) as *const u8, buf.len())
        };
        buf.copy_from_slice(source);
        Ok(())
    }
}

fn has_word(cmdline: &str, word: &str) -> bool {
    cmdline.split_whitespace().any(|w| w == word)
}

fn boot_stack_top() -> u64 {
    core::ptr::addr_of!(boot::BOOT_STACK) as u64 + layout::BOOT_STACK_SIZE as u64
}

extern "C" fn kernel_main(magic: u32, info: u32) -> ! {
    let stack_top = boot_stack_top();
    percpu::enter(percpu::BOOT_CPU, stack_top);
    console::init();
    log::info!("moat {}: booting", env!("CARGO_PKG_VERSION"));
    let (tables, ist_base) = gdt::boot_cpu_tables();
    // SAFETY: the boot CPU's tables and IST stacks are statics that only
    // the boot CPU uses, loaded here once.
    unsafe { gdt::init(tables, stack_top, ist_base) };
    idt::init();

    let boot_info = match BootInfo::parse(&BootDirectMap, magic, info.into()) {
        Ok(info) => info,
        Err(error) => {
            log::error!("multiboot: {error}");
            stop(StopReason::Fatal);
        }
    };
    let mut cmdline_buffer = [0u8; 512];
    let cmdline = boot_info
        .cmdline
        .as_ref()
        .and_then(|s| multiboot::read_str(&BootDirectMap, s, &mut cmdline_buffer).ok())
        .unwrap_or("");
    if has_word(cmdline, "debug-exit") {
        DEBUG_EXIT.store(true, Ordering::Relaxed);
    }
    log::info!("cmdline: {cmdline}");

    let features = features::detect();
    if let Err(error) = memory::init(&boot_info, features.no_execute) {
        log::error!("memory: {error}");
        stop(StopReason::Fatal);
    }
    features::log_banner(&features);

    let platform = match acpi::discover() {
        Ok(platform) => {
            acpi::log_banner(&platform);
            if let Some(first) = platform.ioapics().first() {
                ioapic::init(first.address.into());
            }
            platform
        }
        Err(error) => {
            log::warn!("acpi: {error}");
            acpi::Platform::default()
        }
    };

    pit::mask_legacy_pic();
    let timer = lapic::init(
        features.x2apic,
        trap::VECTOR_TIMER as u8,
        trap::VECTOR_SPURIOUS as u8,
    );
    log::info!(
        "lapic: {} mode, id {}, timer {} kHz, tsc {} MHz, tick {} Hz",
        if timer.x2apic { "x2apic" } else { "xapic" },
        timer.id,
        timer.timer_hz / 1000,
        timer.tsc_hz / 1_000_000,
        lapic::TICK_HZ
    );

    match lapic::wait_for_ticks(2, timer.tsc_hz) {
        Some(cycles) => {
            log::info!(
                "lapic: timer interrupts arrive: 2 ticks in {} us by the TSC",
                cycles * 1_000_000 / timer.tsc_hz.max(1)
            );
            // The timer can now wake the kernel to feed the UART.
            console::start_queueing(timer.tsc_hz);
        }
        None => log::error!("lapic: no timer interrupt within a second"),
    }

    arch::x86_64::vmx::vcpu::set_tsc_hz(timer.tsc_hz);
    enable_virtualization(&features);
    arch::x86_64::fpu::init();
    entry::init_syscall();
    smp::start_all(
        platform.apic_ids(),
        &smp::Options {
            limit: cpu_limit(cmdline),
            hang: word_value(cmdline, "smp-test-hang").map(|n| n as usize),
        },
    );

    if has_word(cmdline, "debug-lock-waits") {
        kernel::report_lock_waits(20_000);
    }
    if let Some(us) = word_value(cmdline, "debug-lock-waits") {
        kernel::report_lock_waits(us.max(1));
    }
    if has_word(cmdline, "smp-test-no-shootdown") {
        arch::x86_64::ipi::disable_remote_shootdowns();
    }
    if has_word(cmdline, "kernel-fault-test") {
        log::warn!("kernel-fault-test: executing ud2 in kernel mode on purpose");
        // SAFETY: not safe: this raises #UD in the kernel deliberately, to
        // show the exception path prints the registers and halts cleanly.
        unsafe { core::arch::asm!("ud2") };
    }

    root::start(&boot_info, timer.tsc_hz, word_value(cmdline, "pool"))
}

/// The number in `key=N` on the command line.
fn word_value(cmdline: &str, key: &str) -> Option<u64> {
    cmdline
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

/// `cpus=N`: at most N CPUs (N >= 1), the boot CPU included.
fn cpu_limit(cmdline: &str) -> Option<usize> {
    let limit = word_value(cmdline, "cpus")?;
    if limit == 0 {
        log::warn!("cpus=0 ignored: the boot CPU always runs");
        return None;
    }
    usize::try_from(limit).ok()
}

fn enable_virtualization(features: &features::Features) {
    match features.virtualization {
        Virtualization::Vmx(_) => {
            let Some((phys, page)) = memory::alloc_zeroed_page() else {
                log::error!("vmx: off: no memory for the VMXON region");
                return;
            };
            match vmx::enable(phys, page) {
                Ok(()) => {
                    arch::x86_64::virt::set_vendor(arch::x86_64::virt::Vendor::Vmx);
                    arch::x86_64::virt::set_highest_tlb_tag(u16::MAX);
                    log::info!("vmx: on")
                }
                Err(error) => log::error!("vmx: off: {error}"),
            }
        }
        Virtualization::Svm(svm_features) => {
            let Some((phys, _)) = memory::alloc_zeroed_page() else {
                log::error!("svm: off: no memory for the host save area");
                return;
            };
            match svm::enable(phys) {
                Ok(()) => {
                    arch::x86_64::virt::set_vendor(arch::x86_64::virt::Vendor::Svm);
                    let highest = svm_features
                        .asids
                        .saturating_sub(1)
                        .min(u32::from(u16::MAX));
                    arch::x86_64::virt::set_highest_tlb_tag(highest as u16);
                    log::info!("svm: on")
                }
                Err(error) => log::error!("svm: off: {error}"),
            }
        }
        Virtualization::None => log::warn!("no virtualization: guests cannot run"),
    }
}

/// Ends the kernel's work: prints why, then ends the emulator when asked
/// to (`debug-exit`), else halts.
pub fn stop(reason: StopReason) -> ! {
    match reason {
        StopReason::NoTasks => {
            smp::report_idle();
            log::info!(
                "moat: no tasks left, stopping after {} timer ticks",
                lapic::ticks()
            );
            let value = EXIT_VALUE.load(Ordering::Relaxed);
            if value != QEMU_EXIT_SUCCESS {
                log::info!("moat: debug-exit value {value:#x}, asked for by the root task");
            }
        }
        StopReason::Fatal => log::error!("moat: cannot continue, stopping"),
        StopReason::KernelFault | StopReason::Panic => {
            console::write_emergency(format_args!("moat: kernel halted\n"))
        }
    }
    console::drain();
    if DEBUG_EXIT.load(Ordering::Relaxed) {
        let code = if reason == StopReason::NoTasks {
            EXIT_VALUE.load(Ordering::Relaxed)
        } else {
            QEMU_EXIT_FAILURE
        };
        cpu::outb(QEMU_DEBUG_EXIT_PORT, code);
        for byte in b"Shutdown" {
            cpu::outb(BOCHS_SHUTDOWN_PORT, *byte);
        }
    }
    cpu::halt_forever()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    console::write_emergency(format_args!("\n!!! KERNEL PANIC: {info}\n"));
    stop(StopReason::Panic)
}
