//! `rtc`: a user-mode driver for the CMOS real-time clock, in one of two
//! modes.
//!
//! By default it shows device interrupts reaching a driver as semaphore
//! ups: it needs the ports 0x70-0x71 and GSI 8 from the manifest, assigns
//! the GSI to a semaphore of its own, starts the RTC's periodic interrupt
//! at 1024 Hz, and for each interrupt: downs the semaphore, acknowledges
//! the device (reading register C) and unmasks the GSI. Prints
//! `rtc: N interrupts through the semaphore` and exits 0.
//!
//! With `serve` it is the machine's clock: it publishes the portal
//! `clock` (`common::cmos::service`), which answers each call with the
//! time read from the RTC's date registers then; each VMM asks it for its
//! guest's clock. It needs only the ports.
//!
//! Arguments: `count=N` (default 20), `tsc_hz=N`, `serve`, `index=N`.
#![no_std]
#![no_main]

use common::cmos::{self, service, Registers};
use common::{args, ms_to_ticks, rt};
use moat_user::io::{inb, outb};
use moat_user::{portal, println, rdtsc, sys, Stack};

moat_user::entry!(main);
moat_user::portal_entry!(clock_portal_entry, read_clock);

const PORTAL_ID: u64 = 0xc10c;
static HANDLER_STACK: Stack<8192> = Stack::new();
/// Reads of the registers before giving up on two alike.
const CLOCK_TRIES: u32 = 8;
/// Polls of register A for the end of an update (one takes at most
/// 2 ms; a port read takes about a microsecond).
const UPDATE_POLLS: u32 = 100_000;

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

/// The time now: registers read outside an update, twice alike (a read
/// that straddles a second would be off by up to a day otherwise).
fn read_time() -> Option<u64> {
    let mut last = None;
    for _ in 0..CLOCK_TRIES {
        let mut polls = 0;
        while read_register(cmos::index::A) & cmos::UPDATE_IN_PROGRESS != 0 {
            polls += 1;
            if polls > UPDATE_POLLS {
                return None;
            }
        }
        let now = Registers::read(read_register);
        if last == Some(now) {
            return now.unix_seconds();
        }
        last = Some(now);
    }
    None
}

fn read_clock(_id: u64, _words: [u64; 6]) -> [u64; 6] {
    match read_time() {
        Some(unix) => [service::OK, unix, rdtsc(), 0, 0, 0],
        None => [service::UNREADABLE, 0, 0, 0, 0, 0],
    }
}

fn serve(args: &str) -> i32 {
    let Some(now) = read_time() else {
        println!("rtc: FAIL the RTC's date registers do not read as a date");
        return 1;
    };
    let rip = portal::entry_address(clock_portal_entry);
    if let Err(status) = rt::serve(service::NAME, HANDLER_STACK.top(), rip, PORTAL_ID, args) {
        println!("rtc: FAIL cannot serve: {status}");
        return 1;
    }
    println!("rtc: serving `{}`, Unix time {now}", service::NAME);
    rt::block_forever(rt::server::IDLE_SM)
}

fn main(args: &str) -> i32 {
    if args::flag(args, "serve") {
        return serve(args);
    }
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
