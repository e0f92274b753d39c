//! GDT and TSS of the boot CPU, with IST stacks for NMI, #DF and #MC.
//!
//! The selector order is fixed by SYSCALL/SYSRET: kernel code, kernel data,
//! then user data and user code at STAR[63:48] + 8 and + 16.

use super::layout::IST_STACK_SIZE;
use core::arch::asm;
use core::mem::size_of;
use spin::Once;

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

#[repr(C, align(16))]
struct IstStacks([[u8; IST_STACK_SIZE]; IST_COUNT]);

static mut IST_STACKS: IstStacks = IstStacks([[0; IST_STACK_SIZE]; IST_COUNT]);
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

static mut TSS: TssArea = TssArea {
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
};
static GDT: Once<[u64; 7]> = Once::new();

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

/// Where the CPU puts the registers on the next interrupt from user mode:
/// the end of the register area of the EC about to run.
pub fn set_kernel_entry_stack(top: u64) {
    // SAFETY: one CPU, interrupts off in the kernel: nobody else touches
    // the TSS now, and the CPU reads RSP0 only on an interrupt from ring 3.
    unsafe { (*core::ptr::addr_of_mut!(TSS)).tss.rsp[0] = top };
}

/// Loads the I/O permission bitmap of the PD about to run (None: it may
/// use no port).
pub fn load_io_bitmap(bitmap: Option<&[u8; IO_BITMAP_BYTES]>) {
    // SAFETY: one CPU, interrupts off in the kernel: nobody else touches
    // the TSS now; the CPU reads the bitmap only for I/O in ring 3.
    unsafe {
        let area = &mut *core::ptr::addr_of_mut!(TSS);
        match bitmap {
            Some(bitmap) => {
                area.io_bitmap = *bitmap;
                area.tss.iomap_base = size_of::<Tss>() as u16;
            }
            None => area.tss.iomap_base = IO_DENY_ALL,
        }
    }
}

/// Loads the GDT and TSS; `kernel_stack_top` is where the CPU switches to on
/// an interrupt from user mode.
pub fn init(kernel_stack_top: u64) {
    let ist_base = core::ptr::addr_of!(IST_STACKS) as u64;
    // SAFETY: runs once on the boot CPU before the TSS is loaded; nothing
    // else refers to it yet.
    let tss = unsafe {
        let area = &mut *core::ptr::addr_of_mut!(TSS);
        area.tss.rsp[0] = kernel_stack_top;
        for slot in 0..IST_COUNT {
            area.tss.ist[slot] = ist_base + ((slot + 1) * IST_STACK_SIZE) as u64;
        }
        &*area
    };
    let [tss_low, tss_high] = tss_descriptor(tss);
    let gdt = GDT.call_once(|| {
        [
            0,
            CODE64,
            DATA,
            DATA | DPL3,
            CODE64 | DPL3,
            tss_low,
            tss_high,
        ]
    });
    let pointer = DescriptorPointer {
        limit: (size_of::<[u64; 7]>() - 1) as u16,
        base: gdt.as_ptr() as u64,
    };
    // SAFETY: the GDT is a static that lives forever, its code and data
    // descriptors match the selectors in use (CS 0x08, data 0x10), and the
    // far return reloads CS from the new table.
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
