//! `vmm`: the per-guest VMM server. It takes its guest's RAM, kernel,
//! initrd, disk image and command line from the manifest's `ram` and
//! `file` mappings, loads the guest through `firmware`, creates the VM and
//! its vCPUs, and runs them, each in an EC of its own on its CPU;
//! `vmm::machine` handles the exits. Another EC wakes or pokes the vCPUs
//! when a device timer is due.
//!
//! Threads and locking (docs/architecture.md, "The VMM's vCPU threads"):
//! vCPU 0 runs in the first EC, vCPU i > 0 in an EC created on the CPU
//! `vcpu-cpus` names (each EC creates its own vCPU, which the kernel binds
//! to the creator's CPU). The machine — every device model, the LAPICs,
//! the console and modem link — sits behind one lock ([`VMM`], a
//! semaphore-backed mutex: a waiter sleeps in the kernel, so ECs of
//! different priorities on one CPU cannot spin against each other); an
//! EC holds it to handle one exit or prepare one entry, never across
//! `vcpu_run` or a wait. What one vCPU does to another (an IPI, an
//! interrupt routed to it, INIT/STARTUP, a reset or stop) is set in the
//! target's state under the lock; after dropping it the sender ups the
//! target's wake semaphore (it may be halted) and pokes its vCPU (it may
//! be in the guest).
//!
//! Arguments: `guest=ADDR,SIZE` (RAM), `heap=ADDR,SIZE`, `kernel=ADDR,SIZE`
//! (a bzImage, or a Multiboot v1 kernel: told apart as QEMU's `-kernel`
//! does), `initrd=ADDR,SIZE` (for a bzImage), `cmdline=ADDR,SIZE` (text),
//! optional `disk=ADDR,SIZE` (a disk image, copied into RAM) or
//! `blk=MAPPING` (the disk is the block service's, through that shared
//! region and the semaphores at 30 and 31: `disk.rs`), `net=MAPPING`
//! with `mac=MAC` (the network is a port of the virtual switch, through
//! that shared region and the semaphores at 32 and 33, and a fourth EC
//! waits for its frames: `net.rs`; without it the echo peer answers), `mod1=ADDR,SIZE`,
//! `mod2=…`, … (a Multiboot kernel's modules, numbered from 1 without a gap) with
//! `modcmdlines=ADDR,SIZE` (text: line N is module N's command line),
//! the flag `debug-exit` (QEMU's isa-debug-exit device at ports
//! 0xf4-0xf7: a guest write of V ends the guest, and the VMM exits with
//! `moat_abi::EXIT_WITH_VALUE + V`, which the root task and the kernel
//! pass on, so that QEMU exits with `(V << 1) | 1`),
//! `clock=SEL` (the machine's clock, the `rtc` driver's `clock` portal:
//! the guest's RTC and kvm-clock wall clock start at the time it gives)
//! or else `epoch=UNIX_SECONDS` (a fixed start), the flag `console-input` (the
//! VMM holds COM1's ports and IRQ 4 and feeds what is typed there to the
//! guest's serial port; a third EC waits for it), `modem=SEL` (the
//! guest's second virtio-console port is named `modem` and relayed to the
//! native modem's portal at SEL; the port's host end is closed while the
//! modem is gone and reopened when it is back, so the guest sees a
//! restart as a port reset), `on-panic=restart` (a guest kernel panic
//! reported through pvpanic reboots the guest, as a reset does; else the
//! VMM stops), `on-triple-fault=stop` (a triple fault ends the guest;
//! by default it resets it, as a PC does), `vm-portals=SEL,SEL,…` (portals the VM
//! gets at the same selectors, for the IPC hypercall), the flag
//! `user-hypercalls` (guest CPL 3 may make it too), `vcpus=N` (1 to
//! 32, default 1), `vcpu-cpus=C1,C2,…` (the CPUs of vCPUs 1, 2, …; vCPU 0
//! runs on the VMM's own CPU; default the VMM's CPU), `vcpu-priority=P`
//! (the priority of vCPUs 1, 2, …; default 10; vCPU 0 has the
//! component's), and the root's `tsc_hz=`.
//! Lines: `vmm: …`; the guest's console goes to the console byte for byte
//! when the VMM holds COM1 (`console-input`), else sanitised by the kernel.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{
    fence, AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};

use common::modem_link::{self, ModemLink};
use common::{args, sel};
use moat_abi::vcpu::{group, VcpuState};
use moat_abi::{flags, rights, Call, CallWord, Space, Status, PAGE_SIZE};
use moat_user::io::{inb, outb};
use moat_user::{println, sys, Sel};
use vdev::virtio::block::BlockBackend;
use vdev::virtio::net::NetBackend;
use vdev::{BadGuestAddress, GuestMemory};
use vmm::machine::{Action, Config, Entry, Hvc0, Machine, NamedPort, Stop, TimeSource};
use vmm::state;

mod disk;
mod net;

moat_user::entry!(main);

/// Above the selectors the manifest gives (`uses … at 20`, …).
const VM: Sel = 64;
const TIMER_EC: Sel = VM + 2;
const TIMER_SC: Sel = VM + 3;
const TIMER_SM: Sel = VM + 4;
const INPUT_EC: Sel = VM + 6;
const INPUT_SC: Sel = VM + 7;
const INPUT_SM: Sel = VM + 8;
const INPUT_UTCB: u64 = 0x0000_6000_0002_0000;
const DUMP_EC: Sel = VM + 9;
const DUMP_SC: Sel = VM + 10;
const DUMP_SM: Sel = VM + 11;
const DUMP_UTCB: u64 = 0x0000_6000_0003_0000;
/// The semaphore behind [`VMM`]'s lock.
const LOCK_SM: Sel = VM + 12;
/// Upped by a vCPU EC when it has made its vCPU, and when it stopped.
const DONE_SM: Sel = VM + 13;
/// Per vCPU from here, four selectors: its vCPU, EC, SC and wake
/// semaphore (vCPU 0 runs in the first EC: no EC or SC of its own).
const VCPU_SELS: Sel = 80;
/// So that every vCPU's selectors fit in the default capacity (256).
const MAX_VCPUS: usize = 32;
/// vCPU 0's state page is at [`STATE_PAGE`]; vCPU i's (i > 0) here + i *
/// 8 KiB, its EC's UTCB in the page after it.
const VCPU_PAGES: u64 = 0x0000_6000_1000_0000;
const VCPU_STACK: usize = 64 << 10;
const VCPU_BUDGET_US: u64 = 10_000;
const DEFAULT_VCPU_PRIORITY: u64 = 10;
/// How long the first EC waits for the others to stop at the end.
const STOP_WAIT_MS: u64 = 1000;

fn vcpu_sel(vcpu: usize) -> Sel {
    VCPU_SELS + 4 * vcpu as Sel
}

fn wake_sel(vcpu: usize) -> Sel {
    vcpu_sel(vcpu) + 3
}

fn state_page(vcpu: usize) -> u64 {
    match vcpu {
        0 => STATE_PAGE,
        i => VCPU_PAGES + i as u64 * 2 * PAGE_SIZE,
    }
}
const NET_EC: Sel = VM + 14;
const NET_SC: Sel = VM + 15;
const NET_UTCB: u64 = 0x0000_6000_0004_0000;
/// How long the dump EC waits for the vCPU loop to print the dump before
/// it says that the loop does not answer.
const DUMP_ANSWER_MS: u64 = 200;
/// Between the vCPU's EC and the timer EC (see `TIMER_PRIORITY`).
const INPUT_PRIORITY: u8 = 25;
/// The host's COM1, where the console is typed.
const COM1: u16 = 0x3f8;
const COM1_GSI: u64 = 4;
const UART_IER: u16 = 1;
const UART_MCR: u16 = 4;
const UART_LSR: u16 = 5;
const IER_RX_DATA: u8 = 1 << 0;
/// OUT2 gates a PC UART's interrupt line.
const MCR_OUT2: u8 = 1 << 3;
const LSR_DATA_READY: u8 = 1 << 0;
const EDGE_ACTIVE_HIGH: u64 = 0;
const STATE_PAGE: u64 = 0x0000_6000_0000_0000;
const TIMER_UTCB: u64 = 0x0000_6000_0001_0000;
/// Above the vCPU's EC (the component's priority, 10 in the manifests),
/// so a due timer preempts the guest at once; below the native real-time
/// components beside the guest (the modem runs at 40), so nothing the
/// guest makes its VMM do can delay them. The manifest gives the VMM this
/// as its `ceiling`; the kernel refuses anything above.
const TIMER_PRIORITY: u8 = 30;
const TIMER_BUDGET_US: u64 = 1000;
/// Kernel memory of the VM beyond its page tables and capabilities.
const VM_QUOTA_BASE: u64 = 512 * 1024;
const CAP_SLOT_COST: u64 = 96;
/// A vCPU's control structures, state page and XSAVE image, with room.
const VM_QUOTA_PER_VCPU: u64 = 64 * 1024;
/// #UDs for unemulated things the log shows, per run.
const MAX_REFUSALS_LOGGED: u32 = 32;
/// Pages per delegation of guest RAM (2 MiB).
const DELEGATE_STEP: u64 = 512;
/// The longest answer the modem gives to one write of the guest.
const MODEM_ANSWER_MAX: usize = 1024;
/// How often the VMM asks whether the modem is still there.
const MODEM_CHECK_MS: u64 = 50;
/// Resets after which a guest that keeps resetting is given up.
const MAX_RESETS: u32 = 8;

/// A region the root task mapped for us: `NAME=ADDR,SIZE`.
#[derive(Clone, Copy)]
struct Region {
    address: u64,
    size: u64,
}

fn region(args: &str, name: &str) -> Option<Region> {
    let (address, size) = args::value(args, name)?.split_once(',')?;
    Some(Region {
        address: args::parse_number(address)?,
        size: args::parse_number(size)?,
    })
}

impl Region {
    /// The region's bytes, read-only.
    ///
    /// # Safety
    /// The root task mapped `size` bytes at `address` for this task's life
    /// (a manifest mapping named in the arguments), and nothing writes
    /// them while the slice lives.
    unsafe fn bytes(&self) -> &'static [u8] {
        // SAFETY: by the caller's promise.
        unsafe { core::slice::from_raw_parts(self.address as *const u8, self.size as usize) }
    }
}

/// The guest's RAM, mapped in this task and delegated to the VM.
struct GuestRam {
    base: *mut u8,
    len: u64,
}

impl GuestRam {
    fn check(&self, gpa: u64, len: usize) -> Result<usize, BadGuestAddress> {
        let end = gpa.checked_add(len as u64).ok_or(BadGuestAddress(gpa))?;
        if end > self.len {
            return Err(BadGuestAddress(gpa));
        }
        Ok(gpa as usize)
    }
}

impl GuestMemory for GuestRam {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), BadGuestAddress> {
        let offset = self.check(gpa, buf.len())?;
        // SAFETY: [offset, offset + len) lies in the RAM region (checked),
        // which stays mapped. Other vCPUs may write it meanwhile, as a
        // device's DMA races a CPU on hardware: only raw pointers are
        // used, no reference to guest memory is made, and a torn value
        // is the guest's own race.
        unsafe {
            core::ptr::copy_nonoverlapping(self.base.add(offset), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), BadGuestAddress> {
        let offset = self.check(gpa, data.len())?;
        // SAFETY: as in `read`; `data` cannot overlap guest RAM (it is
        // the VMM's own memory).
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), self.base.add(offset), data.len()) };
        Ok(())
    }

    fn compare_exchange_u32(
        &self,
        gpa: u64,
        current: u32,
        new: u32,
    ) -> Result<bool, BadGuestAddress> {
        let offset = self.check(gpa, 4)?;
        if !offset.is_multiple_of(4) {
            return Err(BadGuestAddress(gpa));
        }
        // SAFETY: the dword lies in the mapped RAM region (checked) and is
        // 4-byte aligned (checked; the region is page aligned); the guest's
        // vCPUs access it with their own atomic or plain accesses, which
        // the atomic compare-exchange is made to meet (the CPU's LOCK
        // CMPXCHG).
        let word = unsafe { AtomicU32::from_ptr(self.base.add(offset).cast::<u32>()) };
        Ok(word
            .compare_exchange(current, new, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok())
    }
}

/// A mutex whose waiters sleep on a kernel semaphore ([`LOCK_SM`]): a
/// counter of holders and waiters, the semaphore upped once per waiter
/// (a "benaphore"). Not a spinlock: two ECs of different priorities on
/// one CPU would spin for ever against each other.
struct VmmLock<T> {
    /// The holder and the waiters.
    count: AtomicU64,
    value: UnsafeCell<T>,
}

// SAFETY: the value is reached only through a `VmmGuard`, of which there
// is one at a time (the count); the `Rc`s inside the machine are made,
// cloned and dropped only by the holder, and none leaves the lock (this
// binary calls none of the `Machine` methods that hand one out:
// `irq_line`, `lapic_target`, `clock`).
unsafe impl<T> Sync for VmmLock<T> {}

impl<T> VmmLock<T> {
    const fn new(value: T) -> Self {
        Self {
            count: AtomicU64::new(0),
            value: UnsafeCell::new(value),
        }
    }

    fn lock(&self) -> VmmGuard<'_, T> {
        if self.count.fetch_add(1, Ordering::Acquire) > 0 {
            while sys::sm_down(LOCK_SM, 0, false).is_err() {
                core::hint::spin_loop();
            }
            fence(Ordering::Acquire);
        }
        VmmGuard(self)
    }
}

struct VmmGuard<'a, T>(&'a VmmLock<T>);

impl<T> Deref for VmmGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: this guard is the one holder (see `VmmLock`).
        unsafe { &*self.0.value.get() }
    }
}

impl<T> DerefMut for VmmGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes the borrow unique.
        unsafe { &mut *self.0.value.get() }
    }
}

impl<T> Drop for VmmGuard<'_, T> {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::Release) > 1 {
            let _ = sys::sm_up(LOCK_SM);
        }
    }
}

/// The guest TSC: the host's, less its value when the guest started.
struct HostTime {
    start: u64,
}

impl TimeSource for HostTime {
    fn guest_tsc(&self) -> u64 {
        moat_user::rdtsc().wrapping_sub(self.start)
    }
}

fn host_cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// The shortest time between two firings of the timer EC (KVM clamps a
/// guest's timer periods likewise).
const MIN_TIMER_GAP_US: u64 = 50;
/// How long the gap grows, doubling, while firings make no interrupt
/// pending for any vCPU.
const MAX_TIMER_GAP_US: u64 = 1000;

/// The host TSC deadline the timer EC pokes the vCPU at (0: none).
static DEADLINE: AtomicU64 = AtomicU64::new(0);
/// The host TSC before which the timer EC does not fire again, whoever
/// arms it.
static NOT_BEFORE: AtomicU64 = AtomicU64::new(0);
static TIMER_STACK: moat_user::Stack<8192> = moat_user::Stack::new();

/// Fires the machine's timers when they are due and wakes or pokes the
/// vCPUs that have a new interrupt. A guest that programs its timers for
/// "now" over and over (a PIT reload of 1), or leaves what they raise
/// pending with interrupts off, must not keep this EC, above the vCPUs'
/// priority, from letting them run: after each firing it waits at least
/// `MIN_TIMER_GAP_US`, and twice as long each time a firing reached no
/// vCPU, up to `MAX_TIMER_GAP_US`. On Bochs a firing costs more than
/// 50 µs of its instruction-counted time, so without the growing gap such
/// a guest stopped every guest on the CPU.
extern "C" fn timer_ec() -> ! {
    let mut gap_us = MIN_TIMER_GAP_US;
    loop {
        let deadline = DEADLINE.load(Ordering::Acquire);
        match sys::sm_down(TIMER_SM, deadline, false) {
            // Re-armed: look at the new deadline.
            Ok(()) => {}
            Err(Status::Timeout) => {
                if DEADLINE
                    .compare_exchange(deadline, 0, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    // Fire what is due; wake or poke whom it reaches.
                    let kicks = {
                        let mut vmm = VMM.lock();
                        match vmm.as_mut() {
                            Some(v) => {
                                v.machine.poll();
                                let kicks = v.machine.take_kicks();
                                gap_us = if kicks == 0 {
                                    (gap_us * 2).min(MAX_TIMER_GAP_US)
                                } else {
                                    MIN_TIMER_GAP_US
                                };
                                let tsc_hz = v.guest.tsc_hz;
                                NOT_BEFORE.store(
                                    moat_user::rdtsc().saturating_add(tsc_hz / 1_000_000 * gap_us),
                                    Ordering::Release,
                                );
                                arm(host_deadline(&v.machine, v.guest.start, tsc_hz));
                                kicks
                            }
                            None => 0,
                        }
                    };
                    kick(kicks, None);
                }
            }
            Err(_) => sys::exit(3),
        }
    }
}

/// Bytes typed at the host console, from the input EC to the vCPU loop:
/// one producer, one consumer, full means newer bytes are dropped.
struct InputRing {
    bytes: [AtomicU8; INPUT_RING],
    /// Written by the producer only.
    head: AtomicUsize,
    /// Written by the consumer only.
    tail: AtomicUsize,
}

const INPUT_RING: usize = 256;

impl InputRing {
    const fn new() -> Self {
        Self {
            bytes: [const { AtomicU8::new(0) }; INPUT_RING],
            head: AtomicUsize::new(0),
            tail: AtomicUsize::new(0),
        }
    }

    fn push(&self, byte: u8) {
        let head = self.head.load(Ordering::Relaxed);
        if head.wrapping_sub(self.tail.load(Ordering::Acquire)) < INPUT_RING {
            self.bytes[head % INPUT_RING].store(byte, Ordering::Relaxed);
            self.head.store(head.wrapping_add(1), Ordering::Release);
        }
    }

    fn drain(&self, out: &mut Vec<u8>) {
        let head = self.head.load(Ordering::Acquire);
        let mut tail = self.tail.load(Ordering::Relaxed);
        while tail != head {
            out.push(self.bytes[tail % INPUT_RING].load(Ordering::Relaxed));
            tail = tail.wrapping_add(1);
        }
        self.tail.store(tail, Ordering::Release);
    }
}

static INPUT: InputRing = InputRing::new();
static INPUT_STACK: moat_user::Stack<8192> = moat_user::Stack::new();

/// Waits for COM1's receive interrupt, moves the typed bytes to [`INPUT`]
/// and wakes the vCPU loop (halted or running).
extern "C" fn input_ec() -> ! {
    loop {
        if sys::sm_down(INPUT_SM, 0, false).is_err() {
            sys::exit(4);
        }
        while inb(COM1 + UART_LSR) & LSR_DATA_READY != 0 {
            INPUT.push(inb(COM1));
        }
        let _ = sys::irq_unmask(COM1_GSI);
        let kicks = {
            let mut vmm = VMM.lock();
            match vmm.as_mut() {
                Some(v) => {
                    INPUT.drain(&mut v.typed);
                    let typed = core::mem::take(&mut v.typed);
                    v.machine.console_input(&typed);
                    v.machine.take_kicks()
                }
                None => 0,
            }
        };
        kick(kicks, None);
    }
}

static NET_STACK: moat_user::Stack<8192> = moat_user::Stack::new();

/// Waits for the switch to queue frames for this port, hands them to
/// the guest's device and wakes or pokes the vCPUs its interrupt reaches.
extern "C" fn net_ec() -> ! {
    loop {
        if sys::sm_down(net::PORT_SM, 0, false).is_err() {
            sys::exit(6);
        }
        let kicks = {
            let mut vmm = VMM.lock();
            match vmm.as_mut() {
                Some(v) => {
                    v.machine.poll_net();
                    v.machine.take_kicks()
                }
                None => 0,
            }
        };
        kick(kicks, None);
    }
}

fn start_net() -> Result<(), SetupError> {
    start_thread(
        NET_EC,
        NET_SC,
        net_ec,
        NET_STACK.top(),
        NET_UTCB,
        INPUT_PRIORITY,
        ["net EC", "net SC"],
    )
}

/// The kernel's debug event asked for a state dump: the first vCPU loop
/// to pass prints it.
static DUMP: AtomicBool = AtomicBool::new(false);
static DUMP_STACK: moat_user::Stack<8192> = moat_user::Stack::new();
static TSC_HZ: AtomicU64 = AtomicU64::new(0);

/// Waits for the kernel's debug event (`moat_abi::DEBUG_GSI`), then has
/// a vCPU loop print the VMM's state: wakes the halted ones, pokes the
/// running ones. This EC only says when no loop answers (one holds the
/// lock in a call, say).
extern "C" fn dump_ec() -> ! {
    loop {
        if sys::sm_down(DUMP_SM, 0, false).is_err() {
            sys::exit(5);
        }
        DUMP.store(true, Ordering::Release);
        kick(u64::MAX, None);
        let ticks = common::ms_to_ticks(TSC_HZ.load(Ordering::Relaxed), DUMP_ANSWER_MS);
        let deadline = moat_user::rdtsc().wrapping_add(ticks).max(1);
        match sys::sm_down(DUMP_SM, deadline, false) {
            Err(Status::Timeout) if DUMP.load(Ordering::Acquire) => {
                println!("vmm: dump: the vCPU loop did not answer within {DUMP_ANSWER_MS} ms")
            }
            // Another debug event came meanwhile: serve it too.
            Ok(()) => {
                let _ = sys::sm_up(DUMP_SM);
            }
            _ => {}
        }
    }
}

/// Ties [`DUMP_SM`] to the kernel's debug event if the manifest gave this
/// VMM that GSI (`irq 255 to …`); without it there is no dump.
fn start_dump() -> Result<(), SetupError> {
    let fail = |what| move |s| SetupError(what, s);
    sys::create_sm(DUMP_SM, sel::OWN_PD, 0).map_err(fail("dump semaphore"))?;
    if sys::irq_assign(DUMP_SM, moat_abi::DEBUG_GSI, 0).is_err() {
        return Ok(());
    }
    start_thread(
        DUMP_EC,
        DUMP_SC,
        dump_ec,
        DUMP_STACK.top(),
        DUMP_UTCB,
        INPUT_PRIORITY,
        ["dump EC", "dump SC"],
    )
}

/// Prints the VMM's state dump if the debug event asked for one.
fn dump_if_asked(machine: &Machine, link: Option<&ModemLink>) {
    if !DUMP.swap(false, Ordering::AcqRel) {
        return;
    }
    for line in machine.dump() {
        println!("vmm: dump: {line}");
    }
    if let Some(link) = link {
        println!(
            "vmm: dump: port `modem` {}",
            if link.is_open() { "open" } else { "closed" }
        );
    }
    println!("vmm: dump: end");
}

fn start_input() -> Result<(), SetupError> {
    let fail = |what| move |s| SetupError(what, s);
    sys::create_sm(INPUT_SM, sel::OWN_PD, 0).map_err(fail("input semaphore"))?;
    sys::irq_assign(INPUT_SM, COM1_GSI, EDGE_ACTIVE_HIGH).map_err(fail("COM1 interrupt"))?;
    outb(COM1 + UART_IER, IER_RX_DATA);
    outb(COM1 + UART_MCR, inb(COM1 + UART_MCR) | MCR_OUT2);
    start_thread(
        INPUT_EC,
        INPUT_SC,
        input_ec,
        INPUT_STACK.top(),
        INPUT_UTCB,
        INPUT_PRIORITY,
        ["input EC", "input SC"],
    )
}

/// Starts one of the VMM's helper threads on its CPU: an EC at `ec`
/// running `entry` on the stack that ends at `stack_top`, its UTCB at
/// `utcb`, and its SC at `sc` with `priority`; `what` names the two in an
/// error.
fn start_thread(
    ec: Sel,
    sc: Sel,
    entry: extern "C" fn() -> !,
    stack_top: u64,
    utcb: u64,
    priority: u8,
    what: [&'static str; 2],
) -> Result<(), SetupError> {
    sys::create_ec(
        ec,
        sel::OWN_PD,
        false,
        moat_user::abi::CPU_OF_CALLER,
        entry as *const () as u64,
        stack_top - 8,
        utcb,
        sel::EXCEPTION_PORTAL,
        ec,
    )
    .map_err(|s| SetupError(what[0], s))?;
    sys::create_sc(sc, sel::OWN_PD, ec, priority, TIMER_BUDGET_US)
        .map_err(|s| SetupError(what[1], s))
}

/// Tells the timer EC the next deadline (host TSC, 0 for none), never
/// before `NOT_BEFORE`.
fn arm(deadline: u64) {
    let deadline = match deadline {
        0 => 0,
        d => d.max(NOT_BEFORE.load(Ordering::Acquire)),
    };
    if DEADLINE.swap(deadline, Ordering::AcqRel) != deadline {
        let _ = sys::sm_up(TIMER_SM);
    }
}

fn kernel_call(call: Call, sel: Sel, args: [u64; 6]) -> Result<(), Status> {
    let (rax, _) = sys::raw(CallWord::new(call, 0, sel).encode(), args);
    Status::from_code(rax)
        .unwrap_or(Status::BadCall)
        .into_result()
}

/// A step of the set-up that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SetupError(&'static str, Status);

fn main(args: &str) -> i32 {
    match run(args) {
        Ok(stop) => {
            match stop {
                Stop::Failed(failure) => println!("vmm: guest stopped: {failure:?}"),
                Stop::DebugExit(value) => {
                    let byte = value as u8;
                    println!(
                        "vmm: guest stopped: isa-debug-exit value {value:#x}, exit code {:#x}",
                        vdev::debug_exit::exit_status(value)
                    );
                    return (moat_abi::EXIT_WITH_VALUE + u64::from(byte)) as i32;
                }
                _ => println!("vmm: guest stopped: {}", describe(stop)),
            }
            i32::from(stop != Stop::PowerOff)
        }
        Err(SetupError(what, status)) => {
            println!("vmm: FAIL {what}: {status}");
            2
        }
    }
}

fn describe(stop: Stop) -> &'static str {
    match stop {
        Stop::PowerOff => "power-off",
        Stop::Reset => "reset",
        Stop::Panic => "kernel panic (pvpanic)",
        Stop::TripleFault => "triple fault",
        Stop::HaltedForever => "halted with interrupts disabled",
        Stop::DebugExit(_) => "isa-debug-exit",
        Stop::Failed(_) => "failure",
    }
}

/// The Unix time at host TSC `start`, from the machine's clock (the
/// portal `clock`); 0, the guest's clock at 1970, if it cannot be had.
fn clock_epoch(clock: Sel, start: u64, tsc_hz: u64) -> u64 {
    use common::cmos::service;
    match sys::call(clock, [0; 6]) {
        Ok([service::OK, unix, read_at, ..]) => {
            let since = read_at.saturating_sub(start) / tsc_hz.max(1);
            let epoch = unix.saturating_sub(since);
            println!("vmm: guest clock from the machine's RTC: Unix time {epoch}");
            epoch
        }
        Ok(words) => {
            println!(
                "vmm: the machine's clock cannot be read ({}); the guest's clock starts at 0",
                words[0]
            );
            0
        }
        Err(status) => {
            println!(
                "vmm: no answer from the machine's clock ({status}); the guest's clock starts at 0"
            );
            0
        }
    }
}

fn required(args: &str, name: &'static str) -> Result<Region, SetupError> {
    region(args, name).ok_or(SetupError(name, Status::BadParameter))
}

fn run(args: &str) -> Result<Stop, SetupError> {
    let tsc_hz = common::args::tsc_hz(args);
    let ram = required(args, "guest")?;
    let heap = required(args, "heap")?;
    let kernel = required(args, "kernel")?;
    let initrd = region(args, "initrd");
    let cmdline = region(args, "cmdline");
    let start = moat_user::rdtsc();
    let epoch = match args::number(args, "clock", 0) {
        Ok(clock) if clock != 0 => clock_epoch(clock, start, tsc_hz),
        _ => args::number(args, "epoch", 0).unwrap_or(0),
    };
    let vcpus = match args::number(args, "vcpus", 1) {
        Ok(n) if (1..=MAX_VCPUS as u64).contains(&n) => n as usize,
        _ => {
            println!("vmm: FAIL vcpus= must be 1 to {MAX_VCPUS}");
            return Err(SetupError("vcpus", Status::BadParameter));
        }
    };
    let cpus = vcpu_cpus(args, vcpus)?;
    let ap_priority = match args::number(args, "vcpu-priority", DEFAULT_VCPU_PRIORITY) {
        Ok(p) if p <= u64::from(u8::MAX) => p as u8,
        _ => return Err(SetupError("vcpu-priority", Status::BadParameter)),
    };

    // SAFETY: the root task mapped the `heap` region read-write for this
    // task's life, and nothing else uses it: it becomes the heap's.
    let heap_bytes =
        unsafe { core::slice::from_raw_parts_mut(heap.address as *mut u8, heap.size as usize) };
    if !moat_user::heap::HEAP.extend(heap_bytes) {
        return Err(SetupError("heap region", Status::BadParameter));
    }
    let modules = multiboot_modules(args)?;

    // SAFETY: the `file` mappings are read-only boot modules, mapped for
    // this task's life.
    let guest = unsafe {
        Guest {
            ram,
            kernel: kernel.bytes(),
            initrd: initrd.map(|r| r.bytes()),
            cmdline: cmdline.map_or(&[][..], |r| trim_text(r.bytes())),
            modules,
            tsc_hz,
            epoch,
            start,
            vcpus,
        }
    };
    // SAFETY: as above; the disk image is copied, the guest writes the copy.
    let ram_disk = region(args, "disk").map(|disk| unsafe { disk.bytes() }.to_vec());
    let disk = disk::storage(args, tsc_hz, ram_disk)
        .map_err(|what| SetupError(what, Status::BadParameter))?;
    let port = net::port(args).map_err(|what| SetupError(what, Status::BadParameter))?;
    let net_mac = port.as_ref().map(|(_, mac)| *mac);
    let port = port.map(|(port, mac)| (Box::new(port) as Box<dyn NetBackend>, mac));
    let low_ram = guest.low_ram();
    println!(
        "vmm: {} MiB RAM, kernel {} KiB, initrd {} KiB, disk {} KiB{}",
        low_ram >> 20,
        guest.kernel.len() >> 10,
        guest.initrd.map_or(0, |i| i.len() >> 10),
        disk.as_ref().map_or(0, |d| d.sectors() >> 1),
        match guest.modules.len() {
            0 => String::new(),
            n => format!(", {n} Multiboot modules"),
        }
    );
    let vm_portals = args::value(args, "vm-portals").unwrap_or("");
    create_vm(
        ram,
        low_ram,
        vm_portals,
        args::flag(args, "user-hypercalls"),
        vcpus,
    )?;
    let modem = args::number(args, "modem", 0).ok().filter(|&sel| sel != 0);
    let link = ModemLink::new(common::ms_to_ticks(tsc_hz, MODEM_CHECK_MS));
    sys::create_sm(LOCK_SM, sel::OWN_PD, 0).map_err(|s| SetupError("lock semaphore", s))?;
    sys::create_sm(DONE_SM, sel::OWN_PD, 0).map_err(|s| SetupError("done semaphore", s))?;
    start_timer()?;
    TSC_HZ.store(tsc_hz, Ordering::Relaxed);
    start_dump()?;
    let named = match modem {
        Some(_) => NamedPort::Relay("modem"),
        None => NamedPort::Echo,
    };
    let debug_exit = args::flag(args, "debug-exit");
    let (machine, boot_state) = guest.boot(disk, port, named, debug_exit)?;
    *VMM.lock() = Some(Vmm {
        machine,
        guest,
        generation: 1,
        boot_state,
        end: None,
        resetting: false,
        parked: 0,
        console: ConsoleLines::default(),
        link,
        modem,
        named,
        debug_exit,
        restart_on_panic: args::value(args, "on-panic") == Some("restart"),
        stop_on_triple_fault: args::value(args, "on-triple-fault") == Some("stop"),
        resets: 0,
        refusals_logged: 0,
        typed: Vec::new(),
        net_mac,
    });
    if args::flag(args, "console-input") {
        start_input()?;
    }
    if net_mac.is_some() {
        start_net()?;
    }
    create_vcpu(0)?;
    start_vcpus(&cpus, ap_priority)?;
    if vcpus > 1 {
        let list: Vec<String> = cpus
            .iter()
            .map(|&c| match c {
                moat_user::abi::CPU_OF_CALLER => "the VMM's".into(),
                c => format!("{c}"),
            })
            .collect();
        println!(
            "vmm: {vcpus} vCPUs, vCPU 0 on the VMM's CPU, vCPUs 1.. on CPUs {}",
            list.join(",")
        );
    }

    vcpu_loop(0);
    // Every other vCPU's EC stops at its next pass (they were kicked).
    let ticks = common::ms_to_ticks(tsc_hz, STOP_WAIT_MS);
    let deadline = moat_user::rdtsc().wrapping_add(ticks).max(1);
    let mut stopped = 1;
    while stopped < vcpus && sys::sm_down(DONE_SM, deadline, false).is_ok() {
        stopped += 1;
    }
    if stopped < vcpus {
        println!(
            "vmm: {} vCPU(s) did not stop within {STOP_WAIT_MS} ms",
            vcpus - stopped
        );
    }
    arm(0);
    let mut vmm = VMM.lock();
    let Some(v) = vmm.as_mut() else {
        return Err(SetupError("machine", Status::BadParameter));
    };
    v.console.flush(&v.machine, true);
    report(&v.machine);
    let end = v.end.unwrap_or(Ok(Stop::PowerOff));
    if end != Ok(Stop::PowerOff) {
        // SAFETY: as in `vcpu_loop`; the vCPU does not run any more.
        let state = unsafe { &*(STATE_PAGE as *const VcpuState) };
        println!(
            "vmm: at rip {:#x} rsp {:#x} cr0 {:#x} cr4 {:#x} efer {:#x} rax {:#x} rsi {:#x}",
            state.rip, state.rsp, state.cr0, state.cr4, state.efer, state.rax, state.rsi
        );
    }
    end
}

/// The CPUs of vCPUs 1, 2, … (`vcpu-cpus=`); the VMM's own where the
/// list ends early or is not given.
fn vcpu_cpus(args: &str, vcpus: usize) -> Result<Vec<u64>, SetupError> {
    let mut cpus = Vec::new();
    for word in args::value(args, "vcpu-cpus")
        .unwrap_or("")
        .split(',')
        .filter(|w| !w.is_empty())
    {
        match args::parse_number(word) {
            Some(cpu) if cpu < moat_user::abi::CPU_OF_CALLER => cpus.push(cpu),
            _ => {
                println!("vmm: FAIL vcpu-cpus: {word:?} is not a CPU number");
                return Err(SetupError("vcpu-cpus", Status::BadParameter));
            }
        }
    }
    cpus.resize(
        vcpus.saturating_sub(1).max(cpus.len()),
        moat_user::abi::CPU_OF_CALLER,
    );
    cpus.truncate(vcpus - 1);
    Ok(cpus)
}

/// The guest's machine and what the vCPU threads share, behind [`VMM`].
struct Vmm {
    machine: Machine,
    guest: Guest,
    /// Counts the machines built (boots and resets): a vCPU thread that
    /// sees it move drops the exit it holds and starts over.
    generation: u64,
    /// vCPU 0's state at the guest's entry, for this generation.
    boot_state: VcpuState,
    /// Set when the guest ends: every vCPU thread stops.
    end: Option<Result<Stop, SetupError>>,
    /// A reset or restart waits for every vCPU thread to be out of the
    /// guest ([`Vmm::parked`]) before it reloads RAM.
    resetting: bool,
    parked: u64,
    console: ConsoleLines,
    link: ModemLink,
    modem: Option<u64>,
    named: NamedPort,
    debug_exit: bool,
    restart_on_panic: bool,
    stop_on_triple_fault: bool,
    resets: u32,
    refusals_logged: u32,
    typed: Vec<u8>,
    /// The guest's MAC on its switch port, if it has one.
    net_mac: Option<[u8; 6]>,
}

static VMM: VmmLock<Option<Vmm>> = VmmLock::new(None);

impl Vmm {
    fn all_vcpus(&self) -> u64 {
        u64::MAX >> (64 - self.guest.vcpus)
    }

    fn end(&mut self, end: Result<Stop, SetupError>) {
        self.end.get_or_insert(end);
    }

    /// What comes of a stop the machine reported on `vcpu`: the end, or
    /// a reset (started once every vCPU is out of the guest).
    fn stop(&mut self, stop: Stop, state: &VcpuState) {
        let restart = match stop {
            Stop::Panic if self.restart_on_panic => {
                self.resets += 1;
                println!(
                    "vmm: guest kernel panic (pvpanic): restarting the guest (restart {})",
                    self.resets
                );
                true
            }
            Stop::TripleFault if self.stop_on_triple_fault => false,
            Stop::Reset | Stop::TripleFault => {
                println!(
                    "vmm: guest reset ({}, rip {:#x} cs {:#x}/{:#x} cr0 {:#x} cr4 {:#x} efer {:#x})",
                    describe(stop),
                    state.rip,
                    state.cs.selector,
                    state.cs.access,
                    state.cr0,
                    state.cr4,
                    state.efer
                );
                self.resets += 1;
                true
            }
            _ => false,
        };
        if restart && self.resets <= MAX_RESETS {
            self.resetting = true;
        } else {
            self.end(Ok(stop));
        }
    }

    /// Reloads the guest into a new machine: called with every vCPU
    /// thread parked, so no vCPU runs while RAM is rewritten.
    fn reboot(&mut self) {
        let disk = self.machine.take_disk();
        let port = self.machine.take_net().zip(self.net_mac);
        match self.guest.boot(disk, port, self.named, self.debug_exit) {
            Ok((machine, state)) => {
                self.machine = machine;
                self.boot_state = state;
                // The new guest finds the port as the link left it.
                self.machine.set_port_open(self.link.is_open());
                self.generation += 1;
            }
            Err(error) => self.end(Err(error)),
        }
        self.resetting = false;
        self.parked = 0;
    }

    /// Output, the modem's port and #UD reports after an exit.
    fn after_exit(&mut self, action: Action) {
        self.console.flush(
            &self.machine,
            matches!(action, Action::Halt | Action::Stop(_)),
        );
        if let Some(portal) = self.modem {
            relay_to_modem(&mut self.machine, &mut self.link, portal);
        }
        for (rip, what) in self.machine.take_refusals() {
            self.refusals_logged += 1;
            match self.refusals_logged {
                ..=MAX_REFUSALS_LOGGED => {
                    println!("vmm: #UD injected at rip {rip:#x}: {what:?} is not emulated")
                }
                n if n == MAX_REFUSALS_LOGGED + 1 => println!("vmm: further #UDs not logged"),
                _ => {}
            }
        }
    }
}

/// Wakes (it may be halted or wait for STARTUP) and pokes (it may be in
/// the guest) every vCPU in `vcpus` but `except`.
fn kick(vcpus: u64, except: Option<usize>) {
    for vcpu in 0..MAX_VCPUS {
        if vcpus & (1 << vcpu) != 0 && Some(vcpu) != except {
            // A vCPU that does not exist has no semaphore: refused.
            if sys::sm_up(wake_sel(vcpu)).is_ok() {
                let _ = kernel_call(Call::VcpuPoke, vcpu_sel(vcpu), [0; 6]);
            }
        }
    }
}

/// Sleeps until kicked.
fn wait(vcpu: usize) {
    while sys::sm_down(wake_sel(vcpu), 0, false).is_err() {
        core::hint::spin_loop();
    }
}

/// Runs vCPU `vcpu` until the guest ends. Each pass: under the lock,
/// prepare the entry (or see that the vCPU must wait); run the guest
/// without it; under the lock again, handle the exit; then wake and poke
/// the vCPUs that exit concerned.
fn vcpu_loop(vcpu: usize) {
    let mut generation = 0;
    loop {
        // SAFETY: the kernel writes the state page only during this
        // vCPU's vcpu_run, which only this EC calls; this is the only
        // reference until the next one.
        let state = unsafe { &mut *(state_page(vcpu) as *mut VcpuState) };
        let (entry, kicks) = {
            let mut guard = VMM.lock();
            let Some(v) = guard.as_mut() else { return };
            if v.end.is_some() {
                return;
            }
            if v.resetting {
                v.parked |= 1 << vcpu;
                if v.parked == v.all_vcpus() {
                    v.reboot();
                    (Entry::Wait, u64::MAX)
                } else {
                    (Entry::Wait, 0)
                }
            } else {
                if v.generation != generation {
                    generation = v.generation;
                    if vcpu == 0 {
                        *state = v.boot_state.clone();
                    } else {
                        // One TSC for all vCPUs; STARTUP keeps it.
                        state.tsc_offset = v.boot_state.tsc_offset;
                    }
                }
                dump_if_asked(&v.machine, v.modem.map(|_| &v.link));
                INPUT.drain(&mut v.typed);
                if !v.typed.is_empty() {
                    let typed = core::mem::take(&mut v.typed);
                    v.machine.console_input(&typed);
                }
                v.machine.poll_net();
                let entry = v.machine.prepare_entry(vcpu, state);
                arm(host_deadline(&v.machine, v.guest.start, v.guest.tsc_hz));
                (entry, v.machine.take_kicks())
            }
        };
        if kicks == u64::MAX {
            // A reboot: everyone starts over, this thread too.
            kick(kicks, Some(vcpu));
            continue;
        }
        kick(kicks, Some(vcpu));
        if entry == Entry::Wait {
            wait(vcpu);
            continue;
        }
        let run = kernel_call(Call::VcpuRun, vcpu_sel(vcpu), [0; 6]);
        let kicks = {
            let mut guard = VMM.lock();
            let Some(v) = guard.as_mut() else { return };
            if v.end.is_some() || v.resetting || v.generation != generation {
                // The exit belongs to a machine that is gone or going.
                continue;
            }
            match run {
                Ok(()) => {
                    let action = v.machine.handle_exit(vcpu, state);
                    v.after_exit(action);
                    if let Action::Stop(stop) = action {
                        v.stop(stop, state);
                    }
                }
                Err(status) => v.end(Err(SetupError("vcpu_run", status))),
            }
            if v.end.is_some() || v.resetting {
                u64::MAX
            } else {
                v.machine.take_kicks()
            }
        };
        kick(kicks, Some(vcpu));
    }
}

/// Creates vCPU `vcpu` on the calling EC's CPU (where it will run).
fn create_vcpu(vcpu: usize) -> Result<(), SetupError> {
    kernel_call(
        Call::CreateVcpu,
        vcpu_sel(vcpu),
        [VM, state_page(vcpu), 0, 0, 0, 0],
    )
    .map_err(|s| SetupError("create_vcpu", s))?;
    sys::create_sm(wake_sel(vcpu), sel::OWN_PD, 0).map_err(|s| SetupError("wake semaphore", s))
}

/// The vCPU a starting EC runs, set by the first EC before it creates
/// the next one (one at a time: it waits for [`DONE_SM`]).
static STARTING: AtomicUsize = AtomicUsize::new(0);
/// What went wrong in a starting EC.
static START_FAILED: AtomicU64 = AtomicU64::new(0);

extern "C" fn vcpu_ec() -> ! {
    let vcpu = STARTING.load(Ordering::Acquire);
    let created = create_vcpu(vcpu);
    if let Err(SetupError(_, status)) = created {
        START_FAILED.store(status as u64 | 1 << 63, Ordering::Release);
    }
    let _ = sys::sm_up(DONE_SM);
    if created.is_ok() {
        vcpu_loop(vcpu);
        let _ = sys::sm_up(DONE_SM);
    }
    // Stopped: the first EC ends the component.
    loop {
        let _ = sys::sm_down(wake_sel(vcpu), 0, false);
    }
}

/// Starts an EC for each vCPU past the first, on its CPU, and waits until
/// it has made its vCPU there.
fn start_vcpus(cpus: &[u64], priority: u8) -> Result<(), SetupError> {
    let fail = |what| move |s| SetupError(what, s);
    for (index, &cpu) in cpus.iter().enumerate() {
        let vcpu = index + 1;
        let stack = Vec::leak(alloc::vec![0u8; VCPU_STACK]);
        let top = (stack.as_ptr() as u64 + VCPU_STACK as u64) & !0xf;
        STARTING.store(vcpu, Ordering::Release);
        let (ec, sc) = (vcpu_sel(vcpu) + 1, vcpu_sel(vcpu) + 2);
        sys::create_ec(
            ec,
            sel::OWN_PD,
            false,
            cpu,
            vcpu_ec as *const () as u64,
            top - 8,
            state_page(vcpu) + PAGE_SIZE,
            sel::EXCEPTION_PORTAL,
            ec,
        )
        .map_err(fail("vCPU EC"))?;
        sys::create_sc(sc, sel::OWN_PD, ec, priority, VCPU_BUDGET_US).map_err(fail("vCPU SC"))?;
        sys::sm_down(DONE_SM, 0, false).map_err(fail("vCPU start"))?;
        let failed = START_FAILED.load(Ordering::Acquire);
        if failed != 0 {
            let status = Status::from_code(failed & !(1 << 63)).unwrap_or(Status::BadCall);
            println!("vmm: FAIL vCPU {vcpu} on CPU {cpu}: create_vcpu: {status}");
            return Err(SetupError("create_vcpu", status));
        }
    }
    Ok(())
}

/// What the guest is booted from, again at each reset.
struct Guest {
    ram: Region,
    kernel: &'static [u8],
    initrd: Option<&'static [u8]>,
    cmdline: &'static [u8],
    /// A Multiboot kernel's modules.
    modules: Vec<firmware::multiboot::Module<'static>>,
    tsc_hz: u64,
    epoch: u64,
    /// Host TSC at guest TSC 0.
    start: u64,
    vcpus: usize,
}

impl Guest {
    fn layout(&self) -> firmware::GuestLayout {
        firmware::GuestLayout::standard(self.ram.size, self.vcpus as u32)
    }

    /// RAM below the MMIO hole: all the guest gets (nothing above 4 GiB).
    fn low_ram(&self) -> u64 {
        self.layout().low_ram_end().min(self.ram.size)
    }

    /// Clears RAM, loads the guest into it, and gives a machine and vCPU
    /// 0's state at the guest's entry (the other vCPUs wait for STARTUP).
    /// No vCPU may run meanwhile.
    fn boot(
        &self,
        disk: Option<Box<dyn BlockBackend>>,
        port: Option<(Box<dyn NetBackend>, [u8; 6])>,
        named: NamedPort,
        debug_exit: bool,
    ) -> Result<(Machine, VcpuState), SetupError> {
        let low_ram = self.low_ram();
        let boot = {
            // SAFETY: the `guest` region is this task's RAM mapping; no
            // vCPU is running (the caller's promise), and this is the only
            // reference while the firmware writes it.
            let ram = unsafe {
                core::slice::from_raw_parts_mut(self.ram.address as *mut u8, low_ram as usize)
            };
            ram.fill(0);
            let payload = firmware::Payload {
                kernel: self.kernel,
                cmdline: self.cmdline,
                initrd: self.initrd,
            };
            let boot = firmware::boot_detected(ram, &self.layout(), &payload, &self.modules);
            // Where a PC's BIOS would be: Linux's last way to reboot jumps
            // to the reset vector in real mode.
            if let Some(stub) = ram.get_mut(RESET_VECTOR..RESET_VECTOR + RESET_STUB.len()) {
                stub.copy_from_slice(&RESET_STUB);
            }
            boot
        };
        let boot = boot.map_err(|error| {
            println!("vmm: FAIL cannot load the guest: {error}");
            SetupError("load", Status::BadParameter)
        })?;
        let mem = Rc::new(GuestRam {
            base: self.ram.address as *mut u8,
            len: low_ram,
        });
        let config = Config {
            ram_size: low_ram,
            tsc_hz: self.tsc_hz,
            boot_unix_secs: self.epoch,
            vcpus: self.vcpus,
        };
        let time = Rc::new(HostTime { start: self.start });
        let mut machine = Machine::new(&config, mem, time, Box::new(host_cpuid))
            .ok_or(SetupError("machine", Status::BadParameter))?;
        machine
            .add_pci_devices(
                disk,
                Box::new(TscEntropy(moat_user::rdtsc())),
                named,
                Hvc0::from_cmdline(self.cmdline),
            )
            .map_err(|_| SetupError("PCI devices", Status::BadParameter))?;
        if let Some((backend, mac)) = port {
            machine.connect_net(backend, mac);
        }
        if debug_exit {
            machine
                .add_debug_exit()
                .map_err(|_| SetupError("isa-debug-exit", Status::BadParameter))?;
        }
        let mut initial = initial_state(&boot);
        initial.tsc_offset = self.start.wrapping_neg();
        Ok((machine, initial))
    }
}

/// Entropy for the guest's virtio-rng: a SplitMix64 stream reseeded from
/// the TSC at every request. Good enough for a test guest, not for keys:
/// the host offers no better source to a task (RDRAND is not everywhere).
struct TscEntropy(u64);

impl vdev::virtio::rng::EntropySource for TscEntropy {
    fn fill(&mut self, buf: &mut [u8]) {
        self.0 ^= moat_user::rdtsc();
        for chunk in buf.chunks_mut(8) {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// The Multiboot modules `mod1=`, `mod2=`, … with their command lines,
/// the lines of `modcmdlines=` in order (a missing line is empty).
fn multiboot_modules(args: &str) -> Result<Vec<firmware::multiboot::Module<'static>>, SetupError> {
    // SAFETY: the `file` mappings are read-only boot modules, mapped for
    // this task's life.
    let lines = region(args, "modcmdlines").map_or(&[][..], |r| trim_text(unsafe { r.bytes() }));
    let mut lines = lines.split(|&b| b == b'\n');
    let mut modules = Vec::new();
    for number in 1.. {
        let Some(module) = region(args, &format!("mod{number}")) else {
            break;
        };
        modules.push(firmware::multiboot::Module {
            // SAFETY: as above.
            bytes: unsafe { module.bytes() },
            cmdline: lines.next().unwrap_or_default(),
        });
    }
    if lines.any(|line| !line.is_empty()) {
        println!("vmm: FAIL modcmdlines has more lines than there are modules mod1=…");
        return Err(SetupError("modcmdlines", Status::BadParameter));
    }
    Ok(modules)
}

/// The command line module's text, up to a NUL or the end, without the
/// final newline.
fn trim_text(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let text = &bytes[..end];
    let trimmed = text.len()
        - text
            .iter()
            .rev()
            .take_while(|b| b.is_ascii_whitespace())
            .count();
    &text[..trimmed]
}

/// The guest's serial output on its way to the console: whole lines, so
/// that other components' lines never land inside one of the guest's
/// (the guest writes a byte per exit). A VMM that holds the console UART
/// (`console-input`) writes them raw, byte for byte (escape sequences,
/// `\r`, backspace: the user's terminal is the guest's); any other's
/// are sanitised by the kernel, and its carriage returns dropped.
#[derive(Default)]
struct ConsoleLines {
    pending: Vec<u8>,
    /// The kernel refused a raw write: this VMM does not hold the UART.
    sanitised: bool,
}

/// A partial line longer than this is written anyway.
const CONSOLE_LINE_MAX: usize = 512;

impl ConsoleLines {
    /// Takes the guest's new output and writes its complete lines (all of
    /// it with `all`: the guest waits, e.g. at a prompt, or stopped).
    fn flush(&mut self, machine: &Machine, all: bool) {
        let out = machine.take_console_output();
        if self.sanitised {
            self.pending.extend(out.iter().filter(|&&b| b != b'\r'));
        } else {
            self.pending.extend_from_slice(&out);
        }
        let end = if all || self.pending.len() > CONSOLE_LINE_MAX {
            self.pending.len()
        } else {
            self.pending
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1)
        };
        if end == 0 {
            return;
        }
        if !self.sanitised {
            match moat_user::console::write_raw(&self.pending[..end]) {
                Err(Status::InsufficientRights) => {
                    self.sanitised = true;
                    self.pending.retain(|&b| b != b'\r');
                    return self.flush(machine, all);
                }
                _ => {
                    self.pending.drain(..end);
                    return;
                }
            }
        }
        let _ = sys::console_write(&self.pending[..end]);
        self.pending.drain(..end);
    }
}

fn report(machine: &Machine) {
    let s = &machine.stats;
    let r = &s.by_reason;
    use moat_abi::vcpu::exit_reason as e;
    println!(
        "vmm: exits {}: io {} mmio {} cpuid {} msr {} hlt {} window {} poked {} other {}",
        s.total(),
        r[e::IO as usize],
        r[e::MEMORY as usize],
        r[e::CPUID as usize],
        r[e::MSR_READ as usize] + r[e::MSR_WRITE as usize],
        r[e::HLT as usize],
        r[e::INTERRUPT_WINDOW as usize],
        r[e::POKED as usize],
        r[e::OTHER as usize] + r[e::XSETBV as usize] + r[e::HYPERCALL as usize],
    );
    if let Some((msr, write)) = s.last_msr_fault {
        let access = if write { "write" } else { "read" };
        println!(
            "vmm: {} MSR accesses refused (#GP), the last a {access} of {msr:#x}",
            s.msr_faults
        );
    }
}

/// The machine's next deadline as a host TSC value (0: none).
fn host_deadline(machine: &Machine, start: u64, tsc_hz: u64) -> u64 {
    machine.next_deadline_ns().map_or(0, |ns| {
        let ticks = u128::from(ns) * u128::from(tsc_hz) / 1_000_000_000;
        start.wrapping_add(ticks as u64).max(1)
    })
}

fn vm_flags(user_hypercalls: bool) -> u8 {
    if user_hypercalls {
        flags::VM | flags::USER_HYPERCALLS
    } else {
        flags::VM
    }
}

/// Hands what the guest wrote on the `modem` port to the native modem
/// (its port session) and its answer back to the guest, and shows the
/// guest the modem going and coming back as a reset of the port (see
/// `common::modem_link`).
fn relay_to_modem(machine: &mut Machine, link: &mut ModemLink, portal: Sel) {
    let mut call = |words| sys::call(portal, words);
    let written = machine.take_port_output();
    let mut answer = [0u8; MODEM_ANSWER_MAX];
    let (len, mut event) = link.relay(&mut call, &written, &mut answer);
    if len > 0 {
        machine.port_input(&answer[..len]);
    }
    if event.is_none() {
        event = link.poll(&mut call, moat_user::rdtsc());
    }
    let Some(event) = event else { return };
    machine.set_port_open(link.is_open());
    println!(
        "vmm: port `modem`: {}",
        match event {
            modem_link::Event::Gone => "the modem is gone, closed",
            modem_link::Event::Restarted => "the modem restarted, closed",
            modem_link::Event::Back => "the modem answers, open again",
        }
    );
}

/// Creates the VM with the RAM at guest-physical 0, the `portals` (a
/// comma-separated list of this PD's selectors, given at the same
/// selectors); the vCPUs come later, each from the EC that runs it.
fn create_vm(
    ram: Region,
    low_ram: u64,
    portals: &str,
    user: bool,
    vcpus: usize,
) -> Result<(), SetupError> {
    let pages = low_ram / PAGE_SIZE;
    let tables = (pages / 512 + 8) * PAGE_SIZE;
    let quota =
        VM_QUOTA_BASE + pages * CAP_SLOT_COST + tables + (vcpus as u64 - 1) * VM_QUOTA_PER_VCPU;
    let (rax, _) = sys::raw(
        CallWord::new(Call::CreatePd, vm_flags(user), VM).encode(),
        [sel::OWN_PD, quota, 64, 0, 0, 0],
    );
    Status::from_code(rax)
        .unwrap_or(Status::BadCall)
        .into_result()
        .map_err(|s| SetupError("create_pd", s))?;
    // In 2 MiB steps: one kernel call for all of it would not be
    // preempted for its whole length, and components above the VMM (a
    // modem's frame tick) would wait for it.
    for first in (0..pages).step_by(DELEGATE_STEP as usize) {
        sys::delegate(
            VM,
            Space::Memory,
            ram.address / PAGE_SIZE + first,
            first,
            (pages - first).min(DELEGATE_STEP),
            rights::MEM_READ | rights::MEM_WRITE | rights::MEM_EXECUTE,
        )
        .map_err(|s| SetupError("delegate RAM", s))?;
    }
    for portal in portals.split(',').filter(|p| !p.is_empty()) {
        let sel =
            args::parse_number(portal).ok_or(SetupError("vm-portals", Status::BadParameter))?;
        sys::delegate(VM, Space::Object, sel, sel, 1, rights::PT_CALL)
            .map_err(|s| SetupError("delegate a portal to the VM", s))?;
    }
    Ok(())
}

fn start_timer() -> Result<(), SetupError> {
    let fail = |what| move |s| SetupError(what, s);
    sys::create_sm(TIMER_SM, sel::OWN_PD, 0).map_err(fail("timer semaphore"))?;
    start_thread(
        TIMER_EC,
        TIMER_SC,
        timer_ec,
        TIMER_STACK.top(),
        TIMER_UTCB,
        TIMER_PRIORITY,
        ["timer EC", "timer SC"],
    )
}

/// The vCPU state the firmware's boot state describes.
fn initial_state(boot: &firmware::BootState) -> VcpuState {
    let segment = |s: &firmware::Segment| moat_abi::vcpu::Segment {
        selector: s.selector,
        access: s.access_rights,
        limit: s.limit,
        base: s.base,
        ..Default::default()
    };
    let data = segment(&boot.ds);
    let mut state = VcpuState {
        // Everything but an event to inject.
        dirty: group::ALL & !group::INJECT,
        want: state::WANT,
        rip: boot.rip,
        rsp: boot.rsp,
        rax: boot.rax,
        rsi: boot.rsi,
        rbx: boot.rbx,
        rflags: boot.rflags,
        cr0: boot.cr0,
        cr3: boot.cr3,
        cr4: boot.cr4,
        efer: boot.efer,
        xcr0: 1,
        cs: segment(&boot.cs),
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: segment(&boot.tr),
        pat: POWER_ON_PAT,
        dr6: 0xffff_0ff0,
        dr7: 0x400,
        ..VcpuState::default()
    };
    state.ldtr.access = UNUSABLE;
    state.gdtr.base = boot.gdt_base;
    state.gdtr.limit = boot.gdt_limit.into();
    state.idtr.limit = 0xffff;
    state
}

/// F000:FFF0, the first instruction after a reset.
const RESET_VECTOR: usize = 0xf_fff0;
/// `mov al, 1; mov dx, 0x602; out dx, al; hlt`: the ACPI reset register.
const RESET_STUB: [u8; 7] = [0xb0, 0x01, 0xba, 0x02, 0x06, 0xee, 0xf4];

use state::POWER_ON_PAT;
/// VMX access rights: segment unusable.
const UNUSABLE: u32 = 1 << 16;
