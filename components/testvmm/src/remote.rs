//! `remote`: a vCPU running on this component's CPU is poked, then has its
//! VM destroyed, by a second EC of this component on another CPU.
//!
//! The guest spins (`jmp $`), so `vcpu_run` returns only because of the
//! other CPU: first with `POKED` (the poke's latency is printed, in TSC
//! ticks), then with `BadCapability` once the other EC revoked the VM while
//! the vCPU ran. Lines: `testvmm: remote: poked from cpu N after T ticks`,
//! `testvmm: remote: vm destroyed from cpu N while its vcpu ran`, or
//! `testvmm: remote: FAIL …`.

use core::sync::atomic::{AtomicU64, Ordering};

use common::{ms_to_ticks, rt};
use moat_abi::vcpu::exit_reason;
use moat_abi::vcpu::VcpuState;
use moat_abi::{Call, CallWord, Space, Status};
use moat_testvmm::setup;
use moat_user::{println, rdtsc, sys, Stack};

use crate::{ram, start, teardown};

const VM: u64 = 90;
const VCPU: u64 = 91;
const STATE_PAGE: u64 = 0x0000_7100_0000_0000;
const OTHER_EC: u64 = 92;
const OTHER_SC: u64 = 93;
const OTHER_SM: u64 = 94;
const OTHER_UTCB: u64 = 0x0000_7fff_d000_0000;
static OTHER_STACK: Stack<8192> = Stack::new();

/// What the other EC does next: 1 poke, 2 destroy the VM; 0 nothing.
static ORDER: AtomicU64 = AtomicU64::new(0);
/// When it poked (TSC).
static POKED_AT: AtomicU64 = AtomicU64::new(0);
static TSC_HZ: AtomicU64 = AtomicU64::new(0);

/// Runs the test with the other EC on `cpu`; whether it passed.
pub fn run(cpu: u64, tsc_hz: u64) -> bool {
    TSC_HZ.store(tsc_hz, Ordering::Relaxed);
    match steps(cpu) {
        Ok(()) => true,
        Err(why) => {
            println!("testvmm: remote: FAIL {why}");
            let _ = teardown(VM, VCPU);
            false
        }
    }
}

fn steps(cpu: u64) -> Result<(), &'static str> {
    // SAFETY: the only reference; no guest runs yet.
    let initial = setup::prepare_long_mode_code(&[0xeb, 0xfe], unsafe { ram() })
        .map_err(|_| "cannot set up the spinning guest")?;
    start(VM, VCPU, STATE_PAGE, initial).map_err(|_| "cannot create the VM")?;
    sys::create_ec(
        OTHER_EC,
        0,
        false,
        cpu,
        other_ec as *const () as u64,
        OTHER_STACK.top() - 8,
        OTHER_UTCB,
        1,
        1,
    )
    .map_err(|_| "cannot create the EC on the other CPU")?;
    sys::create_sc(OTHER_SC, 0, OTHER_EC, 10, 10_000)
        .map_err(|_| "cannot start the EC on the other CPU")?;

    ORDER.store(1, Ordering::Release);
    let status = vcpu_run();
    let returned = rdtsc();
    // SAFETY: create_vcpu mapped the state page; the vCPU is not running.
    let reason = unsafe { (*(STATE_PAGE as *const VcpuState)).exit.reason };
    if status != Status::Success || reason != exit_reason::POKED {
        return Err("the spinning vCPU returned without the poke");
    }
    let latency = returned.saturating_sub(POKED_AT.load(Ordering::Acquire));
    println!("testvmm: remote: poked from cpu {cpu} after {latency} ticks");

    ORDER.store(2, Ordering::Release);
    match vcpu_run() {
        Status::BadCapability => {
            println!("testvmm: remote: vm destroyed from cpu {cpu} while its vcpu ran");
            Ok(())
        }
        _ => Err("vcpu_run went on after its VM was destroyed"),
    }
}

fn vcpu_run() -> Status {
    let (rax, _) = sys::raw(CallWord::new(Call::VcpuRun, 0, VCPU).encode(), [0; 6]);
    Status::from_code(rax).unwrap_or(Status::BadCall)
}

/// On the other CPU: waits 50 ms for each order, then pokes the vCPU or
/// destroys its VM.
extern "C" fn other_ec() -> ! {
    let tsc_hz = TSC_HZ.load(Ordering::Relaxed);
    let Ok(sleeper) = rt::Sleeper::new(OTHER_SM) else {
        println!("testvmm: remote: FAIL no semaphore on the other CPU");
        sys::exit(1)
    };
    let mut done = 0;
    loop {
        let order = ORDER.load(Ordering::Acquire);
        if order == done {
            let _ = sleeper.for_ticks(ms_to_ticks(tsc_hz, 5));
            continue;
        }
        let _ = sleeper.for_ticks(ms_to_ticks(tsc_hz, 50));
        match order {
            1 => {
                POKED_AT.store(rdtsc(), Ordering::Release);
                let (rax, _) = sys::raw(CallWord::new(Call::VcpuPoke, 0, VCPU).encode(), [0; 6]);
                if rax != Status::Success.code() {
                    println!("testvmm: remote: FAIL vcpu_poke from the other CPU: {rax}");
                }
            }
            _ => {
                if sys::revoke(Space::Object, VM, 1, true).is_err() {
                    println!("testvmm: remote: FAIL revoking the VM from the other CPU");
                }
                // The vCPU capability goes with it below.
                let _ = sys::revoke(Space::Object, VCPU, 1, true);
            }
        }
        done = order;
    }
}
