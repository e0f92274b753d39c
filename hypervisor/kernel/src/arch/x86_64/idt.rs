//! The interrupt descriptor table: every vector goes to its entry stub;
//! NMI, #DF and #MC run on their own IST stacks.

use super::entry::stub_address;
use super::gdt::{IST_DOUBLE_FAULT, IST_MACHINE_CHECK, IST_NMI, KERNEL_CS};
use core::arch::asm;
use spin::Once;

pub const VECTOR_NMI: u8 = 2;
pub const VECTOR_DOUBLE_FAULT: u8 = 8;
pub const VECTOR_MACHINE_CHECK: u8 = 18;

/// The type-and-attributes byte (bits 40..48): a present 64-bit interrupt gate.
const INTERRUPT_GATE: u64 = 0xe;
const PRESENT: u64 = 0x80;

static IDT: Once<[[u64; 2]; 256]> = Once::new();

#[repr(C, packed(2))]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

fn gate(handler: u64, ist: u8) -> [u64; 2] {
    let low = (handler & 0xffff)
        | (u64::from(KERNEL_CS) << 16)
        | (u64::from(ist) << 32)
        | ((INTERRUPT_GATE | PRESENT) << 40)
        | (((handler >> 16) & 0xffff) << 48);
    [low, handler >> 32]
}

fn ist_for(vector: u8) -> u8 {
    match vector {
        VECTOR_NMI => IST_NMI,
        VECTOR_DOUBLE_FAULT => IST_DOUBLE_FAULT,
        VECTOR_MACHINE_CHECK => IST_MACHINE_CHECK,
        _ => 0,
    }
}

pub fn init() {
    let idt = IDT.call_once(|| {
        let mut idt = [[0u64; 2]; 256];
        for (vector, entry) in (0..=255u8).zip(idt.iter_mut()) {
            *entry = gate(stub_address(vector), ist_for(vector));
        }
        idt
    });
    let pointer = DescriptorPointer {
        limit: (core::mem::size_of_val(idt) - 1) as u16,
        base: idt.as_ptr() as u64,
    };
    // SAFETY: the IDT is a static that lives forever and every gate points at
    // an entry stub in kernel code.
    unsafe { asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack, preserves_flags)) };
}
