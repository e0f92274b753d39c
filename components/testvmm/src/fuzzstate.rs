//! A hostile VMM: random bytes over the whole vCPU state page (every
//! group dirty or not, garbage segments, control registers, MSRs, debug
//! registers, events), then `vcpu_run`, many times with a fixed seed. The
//! kernel must return from every run (an exit record or a status) and stay
//! up. Guest RAM is all HLT, so whatever the guest manages to execute ends
//! at once; the activity state is forced to "active", because a vCPU the
//! VMM parks in HLT rightly waits until something wakes it.
//!
//! Prints `testvmm: fuzzstate: N runs, every one returned`.

use super::{checked, start_with_ram, teardown, KernelCall, STATE_BASE, VM_BASE};
use common::rng::Xorshift;
use moat_abi::vcpu::VcpuState;
use moat_abi::PAGE_SIZE;
use moat_testvmm::setup;
use moat_user::{println, sys};

const RUNS: u32 = 500;
const SEED: u64 = 0x5eed_f00d;

fn fuzz() -> Result<u32, KernelCall> {
    let vm = VM_BASE + 50;
    let vcpu = vm + 1;
    let page = STATE_BASE + 50 * PAGE_SIZE;
    // SAFETY: no VM runs yet.
    let ram = unsafe { super::xsave::ram2() };
    let initial = setup::prepare_long_mode_code(&[0xf4], ram).map_err(|_| KernelCall {
        call: "setup",
        status: moat_abi::Status::BadParameter,
    })?;
    ram.fill(0xf4);
    start_with_ram(vm, vcpu, page, initial, ram.as_ptr() as u64)?;
    let mut rng = Xorshift::new(SEED);
    let mut runs = 0;
    let result = (|| {
        for _ in 0..RUNS {
            // SAFETY: the state page is mapped at `page` and the vCPU does
            // not run now; any bit pattern is a valid VcpuState (integers).
            let bytes = unsafe {
                core::slice::from_raw_parts_mut(page as *mut u8, core::mem::size_of::<VcpuState>())
            };
            for chunk in bytes.chunks_mut(8) {
                let word = rng.next_u64().to_le_bytes();
                chunk.copy_from_slice(&word[..chunk.len()]);
            }
            // SAFETY: as above.
            let state = unsafe { &mut *(page as *mut VcpuState) };
            state.activity = 0;
            checked("vcpu_run", sys::vcpu_run(vcpu))?;
            runs += 1;
        }
        Ok(runs)
    })();
    let down = teardown(vm, vcpu);
    let runs = result?;
    down?;
    Ok(runs)
}

pub fn run() -> bool {
    match fuzz() {
        Ok(runs) => {
            println!("testvmm: fuzzstate: {runs} runs, every one returned");
            true
        }
        Err(error) => {
            println!("testvmm: fuzzstate: FAIL {error}");
            false
        }
    }
}
