//! Starting the other CPUs (application processors, APs).
//!
//! The boot CPU starts them one at a time, in MADT order: it gives the CPU
//! its kernel stack, IST stacks, GDT/TSS and VMXON region or host save area
//! (through its per-CPU block), sends INIT, waits 10 ms, sends a STARTUP
//! IPI, waits 200 µs and sends a second one unless the CPU already reached
//! the trampoline (SDM Vol. 3A, "Typical BSP Initialization Sequence"),
//! then waits up to [`START_TIMEOUT_MS`] for the CPU to say it is online. A
//! CPU that does not is reported, sent INIT again (which stops it) and left
//! out; the others go on.
//!
//! The trampoline is real-mode code copied to a page below 1 MiB (a STARTUP
//! IPI starts the CPU at vector * 4 KiB with CS = vector * 256, IP = 0). It
//! loads a small GDT, enters protected mode, turns on PAE, long mode and
//! paging with its own page tables — the low 2 MiB identity mapped, so the
//! code goes on running where it is, plus the kernel half of the kernel's
//! tables — and calls [`ap_main`] in the higher half on the CPU's own
//! stack. What differs per CPU (stack, CPU number) is in the trampoline
//! page's data, which the boot CPU rewrites before each start; one CPU
//! starts at a time, so one copy serves.
//!
//! The started CPU loads the kernel's page tables, its own GDT and TSS, the
//! IDT, enables its FPU/SSE state, SYSCALL, its local APIC with its own
//! timer and its virtualization (VMXON or EFER.SVME + VM_HSAVE_PA), waits
//! for two ticks of its timer, says it is online and enters the scheduler
//! (`scheduler::run_ap`), which idles until the kernel's state exists and
//! an EC bound to this CPU is ready.

use super::layout::phys_to_virt;
use super::percpu::{self, CpuState};
use super::virt::{self, Vendor};
use super::{cpu, entry, fpu, gdt, idt, lapic, svm, vmx};
use crate::memory;
use core::sync::atomic::{fence, Ordering};
use moat_kernel::frame::PAGE_SIZE;
use moat_kernel::smp::{self, Ap};

/// Pages of low memory the bring-up needs: the trampoline (code and data),
/// a page that only halts (for the `smp-test-hang` argument), and the
/// trampoline's PML4, PDPT and page directory.
pub const TRAMPOLINE_PAGES: u64 = 5;
const CODE_PAGE: u64 = 0;
const HALT_PAGE: u64 = 1;
const PML4_PAGE: u64 = 2;
const PDPT_PAGE: u64 = 3;
const PD_PAGE: u64 = 4;

/// How long a started CPU has to say it is online.
pub const START_TIMEOUT_MS: u64 = 1000;
/// The SDM's waits: after INIT, and after each STARTUP IPI.
const INIT_DELAY_US: u64 = 10_000;
const STARTUP_DELAY_US: u64 = 200;

/// Each CPU's kernel stack (the boot CPU's is `BOOT_STACK_SIZE` too).
const KERNEL_STACK_PAGES: usize = super::layout::BOOT_STACK_SIZE / PAGE_SIZE as usize;
const IST_PAGES: usize = gdt::IST_STACKS_SIZE / PAGE_SIZE as usize;
const TABLES_PAGES: usize = gdt::CPU_TABLES_SIZE.div_ceil(PAGE_SIZE as usize);

const CR4_PAE: u64 = 1 << 5;
const CR4_PGE: u64 = 1 << 7;
const EFER: u32 = 0xc000_0080;
const EFER_SCE: u64 = 1 << 0;
const EFER_LME: u64 = 1 << 8;
const EFER_NXE: u64 = 1 << 11;
/// Page-table entry bits: present, writable, 2 MiB page.
const PTE_PRESENT_WRITABLE: u64 = 0b11;
const PDE_LARGE: u64 = 1 << 7;
/// Real mode: CLI; HLT; JMP back to the HLT.
const HALT_CODE: [u8; 4] = [0xfa, 0xf4, 0xeb, 0xfd];

/// The trampoline's data, at fixed offsets from its start (its first
/// byte, where the STARTUP IPI lands, is code).
const DATA: u64 = 0x180;
const GDT: u64 = DATA;
const GDT_ENTRIES: [u64; 4] = [
    0,
    0x00cf_9a00_0000_ffff, // 0x08: 32-bit code
    0x00cf_9200_0000_ffff, // 0x10: data
    0x00af_9a00_0000_ffff, // 0x18: 64-bit code
];
/// Limit (2 bytes), then the GDT's physical address (4).
const GDTR: u64 = DATA + 0x20;
/// Far pointers: a physical address (4 bytes), then the selector (2).
const FAR32: u64 = DATA + 0x28;
const FAR64: u64 = DATA + 0x30;
const CR3: u64 = DATA + 0x38;
/// EFER bits to set.
const EFER_BITS: u64 = DATA + 0x3c;
const STACK: u64 = DATA + 0x40;
const CPU_INDEX: u64 = DATA + 0x48;
/// Set by the CPU as soon as it runs the trampoline.
const ARRIVED: u64 = DATA + 0x50;
const END: u64 = DATA + 0x58;
const CODE32_SELECTOR: u16 = 0x08;
const CODE64_SELECTOR: u16 = 0x18;

core::arch::global_asm!(
    ".pushsection .text.ap_trampoline, \"ax\"",
    ".balign 16",
    ".global ap_trampoline",
    "ap_trampoline:",
    // ---- 16-bit real mode, CS = the page's segment, IP = 0 ----
    ".code16",
    "    cli",
    "    cld",
    "    mov ax, cs",
    "    mov ds, ax",
    "    mov dword ptr [{arrived}], 1",
    // ebx = the page's physical address, for the 32-bit code.
    "    xor ebx, ebx",
    "    mov bx, ax",
    "    shl ebx, 4",
    "    lgdt [{gdtr}]",
    "    mov eax, cr0",
    "    or eax, 1",
    "    mov cr0, eax",
    // ljmp dword ptr [FAR32]: to the 32-bit code below.
    "    .byte 0x66, 0xff, 0x2e",
    "    .word {far32}",

    // ---- 32-bit protected mode, flat segments ----
    ".code32",
    ".global ap_protected",
    "ap_protected:",
    "    mov ax, 0x10",
    "    mov ds, ax",
    "    mov es, ax",
    "    mov ss, ax",
    "    mov eax, cr4",
    "    or eax, {cr4_pae}",
    "    mov cr4, eax",
    "    mov eax, [ebx + {cr3}]",
    "    mov cr3, eax",
    "    mov ecx, {efer}",
    "    rdmsr",
    "    or eax, [ebx + {efer_bits}]",
    "    wrmsr",
    "    mov eax, cr0",
    "    or eax, (1 << 31) | (1 << 16) | (1 << 5) | 1", // PG, WP, NE, PE
    "    mov cr0, eax",
    // ljmp [ebx + FAR64]: to the 64-bit code below.
    "    .byte 0xff, 0xab",
    "    .long {far64}",

    // ---- 64-bit long mode, still identity mapped ----
    ".code64",
    ".global ap_long",
    "ap_long:",
    "    mov ax, 0x10",
    "    mov ds, ax",
    "    mov es, ax",
    "    mov ss, ax",
    "    xor eax, eax",
    "    mov fs, ax",
    "    mov gs, ax",
    // The upper halves of registers are undefined after the mode switch.
    "    mov ebx, ebx",
    "    mov rsp, [rbx + {stack}]",
    "    mov rdi, [rbx + {cpu}]",
    "    xor ebp, ebp",
    "    movabs rax, offset {main}",
    "    call rax",
    "    ud2",
    // The data, filled in by the boot CPU (an error here if the code grew
    // past DATA).
    ".org {data}, 0xcc",
    ".fill {data_len}, 1, 0",
    ".global ap_trampoline_end",
    "ap_trampoline_end:",
    ".popsection",
    arrived = const ARRIVED,
    gdtr = const GDTR,
    far32 = const FAR32,
    far64 = const FAR64,
    cr3 = const CR3,
    efer_bits = const EFER_BITS,
    stack = const STACK,
    cpu = const CPU_INDEX,
    data = const DATA,
    data_len = const END - DATA,
    cr4_pae = const CR4_PAE,
    efer = const EFER,
    main = sym ap_main,
);

extern "C" {
    static ap_trampoline: u8;
    static ap_protected: u8;
    static ap_long: u8;
    static ap_trampoline_end: u8;
}

/// The offset of a trampoline label from its start.
macro_rules! offset {
    ($symbol:ident) => {
        (core::ptr::addr_of!($symbol) as u64 - core::ptr::addr_of!(ap_trampoline) as u64)
    };
}

/// The trampoline, copied into low memory at `base` (physical).
struct Trampoline {
    base: u64,
}

impl Trampoline {
    /// Copies the code, writes the halt page and builds the page tables.
    fn install(base: u64) -> Self {
        let len = offset!(ap_trampoline_end);
        debug_assert_eq!(len, END);
        let page = |index: u64| phys_to_virt(base + index * PAGE_SIZE);
        // SAFETY: `memory::trampoline_area` gave these TRAMPOLINE_PAGES low
        // pages to this module alone; they are RAM reached through the
        // direct map, and no CPU runs the trampoline yet. The source is the
        // trampoline's `len` bytes in kernel text.
        unsafe {
            core::ptr::write_bytes(
                page(0) as *mut u8,
                0,
                (TRAMPOLINE_PAGES * PAGE_SIZE) as usize,
            );
            core::ptr::copy_nonoverlapping(
                core::ptr::addr_of!(ap_trampoline),
                page(CODE_PAGE) as *mut u8,
                len as usize,
            );
            core::ptr::copy_nonoverlapping(
                HALT_CODE.as_ptr(),
                page(HALT_PAGE) as *mut u8,
                HALT_CODE.len(),
            );
        }
        let code = base + CODE_PAGE * PAGE_SIZE;
        let this = Self { base };
        for (i, entry) in GDT_ENTRIES.iter().enumerate() {
            this.write64(GDT + 8 * i as u64, *entry);
        }
        this.write16(GDTR, (GDT_ENTRIES.len() * 8 - 1) as u16);
        this.write32(GDTR + 2, (code + GDT) as u32);
        this.write32(FAR32, (code + offset!(ap_protected)) as u32);
        this.write16(FAR32 + 4, CODE32_SELECTOR);
        this.write32(FAR64, (code + offset!(ap_long)) as u32);
        this.write16(FAR64 + 4, CODE64_SELECTOR);
        this.write32(CR3, (base + PML4_PAGE * PAGE_SIZE) as u32);
        let efer = cpu::read_msr(EFER) & (EFER_SCE | EFER_NXE);
        this.write32(EFER_BITS, (efer | EFER_LME) as u32);

        // The low 2 MiB identity mapped; the kernel half as the kernel's.
        let table = |index: u64| page(index) as *mut u64;
        let kernel = phys_to_virt(memory::kernel_root()) as *const u64;
        // SAFETY: the three table pages are this module's (above); the
        // kernel's PML4 is a live page-table frame read through the direct
        // map, and indices stay below 512.
        unsafe {
            table(PML4_PAGE).write_volatile((base + PDPT_PAGE * PAGE_SIZE) | PTE_PRESENT_WRITABLE);
            table(PDPT_PAGE).write_volatile((base + PD_PAGE * PAGE_SIZE) | PTE_PRESENT_WRITABLE);
            table(PD_PAGE).write_volatile(PTE_PRESENT_WRITABLE | PDE_LARGE);
            for slot in super::layout::KERNEL_PML4_FIRST..512 {
                table(PML4_PAGE)
                    .add(slot)
                    .write_volatile(kernel.add(slot).read_volatile());
            }
        }
        this
    }

    /// The direct-map address of the data word at `offset`.
    fn data<T>(&self, offset: u64) -> *mut T {
        debug_assert!(
            (DATA..END).contains(&offset) && offset.is_multiple_of(align_of::<T>() as u64)
        );
        phys_to_virt(self.base + CODE_PAGE * PAGE_SIZE + offset) as *mut T
    }

    fn write16(&self, offset: u64, value: u16) {
        // SAFETY: `offset` is an aligned word of the trampoline's data in
        // the copied page, which only this module and the CPU being started
        // use; volatile, as that CPU reads it.
        unsafe { self.data::<u16>(offset).write_volatile(value) }
    }

    fn write32(&self, offset: u64, value: u32) {
        // SAFETY: as in `write16`.
        unsafe { self.data::<u32>(offset).write_volatile(value) }
    }

    fn write64(&self, offset: u64, value: u64) {
        // SAFETY: as in `write16`.
        unsafe { self.data::<u64>(offset).write_volatile(value) }
    }

    /// Whether the CPU being started has run the trampoline's first lines.
    fn arrived(&self) -> bool {
        // SAFETY: as in `write16`; the starting CPU writes this word.
        unsafe { self.data::<u32>(ARRIVED).read_volatile() != 0 }
    }

    fn vector(&self, page: u64) -> u8 {
        smp::sipi_vector(self.base + page * PAGE_SIZE).expect("trampoline placed below 1 MiB")
    }
}

/// How `start_all` was asked to start the CPUs.
pub struct Options {
    /// `cpus=N`: at most N CPUs, the boot CPU included.
    pub limit: Option<usize>,
    /// `smp-test-hang=N`: CPU N is sent to a page that only halts, as a CPU
    /// that hangs during start-up would (for the system test of the
    /// timeout).
    pub hang: Option<usize>,
}

/// Starts the CPUs the MADT lists (`apic_ids`, the boot CPU among them);
/// returns how many CPUs are online, the boot CPU included.
pub fn start_all(apic_ids: &[u32], options: &Options) -> usize {
    let bsp = lapic::id();
    let boot = percpu::get(percpu::BOOT_CPU);
    boot.apic_id.store(bsp, Ordering::Relaxed);
    boot.set_state(CpuState::Online);
    let listed = apic_ids.len().max(1);
    let planned = smp::plan(apic_ids, bsp, options.limit).count();
    if let Some(limit) = options.limit.filter(|&limit| limit < listed) {
        log::info!(
            "smp: {listed} cpu(s) listed, starting {} (cpus={limit})",
            planned + 1
        );
    }
    let mut online = 1;
    if planned > 0 {
        match memory::trampoline_area() {
            Some(base) => {
                let trampoline = Trampoline::install(base);
                for ap in smp::plan(apic_ids, bsp, options.limit) {
                    match start(&trampoline, ap, options.hang == Some(ap.index)) {
                        Ok(()) => online += 1,
                        Err(why) => log::warn!(
                            "cpu {}: did not start (apic id {}): {why}",
                            ap.index,
                            ap.apic_id
                        ),
                    }
                }
            }
            None => log::warn!("smp: no free page below 1 MiB for the start-up code: cpu 0 only"),
        }
    }
    log::info!("cpus: {online} online");
    online
}

/// Frames for one CPU: stacks, tables, virtualization area. Kept for good,
/// also when the CPU does not start (it may still be using them).
struct Resources {
    stack_top: u64,
    ist_base: u64,
    tables: u64,
    virt_area: u64,
}

fn allocate() -> Option<Resources> {
    let stack = memory::alloc_contiguous(KERNEL_STACK_PAGES)?;
    let ist = memory::alloc_contiguous(IST_PAGES)?;
    let tables = memory::alloc_contiguous(TABLES_PAGES)?;
    let virt_area = match virt::vendor() {
        Vendor::None => 0,
        Vendor::Vmx | Vendor::Svm => memory::alloc_zeroed_page()?.0,
    };
    let tables = phys_to_virt(tables);
    // SAFETY: the frames were just allocated (zeroed, page aligned) and
    // are this CPU's alone; the direct map reaches them.
    unsafe { gdt::prepare_tables(tables as *mut gdt::CpuTables) };
    Some(Resources {
        stack_top: phys_to_virt(stack) + (KERNEL_STACK_PAGES as u64) * PAGE_SIZE,
        ist_base: phys_to_virt(ist),
        tables,
        virt_area,
    })
}

/// Why a CPU did not come online.
enum StartError {
    /// An x2APIC id above 255, which xAPIC IPIs cannot name.
    NotAddressable,
    NoMemory,
    /// No answer in time; whether it had run the trampoline's first lines.
    NoAnswer {
        ran_trampoline: bool,
    },
}

impl core::fmt::Display for StartError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            StartError::NotAddressable => f.write_str("its APIC id needs x2APIC mode"),
            StartError::NoMemory => f.write_str("no memory for its stacks and tables"),
            StartError::NoAnswer { ran_trampoline } => write!(
                f,
                "no answer within {START_TIMEOUT_MS} ms ({})",
                if *ran_trampoline {
                    "it ran the start-up code, not the kernel's"
                } else {
                    "it never ran the start-up code"
                }
            ),
        }
    }
}

/// Starts one CPU and waits for it to come online.
fn start(trampoline: &Trampoline, ap: Ap, hang: bool) -> Result<(), StartError> {
    if !lapic::x2apic() && ap.apic_id > 0xff {
        return Err(StartError::NotAddressable);
    }
    let block = percpu::get(ap.index);
    let resources = allocate().ok_or(StartError::NoMemory)?;
    block.apic_id.store(ap.apic_id, Ordering::Relaxed);
    block
        .stack_top
        .store(resources.stack_top, Ordering::Relaxed);
    block.ist_base.store(resources.ist_base, Ordering::Relaxed);
    block.tables.store(resources.tables, Ordering::Relaxed);
    block
        .virt_area
        .store(resources.virt_area, Ordering::Relaxed);
    trampoline.write64(STACK, resources.stack_top);
    trampoline.write64(CPU_INDEX, ap.index as u64);
    trampoline.write32(ARRIVED, 0);
    // Everything above is in memory before the CPU can read it.
    block.set_state(CpuState::Starting);
    fence(Ordering::SeqCst);

    let vector = trampoline.vector(if hang { HALT_PAGE } else { CODE_PAGE });
    if hang {
        log::warn!(
            "smp-test-hang: cpu {} is sent to a page that halts",
            ap.index
        );
    }
    lapic::send_init(ap.apic_id);
    lapic::delay_us(INIT_DELAY_US);
    lapic::send_startup(ap.apic_id, vector);
    lapic::delay_us(STARTUP_DELAY_US);
    if !trampoline.arrived() {
        lapic::send_startup(ap.apic_id, vector);
        lapic::delay_us(STARTUP_DELAY_US);
    }

    let limit = lapic::tsc_hz() / 1000 * START_TIMEOUT_MS;
    let waiting_since = cpu::rdtsc();
    while block.state() != CpuState::Online {
        if cpu::rdtsc().wrapping_sub(waiting_since) > limit {
            lapic::send_init(ap.apic_id);
            block.set_state(CpuState::Failed);
            return Err(StartError::NoAnswer {
                ran_trampoline: trampoline.arrived(),
            });
        }
        core::hint::spin_loop();
    }
    let virt_name = match virt::vendor() {
        Vendor::Vmx => "vmx",
        Vendor::Svm => "svm",
        Vendor::None => "virtualization",
    };
    let virt_on = block.virt_on.load(Ordering::Relaxed);
    log::info!(
        "cpu {}: online, apic id {}, {virt_name} {}, timer {}",
        ap.index,
        ap.apic_id,
        if virt_on { "on" } else { "off" },
        if block.timer_ticking.load(Ordering::Relaxed) {
            "ticking"
        } else {
            "silent"
        }
    );
    if !block.timer_ticking.load(Ordering::Relaxed) {
        log::error!("cpu {}: no timer interrupt within a second", ap.index);
    }
    Ok(())
}

/// Where a started CPU enters the kernel, on its own stack, from the
/// trampoline (whose page tables are still loaded).
extern "C" fn ap_main(index: u64) -> ! {
    let index = index as usize;
    let block = percpu::get(index);
    let stack_top = block.stack_top.load(Ordering::Relaxed);
    percpu::enter(index, stack_top);
    // SAFETY: the kernel's tables map the kernel, its stacks (this one is
    // in the direct map) and statics exactly as the trampoline's kernel
    // half does; PGE only makes the kernel's global mappings global.
    unsafe {
        cpu::write_cr3(memory::kernel_root());
        cpu::write_cr4(cpu::read_cr4() | CR4_PGE);
    }
    // SAFETY: the boot CPU prepared these tables and IST stacks for this
    // CPU alone (`allocate`), in frames it never frees.
    unsafe {
        gdt::init(
            block.tables.load(Ordering::Relaxed) as *mut gdt::CpuTables,
            stack_top,
            block.ist_base.load(Ordering::Relaxed),
        );
    }
    idt::init();
    fpu::init_this_cpu();
    entry::init_syscall();
    lapic::init_this_cpu();
    block.virt_on.store(
        enable_virtualization(block.virt_area.load(Ordering::Relaxed)),
        Ordering::Relaxed,
    );
    let ticking = lapic::wait_for_ticks(2, lapic::tsc_hz()).is_some();
    block.timer_ticking.store(ticking, Ordering::Relaxed);
    block.set_state(CpuState::Online);
    crate::scheduler::run_ap()
}

/// VMXON or SVM on this CPU, as the boot CPU turned it on, with the frame
/// `area` the boot CPU allocated for it.
fn enable_virtualization(area: u64) -> bool {
    let result = match virt::vendor() {
        Vendor::None => return false,
        Vendor::Vmx => {
            // SAFETY: `area` is a zeroed frame allocated for this CPU's
            // VMXON region alone; the direct map reaches it.
            let region = unsafe { &mut *(phys_to_virt(area) as *mut [u8; 4096]) };
            vmx::enable(area, region).map_err(|error| log::error!("vmx: off: {error}"))
        }
        Vendor::Svm => svm::enable(area).map_err(|error| log::error!("svm: off: {error}")),
    };
    result.is_ok()
}

/// The CPUs that came online besides the boot CPU, with their ticks.
pub fn report_idle() {
    for (index, block) in percpu::all().iter().enumerate().skip(1) {
        if block.state() == CpuState::Online {
            log::info!(
                "cpu {index}: idle, {} timer ticks",
                block.ticks.load(Ordering::Relaxed)
            );
        }
    }
}
