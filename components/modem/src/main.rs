//! `modem`: a simulated baseband beside Linux. Its first EC runs the 1 ms
//! frame tick, a hard periodic loop: it sleeps until each frame's release
//! (absolute TSC deadlines from one start, so lateness never accumulates),
//! measures how late it woke (release jitter), counts the frames it missed
//! and resynchronises past them, and prints a summary every
//! `report_every` frames. A handler EC serves the portal `modem`: the
//! protocol of `common::modem` over one AT session per channel.
//!
//! The tick shares only its counters with the handler, through atomics;
//! the AT sessions belong to the handler alone.
//!
//! Arguments: `report_every=N` frames (default 1000, 0 = never),
//! `crash_after=N` frames (fault on purpose then, so the root task
//! restarts it; default 0 = never), `index=N` and `tsc_hz=N` (from the
//! root task).
#![no_std]
#![no_main]

use common::modem::{report_due, ticks_to_ns, Error, FrameClock, Modem, Reply, Telemetry};
use common::modem_at::Events;
use common::rt::{self, Sleeper};
use common::{args, ms_to_ticks};
use core::sync::atomic::{AtomicU64, Ordering};
use moat_user::{portal, println, rdtsc, sys, Stack};

moat_user::entry!(main);
moat_user::portal_entry!(modem_portal_entry, handle);

const PORTAL_ID: u64 = 0x3d0d;
const SLEEP_SM: u64 = rt::server::IDLE_SM + 1;
const FRAME_MS: u64 = 1;
const DEFAULT_REPORT_EVERY: u64 = 1000;
const NS_PER_US: u64 = 1000;

static FRAMES: AtomicU64 = AtomicU64::new(0);
static MISSED: AtomicU64 = AtomicU64::new(0);
static WORST_JITTER_NS: AtomicU64 = AtomicU64::new(0);
static INSTANCE: AtomicU64 = AtomicU64::new(0);

/// Only the handler EC locks it (one activation at a time), so it is
/// never contended.
static MODEM: spin::Mutex<Modem> = spin::Mutex::new(Modem::new());

static HANDLER_STACK: Stack<16384> = Stack::new();

fn main(args: &str) -> i32 {
    let (Ok(report_every), Ok(crash_after)) = (
        args::number(args, "report_every", DEFAULT_REPORT_EVERY),
        args::number(args, "crash_after", 0),
    ) else {
        println!("modem: FAIL bad arguments '{args}'");
        return 2;
    };
    let tsc_hz = args::tsc_hz(args);
    INSTANCE.store(rdtsc(), Ordering::Relaxed);
    let sleeper = match Sleeper::new(SLEEP_SM) {
        Ok(sleeper) => sleeper,
        Err(status) => {
            println!("modem: FAIL no semaphore to sleep on: {status}");
            return 1;
        }
    };
    let rip = portal::entry_address(modem_portal_entry);
    if let Err(status) = rt::serve("modem", HANDLER_STACK.top(), rip, PORTAL_ID, args) {
        println!("modem: FAIL cannot serve: {status}");
        return 1;
    }
    println!("modem: serving, frame {FRAME_MS} ms, summary every {report_every} frames");
    let period = ms_to_ticks(tsc_hz, FRAME_MS);
    let mut clock = FrameClock::new(rdtsc(), period);
    loop {
        if let Err(status) = sleeper.until(clock.release()) {
            println!("modem: FAIL sleeping: {status}");
            return 1;
        }
        let before = clock.frames();
        clock.woke(rdtsc());
        let frames = clock.frames();
        let worst_ns = ticks_to_ns(clock.worst_late(), tsc_hz);
        FRAMES.store(frames, Ordering::Relaxed);
        MISSED.store(clock.missed(), Ordering::Relaxed);
        WORST_JITTER_NS.store(worst_ns, Ordering::Relaxed);
        if report_due(before, frames, report_every) {
            println!(
                "modem: frames {frames}, missed {}, worst jitter {}.{:03} us",
                clock.missed(),
                worst_ns / NS_PER_US,
                worst_ns % NS_PER_US
            );
        }
        if crash_after != 0 && frames >= crash_after {
            crash(frames);
        }
    }
}

fn crash(frames: u64) -> ! {
    println!("modem: crashing on purpose after {frames} frames");
    // SAFETY: not safe: the write faults on purpose (nothing is mapped at
    // the bottom of the address space), so the root task restarts us.
    unsafe { core::ptr::write_volatile(0x28 as *mut u64, 1) };
    sys::exit(3)
}

/// Logs each SMS the AT engine sends.
struct SmsLog;

impl Events for SmsLog {
    fn sms_sent(&mut self, number: &[u8], text: &[u8], _reference: u8) {
        println!(
            "modem: SMS to {}: {}",
            number.escape_ascii(),
            text.escape_ascii()
        );
    }
}

fn handle(_id: u64, words: [u64; 6]) -> [u64; 6] {
    // SAFETY: server::HANDLER_UTCB was given to the successful create_ec of
    // the handler EC, which is running this; nothing else refers to it.
    let utcb = unsafe { moat_user::utcb_at(rt::server::HANDLER_UTCB) };
    // The protocol is the six words: nothing a caller put in the UTCB
    // goes back.
    utcb.typed = 0;
    utcb.untyped = 0;
    let telemetry = Telemetry {
        frames: FRAMES.load(Ordering::Relaxed),
        missed: MISSED.load(Ordering::Relaxed),
        worst_jitter_ns: WORST_JITTER_NS.load(Ordering::Relaxed),
        instance: INSTANCE.load(Ordering::Relaxed),
    };
    match MODEM.try_lock() {
        Some(mut modem) => modem.handle(words, telemetry, &mut SmsLog),
        None => Reply::Refused(Error::Busy).encode(),
    }
}
