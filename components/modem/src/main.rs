//! `modem`: a simulated baseband beside Linux. Its first EC runs the 1 ms
//! frame tick, a hard periodic loop: it sleeps until each frame's release
//! (absolute TSC deadlines from one start, so lateness never accumulates),
//! measures how late it woke (release jitter), counts the frames it missed
//! and resynchronises past them, and prints a summary every
//! `report_every` frames: the totals since it started and, after `last`,
//! the missed frames and worst jitter of the frames since the summary
//! before. A handler EC serves the portal `modem`: the
//! protocol of `common::modem` over one AT session per channel.
//!
//! The tick shares only its counters with the handler, through atomics;
//! the AT sessions belong to the handler alone.
//!
//! Arguments: `report_every=N` frames (default 1000, 0 = never),
//! `crash_after=N` frames (fault on purpose then, so the root task
//! restarts it; default 0 = never), the flag `fault_injection` (the AT
//! command `AT+MOATFAULT` crashes it on purpose, for the demo; without the
//! flag that command is an `ERROR`), `index=N` and `tsc_hz=N` (from the
//! root task).
#![no_std]
#![no_main]

use common::modem::{report_due, ticks_to_ns, Error, FrameClock, Modem, Reply, Telemetry};
use common::modem_at::Events;
use common::rt::{self, Sleeper};
use common::{args, ms_to_ticks};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
/// Set once at start from the `fault_injection` flag.
static FAULT_INJECTION: AtomicBool = AtomicBool::new(false);

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
    FAULT_INJECTION.store(args::flag(args, "fault_injection"), Ordering::Relaxed);
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
    // Since the last summary: the missed count then, the worst lateness.
    let mut window_missed_from = 0;
    let mut window_worst = 0;
    loop {
        if let Err(status) = sleeper.until(clock.release()) {
            println!("modem: FAIL sleeping: {status}");
            return 1;
        }
        let before = clock.frames();
        let wake = clock.woke(rdtsc());
        window_worst = window_worst.max(wake.late);
        let frames = clock.frames();
        let worst_ns = ticks_to_ns(clock.worst_late(), tsc_hz);
        FRAMES.store(frames, Ordering::Relaxed);
        MISSED.store(clock.missed(), Ordering::Relaxed);
        WORST_JITTER_NS.store(worst_ns, Ordering::Relaxed);
        if report_due(before, frames, report_every) {
            let last_ns = ticks_to_ns(window_worst, tsc_hz);
            println!(
                "modem: frames {frames}, missed {}, worst jitter {}.{:03} us; last {}: missed {}, worst {}.{:03} us",
                clock.missed(),
                worst_ns / NS_PER_US,
                worst_ns % NS_PER_US,
                report_every,
                clock.missed() - window_missed_from,
                last_ns / NS_PER_US,
                last_ns % NS_PER_US
            );
            window_missed_from = clock.missed();
            window_worst = 0;
        }
        if crash_after != 0 && frames >= crash_after {
            crash(frames);
        }
    }
}

fn crash(frames: u64) -> ! {
    println!("modem: crashing on purpose after {frames} frames");
    fault()
}

fn fault() -> ! {
    // SAFETY: not safe: the write faults on purpose (nothing is mapped at
    // the bottom of the address space), so the root task restarts us.
    unsafe { core::ptr::write_volatile(0x28 as *mut u64, 1) };
    sys::exit(3)
}

/// Logs each SMS the AT engine sends; crashes on `AT+MOATFAULT` when
/// fault injection is on.
struct SmsLog;

impl Events for SmsLog {
    fn sms_sent(&mut self, number: &[u8], text: &[u8], _reference: u8) {
        println!(
            "modem: SMS to {}: {}",
            number.escape_ascii(),
            text.escape_ascii()
        );
    }

    fn fault_requested(&mut self) -> bool {
        if !FAULT_INJECTION.load(Ordering::Relaxed) {
            return false;
        }
        println!("modem: crashing on purpose (AT+MOATFAULT)");
        fault()
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
