//! Everything specific to x86_64 hardware.

pub mod acpi;
pub mod boot;
pub mod cpu;
pub mod debug;
pub mod entry;
pub mod features;
pub mod fpu;
pub mod gdt;
pub mod idt;
pub mod ioapic;
pub mod ipi;
pub mod lapic;
pub mod layout;
pub mod msi;
pub mod percpu;
pub mod pit;
pub mod serial;
pub mod smp;
pub mod svm;
pub mod trap;
pub mod virt;
pub mod vmx;
