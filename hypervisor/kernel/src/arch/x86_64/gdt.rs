//! GDT and TSS of each CPU, with IST stacks for NMI, #DF and #MC.
//!
//! The selector order is fixed by SYSCALL/SYSRET: kernel code, kernel data,
//! then user data and user code at STAR[63:48] + 8 and + 16.

use super::layout::IST_STACK_SIZE;
use super::percpu;
use core::arch::asm;
use core::mem::size_of;
use core::sync::atomic::Ordering;

pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
pub const USER_DS: u16 = 0x18 | 3;
pub const USER_CS: u16 = 0x20 | 3;
const TSS_SELECTOR: u16 = 0x28;
/// STAR[63:48]: SYSRET loads CS from this + 16 and SS from this + 8.
pub const SYSRET_BASE: u16 = 0x10;

pub const IST_DOUBLE_FAULT: u8 = 1;
pub const IST_NMI: u8 = 2;
pub const IST_MACHINE_CHECK: u8 = 3;
const IST_COUNT: usize = 3;

const CODE64: u64 = 0x0020_9a00_0000_0000;
const DATA: u64 = 0x0000_9200_0000_0000;
const DPL3: u64 = 3 << 45;

#[repr(C, packed(4))]
pub struct Tss {
    reserved0: u32,
    pub rsp: [u64; 3],
    reserved1: u64,
    pub ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}

/// IST stacks per CPU: NMI, #DF and #MC, one after another.
pub const IST_STACKS_SIZE: usize = IST_COUNT * IST_STACK_SIZE;

#[repr(C, align(16))]
struct IstStacks([u8; IST_STACKS_SIZE]);

/// The boot CPU's IST stacks; the others' are allocated when they start.
static mut BOOT_IST_STACKS: IstStacks = IstStacks([0; IST_STACKS_SIZE]);
/// Bytes of the I/O permission bitmap: one bit per port, set = denied.
pub const IO_BITMAP_BYTES: usize = 8192;

/// The TSS with its I/O permission bitmap (plus the all-ones byte the CPU
/// reads past the end).
#[repr(C, packed(4))]
struct TssArea {
    tss: Tss,
    io_bitmap: [u8; IO_BITMAP_BYTES],
    terminator: u8,
}

/// An I/O map base past the TSS limit: every port is denied in ring 3.
const IO_DENY_ALL: u16 = size_of::<TssArea>() as u16;
const GDT_ENTRIES: usize = 7;

/// One CPU's descriptor tables: its GDT and its TSS.
#[repr(C, align(16))]
pub struct CpuTables {
    gdt: [u64; GDT_ENTRIES],
    area: TssArea,
}

impl CpuTables {
    const INIT: CpuTables = CpuTables {
        gdt: [0; GDT_ENTRIES],
        area: TssArea {
            tss: Tss {
                reserved0: 0,
                rsp: [0; 3],
                reserved1: 0,
                ist: [0; 7],
                reserved2: 0,
                reserved3: 0,
                iomap_base: IO_DENY_ALL,
            },
            io_bitmap: [0xff; IO_BITMAP_BYTES],
            terminator: 0xff,
        },
    };
}

/// Bytes a CPU's tables take (for the other CPUs, allocated in frames).
pub const CPU_TABLES_SIZE: usize = size_of::<CpuTables>();

static mut BOOT_TABLES: CpuTables = CpuTables::INIT;

#[repr(C, packed(2))]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

fn tss_descriptor(tss: &TssArea) -> [u64; 2] {
    let base = tss as *const TssArea as u64;
    let limit = (size_of::<TssArea>() - 1) as u64;
    let low = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40) // present, 64-bit available TSS
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    [low, base >> 32]
}

/// This CPU's TSS area.
///
/// # Safety
/// Only this CPU may use the result, with interrupts off, and no other
/// reference to its tables may be live.
#[inline]
unsafe fn this_cpu_area() -> &'static mut TssArea {
    let tables = percpu::current().tables.load(Ordering::Relaxed) as *mut CpuTables;
    // SAFETY: `init` stored the address of this CPU's CpuTables, which live
    // for ever (a static, or frames never freed); the caller guarantees
    // exclusive use.
    unsafe { &mut (*tables).area }
}

/// Where the CPU puts the registers on the next interrupt from user mode:
/// the end of the register area of the EC about to run.
#[inline]
pub fn set_kernel_entry_stack(top: u64) {
    // SAFETY: each CPU touches only its own TSS, with interrupts off in the
    // kernel; the CPU reads RSP0 only on an interrupt from ring 3.
    unsafe { this_cpu_area().tss.rsp[0] = top };
}

/// Loads the I/O permission bitmap of the PD about to run (None: it may
/// use no port). Kept out of line: it runs only when the PD whose bitmap
/// the TSS holds changes, and inlined it would bloat the switch path.
#[inline(never)]
pub fn load_io_bitmap(bitmap: Option<&[u8; IO_BITMAP_BYTES]>) {
    // SAFETY: as in `set_kernel_entry_stack`; the CPU reads the bitmap only
    // for I/O in ring 3.
    let area = unsafe { this_cpu_area() };
    match bitmap {
        Some(bitmap) => {
            area.io_bitmap = *bitmap;
            area.tss.iomap_base = size_of::<Tss>() as u16;
        }
        None => area.tss.iomap_base = IO_DENY_ALL,
    }
}

/// The boot CPU's tables and IST stacks (the start of the three).
pub fn boot_cpu_tables() -> (*mut CpuTables, u64) {
    (
        core::ptr::addr_of_mut!(BOOT_TABLES),
        core::ptr::addr_of!(BOOT_IST_STACKS) as u64,
    )
}

/// Fills in the `CPU_TABLES_SIZE` bytes at `tables` (another CPU's, in
/// frames it was given) as the boot CPU's started out.
///
/// # Safety
/// `tables` must be writable, 16-byte aligned, and used by nothing else.
pub unsafe fn prepare_tables(tables: *mut CpuTables) {
    // SAFETY: forwarded from the caller.
    unsafe { tables.write(CpuTables::INIT) };
}

/// Loads this CPU's GDT and TSS from `tables`: `kernel_stack_top` is where
/// the CPU switches to on an interrupt from user mode, `ist_base` the
/// start of its IST stacks. Records both in this CPU's per-CPU block.
///
/// # Safety
/// `tables` must be this CPU's own, prepared (`CpuTables::INIT` or
/// `prepare_tables`), live for ever and not yet loaded; `ist_base` must
/// point at `IST_STACKS_SIZE` bytes that only this CPU uses.
pub unsafe fn init(tables: *mut CpuTables, kernel_stack_top: u64, ist_base: u64) {
    let percpu = percpu::current();
    percpu.tables.store(tables as u64, Ordering::Relaxed);
    percpu.ist_base.store(ist_base, Ordering::Relaxed);
    // SAFETY: the caller guarantees the tables are this CPU's and not yet
    // in use, so nothing else refers to them.
    let tables = unsafe { &mut *tables };
    tables.area.tss.rsp[0] = kernel_stack_top;
    for slot in 0..IST_COUNT {
        tables.area.tss.ist[slot] = ist_base + ((slot + 1) * IST_STACK_SIZE) as u64;
    }
    let [tss_low, tss_high] = tss_descriptor(&tables.area);
    tables.gdt = [
        0,
        CODE64,
        DATA,
        DATA | DPL3,
        CODE64 | DPL3,
        tss_low,
        tss_high,
    ];
    let pointer = DescriptorPointer {
        limit: (size_of::<[u64; GDT_ENTRIES]>() - 1) as u16,
        base: tables.gdt.as_ptr() as u64,
    };
    // SAFETY: the GDT lives for ever (caller), its code and data
    // descriptors match the selectors in use (CS 0x08, data 0x10), the far
    // return reloads CS from the new table, and the TSS descriptor is
    // available (not busy): it was never loaded.
    unsafe {
        asm!(
            "lgdt [{pointer}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ds, {ds:e}",
            "mov es, {ds:e}",
            "mov ss, {ds:e}",
            "ltr {tss:x}",
            pointer = in(reg) &pointer,
            cs = const KERNEL_CS as u64,
            ds = in(reg) KERNEL_DS as u32,
            tss = in(reg) TSS_SELECTOR,
            tmp = out(reg) _,
        );
    }
}
