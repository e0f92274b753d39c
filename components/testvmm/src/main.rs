//! `testvmm`: the minimal VMM that runs the test guests of `guests/testvm`.
//!
//! For each guest it creates a VM, gives it [`RAM_SIZE`] bytes of its own
//! memory at guest-physical 0 and the `echo` portal (its selector 20) at
//! the VM's selector 20, creates a vCPU and runs it, handling the exits
//! with `moat_testvmm::vmm`, then destroys the VM. Lines:
//! `testvmm: <guest>: <line>` per guest line or failure (`FAIL …`), then
//! `testvmm: all guests done`.
//!
//! Arguments: `guests=NAME,NAME,…` (default: all, in their order);
//! `remote-cpu=N`: instead, the cross-CPU poke and VM teardown test of
//! `remote.rs`, with the second EC on CPU N.
#![no_std]
#![no_main]

use core::fmt;

use common::args;
use moat_abi::vcpu::VcpuState;
use moat_abi::{rights, selectors, Space, Status, PAGE_SIZE};
use moat_testvm::layout::RAM_SIZE;
use moat_testvm::{TestGuest, ECHO_SELECTOR};
use moat_testvmm::setup;
use moat_testvmm::vmm::{Host, Next, Session};
use moat_user::{println, sys};

moat_user::entry!(main);

extern crate alloc;

mod bench;
mod fuzzstate;
mod remote;
mod xsave;

/// The `echo` portal, from the manifest's `uses echo at 20`.
const ECHO: u64 = 20;
/// Selectors of guest `n`'s VM and vCPU: `VM_BASE + 2n` and the next.
const VM_BASE: u64 = 32;
/// Where guest `n`'s vCPU state page is mapped: `STATE_BASE + n` pages.
const STATE_BASE: u64 = 0x0000_7000_0000_0000;
/// Kernel memory each VM gets: its vCPU, its guest-physical tables and
/// its capabilities are charged to it.
const VM_QUOTA: u64 = 96 * 1024;
const VM_CAPACITY: u64 = 64;
const RAM_PAGES: u64 = RAM_SIZE / PAGE_SIZE;

// Guest RAM, in a section of its own that is writable and executable: the
// root task gives this segment's pages those rights, and a guest can only
// execute memory whose capability has MEM_EXECUTE.
core::arch::global_asm!(
    ".pushsection .testvmm_ram, \"awx\", @nobits",
    ".balign 4096",
    ".globl testvmm_ram",
    "testvmm_ram:",
    ".zero {size}",
    ".popsection",
    size = const RAM_SIZE,
);

extern "C" {
    static mut testvmm_ram: [u8; RAM_SIZE as usize];
}

/// The guest RAM.
///
/// # Safety
/// No other reference to it may be live. Do not hold it across `vcpu_run`
/// (the guest writes it meanwhile).
unsafe fn ram() -> &'static mut [u8] {
    // SAFETY: the symbol is RAM_SIZE bytes of zero-initialised, page-aligned
    // memory of this task (the section above); the caller promises the
    // reference is the only one.
    unsafe {
        core::slice::from_raw_parts_mut((&raw mut testvmm_ram).cast::<u8>(), RAM_SIZE as usize)
    }
}

fn ram_address() -> u64 {
    (&raw const testvmm_ram) as u64
}

struct Console;

impl Host for Console {
    fn cpuid(&mut self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
        [r.eax, r.ebx, r.ecx, r.edx]
    }

    fn line(&mut self, guest: &str, text: fmt::Arguments<'_>) {
        println!("testvmm: {guest}: {text}");
    }
}

/// A kernel call that failed.
struct KernelCall {
    call: &'static str,
    status: Status,
}

impl fmt::Display for KernelCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.call, self.status)
    }
}

fn checked(call: &'static str, result: Result<(), Status>) -> Result<(), KernelCall> {
    result.map_err(|status| KernelCall { call, status })
}

fn main(args: &str) -> i32 {
    if args::flag(args, "bench") {
        return bench::run();
    }
    if let Some(cpu) = args::value(args, "remote-cpu").and_then(args::parse_number) {
        return i32::from(!remote::run(cpu, args::tsc_hz(args)));
    }
    let selected = match moat_testvmm::select(args::value(args, "guests")) {
        Ok(selected) => selected,
        Err(name) => {
            println!("testvmm: FAIL no guest is called '{name}'");
            return 2;
        }
    };
    let mut failed = 0;
    for (n, guest) in selected.enumerate() {
        if !run(n as u64, guest) {
            failed += 1;
        }
    }
    if args::value(args, "guests").is_none() {
        if !xsave::run() {
            failed += 1;
        }
        if !fuzzstate::run() {
            failed += 1;
        }
    }
    println!("testvmm: all guests done");
    i32::from(failed > 0)
}

/// Runs guest number `n`; whether it passed.
fn run(n: u64, guest: &TestGuest) -> bool {
    let vm = VM_BASE + 2 * n;
    let vcpu = vm + 1;
    let state_page = STATE_BASE + n * PAGE_SIZE;
    let mut host = Console;
    let mut session = Session::new(guest);
    // SAFETY: the only reference; no guest runs yet.
    let prepared = setup::prepare(guest, unsafe { ram() });
    let initial = match prepared {
        Ok(state) => state,
        Err(error) => {
            session.fail(error, &mut host);
            return false;
        }
    };
    let result = start(vm, vcpu, state_page, initial).and_then(|()| {
        loop {
            checked("vcpu_run", sys::vcpu_run(vcpu))?;
            // SAFETY: create_vcpu mapped the state page at `state_page`
            // (page aligned, a VcpuState fits); the kernel writes it only
            // during vcpu_run, and this is the only reference until the
            // next one.
            let state = unsafe { &mut *(state_page as *mut VcpuState) };
            // SAFETY: the only reference, dropped before the next vcpu_run.
            let ram = unsafe { ram() };
            if session.handle(state, ram, &mut host) == Next::Stop {
                return Ok(());
            }
        }
    });
    if let Err(error) = result {
        session.fail(error, &mut host);
    }
    if let Err(error) = teardown(vm, vcpu) {
        session.fail(error, &mut host);
    }
    session.passed()
}

/// Creates the VM with its memory and portal and the vCPU in `initial`.
fn start(vm: u64, vcpu: u64, state_page: u64, initial: VcpuState) -> Result<(), KernelCall> {
    start_with_ram(vm, vcpu, state_page, initial, ram_address())
}

/// `start` with the VM's memory at `ram` (RAM_SIZE bytes, page aligned).
fn start_with_ram(
    vm: u64,
    vcpu: u64,
    state_page: u64,
    initial: VcpuState,
    ram: u64,
) -> Result<(), KernelCall> {
    checked(
        "create_pd",
        sys::create_vm(vm, selectors::SELF_PD, VM_QUOTA, VM_CAPACITY, false),
    )?;
    checked(
        "delegate memory",
        sys::delegate(
            vm,
            Space::Memory,
            ram / PAGE_SIZE,
            0,
            RAM_PAGES,
            rights::MEM_READ | rights::MEM_WRITE | rights::MEM_EXECUTE,
        ),
    )?;
    checked(
        "delegate echo",
        sys::delegate(vm, Space::Object, ECHO, ECHO_SELECTOR, 1, rights::PT_CALL),
    )?;
    checked("create_vcpu", sys::create_vcpu(vcpu, vm, state_page))?;
    // SAFETY: create_vcpu just mapped the state page there, writable, and
    // the vCPU does not run yet.
    unsafe { core::ptr::write(state_page as *mut VcpuState, initial) };
    Ok(())
}

/// Destroys the vCPU and the VM (with everything delegated into it).
fn teardown(vm: u64, vcpu: u64) -> Result<(), KernelCall> {
    let vcpu_gone = checked("revoke vcpu", sys::revoke(Space::Object, vcpu, 1, true));
    let vm_gone = checked("revoke vm", sys::revoke(Space::Object, vm, 1, true));
    vcpu_gone.and(vm_gone)
}
