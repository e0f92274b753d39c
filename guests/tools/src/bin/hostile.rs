//! `hostile`: root inside the Linux guest carries out the bare-metal
//! hostile guest's seeded plan (`hostile::plan`) against the VMM's devices
//! through `iopl(3)` and `/dev/port`, `/dev/mem`, CPUID, `/dev/cpu/0/msr`
//! and the IPC hypercall, sparing what Linux needs to go on
//! (`moat_guest_tools::hostile::carry`).
//!
//! Every access is one small assembly routine; an exception the VMM (or
//! Linux) answers it with arrives as a signal, whose handler returns from
//! the routine as if it had finished, so the run goes on and the signal
//! is counted.

use std::arch::global_asm;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use hostile::pci::{self, ConfigSpace, VirtioDevice};
use hostile::plan::{Plan, Targets};
use hostile::Config;
use moat_guest_tools::args::run_or_exit;
use moat_guest_tools::hostile::{self as tool, Access, Tally, PROGRESS_EVERY};
use moat_guest_tools::ipc::Insn;
use moat_guest_tools::{hypercall, probe};

const USAGE: &str = "\
usage: hostile [seed=N] [actions=N] [classes=MASK]

Run as root inside the Linux guest under Moat: makes N (default 100000)
seeded actions of the bare-metal hostile guest's plan against the VMM's
devices: port I/O of every width (iopl(3); /dev/port for some bytes), MMIO
of every width through /dev/mem (boot with iomem=relaxed to reach the
LAPIC, IOAPIC, ECAM and virtio BARs Linux drivers hold), random CPUID
leaves, MSR reads through /dev/cpu/0/msr (skipped if absent) and malformed
IPC hypercalls. COM1's live registers, LAPIC/IOAPIC writes and MSR writes
become harmless reads (counted as spared), and device addresses go only
to RAM Linux does not own (memmap=16M$<end of RAM - 16M>). Classes: the
plan's bits (port 0x1, mmio 0x2, cpuid 0x4, msr 0x8, hypercall 0x10);
default and most 0x1f (rings and junk instructions: not from Linux yet). Prints the seed first, progress every 10000
actions, then `hostile: done, N actions (seed S)` and the counts.
";

const PAGE: u64 = 4096;
/// Mappings of `/dev/mem` kept at once (each is one VMA of this process).
const MAX_MAPPINGS: usize = 512;
const MAX_VIRTIO: usize = 8;
/// What a routine returns when a signal ended it.
const FAULTED: u64 = 0xdead_f00d_dead_f00d;

global_asm!(
    ".globl hostile_stubs_start",
    ".globl hostile_stubs_end",
    "hostile_stubs_start:",
    "hostile_in8: mov edx, edi; xor eax, eax; in al, dx; ret",
    "hostile_in16: mov edx, edi; xor eax, eax; in ax, dx; ret",
    "hostile_in32: mov edx, edi; in eax, dx; ret",
    "hostile_out8: mov edx, edi; mov eax, esi; out dx, al; ret",
    "hostile_out16: mov edx, edi; mov eax, esi; out dx, ax; ret",
    "hostile_out32: mov edx, edi; mov eax, esi; out dx, eax; ret",
    "hostile_load8: movzx eax, byte ptr [rdi]; ret",
    "hostile_load16: movzx eax, word ptr [rdi]; ret",
    "hostile_load32: mov eax, dword ptr [rdi]; ret",
    "hostile_load64: mov rax, qword ptr [rdi]; ret",
    "hostile_store8: mov byte ptr [rdi], sil; ret",
    "hostile_store16: mov word ptr [rdi], si; ret",
    "hostile_store32: mov dword ptr [rdi], esi; ret",
    "hostile_store64: mov qword ptr [rdi], rsi; ret",
    // cpuid(leaf, subleaf) -> eax; rbx kept in r11 (no push: a fault
    // must find the return address on top of the stack).
    "hostile_cpuid: mov r11, rbx; mov eax, edi; mov ecx, esi; cpuid; mov rbx, r11; ret",
    // hypercall(regs): rax, rdi, rsi, rdx, r10, r8, r9 from regs[0..7]
    // and back.
    "hostile_vmcall: mov r11, rdi",
    "mov rax, [r11]; mov rdi, [r11 + 8]; mov rsi, [r11 + 16]; mov rdx, [r11 + 24]",
    "mov r10, [r11 + 32]; mov r8, [r11 + 40]; mov r9, [r11 + 48]",
    "vmcall",
    "jmp 2f",
    "hostile_vmmcall: mov r11, rdi",
    "mov rax, [r11]; mov rdi, [r11 + 8]; mov rsi, [r11 + 16]; mov rdx, [r11 + 24]",
    "mov r10, [r11 + 32]; mov r8, [r11 + 40]; mov r9, [r11 + 48]",
    "vmmcall",
    "2: mov [r11], rax; mov [r11 + 8], rdi; mov [r11 + 16], rsi; mov [r11 + 24], rdx",
    "mov [r11 + 32], r10; mov [r11 + 40], r8; mov [r11 + 48], r9",
    "ret",
    "hostile_stubs_end:",
);

extern "C" {
    static hostile_stubs_start: u8;
    static hostile_stubs_end: u8;
    fn hostile_in8(port: u32) -> u64;
    fn hostile_in16(port: u32) -> u64;
    fn hostile_in32(port: u32) -> u64;
    fn hostile_out8(port: u32, value: u32) -> u64;
    fn hostile_out16(port: u32, value: u32) -> u64;
    fn hostile_out32(port: u32, value: u32) -> u64;
    fn hostile_load8(at: u64) -> u64;
    fn hostile_load16(at: u64) -> u64;
    fn hostile_load32(at: u64) -> u64;
    fn hostile_load64(at: u64) -> u64;
    fn hostile_store8(at: u64, value: u64) -> u64;
    fn hostile_store16(at: u64, value: u64) -> u64;
    fn hostile_store32(at: u64, value: u64) -> u64;
    fn hostile_store64(at: u64, value: u64) -> u64;
    fn hostile_cpuid(leaf: u32, subleaf: u32) -> u64;
    fn hostile_vmcall(regs: *mut [u64; 7]) -> u64;
    fn hostile_vmmcall(regs: *mut [u64; 7]) -> u64;
}

/// The signal that ended the last routine (0: none).
static SIGNALLED: AtomicI32 = AtomicI32::new(0);
static STUBS: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// A signal inside a routine: return from it with [`FAULTED`] (the
/// routines push nothing, so the return address is on top of the stack).
/// Anywhere else: the default action, as if nothing were installed.
extern "C" fn on_signal(signal: i32, _info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    let context = context.cast::<libc::ucontext_t>();
    // SAFETY: the kernel passes the interrupted context of this thread
    // (SA_SIGINFO); it is ours to change until the handler returns.
    let regs = unsafe { &mut (*context).uc_mcontext.gregs };
    let rip = regs[libc::REG_RIP as usize] as u64;
    let (start, end) = (
        STUBS[0].load(Ordering::Relaxed),
        STUBS[1].load(Ordering::Relaxed),
    );
    if !(start..end).contains(&rip) {
        // SAFETY: restoring the default action of this signal; returning
        // re-executes the instruction, which raises it again.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
        return;
    }
    let rsp = regs[libc::REG_RSP as usize] as u64;
    // SAFETY: inside a routine the top of the stack is the return address
    // the call pushed, on this thread's stack.
    let ret = unsafe { (rsp as *const u64).read() };
    regs[libc::REG_RIP as usize] = ret as i64;
    regs[libc::REG_RSP as usize] = (rsp + 8) as i64;
    regs[libc::REG_RAX as usize] = FAULTED as i64;
    SIGNALLED.store(signal, Ordering::Relaxed);
}

fn install_handlers() -> Result<(), String> {
    // Only the addresses of the two labels are taken.
    let (start, end) = (
        std::ptr::addr_of!(hostile_stubs_start) as u64,
        std::ptr::addr_of!(hostile_stubs_end) as u64,
    );
    STUBS[0].store(start, Ordering::Relaxed);
    STUBS[1].store(end, Ordering::Relaxed);
    for signal in [
        libc::SIGSEGV,
        libc::SIGBUS,
        libc::SIGILL,
        libc::SIGFPE,
        libc::SIGTRAP,
    ] {
        // SAFETY: a zeroed sigaction is valid; the handler only touches
        // atomics and the context the kernel hands it.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(format!(
                "sigaction({signal}): {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        _ => "SIGTRAP",
    }
}

/// Configuration space of bus 0 through sysfs (root reads all 256 bytes).
struct SysfsConfig;

impl ConfigSpace for SysfsConfig {
    fn read32(&mut self, slot: u8, offset: u8) -> u32 {
        let path = format!("/sys/bus/pci/devices/0000:00:{slot:02x}.0/config");
        let mut word = [0xff; 4];
        if let Ok(file) = File::open(path) {
            let _ = file.read_exact_at(&mut word, u64::from(offset));
        }
        u32::from_le_bytes(word)
    }
}

fn firmware_memmap() -> Vec<(u64, u64, String)> {
    let Ok(dir) = fs::read_dir("/sys/firmware/memmap") else {
        return Vec::new();
    };
    let hex = |path: std::path::PathBuf| {
        let text = fs::read_to_string(path).ok()?;
        u64::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
    };
    dir.flatten()
        .filter_map(|entry| {
            let p = entry.path();
            let kind = fs::read_to_string(p.join("type")).ok()?;
            Some((
                hex(p.join("start"))?,
                hex(p.join("end"))?,
                kind.trim().to_string(),
            ))
        })
        .collect()
}

/// Pages of `/dev/mem` mapped so far (two at a time: an access may
/// straddle), or the errno that refused them.
struct PhysMem {
    file: File,
    mapped: BTreeMap<u64, Result<u64, i32>>,
}

impl PhysMem {
    fn at(&mut self, addr: u64) -> Result<u64, i32> {
        let page = addr & !(PAGE - 1);
        if self.mapped.len() >= MAX_MAPPINGS {
            for (_, base) in std::mem::take(&mut self.mapped) {
                if let Ok(base) = base {
                    // SAFETY: the two pages at `base` are this map's own
                    // and nothing refers to them any more.
                    unsafe { libc::munmap(base as *mut libc::c_void, 2 * PAGE as usize) };
                }
            }
        }
        let fd = self.file.as_raw_fd();
        let base = *self.mapped.entry(page).or_insert_with(|| {
            // SAFETY: a new shared mapping anywhere in this process's
            // address space; no existing mapping changes.
            let ret = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    2 * PAGE as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    page as libc::off_t,
                )
            };
            if ret == libc::MAP_FAILED {
                Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
            } else {
                Ok(ret as u64)
            }
        });
        base.map(|base| base + (addr - page))
    }
}

struct Machine {
    mem: PhysMem,
    port: File,
    msr: Option<File>,
    insn: Insn,
}

impl Machine {
    /// Carries out one access; the class name under which a refusal counts.
    fn access(&mut self, n: u64, access: Access, tally: &mut Tally) {
        SIGNALLED.store(0, Ordering::Relaxed);
        let refused = |tally: &mut Tally, what: &'static str| {
            *tally.refused.entry(what).or_default() += 1;
        };
        // Every routine below makes one access of the kind its name says
        // and touches no memory of this process but the mapped device page
        // given or `regs`; a fault returns FAULTED (`on_signal`).
        match access {
            Access::PortRead { port, size } => {
                if size == 1 && n % 2 == 1 {
                    let mut byte = [0u8];
                    if self.port.read_exact_at(&mut byte, u64::from(port)).is_err() {
                        refused(tally, "port");
                    }
                    return self.after(tally);
                }
                let port = u32::from(port);
                // SAFETY: the routine makes one access of its kind and
                // touches no memory of this process (`regs` aside).
                unsafe {
                    match size {
                        1 => hostile_in8(port),
                        2 => hostile_in16(port),
                        _ => hostile_in32(port),
                    }
                };
            }
            Access::PortWrite { port, size, value } => {
                if size == 1 && n % 2 == 1 {
                    if self
                        .port
                        .write_all_at(&[value as u8], u64::from(port))
                        .is_err()
                    {
                        refused(tally, "port");
                    }
                    return self.after(tally);
                }
                let port = u32::from(port);
                // SAFETY: the routine makes one access of its kind and
                // touches no memory of this process (`regs` aside).
                unsafe {
                    match size {
                        1 => hostile_out8(port, value),
                        2 => hostile_out16(port, value),
                        _ => hostile_out32(port, value),
                    }
                };
            }
            Access::MmioRead { addr, size } => match self.mem.at(addr) {
                // SAFETY: `at` lies in the two device pages mapped for it;
                // the routine makes one access there (a fault returns).
                Ok(at) => unsafe {
                    match size {
                        1 => hostile_load8(at),
                        2 => hostile_load16(at),
                        4 => hostile_load32(at),
                        _ => hostile_load64(at),
                    };
                },
                Err(_) => refused(tally, "mmio"),
            },
            Access::MmioWrite { addr, size, value } => match self.mem.at(addr) {
                // SAFETY: `at` lies in the two device pages mapped for it;
                // the routine makes one access there (a fault returns).
                Ok(at) => unsafe {
                    match size {
                        1 => hostile_store8(at, value),
                        2 => hostile_store16(at, value),
                        4 => hostile_store32(at, value),
                        _ => hostile_store64(at, value),
                    };
                },
                Err(_) => refused(tally, "mmio"),
            },
            Access::Cpuid { leaf, subleaf } => {
                // SAFETY: the routine makes one access of its kind and
                // touches no memory of this process (`regs` aside).
                unsafe { hostile_cpuid(leaf, subleaf) };
            }
            Access::MsrRead { msr } => {
                let mut value = [0u8; 8];
                match &self.msr {
                    Some(file) if file.read_exact_at(&mut value, u64::from(msr)).is_ok() => {}
                    _ => refused(tally, "msr"),
                }
            }
            Access::Hypercall { rax, words } => {
                let mut regs = [
                    rax, words[0], words[1], words[2], words[3], words[4], words[5],
                ];
                // SAFETY: the routine makes one access of its kind and
                // touches no memory of this process (`regs` aside).
                let status = unsafe {
                    match self.insn {
                        Insn::Vmcall => hostile_vmcall(&mut regs),
                        Insn::Vmmcall => hostile_vmmcall(&mut regs),
                    }
                };
                if status != FAULTED && regs[0] == 0 {
                    tally.hypercalls_answered += 1;
                }
            }
        }
        self.after(tally);
    }

    fn after(&self, tally: &mut Tally) {
        let signal = SIGNALLED.swap(0, Ordering::Relaxed);
        if signal != 0 {
            *tally.signals.entry(signal_name(signal)).or_default() += 1;
        }
    }
}

fn setup() -> Result<(Machine, Vec<VirtioDevice>, hostile::Layout, bool), String> {
    install_handlers()?;
    // SAFETY: iopl changes only this process's I/O privilege.
    if unsafe { libc::iopl(3) } != 0 {
        return Err(format!("iopl(3): {}", std::io::Error::last_os_error()));
    }
    let open = |path: &str, write: bool| {
        File::options()
            .read(true)
            .write(write)
            .custom_flags(libc::O_SYNC)
            .open(path)
            .map_err(|e| format!("{path}: {e}"))
    };
    let mem = open("/dev/mem", true)?;
    let port = open("/dev/port", true)?;
    let msr = match open("/dev/cpu/0/msr", false) {
        Ok(file) => Some(file),
        Err(e) => {
            println!("hostile: {e}: MSR reads skipped (counted as refused)");
            None
        }
    };
    let (found, count) = pci::find_virtio::<MAX_VIRTIO>(&mut SysfsConfig);
    let virtio = found[..count].to_vec();
    let iomem = fs::read_to_string("/proc/iomem").map_err(|e| format!("/proc/iomem: {e}"))?;
    let iomem = probe::parse_iomem(&iomem)?;
    let firmware_end = tool::firmware_ram_end(&firmware_memmap())
        .ok_or("/sys/firmware/memmap lists no RAM below 4 GiB")?;
    let (layout, dma_safe) =
        tool::linux_layout(firmware_end, &iomem).ok_or("no layout: too little RAM")?;
    let machine = Machine {
        mem: PhysMem {
            file: mem,
            mapped: BTreeMap::new(),
        },
        port,
        msr,
        insn: hypercall::this_cpu_insn(),
    };
    Ok((machine, virtio, layout, dma_safe))
}

fn main() -> ExitCode {
    let config: Config = match run_or_exit("hostile", USAGE, tool::parse) {
        Ok(config) => config,
        Err(code) => return code,
    };
    println!(
        "hostile: seed {:#x}, {} actions, classes {:#x}",
        config.seed, config.actions, config.classes
    );
    let (mut machine, virtio, layout, dma_safe) = match setup() {
        Ok(setup) => setup,
        Err(e) => {
            println!("hostile: FAIL {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "hostile: {} virtio devices, RAM ends at {:#x}, device scratch from {:#x} ({})",
        virtio.len(),
        layout.ram_end,
        layout.scratch,
        if dma_safe {
            "withheld from Linux"
        } else {
            "Linux's: no device is given an address there"
        }
    );
    let mut plan = Plan::new(
        config.seed,
        Targets {
            layout,
            virtio: &virtio,
            classes: config.classes,
            port_writes: true,
            interrupt_controllers: true,
        },
    );
    let mut tally = Tally::default();
    for n in 0..config.actions {
        let action = plan.next_action();
        let carried = tool::carry(&action, &virtio, dma_safe);
        tally.record(action.class(), carried.spared);
        machine.access(n, carried.access, &mut tally);
        if (n + 1) % PROGRESS_EVERY == 0 {
            println!("hostile: {} actions", n + 1);
        }
    }
    println!(
        "hostile: done, {} actions (seed {:#x})",
        tally.actions, config.seed
    );
    for line in tally.lines() {
        println!("{line}");
    }
    ExitCode::SUCCESS
}
