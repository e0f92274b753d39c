//! `remote`: a vCPU running on this component's CPU is poked, has a page
//! of its guest memory revoked, then has its VM destroyed, by a second EC
//! of this component on another CPU — while the guest runs there, without
//! the kernel lock.
//!
//! The guest increments a counter in its memory for ever, so `vcpu_run`
//! returns only because of the other CPU: first with `POKED` (the poke's
//! latency is printed, in TSC ticks); then with a `MEMORY` exit at the
//! counter's page once the other EC revoked it — and the counter, read
//! through this task's own mapping, must not move after the revoke
//! returned (the guest TLB of the CPU running it was shot down); then, the
//! page given back, with `BadCapability` once the other EC revoked the VM
//! while the vCPU ran. Lines: `testvmm: remote: poked from cpu N after T
//! ticks`, `testvmm: remote: page revoked from cpu N while its vcpu ran:
//! counter C, no write after the revoke`, `testvmm: remote: vm destroyed
//! from cpu N while its vcpu ran`, or `testvmm: remote: FAIL …`.

use core::sync::atomic::{AtomicU64, Ordering};

use common::{ms_to_ticks, rt};
use moat_abi::vcpu::exit_reason;
use moat_abi::vcpu::VcpuState;
use moat_abi::{rights, Space, Status, PAGE_SIZE};
use moat_testvmm::setup;
use moat_user::{println, rdtsc, sys, Stack};

use crate::{ram, ram_address, start, teardown};

const VM: u64 = 90;
const VCPU: u64 = 91;
const STATE_PAGE: u64 = 0x0000_7100_0000_0000;
const OTHER_EC: u64 = 92;
const OTHER_SC: u64 = 93;
const OTHER_SM: u64 = 94;
const OTHER_UTCB: u64 = 0x0000_7fff_d000_0000;
static OTHER_STACK: Stack<8192> = Stack::new();

/// The guest-physical address of the guest's counter (below the stack,
/// which this guest does not use).
const COUNTER: u64 = 0x3_0000;
/// `inc qword [COUNTER]; jmp` back to it.
const GUEST_CODE: [u8; 10] = [0x48, 0xff, 0x04, 0x25, 0x00, 0x00, 0x03, 0x00, 0xeb, 0xf6];

/// What the other EC does next: 1 poke, 2 revoke the counter's page,
/// 3 destroy the VM; 0 nothing.
static ORDER: AtomicU64 = AtomicU64::new(0);
/// The counter right after the revoke returned, and 20 ms later (+1, so
/// that 0 means "not yet").
static AFTER_REVOKE: [AtomicU64; 2] = [const { AtomicU64::new(0) }; 2];
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
    let initial = setup::prepare_long_mode_code(&GUEST_CODE, unsafe { ram() })
        .map_err(|_| "cannot set up the counting guest")?;
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
    let status = vcpu_run();
    // SAFETY: as above.
    let exit = unsafe { (*(STATE_PAGE as *const VcpuState)).exit };
    if status != Status::Success || exit.reason != exit_reason::MEMORY {
        return Err("the counting vCPU returned without a memory exit");
    }
    if exit.gpa & !(PAGE_SIZE - 1) != COUNTER {
        return Err("the memory exit was not at the revoked page");
    }
    // The second is stored last: once it is there, so is the first.
    let later = loop {
        let later = AFTER_REVOKE[1].load(Ordering::Acquire);
        if later != 0 {
            break later;
        }
        core::hint::spin_loop();
    };
    let after = AFTER_REVOKE[0].load(Ordering::Acquire);
    if after != later {
        println!(
            "testvmm: remote: counter {} right after the revoke returned, {} 20 ms later",
            after - 1,
            later - 1
        );
        return Err("the guest wrote its page after the revoke returned");
    }
    if after <= 1 {
        return Err("the guest never counted");
    }
    println!(
        "testvmm: remote: page revoked from cpu {cpu} while its vcpu ran: counter {}, no write after the revoke",
        after - 1
    );
    // The page back, and the guest counts on.
    sys::delegate(
        VM,
        Space::Memory,
        (ram_address() + COUNTER) / PAGE_SIZE,
        COUNTER / PAGE_SIZE,
        1,
        rights::MEM_READ | rights::MEM_WRITE | rights::MEM_EXECUTE,
    )
    .map_err(|_| "cannot give the page back")?;

    ORDER.store(3, Ordering::Release);
    match vcpu_run() {
        Status::BadCapability => {
            println!("testvmm: remote: vm destroyed from cpu {cpu} while its vcpu ran");
            Ok(())
        }
        _ => Err("vcpu_run went on after its VM was destroyed"),
    }
}

/// The guest's counter, read through this task's mapping of its memory.
fn counter() -> u64 {
    let at = (ram_address() + COUNTER) as *const u64;
    // SAFETY: the counter lies in this task's guest-RAM array (aligned,
    // mapped for the task's life); the guest may write it meanwhile, so it
    // is read volatile and only compared.
    unsafe { at.read_volatile() }
}

fn vcpu_run() -> Status {
    sys::vcpu_run(VCPU).err().unwrap_or(Status::Success)
}

/// On the other CPU: waits 50 ms for each order, then pokes the vCPU,
/// revokes the counter's page or destroys its VM.
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
                if let Err(status) = sys::vcpu_poke(VCPU) {
                    println!("testvmm: remote: FAIL vcpu_poke from the other CPU: {status}");
                }
            }
            2 => {
                let page = (ram_address() + COUNTER) / PAGE_SIZE;
                if sys::revoke(Space::Memory, page, 1, false).is_err() {
                    println!("testvmm: remote: FAIL revoking the guest page from the other CPU");
                }
                let after = counter();
                let _ = sleeper.for_ticks(ms_to_ticks(tsc_hz, 20));
                AFTER_REVOKE[0].store(after + 1, Ordering::Release);
                AFTER_REVOKE[1].store(counter() + 1, Ordering::Release);
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
