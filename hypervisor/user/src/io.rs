//! Port I/O for tasks given I/O-port capabilities: the kernel's I/O bitmap
//! lets exactly those ports through; any other makes the instruction #GP,
//! which ends up as a fault of the task, never a memory access.

pub fn outb(port: u16, value: u8) {
    // SAFETY: OUT touches no memory; without the port's capability the CPU
    // raises #GP, which the kernel reports as this task's fault.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack))
    };
}

pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`; IN writes only the register.
    unsafe {
        core::arch::asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack))
    };
    value
}
