//! The bare-metal hostile guest: a bzImage the real VMM boots like Linux
//! (64-bit entry, identity-mapped, zero page in `rsi`), which carries out
//! the seeded plan of `hostile::plan` against the VMM's devices and ends
//! with a triple fault.
//!
//! Memory: the image at 1 MiB (code, data, stacks, its own page tables,
//! GDT, TSS and IDT); user-mode junk code and stack in the 2 MiB page at
//! 2 MiB; a canary at 4 MiB that no device is ever pointed at and that
//! must be intact at the end; the plan's scratch area at the top of RAM.
//! The device hole (3-4 GiB) is mapped non-executable; once the devices
//! are found, the 4 KiB pages junk aims at (each virtio device's notify,
//! ISR and device-specific pages, the IOAPIC, the LAPIC) become user
//! pages, so junk run at CPL 3 reaches those and nothing else: not the
//! guest, and not the virtio common configuration or ECAM, through which
//! it could point a device's DMA at the guest's own tables (junk's random
//! displacements reach far past the register it aims with).
//!
//! Every access that the VMM may answer with an exception runs through
//! `hostile_guarded`, which the exception handlers unwind to; the vector
//! is counted. Output goes to COM1 (reprogrammed before each line, since
//! the plan writes its registers too).
#![no_std]
#![no_main]
#![cfg_attr(not(target_os = "none"), allow(dead_code, unused_imports))]

use core::arch::global_asm;
use core::fmt::{self, Write};

use hostile::pci::{self, ConfigSpace, Region, VirtioDevice};
use hostile::plan::{class, Action, Plan, Targets};
use hostile::virtio::{self, Step};
use hostile::{junk, Config, Layout, Xorshift, MIB};

const ZERO_PAGE_LEN: usize = 4096;
const CMDLINE_MAX: usize = 2048;
const JUNK_PAGE: u64 = 2 * MIB;
const USER_STACK_TOP: u64 = 4 * MIB - 0x1000;
/// After the junk bytes: an instruction that starts in them may take up
/// to 14 bytes more, so 15 `hlt` (a #GP at CPL 3, whichever byte decoding
/// starts at) and a `ud2`. With only the `ud2`, junk whose last
/// instruction swallowed its first byte ran on through the zeroed page
/// (`add [rax], al` a million times, each an MMIO exit when RAX held a
/// device address) into the user stack: the guest seemed to stall.
const JUNK_STOP: [u8; 17] = [
    0xf4, 0xf4, 0xf4, 0xf4, 0xf4, 0xf4, 0xf4, 0xf4, 0xf4, 0xf4, 0xf4, 0xf4, 0xf4, 0xf4, 0xf4, 0x0f,
    0x0b,
];
const CANARY: u64 = 4 * MIB;
const CANARY_LEN: usize = 512 * 1024;
/// Nothing the guest keeps lies at or above this.
const KEEP_BELOW: u64 = 8 * MIB;
const PROGRESS_EVERY: u64 = 10_000;
const MAX_VIRTIO: usize = 8;

const COM1: u16 = 0x3f8;
const PCI_ADDRESS: u16 = 0xcf8;
const PCI_DATA: u16 = 0xcfc;

/// Registers for a guarded routine, in and out.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Ctx {
    rax: u64,
    rbx: u64,
    rcx: u64,
    rdx: u64,
    rsi: u64,
    rdi: u64,
}

extern "C" {
    /// Calls `routine(ctx)`; 0 if it returned, else 1 + the vector of the
    /// exception that ended it.
    fn hostile_guarded(routine: unsafe extern "C" fn(*mut Ctx), ctx: *mut Ctx) -> u64;
    fn hostile_in8(ctx: *mut Ctx);
    fn hostile_in16(ctx: *mut Ctx);
    fn hostile_in32(ctx: *mut Ctx);
    fn hostile_out8(ctx: *mut Ctx);
    fn hostile_out16(ctx: *mut Ctx);
    fn hostile_out32(ctx: *mut Ctx);
    fn hostile_read8(ctx: *mut Ctx);
    fn hostile_read16(ctx: *mut Ctx);
    fn hostile_read32(ctx: *mut Ctx);
    fn hostile_read64(ctx: *mut Ctx);
    fn hostile_write8(ctx: *mut Ctx);
    fn hostile_write16(ctx: *mut Ctx);
    fn hostile_write32(ctx: *mut Ctx);
    fn hostile_write64(ctx: *mut Ctx);
    fn hostile_rdmsr(ctx: *mut Ctx);
    fn hostile_wrmsr(ctx: *mut Ctx);
    fn hostile_cpuid(ctx: *mut Ctx);
    fn hostile_vmcall(ctx: *mut Ctx);
    fn hostile_vmmcall(ctx: *mut Ctx);
    fn hostile_user(ctx: *mut Ctx);
    fn hostile_monitor(ctx: *mut Ctx);
    fn hostile_mwait(ctx: *mut Ctx);
    fn hostile_rdtscp(ctx: *mut Ctx);
    /// Loads the GDT, TSS, IDT and CR3 the guest built.
    fn hostile_load_tables(
        gdtr: *const DescriptorPointer,
        idtr: *const DescriptorPointer,
        cr3: u64,
    );
    /// IDT limit 0, then an exception: nothing can be delivered.
    fn hostile_triple_fault() -> !;
    static hostile_stubs: u8;
}

type Routine = unsafe extern "C" fn(*mut Ctx);

/// Runs `routine` with `ctx` under the exception guard.
fn guarded(routine: Routine, ctx: &mut Ctx) -> Option<u8> {
    // SAFETY: every routine passed here is one of the asm routines above,
    // which touch only `ctx`, the registers `hostile_guarded` saves, and
    // the device or MSR named in `ctx`; the guard returns here whatever
    // exception they raise, with the stack as it was.
    let r = unsafe { hostile_guarded(routine, ctx) };
    (r != 0).then(|| (r - 1) as u8)
}

fn outb(port: u16, value: u8) {
    let mut ctx = Ctx {
        rdx: port.into(),
        rax: value.into(),
        ..Ctx::default()
    };
    guarded(hostile_out8, &mut ctx);
}

fn outl(port: u16, value: u32) {
    let mut ctx = Ctx {
        rdx: port.into(),
        rax: value.into(),
        ..Ctx::default()
    };
    guarded(hostile_out32, &mut ctx);
}

fn inl(port: u16) -> u32 {
    let mut ctx = Ctx {
        rdx: port.into(),
        ..Ctx::default()
    };
    guarded(hostile_in32, &mut ctx);
    ctx.rax as u32
}

/// COM1, set back to 8N1 without loopback before each line.
struct Serial;

impl Serial {
    fn reset() {
        outb(COM1 + 3, 0x03);
        outb(COM1 + 1, 0x00);
        outb(COM1 + 4, 0x03);
    }
}

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            outb(COM1, b);
        }
        Ok(())
    }
}

macro_rules! say {
    ($($arg:tt)*) => {{
        Serial::reset();
        let _ = writeln!(Serial, $($arg)*);
    }};
}

/// PCI configuration through CF8/CFC.
struct PortConfig;

impl ConfigSpace for PortConfig {
    fn read32(&mut self, slot: u8, offset: u8) -> u32 {
        outl(
            PCI_ADDRESS,
            0x8000_0000 | (u32::from(slot) << 11) | u32::from(offset & 0xfc),
        );
        inl(PCI_DATA)
    }
}

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

#[repr(C, align(4096))]
struct Table([u64; 512]);

#[repr(C, align(16))]
struct Stack([u8; 64 * 1024]);

/// The guest's own structures, in .bss.
struct Tables {
    pml4: Table,
    pdpt: Table,
    pd: [Table; 4],
    /// 4 KiB tables for the 2 MiB regions of the device hole that hold
    /// user pages.
    small: [Table; SMALL_TABLES],
    idt: [u64; 512],
    gdt: [u64; 8],
    tss: [u32; 26],
}

static mut TABLES: Tables = Tables {
    pml4: Table([0; 512]),
    pdpt: Table([0; 512]),
    pd: [const { Table([0; 512]) }; 4],
    small: [const { Table([0; 512]) }; SMALL_TABLES],
    idt: [0; 512],
    gdt: [0; 8],
    tss: [0; 26],
};

/// The stack the CPU switches to on an exception from CPL 3.
static mut TRAP_STACK: Stack = Stack([0; 64 * 1024]);
/// The main stack (`hostile_entry` switches to it).
#[no_mangle]
static mut HOSTILE_STACK: Stack = Stack([0; 64 * 1024]);

mod pte {
    pub const PRESENT: u64 = 1;
    pub const WRITABLE: u64 = 1 << 1;
    pub const USER: u64 = 1 << 2;
    pub const HUGE: u64 = 1 << 7;
    pub const NX: u64 = 1 << 63;
}

const KERNEL_CS: u64 = 0x08;

/// Page tables, GDT with user segments and a TSS, IDT of 32 exception
/// stubs; then loads them.
fn build_tables() {
    // SAFETY: one CPU, nothing else holds a reference to TABLES or the
    // trap stack; the tables are loaded only after they are complete.
    let t = unsafe { &mut *core::ptr::addr_of_mut!(TABLES) };
    let flags = pte::PRESENT | pte::WRITABLE | pte::USER;
    t.pml4.0[0] = t.pdpt.0.as_ptr() as u64 | flags;
    for gib in 0..4u64 {
        t.pdpt.0[gib as usize] = t.pd[gib as usize].0.as_ptr() as u64 | flags;
        for i in 0..512u64 {
            let frame = gib << 30 | i << 21;
            let mut entry = frame | pte::PRESENT | pte::WRITABLE | pte::HUGE;
            if gib == 3 {
                entry |= pte::NX;
            } else if frame == JUNK_PAGE {
                entry |= pte::USER;
            }
            t.pd[gib as usize].0[i as usize] = entry;
        }
    }
    // GDT: null, kernel code 0x08, kernel data 0x10, user data 0x18,
    // user code 0x20, TSS 0x28 (two entries).
    t.gdt[1] = 0x00af_9b00_0000_ffff;
    t.gdt[2] = 0x00cf_9300_0000_ffff;
    t.gdt[3] = 0x00cf_f300_0000_ffff;
    t.gdt[4] = 0x00af_fb00_0000_ffff;
    let rsp0 = core::ptr::addr_of!(TRAP_STACK) as u64 + 64 * 1024;
    t.tss[1] = rsp0 as u32;
    t.tss[2] = (rsp0 >> 32) as u32;
    // I/O map base past the limit: no port for CPL 3.
    t.tss[25] = 104 << 16;
    let tss = t.tss.as_ptr() as u64;
    let limit = 103u64;
    t.gdt[5] = limit | (tss & 0xff_ffff) << 16 | 0x89 << 40 | ((tss >> 24) & 0xff) << 56;
    t.gdt[6] = tss >> 32;
    let stubs = core::ptr::addr_of!(hostile_stubs) as u64;
    for vector in 0..32u64 {
        let handler = stubs + vector * 16;
        t.idt[2 * vector as usize] =
            (handler & 0xffff) | KERNEL_CS << 16 | 0x8e00 << 32 | ((handler >> 16) & 0xffff) << 48;
        t.idt[2 * vector as usize + 1] = handler >> 32;
    }
    let gdtr = DescriptorPointer {
        limit: (8 * 8 - 1) as u16,
        base: t.gdt.as_ptr() as u64,
    };
    let idtr = DescriptorPointer {
        limit: (32 * 16 - 1) as u16,
        base: t.idt.as_ptr() as u64,
    };
    let cr3 = t.pml4.0.as_ptr() as u64;
    // SAFETY: the tables above map this image where it runs (identity),
    // the GDT has the selectors the routine loads, and every IDT entry
    // points at a stub.
    unsafe { hostile_load_tables(&gdtr, &idtr, cr3) };
}

/// 2 MiB regions of the device hole split into 4 KiB pages: the virtio
/// BARs', the IOAPIC's and the LAPIC's.
const SMALL_TABLES: usize = 4;

/// Makes the 4 KiB pages of `regions` (in the device hole) user pages,
/// splitting their 2 MiB pages, then flushes the TLB.
fn open_to_user(regions: &[Region]) {
    // SAFETY: one CPU; no reference to TABLES is live (build_tables has
    // returned); the entries are changed from one valid mapping of the
    // same frames to another, then CR3 is reloaded.
    let t = unsafe { &mut *core::ptr::addr_of_mut!(TABLES) };
    let mut used = 0;
    for r in regions.iter().filter(|r| r.len > 0) {
        let mut page = r.base & !0xfff;
        while page < r.base + r.len {
            let (gib, big) = ((page >> 30) as usize, ((page >> 21) & 511) as usize);
            if gib != 3 {
                break;
            }
            let entry = t.pd[gib].0[big];
            let small = if entry & pte::HUGE != 0 {
                if used == SMALL_TABLES {
                    say!("hostile: FAIL more than {SMALL_TABLES} device regions for junk");
                    halt();
                }
                let table = &mut t.small[used];
                used += 1;
                let base = entry & 0xf_ffff_ffe0_0000;
                for (i, e) in table.0.iter_mut().enumerate() {
                    *e = (base + i as u64 * 0x1000) | pte::PRESENT | pte::WRITABLE | pte::NX;
                }
                t.pd[gib].0[big] =
                    table.0.as_ptr() as u64 | pte::PRESENT | pte::WRITABLE | pte::USER;
                table
            } else {
                let at = (entry & 0xf_ffff_ffff_f000) as *const u64;
                t.small
                    .iter_mut()
                    .find(|table| core::ptr::eq(table.0.as_ptr(), at))
                    .expect("a split region's table")
            };
            small.0[((page >> 12) & 511) as usize] |= pte::USER;
            page += 0x1000;
        }
    }
    // SAFETY: reloading CR3 with its own value only flushes the TLB.
    unsafe {
        core::arch::asm!("mov {0}, cr3", "mov cr3, {0}", out(reg) _, options(nostack));
    }
}

/// Bytes of guest-physical memory the guest itself owns (identity-mapped,
/// supervisor): the zero page, the command line, the canary, scratch.
fn ram(addr: u64, len: usize) -> &'static mut [u8] {
    // SAFETY: callers pass ranges of RAM below the end the e820 map gives
    // that no Rust object occupies (low memory, canary, junk page,
    // scratch), identity-mapped; the guest is single-threaded and never
    // holds two of these slices at once for one range.
    unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, len) }
}

#[derive(Default)]
struct Counts {
    by_class: [u64; 7],
    /// Exceptions the guest took, by vector.
    vectors: [u64; 32],
    port_writes: u64,
    mmio_writes: u64,
    rings: u64,
}

struct Executor {
    amd: bool,
    devices: [VirtioDevice; MAX_VIRTIO],
    counts: Counts,
}

impl Executor {
    fn note(&mut self, vector: Option<u8>) {
        if let Some(v) = vector {
            self.counts.vectors[usize::from(v) % 32] += 1;
        }
    }

    fn run(&mut self, action: Action) {
        self.counts.by_class[action.class()] += 1;
        let mut ctx = Ctx::default();
        let routine: Routine = match action {
            Action::PortRead { port, size } => {
                ctx.rdx = port.into();
                match size {
                    1 => hostile_in8,
                    2 => hostile_in16,
                    _ => hostile_in32,
                }
            }
            Action::PortWrite { port, size, value } => {
                self.counts.port_writes += 1;
                ctx.rdx = port.into();
                ctx.rax = value.into();
                match size {
                    1 => hostile_out8,
                    2 => hostile_out16,
                    _ => hostile_out32,
                }
            }
            Action::MmioRead { addr, size } => {
                ctx.rdi = addr;
                read_routine(size)
            }
            Action::MmioWrite { addr, size, value } => {
                self.counts.mmio_writes += 1;
                ctx.rdi = addr;
                ctx.rax = value;
                write_routine(size)
            }
            Action::Cpuid { leaf, subleaf } => {
                ctx.rax = leaf.into();
                ctx.rcx = subleaf.into();
                hostile_cpuid
            }
            Action::MsrRead { msr } => {
                ctx.rcx = msr.into();
                hostile_rdmsr
            }
            Action::MsrWrite { msr, value } => {
                ctx.rcx = msr.into();
                ctx.rax = value & 0xffff_ffff;
                ctx.rdx = value >> 32;
                hostile_wrmsr
            }
            Action::Hypercall { regs } => {
                [ctx.rax, ctx.rbx, ctx.rcx, ctx.rdx, ctx.rsi, ctx.rdi] = regs;
                if self.amd {
                    hostile_vmmcall
                } else {
                    hostile_vmcall
                }
            }
            Action::Ring(ring) => {
                self.ring(ring);
                return;
            }
            Action::Junk(junk) => {
                let code = ram(JUNK_PAGE, junk::CODE_LEN + JUNK_STOP.len());
                code[..junk::CODE_LEN].copy_from_slice(&junk.code);
                code[junk::CODE_LEN..].copy_from_slice(&JUNK_STOP);
                [ctx.rax, ctx.rbx, ctx.rcx, ctx.rdx, ctx.rsi, ctx.rdi] = junk.regs;
                hostile_user
            }
        };
        let vector = guarded(routine, &mut ctx);
        self.note(vector);
    }

    fn ring(&mut self, ring: &virtio::Ring) {
        self.counts.rings += 1;
        ram(ring.base, virtio::IMAGE_LEN).copy_from_slice(&ring.image);
        let Some(device) = self
            .devices
            .iter()
            .find(|d| {
                d.common.len != 0
                    && ring.steps.iter().any(|s| matches!(s, Step::Write { addr, .. } if *addr == d.common.base + virtio::common::DEVICE_STATUS))
            })
            .copied()
        else {
            return;
        };
        for step in ring.steps {
            let mut ctx = Ctx::default();
            let vector = match step {
                Step::None => continue,
                Step::Write { addr, size, value } => {
                    ctx.rdi = addr;
                    ctx.rax = value;
                    guarded(write_routine(size), &mut ctx)
                }
                Step::Read { addr, size } => {
                    ctx.rdi = addr;
                    guarded(read_routine(size), &mut ctx)
                }
                Step::Notify { queue } => {
                    ctx.rdi = device.common.base + virtio::common::QUEUE_NOTIFY_OFF;
                    let v = guarded(hostile_read16, &mut ctx);
                    self.note(v);
                    let offset = (ctx.rax & 0xffff) * u64::from(device.notify_multiplier);
                    if offset + 2 > device.notify.len {
                        continue;
                    }
                    let mut kick = Ctx {
                        rdi: device.notify.base + offset,
                        rax: queue.into(),
                        ..Ctx::default()
                    };
                    guarded(hostile_write16, &mut kick)
                }
            };
            self.note(vector);
        }
    }
}

fn read_routine(size: u8) -> Routine {
    match size {
        1 => hostile_read8,
        2 => hostile_read16,
        4 => hostile_read32,
        _ => hostile_read64,
    }
}

fn write_routine(size: u8) -> Routine {
    match size {
        1 => hostile_write8,
        2 => hostile_write16,
        4 => hostile_write32,
        _ => hostile_write64,
    }
}

const CANARY_SALT: u64 = 0xca7a_5eed;

fn canary_bytes(seed: u64, out: &mut [u8]) {
    let mut rng = Xorshift::new(seed ^ CANARY_SALT);
    for chunk in out.chunks_mut(8) {
        let word = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
}

fn vendor_is_amd() -> bool {
    let mut ctx = Ctx::default();
    guarded(hostile_cpuid, &mut ctx);
    // "AuthenticAMD": ebx "Auth".
    ctx.rbx as u32 == u32::from_le_bytes(*b"Auth")
}

#[no_mangle]
extern "C" fn hostile_main(zero_page: u64) -> ! {
    let mut zp = [0u8; ZERO_PAGE_LEN];
    zp.copy_from_slice(ram(zero_page, ZERO_PAGE_LEN));
    let cmd_ptr = u64::from(u32::from_le_bytes([
        zp[0x228], zp[0x229], zp[0x22a], zp[0x22b],
    ]));
    let mut cmdline = [0u8; CMDLINE_MAX];
    cmdline.copy_from_slice(ram(cmd_ptr, CMDLINE_MAX));
    let len = cmdline.iter().position(|&b| b == 0).unwrap_or(CMDLINE_MAX);
    let words = core::str::from_utf8(&cmdline[..len]).unwrap_or("");
    build_tables();
    // Nothing below 1 MiB is needed any more (the firmware's page tables
    // and GDT are replaced): cleared, so a device pointed at low memory
    // finds zeros, not tables.
    ram(0x1000, 0x9_e000).fill(0);
    let config = match Config::parse(words, "hostile.") {
        Ok(c) => c,
        Err(bad) => {
            say!("hostile: FAIL bad command line word {:?}", bad.0);
            halt();
        }
    };
    let Some(layout) =
        hostile::ram_end_from_zero_page(&zp).and_then(|end| Layout::new(end, KEEP_BELOW))
    else {
        say!("hostile: FAIL no RAM map, or too little RAM");
        halt();
    };
    let (devices, found) = pci::find_virtio::<MAX_VIRTIO>(&mut PortConfig);
    let mut junk_pages = [Region::default(); 2 + 3 * MAX_VIRTIO];
    junk_pages[0] = Region {
        base: hostile::IOAPIC,
        len: 0x40,
    };
    junk_pages[1] = Region {
        base: hostile::LAPIC,
        len: 0x1000,
    };
    for (i, d) in devices[..found].iter().enumerate() {
        junk_pages[2 + 3 * i..5 + 3 * i].copy_from_slice(&[d.notify, d.isr, d.device]);
    }
    open_to_user(&junk_pages);
    let amd = vendor_is_amd();
    say!(
        "hostile: seed {:#x}, {} actions, classes {:#x}, {} MiB RAM, {} virtio devices, {}",
        config.seed,
        config.actions,
        config.classes,
        layout.ram_end / MIB,
        found,
        if amd { "vmmcall" } else { "vmcall" }
    );
    for d in &devices[..found] {
        say!(
            "hostile: virtio {:#06x} in slot {} at {:#x}",
            d.device_id,
            d.slot,
            d.common.base
        );
    }
    let not_offered = [hostile_monitor as Routine, hostile_mwait, hostile_rdtscp].map(|routine| {
        match guarded(routine, &mut Ctx::default()) {
            Some(6) => "#UD",
            Some(_) => "another exception",
            None => "ran",
        }
    });
    say!(
        "hostile: not offered: monitor {}, mwait {}, rdtscp {}",
        not_offered[0],
        not_offered[1],
        not_offered[2]
    );
    canary_bytes(config.seed, ram(CANARY, CANARY_LEN));

    let mut exec = Executor {
        amd,
        devices,
        counts: Counts::default(),
    };
    let targets = Targets {
        layout,
        virtio: &devices[..found],
        classes: config.classes,
        port_writes: true,
        interrupt_controllers: true,
    };
    let mut plan = Plan::new(config.seed, targets);
    for n in 1..=config.actions {
        let action = plan.next_action();
        note_last(n, &action);
        exec.run(action);
        if n % PROGRESS_EVERY == 0 {
            say!("hostile: {n} actions");
        }
    }

    let c = &exec.counts;
    say!(
        "hostile: done, {} actions (seed {:#x})",
        config.actions,
        config.seed
    );
    Serial::reset();
    let _ = write!(Serial, "hostile: by class");
    for (name, n) in class::NAMES.iter().zip(c.by_class) {
        let _ = write!(Serial, " {name} {n}");
    }
    let _ = writeln!(
        Serial,
        "; {} port and {} MMIO writes",
        c.port_writes, c.mmio_writes
    );
    let _ = write!(Serial, "hostile: exceptions taken");
    for (v, n) in c.vectors.iter().enumerate().filter(|(_, &n)| n > 0) {
        let _ = write!(Serial, " #{v}:{n}");
    }
    let _ = writeln!(Serial);
    let mut expected = Xorshift::new(config.seed ^ CANARY_SALT);
    let damaged = ram(CANARY, CANARY_LEN)
        .chunks(8)
        .filter(|chunk| **chunk != expected.next_u64().to_le_bytes()[..chunk.len()])
        .count();
    if damaged == 0 {
        say!("hostile: canary intact ({} KiB)", CANARY_LEN / 1024);
    } else {
        say!("hostile: FAIL canary: {damaged} words changed");
    }
    say!("hostile: triple fault next");
    // SAFETY: the guest ends here on purpose.
    unsafe { hostile_triple_fault() }
}

fn halt() -> ! {
    // SAFETY: the guest has nothing more to do.
    unsafe { hostile_triple_fault() }
}

/// The action under way, for the report of an unexpected exception.
static LAST_ACTION: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
static LAST_TEXT: spin_free::Text = spin_free::Text::new();

mod spin_free {
    use core::sync::atomic::{AtomicU8, Ordering};

    /// A line of text kept by a single-threaded guest.
    pub struct Text {
        bytes: [AtomicU8; 160],
    }

    impl Text {
        pub const fn new() -> Self {
            Self {
                bytes: [const { AtomicU8::new(0) }; 160],
            }
        }

        pub fn set(&self, text: &[u8]) {
            for (i, slot) in self.bytes.iter().enumerate() {
                slot.store(text.get(i).copied().unwrap_or(0), Ordering::Relaxed);
            }
        }

        pub fn get(&self, out: &mut [u8; 160]) -> usize {
            for (o, b) in out.iter_mut().zip(&self.bytes) {
                *o = b.load(Ordering::Relaxed);
            }
            out.iter().position(|&b| b == 0).unwrap_or(160)
        }
    }
}

/// Keeps the action's number and a short description.
fn note_last(n: u64, action: &Action) {
    struct Buf {
        bytes: [u8; 160],
        len: usize,
    }
    impl Write for Buf {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            for b in s.bytes() {
                if self.len < self.bytes.len() {
                    self.bytes[self.len] = b;
                    self.len += 1;
                }
            }
            Ok(())
        }
    }
    LAST_ACTION.store(n, core::sync::atomic::Ordering::Relaxed);
    let mut buf = Buf {
        bytes: [0; 160],
        len: 0,
    };
    let _ = match action {
        Action::Ring(r) => write!(
            buf,
            "ring at {:#x} queue {} size {}",
            r.base, r.queue, r.size
        ),
        Action::Junk(j) => write!(buf, "junk {:02x?}", j.code),
        other => write!(buf, "{other:?}"),
    };
    LAST_TEXT.set(&buf.bytes[..buf.len]);
}

/// An exception no guard expected: report it and end.
#[no_mangle]
extern "C" fn hostile_unexpected(vector: u64, top: u64, next: u64) -> ! {
    // The frame's first words: the RIP, or the error code and the RIP.
    let mut text = [0u8; 160];
    let len = LAST_TEXT.get(&mut text);
    say!(
        "hostile: FAIL unexpected exception {vector}, frame {top:#x} {next:#x}, in action {}: {}",
        LAST_ACTION.load(core::sync::atomic::Ordering::Relaxed),
        core::str::from_utf8(&text[..len]).unwrap_or("?")
    );
    halt()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    say!("hostile: FAIL panic: {info}");
    halt()
}

// The boot protocol's header (file offset 0; see linker.ld), the entry,
// the guard and the routines.
global_asm!(
    ".pushsection .hostile.header, \"a\"",
    ".fill 0x1f1, 1, 0",
    ".byte 1",                // 0x1f1 setup_sects: code at file offset 0x400
    ".fill 0x1fe - 0x1f2, 1, 0",
    ".2byte 0xaa55",          // 0x1fe boot_flag
    ".byte 0xeb, 0x66",       // 0x200 jump: header up to 0x268
    ".ascii \"HdrS\"",        // 0x202
    ".2byte 0x020f",          // 0x206 version 2.15
    ".fill 0x211 - 0x208, 1, 0",
    ".byte 1",                // 0x211 loadflags: LOADED_HIGH
    ".fill 0x22c - 0x212, 1, 0",
    ".4byte 0x7fffffff",      // 0x22c initrd_addr_max
    ".4byte 0x1000",          // 0x230 kernel_alignment
    ".byte 0",                // 0x234 relocatable_kernel
    ".byte 0",                // 0x235
    ".2byte 1",               // 0x236 xloadflags: XLF_KERNEL_64
    ".4byte 2047",            // 0x238 cmdline_size
    ".fill 0x258 - 0x23c, 1, 0",
    ".8byte 0x100000",        // 0x258 pref_address
    ".4byte hostile_image_end - 0x100000", // 0x260 init_size
    ".fill 0x400 - 0x264, 1, 0",
    ".popsection",
    ".pushsection .hostile.head, \"ax\"",
    ".popsection",
    ".pushsection .hostile.entry, \"ax\"",
    ".globl hostile_entry",
    "hostile_entry:",
    "    cli",
    "    lea rsp, [rip + HOSTILE_STACK + 65536]",
    "    mov rdi, rsi",
    "    call hostile_main",
    "2:  hlt",
    "    jmp 2b",
    ".popsection",
    ".text",
    // u64 hostile_guarded(routine, ctx)
    ".globl hostile_guarded",
    "hostile_guarded:",
    "    push rbx",
    "    push rbp",
    "    push r12",
    "    push r13",
    "    push r14",
    "    push r15",
    "    mov [rip + hostile_recover_rsp], rsp",
    "    mov rax, rdi",
    "    mov rdi, rsi",
    "    call rax",
    "    xor eax, eax",
    "hostile_recovered:",
    "    mov qword ptr [rip + hostile_recover_rsp], 0",
    "    pop r15",
    "    pop r14",
    "    pop r13",
    "    pop r12",
    "    pop rbp",
    "    pop rbx",
    "    ret",
    // Exception stubs, 16 bytes apart: push the vector, go to the trap.
    ".balign 16",
    ".globl hostile_stubs",
    "hostile_stubs:",
    ".set hostile_vector, 0",
    ".rept 32",
    ".balign 16",
    "    .byte 0x6a, hostile_vector", // push imm8
    "    jmp hostile_trap",
    ".set hostile_vector, hostile_vector + 1",
    ".endr",
    "hostile_trap:",
    // An exception keeps RFLAGS.DF: junk that ran `std` would otherwise
    // leave the Rust code after it copying backwards over its own stack.
    "    cld",
    "    pop rax",
    "    mov rcx, [rip + hostile_recover_rsp]",
    "    test rcx, rcx",
    "    jz 3f",
    // Back to the guard's frame, in kernel mode, data segments reloaded
    // (user junk may have changed them).
    "    mov rsp, rcx",
    "    mov ecx, 0x10",
    "    mov ds, ecx",
    "    mov es, ecx",
    "    mov ss, ecx",
    "    inc rax",
    "    jmp hostile_recovered",
    "3:  mov rdi, rax",
    "    mov rsi, [rsp]",
    "    mov rdx, [rsp + 8]",
    "    and rsp, -16",
    "    call hostile_unexpected",
    // Routines: ctx in rdi, fields rax 0, rbx 8, rcx 16, rdx 24, rsi 32, rdi 40.
    ".globl hostile_in8, hostile_in16, hostile_in32, hostile_out8, hostile_out16, hostile_out32",
    "hostile_in8:  mov edx, [rdi + 24]", "    in al, dx", "    mov [rdi], rax", "    ret",
    "hostile_in16: mov edx, [rdi + 24]", "    in ax, dx", "    mov [rdi], rax", "    ret",
    "hostile_in32: mov edx, [rdi + 24]", "    in eax, dx", "    mov [rdi], rax", "    ret",
    "hostile_out8:  mov edx, [rdi + 24]", "    mov rax, [rdi]", "    out dx, al", "    ret",
    "hostile_out16: mov edx, [rdi + 24]", "    mov rax, [rdi]", "    out dx, ax", "    ret",
    "hostile_out32: mov edx, [rdi + 24]", "    mov rax, [rdi]", "    out dx, eax", "    ret",
    ".globl hostile_read8, hostile_read16, hostile_read32, hostile_read64",
    "hostile_read8:  mov rsi, [rdi + 40]", "    movzx eax, byte ptr [rsi]", "    mov [rdi], rax", "    ret",
    "hostile_read16: mov rsi, [rdi + 40]", "    movzx eax, word ptr [rsi]", "    mov [rdi], rax", "    ret",
    "hostile_read32: mov rsi, [rdi + 40]", "    mov eax, dword ptr [rsi]", "    mov [rdi], rax", "    ret",
    "hostile_read64: mov rsi, [rdi + 40]", "    mov rax, qword ptr [rsi]", "    mov [rdi], rax", "    ret",
    ".globl hostile_write8, hostile_write16, hostile_write32, hostile_write64",
    "hostile_write8:  mov rsi, [rdi + 40]", "    mov rax, [rdi]", "    mov byte ptr [rsi], al", "    ret",
    "hostile_write16: mov rsi, [rdi + 40]", "    mov rax, [rdi]", "    mov word ptr [rsi], ax", "    ret",
    "hostile_write32: mov rsi, [rdi + 40]", "    mov rax, [rdi]", "    mov dword ptr [rsi], eax", "    ret",
    "hostile_write64: mov rsi, [rdi + 40]", "    mov rax, [rdi]", "    mov qword ptr [rsi], rax", "    ret",
    // Instructions the CPU model does not offer (CPUID): each must #UD.
    ".globl hostile_monitor, hostile_mwait, hostile_rdtscp",
    "hostile_monitor: mov rax, rdi", "    xor ecx, ecx", "    xor edx, edx", "    monitor", "    ret",
    "hostile_mwait: xor eax, eax", "    xor ecx, ecx", "    mwait", "    ret",
    "hostile_rdtscp: rdtscp", "    mov [rdi], rax", "    ret",
    ".globl hostile_rdmsr, hostile_wrmsr, hostile_cpuid",
    "hostile_rdmsr: mov rcx, [rdi + 16]", "    rdmsr", "    mov [rdi], rax", "    mov [rdi + 24], rdx", "    ret",
    "hostile_wrmsr: mov rcx, [rdi + 16]", "    mov rax, [rdi]", "    mov rdx, [rdi + 24]", "    wrmsr", "    ret",
    "hostile_cpuid: mov r8, rdi", "    mov rax, [r8]", "    mov rcx, [r8 + 16]", "    cpuid",
    "    mov [r8], rax", "    mov [r8 + 8], rbx", "    mov [r8 + 16], rcx", "    mov [r8 + 24], rdx", "    ret",
    // Hypercalls: every register from ctx, the answer back.
    ".globl hostile_vmcall, hostile_vmmcall",
    "hostile_vmcall:",
    "    push rdi",
    "    call hostile_load_regs",
    "    vmcall",
    "    jmp hostile_store_regs",
    "hostile_vmmcall:",
    "    push rdi",
    "    call hostile_load_regs",
    "    vmmcall",
    "hostile_store_regs:",
    "    xchg rdi, [rsp]",
    "    mov [rdi], rax",
    "    mov [rdi + 8], rbx",
    "    mov [rdi + 16], rcx",
    "    mov [rdi + 24], rdx",
    "    mov [rdi + 32], rsi",
    "    pop rax",
    "    mov [rdi + 40], rax",
    "    ret",
    "hostile_load_regs:",
    "    mov rax, [rdi]",
    "    mov rbx, [rdi + 8]",
    "    mov rcx, [rdi + 16]",
    "    mov rdx, [rdi + 24]",
    "    mov rsi, [rdi + 32]",
    "    mov rdi, [rdi + 40]",
    "    ret",
    // Junk in user mode: iretq to the junk page with the registers set;
    // it returns only through an exception (ud2 at the end at the latest).
    ".globl hostile_user",
    "hostile_user:",
    "    push 0x1b",                 // SS: user data
    "    mov rax, {user_stack}",
    "    push rax",                  // RSP
    "    push 0x2",                  // RFLAGS: IF clear, IOPL 0
    "    push 0x23",                 // CS: user code
    "    mov rax, {junk}",
    "    push rax",                  // RIP
    "    xor ebp, ebp",
    "    xor r8d, r8d", "    xor r9d, r9d", "    xor r10d, r10d", "    xor r11d, r11d",
    "    xor r12d, r12d", "    xor r13d, r13d", "    xor r14d, r14d", "    xor r15d, r15d",
    "    call hostile_load_regs",
    "    iretq",
    ".globl hostile_load_tables",
    "hostile_load_tables:",
    // EFER.NXE first: the new tables use the NX bit.
    "    mov r8, rdx",
    "    mov ecx, 0xc0000080",
    "    rdmsr",
    "    or eax, 0x800",
    "    wrmsr",
    "    lgdt [rdi]",
    "    lidt [rsi]",
    "    mov cr3, r8",
    "    mov eax, 0x10",
    "    mov ds, eax",
    "    mov es, eax",
    "    mov ss, eax",
    "    mov fs, eax",
    "    mov gs, eax",
    "    mov eax, 0x28",
    "    ltr ax",
    "    pop rax",
    "    push 0x08",
    "    push rax",
    "    retfq",
    ".globl hostile_triple_fault",
    "hostile_triple_fault:",
    "    lidt [rip + hostile_no_idt]",
    "    ud2",
    "    jmp hostile_triple_fault",
    ".pushsection .data",
    ".balign 8",
    "hostile_recover_rsp: .8byte 0",
    "hostile_no_idt: .2byte 0",
    "    .8byte 0",
    ".popsection",
    user_stack = const USER_STACK_TOP,
    junk = const JUNK_PAGE,
);
