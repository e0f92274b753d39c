//! `rtc`: a user-mode driver for the CMOS real-time clock's periodic
//! interrupt, to show device interrupts reaching a driver as semaphore ups.
//!
//! It needs the ports 0x70-0x71 and GSI 8 from the manifest. It assigns the
//! GSI to a semaphore of its own, starts the RTC's periodic interrupt at
//! 1024 Hz, and for each interrupt: downs the semaphore, acknowledges the
//! device (reading register C) and unmasks the GSI. Prints
//! `rtc: N interrupts through the semaphore` and exits 0.
//!
//! Arguments: `count=N` (default 20), `tsc_hz=N`.
#![no_std]
#![no_main]

use common::{args, ms_to_ticks};
use moat_user::io::{inb, outb};
use moat_user::{println, rdtsc, sys};

moat_user::entry!(main);

const INDEX: u16 = 0x70;
const DATA: u16 = 0x71;
/// Selecting a register with bit 7 set keeps NMIs masked meanwhile.
const REG_A: u8 = 0x8a;
const REG_B: u8 = 0x8b;
const REG_C: u8 = 0x0c;
const PERIODIC_ENABLE: u8 = 1 << 6;
/// Rate 6: 32768 >> 5 = 1024 Hz.
const RATE_1024_HZ: u8 = 6;
const GSI: u64 = 8;
const IRQ_SM: u64 = 40;
const EDGE_ACTIVE_HIGH: u64 = 0;

fn read_register(register: u8) -> u8 {
    outb(INDEX, register);
    inb(DATA)
}

fn write_register(register: u8, value: u8) {
    outb(INDEX, register);
    outb(DATA, value);
}

fn main(args: &str) -> i32 {
    let Ok(count) = args::number(args, "count", 20) else {
        println!("rtc: FAIL bad arguments '{args}'");
        return 2;
    };
    let timeout = ms_to_ticks(args::tsc_hz(args), 1000);
    if let Err(status) = sys::create_sm(IRQ_SM, 0, 0) {
        println!("rtc: FAIL create_sm: {status}");
        return 1;
    }
    if let Err(status) = sys::irq_assign(IRQ_SM, GSI, EDGE_ACTIVE_HIGH) {
        println!("rtc: FAIL irq_assign: {status}");
        return 1;
    }
    let a = read_register(REG_A);
    write_register(REG_A, (a & 0xf0) | RATE_1024_HZ);
    let b = read_register(REG_B);
    write_register(REG_B, b | PERIODIC_ENABLE);
    read_register(REG_C);
    let mut result = 0;
    for n in 0..count {
        if let Err(status) = sys::sm_down(IRQ_SM, rdtsc().saturating_add(timeout), false) {
            println!("rtc: FAIL no interrupt after {n}: {status}");
            result = 1;
            break;
        }
        read_register(REG_C);
        if let Err(status) = sys::irq_unmask(GSI) {
            println!("rtc: FAIL irq_unmask: {status}");
            result = 1;
            break;
        }
    }
    write_register(REG_B, read_register(REG_B) & !PERIODIC_ENABLE);
    read_register(REG_C);
    if result == 0 {
        println!("rtc: {count} interrupts through the semaphore");
    }
    result
}
