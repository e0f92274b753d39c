//! `ping`'s SMP benchmarks (`cargo xtask bench smp`, docs/benchmarks.md).
//!
//! - `throughput calls=N`: N null calls to `echo` as fast as they go, after
//!   a warm-up; one line `bench smp pair cpu=C calls=N start=S end=E` with
//!   the TSC before and after, so that the harness can add up the pairs
//!   that ran at once on several CPUs (the TSC is the same on every CPU).
//! - `wakeup-cpu=K samples=N`: a second EC of this PD on CPU K waits on a
//!   semaphore; this EC stamps the TSC and ups it, the other reads the TSC
//!   when it wakes; one line `bench smp wakeup from=C to=K median=M min=M
//!   samples=N` in TSC ticks.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use common::stats;
use moat_user::abi::{Space, Status};
use moat_user::{println, rdtsc, sys, Stack};

use crate::{ECHO, WARMUP};

const WAKE_SM: u64 = 50;
const WAKER_EC: u64 = 51;
const WAKER_SC: u64 = 52;
const WAKER_UTCB: u64 = 0x0000_7fff_b000_0000;
static WAKER_STACK: Stack<8192> = Stack::new();

/// The TSC when this EC upped the semaphore.
static STAMP: AtomicU64 = AtomicU64::new(0);
/// The wake-up latency the other EC measured last, +1 (0: none yet).
static MEASURED: AtomicU64 = AtomicU64::new(0);

/// This EC's CPU as the manifest's `args` repeat it (`cpu=`), for the
/// output.
fn cpu(args: &str) -> u64 {
    common::args::number(args, "cpu", 0).unwrap_or(0)
}

pub fn throughput(args: &str, calls: u64) -> Result<(), &'static str> {
    for _ in 0..WARMUP {
        sys::call(ECHO, [0; 6]).map_err(|_| "a warm-up call failed")?;
    }
    let start = rdtsc();
    for _ in 0..calls {
        sys::call(ECHO, [0; 6]).map_err(|_| "a call failed")?;
    }
    let end = rdtsc();
    println!(
        "bench smp pair cpu={} calls={calls} start={start} end={end}",
        cpu(args)
    );
    Ok(())
}

pub fn wakeup(args: &str, to: u64, samples: u64) -> Result<(), &'static str> {
    sys::create_sm(WAKE_SM, 0, 0).map_err(|_| "cannot create the semaphore")?;
    sys::create_ec(
        WAKER_EC,
        0,
        false,
        to,
        waiter as *const () as u64,
        WAKER_STACK.top() - 8,
        WAKER_UTCB,
        1,
        1,
    )
    .map_err(|_| "cannot create the EC on the other CPU")?;
    sys::create_sc(WAKER_SC, 0, WAKER_EC, 10, 10_000)
        .map_err(|_| "cannot start the EC on the other CPU")?;
    let mut latencies: Vec<u32> = Vec::with_capacity(samples as usize);
    for i in 0..WARMUP + samples {
        // Let the other EC block first: a wake-up, not a semaphore that
        // was already up, is measured.
        let waited = rdtsc();
        while rdtsc().wrapping_sub(waited) < 200_000 {
            core::hint::spin_loop();
        }
        MEASURED.store(0, Ordering::Release);
        STAMP.store(rdtsc(), Ordering::Release);
        sys::sm_up(WAKE_SM).map_err(|_| "sm_up failed")?;
        let measured = loop {
            let measured = MEASURED.load(Ordering::Acquire);
            if measured != 0 {
                break measured - 1;
            }
            core::hint::spin_loop();
        };
        if i >= WARMUP {
            latencies.push(u32::try_from(measured).unwrap_or(u32::MAX));
        }
    }
    let _ = sys::revoke(Space::Object, WAKER_EC, 1, true);
    let (median, min) = stats::median_min(&mut latencies).ok_or("no samples")?;
    println!(
        "bench smp wakeup from={} to={to} median={median} min={min} samples={samples}",
        cpu(args)
    );
    Ok(())
}

/// On the other CPU: waits, and says how long the wake-up took.
extern "C" fn waiter() -> ! {
    loop {
        match sys::sm_down(WAKE_SM, 0, false) {
            Ok(()) => {
                let now = rdtsc();
                let took = now.wrapping_sub(STAMP.load(Ordering::Acquire));
                MEASURED.store(took.saturating_add(1), Ordering::Release);
            }
            Err(Status::Aborted) => sys::exit(0),
            Err(_) => {}
        }
    }
}
