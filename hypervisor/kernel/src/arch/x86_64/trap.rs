//! What happens after an entry: exceptions, interrupts and system calls.

use super::entry::TrapFrame;
use super::{cpu, ioapic, ipi, lapic, msi};
use crate::console;
use moat_abi::ExceptionMessage;

pub const VECTOR_TIMER: u64 = 0x20;
pub const VECTOR_SPURIOUS: u64 = 0xff;
const NMI: u64 = 2;
const VECTOR_PAGE_FAULT: u64 = 14;

const EXCEPTION_NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor segment overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved 15",
    "#MF x87 floating point",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD floating point",
    "#VE virtualization",
    "#CP control protection",
    "reserved 22",
    "reserved 23",
    "reserved 24",
    "reserved 25",
    "reserved 26",
    "reserved 27",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security",
    "reserved 31",
];

pub fn exception_name(vector: u64) -> &'static str {
    usize::try_from(vector)
        .ok()
        .and_then(|v| EXCEPTION_NAMES.get(v))
        .copied()
        .unwrap_or("interrupt")
}

/// An interrupt or exception from user mode; `frame` is the running EC's
/// register area. Returns the frame of the EC to enter next.
pub extern "C" fn user_interrupt(frame: *mut TrapFrame) -> *const TrapFrame {
    // SAFETY: the entry stub passes the registers it just saved, in the
    // running EC's register area, which nothing else touches meanwhile.
    let (vector, error_code, rip, rsp, cs) = unsafe {
        let f = &*frame;
        (f.vector, f.error_code, f.rip, f.rsp, f.cs)
    };
    match vector {
        NMI => crate::dump::nmi(rip, cs),
        0..=31 => {
            let message = ExceptionMessage {
                vector,
                error_code,
                rip,
                rsp,
                fault_address: if vector == VECTOR_PAGE_FAULT {
                    cpu::read_cr2()
                } else {
                    0
                },
                ec_id: 0,
            };
            let mut guard = crate::kernel::lock();
            if let Some(kernel) = guard.as_mut() {
                if let Some(ec) = kernel.current() {
                    kernel.raise(ec, message);
                }
            }
        }
        VECTOR_TIMER => timer_interrupt(),
        ipi::VECTOR_IPI => ipi_interrupt(),
        VECTOR_SPURIOUS => {}
        vector => device_interrupt(vector),
    }
    crate::scheduler::leave()
}

/// An interrupt in kernel mode (the idle loop) or a kernel exception.
pub extern "C" fn kernel_interrupt(frame: &mut TrapFrame) {
    match frame.vector {
        NMI => crate::dump::nmi(frame.rip, frame.cs),
        0..=31 => kernel_exception(frame),
        VECTOR_TIMER => timer_interrupt(),
        ipi::VECTOR_IPI => ipi_interrupt(),
        VECTOR_SPURIOUS => {}
        vector => device_interrupt(vector),
    }
}

/// The LAPIC timer: this CPU's scheduling tick.
fn timer_interrupt() {
    crate::scheduler::tick();
    lapic::end_of_interrupt();
}

/// Another CPU asks for a TLB shootdown or made an EC of this CPU ready.
fn ipi_interrupt() {
    lapic::end_of_interrupt();
    crate::scheduler::wake();
}

/// A device interrupt: mask its GSI (an MSI needs no mask), acknowledge
/// it, up its semaphore.
fn device_interrupt(vector: u64) {
    let gsi = vector.wrapping_sub(u64::from(ioapic::VECTOR_BASE));
    if ioapic::present(gsi) {
        ioapic::set_masked(gsi as u32, true);
        lapic::end_of_interrupt();
        let mut guard = crate::kernel::lock();
        if let Some(kernel) = guard.as_mut() {
            kernel.interrupt(gsi);
        }
    } else if let Some(n) = msi::of_vector(vector) {
        lapic::end_of_interrupt();
        let mut guard = crate::kernel::lock();
        if let Some(kernel) = guard.as_mut() {
            kernel.interrupt_slot(msi::slot(n));
        }
    } else {
        log::warn!("unexpected interrupt vector {vector:#x}");
        lapic::end_of_interrupt();
    }
}

/// An exception in kernel mode is a kernel bug: print everything and stop.
fn kernel_exception(frame: &TrapFrame) -> ! {
    let cr2 = cpu::read_cr2();
    console::write_emergency(format_args!(
        "\n!!! exception in kernel mode: {} (vector {}), error code {:#x}\n",
        exception_name(frame.vector),
        frame.vector,
        frame.error_code
    ));
    dump(frame, cr2);
    crate::stop(crate::StopReason::KernelFault)
}

pub fn dump(frame: &TrapFrame, cr2: u64) {
    let f = frame;
    console::write_emergency(format_args!(
        "    rip {:#018x}  cs {:#06x}  rflags {:#010x}  rsp {:#018x}  ss {:#06x}\n\
         \x20   rax {:#018x}  rbx {:#018x}  rcx {:#018x}  rdx {:#018x}\n\
         \x20   rsi {:#018x}  rdi {:#018x}  rbp {:#018x}  r8  {:#018x}\n\
         \x20   r9  {:#018x}  r10 {:#018x}  r11 {:#018x}  r12 {:#018x}\n\
         \x20   r13 {:#018x}  r14 {:#018x}  r15 {:#018x}  cr2 {:#018x}\n\
         \x20   cr0 {:#x}  cr3 {:#x}  cr4 {:#x}\n",
        f.rip,
        f.cs,
        f.rflags,
        f.rsp,
        f.ss,
        f.rax,
        f.rbx,
        f.rcx,
        f.rdx,
        f.rsi,
        f.rdi,
        f.rbp,
        f.r8,
        f.r9,
        f.r10,
        f.r11,
        f.r12,
        f.r13,
        f.r14,
        f.r15,
        cr2,
        cpu::read_cr0(),
        cpu::read_cr3(),
        cpu::read_cr4()
    ));
}
