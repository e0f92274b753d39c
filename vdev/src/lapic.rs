//! Local APIC of one vCPU: xAPIC (the MMIO page, a [`BusDevice`]) and
//! x2APIC (MSRs 0x800-0x8ff), IA32_APIC_BASE and IA32_TSC_DEADLINE. A VM
//! has one per vCPU; [`route`] finds which of them an IPI or an
//! interrupt message reaches.
//!
//! The VMM routes MSRs [`APIC_BASE_MSR`], [`TSC_DEADLINE_MSR`] and
//! [`X2APIC_MSRS`] to [`Lapic::read_msr`] / [`Lapic::write_msr`] (`None` /
//! `false` mean: inject #GP), and the page at [`Lapic::base_address`] to
//! the bus. Around each guest entry it calls [`Lapic::poll_timer`], injects
//! [`Lapic::pending_interrupt`] when the guest can take it and then calls
//! [`Lapic::acknowledge`]; after each access it forwards
//! [`Lapic::take_level_eoi`] to the I/O APIC (with the LAPIC's borrow
//! released: the I/O APIC may deliver straight back); it sleeps no later
//! than [`Lapic::timer_deadline_ns`]. MOV to/from CR8 map to
//! `set_tpr(cr8 << 4)` / `tpr() >> 4`.
//!
//! The timer counts at [`LapicConfig::timer_hz`] divided by the divide
//! configuration; the VMM reports that rate to the guest (CPUID 0x15 crystal
//! clock, or KVM leaf 0x40000010) so Linux needs no calibration. TSC-deadline
//! mode compares against the guest TSC, taken to run at
//! [`LapicConfig::tsc_hz`] from 0 at guest time 0 unless the VMM says
//! otherwise with [`Lapic::set_guest_tsc`].
//!
//! Six LVT entries exist (timer, thermal, performance counter, LINT0,
//! LINT1, error; the version register says so); only the timer and error
//! entries ever fire. IPIs: a write of the ICR with the self shorthand
//! (fixed only) and the x2APIC SELF IPI register deliver here at once;
//! every other ICR write becomes an [`Ipi`] the VMM takes with
//! [`Lapic::take_ipi`] and delivers to the LAPICs [`route`] names (fixed,
//! lowest priority, NMI, INIT, STARTUP; physical and logical destinations
//! in xAPIC flat and cluster and x2APIC cluster form, broadcast, the
//! all-including-self and all-excluding-self shorthands). SMI, ExtINT
//! and reserved delivery modes are counted in
//! [`Lapic::unsupported_ipis`] and dropped. xAPIC MMIO: 1, 2 or 4-byte
//! reads inside a register's first four bytes, 4-byte aligned writes;
//! other accesses read all ones and write nothing, reserved registers
//! read 0.

use alloc::vec::Vec;
use core::ops::RangeInclusive;

use crate::{BusDevice, Clock};

pub const APIC_BASE_MSR: u32 = 0x1b;
pub const TSC_DEADLINE_MSR: u32 = 0x6e0;
pub const X2APIC_MSRS: RangeInclusive<u32> = 0x800..=0x8ff;
pub const DEFAULT_BASE: u64 = 0xfee0_0000;
pub const WINDOW_LEN: u64 = 0x1000;

const BASE_BSP: u64 = 1 << 8;
const BASE_X2APIC: u64 = 1 << 10;
const BASE_ENABLE: u64 = 1 << 11;
/// Base address bits for a MAXPHYADDR of 52.
const BASE_ADDRESS: u64 = 0x000f_ffff_ffff_f000;

/// Register numbers: xAPIC offset / 16, x2APIC MSR - 0x800.
mod reg {
    pub const ID: u32 = 0x02;
    pub const VERSION: u32 = 0x03;
    pub const TPR: u32 = 0x08;
    pub const APR: u32 = 0x09;
    pub const PPR: u32 = 0x0a;
    pub const EOI: u32 = 0x0b;
    pub const RRD: u32 = 0x0c;
    pub const LDR: u32 = 0x0d;
    pub const DFR: u32 = 0x0e;
    pub const SVR: u32 = 0x0f;
    pub const ISR: u32 = 0x10;
    pub const TMR: u32 = 0x18;
    pub const IRR: u32 = 0x20;
    pub const ESR: u32 = 0x28;
    pub const ICR: u32 = 0x30;
    pub const ICR_HIGH: u32 = 0x31;
    pub const LVT_TIMER: u32 = 0x32;
    pub const LVT_ERROR: u32 = 0x37;
    pub const TIMER_INITIAL: u32 = 0x38;
    pub const TIMER_CURRENT: u32 = 0x39;
    pub const TIMER_DIVIDE: u32 = 0x3e;
    pub const SELF_IPI: u32 = 0x3f;
}

const LVT_COUNT: usize = 6;
const LVT_TIMER: usize = 0;
const LVT_ERROR: usize = 5;
/// Integrated APIC, max LVT entry index in bits 23:16.
const VERSION: u32 = 0x14 | ((LVT_COUNT as u32 - 1) << 16);

const VECTOR: u32 = 0xff;
const FIRST_VALID_VECTOR: u8 = 16;
const LVT_DELIVERY_STATUS: u32 = 1 << 12;
const LVT_REMOTE_IRR: u32 = 1 << 14;
const LVT_MASKED: u32 = 1 << 16;
const TIMER_MODE_SHIFT: u32 = 17;
/// Per LVT: vector, delivery mode, polarity, trigger, mask, timer mode.
const LVT_WRITABLE: [u32; LVT_COUNT] = [
    0x0007_00ff,
    0x0001_07ff,
    0x0001_07ff,
    0x0001_a7ff,
    0x0001_a7ff,
    0x0001_00ff,
];

const SVR_WRITABLE: u32 = 0x3ff;
const SVR_ENABLE: u32 = 1 << 8;
const SVR_RESET: u32 = 0xff;
const TPR_WRITABLE: u32 = 0xff;
const LDR_XAPIC: u32 = 0xff00_0000;
const DFR_MODEL_SHIFT: u32 = 28;
const DFR_FLAT: u32 = 0xf;
const DFR_RESERVED_ONES: u32 = 0x0fff_ffff;
const DIVIDE_WRITABLE: u32 = 0b1011;

const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;

const ICR_LOW_WRITABLE: u32 = 0x000c_cfff;
/// Bits 31:20, 17:16 and 13 (12, busy, is ignored).
const ICR_X2APIC_RESERVED: u32 = 0xfff3_2000;
const ICR_HIGH_XAPIC: u32 = 0xff00_0000;
const ICR_DELIVERY_MODE_SHIFT: u32 = 8;
const ICR_DELIVERY_MODE: u32 = 0b111;
const DELIVERY_FIXED: u32 = 0;
const DELIVERY_LOWEST_PRIORITY: u32 = 1;
const DELIVERY_NMI: u32 = 4;
const DELIVERY_INIT: u32 = 5;
const DELIVERY_STARTUP: u32 = 6;
const ICR_LOGICAL: u32 = 1 << 11;
const ICR_LEVEL_ASSERT: u32 = 1 << 14;
const ICR_TRIGGER_LEVEL: u32 = 1 << 15;
const ICR_SHORTHAND_SHIFT: u32 = 18;
const SHORTHAND_NONE: u32 = 0;
const SHORTHAND_SELF: u32 = 1;
const SHORTHAND_ALL_INCLUDING_SELF: u32 = 2;
/// IPIs one vCPU may have queued before the VMM takes them (one ICR
/// write per exit, so one in practice).
const MAX_OUTGOING: usize = 8;
const XAPIC_BROADCAST: u32 = 0xff;
const X2APIC_BROADCAST: u32 = u32::MAX;

const NS_PER_SEC: u128 = 1_000_000_000;

/// `value * mul / div` in u128, saturated to u64.
fn scale(value: u64, mul: u128, div: u128) -> u64 {
    u64::try_from(u128::from(value) * mul / div).unwrap_or(u64::MAX)
}

/// As [`scale`], rounded up.
fn scale_up(value: u64, mul: u128, div: u128) -> u64 {
    u64::try_from((u128::from(value) * mul).div_ceil(div)).unwrap_or(u64::MAX)
}

/// 256 bits, one per vector (ISR, TMR, IRR).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct VectorSet([u32; 8]);

impl VectorSet {
    fn set(&mut self, vector: u8) {
        self.0[usize::from(vector >> 5)] |= 1 << (vector & 31);
    }

    fn clear(&mut self, vector: u8) {
        self.0[usize::from(vector >> 5)] &= !(1 << (vector & 31));
    }

    fn contains(&self, vector: u8) -> bool {
        self.0[usize::from(vector >> 5)] & (1 << (vector & 31)) != 0
    }

    fn highest(&self) -> Option<u8> {
        let (word, bits) = self.0.iter().enumerate().rev().find(|(_, w)| **w != 0)?;
        Some((word as u8) << 5 | (31 - bits.leading_zeros()) as u8)
    }

    /// Register `index` of the eight 32-bit ones.
    fn word(&self, index: u32) -> u32 {
        self.0.get(index as usize).copied().unwrap_or(0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TimerMode {
    OneShot,
    Periodic,
    TscDeadline,
    Reserved,
}

fn timer_mode(lvt: u32) -> TimerMode {
    match (lvt >> TIMER_MODE_SHIFT) & 0b11 {
        0 => TimerMode::OneShot,
        1 => TimerMode::Periodic,
        2 => TimerMode::TscDeadline,
        _ => TimerMode::Reserved,
    }
}

/// The count-down timer, computed from the clock: `anchor_ticks` counter
/// ticks had elapsed since the count was loaded at `anchor_ns` (the anchor
/// moves when the divider changes).
#[derive(Debug, Default)]
struct Timer {
    initial: u32,
    divide: u32,
    armed: bool,
    anchor_ns: u64,
    anchor_ticks: u64,
    /// Expiries already signalled since the count was loaded.
    fired: u64,
    tsc_deadline: u64,
}

impl Timer {
    fn divisor(&self) -> u128 {
        match ((self.divide >> 1) & 0b100) | (self.divide & 0b11) {
            0b111 => 1,
            shift => 2 << shift,
        }
    }

    fn elapsed(&self, now: u64, hz: u64) -> u64 {
        let ns = now.saturating_sub(self.anchor_ns);
        let ticks = scale(ns, u128::from(hz), NS_PER_SEC * self.divisor());
        self.anchor_ticks.saturating_add(ticks)
    }

    fn ns_at(&self, ticks: u64, hz: u64) -> u64 {
        let ticks = ticks.saturating_sub(self.anchor_ticks);
        let ns = scale_up(ticks, NS_PER_SEC * self.divisor(), u128::from(hz));
        self.anchor_ns.saturating_add(ns)
    }

    fn load(&mut self, now: u64, initial: u32) {
        *self = Self {
            initial,
            divide: self.divide,
            armed: initial != 0,
            anchor_ns: now,
            ..Self::default()
        };
    }
}

#[derive(Clone, Copy, Debug)]
pub struct LapicConfig {
    /// The x2APIC ID; xAPIC mode shows its low 8 bits.
    pub apic_id: u32,
    /// Bootstrap processor (IA32_APIC_BASE bit 8).
    pub bsp: bool,
    /// The timer's input clock before the divider.
    pub timer_hz: u64,
    /// The guest TSC's rate.
    pub tsc_hz: u64,
}

/// How an IPI or interrupt message is delivered (ICR bits 10:8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    Fixed,
    LowestPriority,
    Nmi,
    /// INIT (level assert): the target goes to wait-for-SIPI.
    Init,
    /// STARTUP with its vector: a target waiting for SIPI starts at
    /// `vector << 12` in real mode.
    Startup,
}

/// ICR bits 19:18.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shorthand {
    None,
    Self_,
    AllIncludingSelf,
    AllExcludingSelf,
}

/// An IPI as the sender's ICR described it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipi {
    pub vector: u8,
    pub mode: Delivery,
    pub shorthand: Shorthand,
    /// xAPIC: ICR bits 63:56; x2APIC: bits 63:32.
    pub destination: u32,
    pub logical: bool,
}

/// The vCPUs (indices into `lapics`, bit i for vCPU i; at most 64) an IPI
/// from vCPU `sender` reaches: the shorthand's, else those whose APIC
/// accepts the destination. Lowest-priority delivery picks one of them,
/// the one with the lowest processor priority (the first on a tie; SDM
/// Vol. 3A 11.6.2.4 lets the choice be model-specific). Also for
/// interrupt messages from the I/O APIC and MSIs (`sender` past the end,
/// shorthand `None`).
pub fn route<C: Clock>(ipi: &Ipi, sender: usize, lapics: &[&Lapic<C>]) -> u64 {
    let mut targets = 0u64;
    for (i, lapic) in lapics.iter().enumerate().take(64) {
        let hit = match ipi.shorthand {
            Shorthand::None => lapic.accepts_destination(ipi.destination, ipi.logical),
            Shorthand::Self_ => i == sender,
            Shorthand::AllIncludingSelf => true,
            Shorthand::AllExcludingSelf => i != sender,
        };
        if hit {
            targets |= 1 << i;
        }
    }
    if ipi.mode == Delivery::LowestPriority && targets != 0 {
        let chosen = (0..lapics.len().min(64))
            .filter(|i| targets & (1 << i) != 0)
            .min_by_key(|&i| lapics[i].processor_priority() >> 4)
            .unwrap_or(0);
        targets = 1 << chosen;
    }
    targets
}

pub struct Lapic<C: Clock> {
    clock: C,
    config: LapicConfig,
    base_msr: u64,
    tpr: u8,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: VectorSet,
    tmr: VectorSet,
    irr: VectorSet,
    esr: u32,
    esr_pending: u32,
    icr: u64,
    lvt: [u32; LVT_COUNT],
    timer: Timer,
    level_eois: VectorSet,
    tsc_anchor: u64,
    tsc_anchor_ns: u64,
    unsupported_ipis: u64,
    /// IPIs sent through the ICR, for the VMM to deliver ([`route`]).
    outgoing: Vec<Ipi>,
}

impl<C: Clock> Lapic<C> {
    pub fn new(clock: C, config: LapicConfig) -> Self {
        let config = LapicConfig {
            timer_hz: config.timer_hz.max(1),
            tsc_hz: config.tsc_hz.max(1),
            ..config
        };
        let bsp = if config.bsp { BASE_BSP } else { 0 };
        let mut lapic = Self {
            clock,
            config,
            base_msr: DEFAULT_BASE | BASE_ENABLE | bsp,
            tpr: 0,
            ldr: 0,
            dfr: 0,
            svr: 0,
            isr: VectorSet::default(),
            tmr: VectorSet::default(),
            irr: VectorSet::default(),
            esr: 0,
            esr_pending: 0,
            icr: 0,
            lvt: [0; LVT_COUNT],
            timer: Timer::default(),
            level_eois: VectorSet::default(),
            tsc_anchor: 0,
            tsc_anchor_ns: 0,
            unsupported_ipis: 0,
            outgoing: Vec::new(),
        };
        lapic.reset_registers();
        lapic
    }

    /// An INIT: the registers go to their power-up state; the ID and
    /// IA32_APIC_BASE (so the xAPIC or x2APIC mode) stay (SDM Vol. 3A
    /// 10.4.7.3).
    pub fn init(&mut self) {
        self.reset_registers();
        self.outgoing.clear();
        self.level_eois = VectorSet::default();
    }

    /// Power-up state of everything but the ID and IA32_APIC_BASE.
    fn reset_registers(&mut self) {
        self.tpr = 0;
        self.ldr = 0;
        self.dfr = u32::MAX;
        self.svr = SVR_RESET;
        self.isr = VectorSet::default();
        self.tmr = VectorSet::default();
        self.irr = VectorSet::default();
        self.esr = 0;
        self.esr_pending = 0;
        self.icr = 0;
        self.lvt = [LVT_MASKED; LVT_COUNT];
        self.timer = Timer::default();
    }

    fn enabled(&self) -> bool {
        self.base_msr & BASE_ENABLE != 0
    }

    pub fn is_x2apic(&self) -> bool {
        self.base_msr & BASE_X2APIC != 0
    }

    fn software_enabled(&self) -> bool {
        self.svr & SVR_ENABLE != 0
    }

    /// Where the MMIO page is, while the xAPIC interface is on.
    pub fn base_address(&self) -> Option<u64> {
        (self.enabled() && !self.is_x2apic()).then_some(self.base_msr & BASE_ADDRESS)
    }

    pub fn tpr(&self) -> u8 {
        self.tpr
    }

    pub fn set_tpr(&mut self, tpr: u8) {
        self.tpr = tpr;
    }

    pub fn unsupported_ipis(&self) -> u64 {
        self.unsupported_ipis
    }

    /// Tell the model the guest TSC reads `tsc_now` at this instant (after
    /// the guest or the VMM set it); it advances at `tsc_hz` from here.
    pub fn set_guest_tsc(&mut self, tsc_now: u64) {
        self.tsc_anchor = tsc_now;
        self.tsc_anchor_ns = self.clock.now_ns();
    }

    fn guest_tsc(&self, now: u64) -> u64 {
        let ns = now.saturating_sub(self.tsc_anchor_ns);
        let ticks = scale(ns, u128::from(self.config.tsc_hz), NS_PER_SEC);
        self.tsc_anchor.saturating_add(ticks)
    }

    fn ns_at_tsc(&self, tsc: u64) -> u64 {
        let ticks = tsc.saturating_sub(self.tsc_anchor);
        let ns = scale_up(ticks, NS_PER_SEC, u128::from(self.config.tsc_hz));
        self.tsc_anchor_ns.saturating_add(ns)
    }

    fn ppr(&self) -> u8 {
        let in_service = self.isr.highest().unwrap_or(0);
        if self.tpr >> 4 >= in_service >> 4 {
            self.tpr
        } else {
            in_service & 0xf0
        }
    }

    /// An interrupt from the I/O APIC or an MSI; `false` if dropped: the
    /// APIC is disabled (globally or by software) or the vector is illegal.
    pub fn accept(&mut self, vector: u8, level_triggered: bool) -> bool {
        if !(self.enabled() && self.software_enabled()) {
            return false;
        }
        if vector < FIRST_VALID_VECTOR {
            self.signal_error(ESR_RECEIVE_ILLEGAL_VECTOR);
            return false;
        }
        self.irr.set(vector);
        if level_triggered {
            self.tmr.set(vector);
        } else {
            self.tmr.clear(vector);
        }
        true
    }

    fn signal_error(&mut self, error: u32) {
        self.esr_pending |= error;
        let lvt = self.lvt[LVT_ERROR];
        let vector = (lvt & VECTOR) as u8;
        if lvt & LVT_MASKED == 0 && vector >= FIRST_VALID_VECTOR {
            self.accept(vector, false);
        }
    }

    /// The vector to inject now: the highest requested one whose priority
    /// class is above the processor priority.
    pub fn pending_interrupt(&self) -> Option<u8> {
        if !(self.enabled() && self.software_enabled()) {
            return None;
        }
        let vector = self.irr.highest()?;
        (vector >> 4 > self.ppr() >> 4).then_some(vector)
    }

    /// The highest vector requested (IRR) and the highest in service
    /// (ISR), whatever the priorities: for the VMM's state dump.
    pub fn highest_requested_and_in_service(&self) -> (Option<u8>, Option<u8>) {
        (self.irr.highest(), self.isr.highest())
    }

    /// The VMM injected `vector`: it moves from requested to in service.
    pub fn acknowledge(&mut self, vector: u8) {
        if self.irr.contains(vector) {
            self.irr.clear(vector);
            self.isr.set(vector);
        }
    }

    /// End the highest interrupt in service; returns its vector if it was
    /// level-triggered (the I/O APIC must hear of it).
    pub fn eoi(&mut self) -> Option<u8> {
        let vector = self.isr.highest()?;
        self.isr.clear(vector);
        self.tmr.contains(vector).then_some(vector)
    }

    /// A level-triggered vector the guest ended through the EOI register,
    /// for `IoApic::end_of_interrupt`; call until `None`.
    pub fn take_level_eoi(&mut self) -> Option<u8> {
        let vector = self.level_eois.highest()?;
        self.level_eois.clear(vector);
        Some(vector)
    }

    /// When the VMM must wake to fire the timer: if it is armed, unmasked
    /// and its vector is not still waiting in IRR.
    pub fn timer_deadline_ns(&self) -> Option<u64> {
        let lvt = self.lvt[LVT_TIMER];
        // Masked, or its vector still waits in IRR (a guest with
        // interrupts off): a firing would change nothing, and the count
        // catches up at the next poll; the deadline comes back when the
        // vector is taken.
        if !self.enabled() || lvt & LVT_MASKED != 0 || self.irr.contains((lvt & VECTOR) as u8) {
            return None;
        }
        let hz = self.config.timer_hz;
        match timer_mode(lvt) {
            TimerMode::OneShot | TimerMode::Periodic if self.timer.armed => {
                let next = self.timer.fired.checked_add(1)?;
                let ticks = next.checked_mul(u64::from(self.timer.initial))?;
                Some(self.timer.ns_at(ticks, hz))
            }
            TimerMode::TscDeadline if self.timer.tsc_deadline != 0 => {
                Some(self.ns_at_tsc(self.timer.tsc_deadline))
            }
            _ => None,
        }
    }

    /// Fire the timer if it expired: its vector goes to IRR unless masked.
    /// Expiries missed between polls coalesce into one interrupt.
    pub fn poll_timer(&mut self) {
        let now = self.clock.now_ns();
        let lvt = self.lvt[LVT_TIMER];
        let timer = &mut self.timer;
        let expired = match timer_mode(lvt) {
            mode @ (TimerMode::OneShot | TimerMode::Periodic) if timer.armed => {
                let due = timer.elapsed(now, self.config.timer_hz) / u64::from(timer.initial);
                let expired = due > timer.fired;
                if expired {
                    timer.fired = due;
                    timer.armed = mode == TimerMode::Periodic;
                }
                expired
            }
            TimerMode::TscDeadline if timer.tsc_deadline != 0 => {
                let expired = self.guest_tsc(now) >= self.timer.tsc_deadline;
                if expired {
                    self.timer.tsc_deadline = 0;
                }
                expired
            }
            _ => false,
        };
        if expired && lvt & LVT_MASKED == 0 {
            self.accept((lvt & VECTOR) as u8, false);
        }
    }

    fn current_count(&self, now: u64) -> u32 {
        let timer = &self.timer;
        if !timer.armed {
            return 0;
        }
        let initial = u64::from(timer.initial);
        let elapsed = timer.elapsed(now, self.config.timer_hz);
        let count = match timer_mode(self.lvt[LVT_TIMER]) {
            TimerMode::OneShot => initial.saturating_sub(elapsed),
            TimerMode::Periodic => initial - elapsed % initial,
            TimerMode::TscDeadline | TimerMode::Reserved => 0,
        };
        count as u32
    }

    fn write_svr(&mut self, value: u32) {
        self.svr = value;
        if !self.software_enabled() {
            for lvt in &mut self.lvt {
                *lvt |= LVT_MASKED;
            }
        }
    }

    fn write_lvt(&mut self, index: usize, value: u32) {
        let mut value = value & LVT_WRITABLE[index];
        if !self.software_enabled() {
            value |= LVT_MASKED;
        }
        if index == LVT_TIMER {
            let was_deadline = timer_mode(self.lvt[LVT_TIMER]) == TimerMode::TscDeadline;
            if was_deadline != (timer_mode(value) == TimerMode::TscDeadline) {
                // Switching to or from TSC-deadline mode disarms the timer.
                self.timer = Timer {
                    divide: self.timer.divide,
                    ..Timer::default()
                };
            }
        }
        self.lvt[index] = value;
    }

    fn write_divide(&mut self, now: u64, value: u32) {
        let timer = &mut self.timer;
        if timer.armed {
            timer.anchor_ticks = timer.elapsed(now, self.config.timer_hz);
            timer.anchor_ns = now;
        }
        timer.divide = value;
    }

    fn write_tsc_deadline(&mut self, deadline: u64) {
        if self.enabled() && timer_mode(self.lvt[LVT_TIMER]) == TimerMode::TscDeadline {
            self.timer.tsc_deadline = deadline;
            self.poll_timer();
        }
    }

    /// Whether a message to `destination` (physical: an APIC ID; logical:
    /// matched against the LDR in this APIC's destination model) reaches
    /// this APIC, in the mode this APIC is in (xAPIC 8-bit IDs, x2APIC
    /// 32-bit). Broadcast (0xff, 0xffff_ffff) reaches every APIC.
    pub fn accepts_destination(&self, destination: u32, logical: bool) -> bool {
        let id = self.config.apic_id;
        match (self.is_x2apic(), logical) {
            (true, false) => destination == X2APIC_BROADCAST || destination == id,
            (true, true) => {
                let ldr = self.x2apic_ldr();
                destination == X2APIC_BROADCAST
                    || (destination >> 16 == ldr >> 16 && destination & ldr & 0xffff != 0)
            }
            (false, false) => destination == XAPIC_BROADCAST || destination == id & 0xff,
            (false, true) => {
                let ldr = self.ldr >> 24;
                if destination == XAPIC_BROADCAST {
                    true
                } else if self.dfr >> DFR_MODEL_SHIFT == DFR_FLAT {
                    destination & ldr != 0
                } else {
                    destination >> 4 == ldr >> 4 && destination & ldr & 0xf != 0
                }
            }
        }
    }

    fn x2apic_ldr(&self) -> u32 {
        let id = self.config.apic_id;
        ((id >> 4) << 16) | (1 << (id & 0xf))
    }

    fn send_to_self(&mut self, vector: u8) {
        if vector < FIRST_VALID_VECTOR {
            self.signal_error(ESR_SEND_ILLEGAL_VECTOR);
        } else {
            self.accept(vector, false);
        }
    }

    fn send_ipi(&mut self) {
        let low = self.icr as u32;
        let destination = if self.is_x2apic() {
            (self.icr >> 32) as u32
        } else {
            (self.icr >> 56) as u32
        };
        let vector = (low & VECTOR) as u8;
        let shorthand = match (low >> ICR_SHORTHAND_SHIFT) & 0b11 {
            SHORTHAND_NONE => Shorthand::None,
            SHORTHAND_SELF => Shorthand::Self_,
            SHORTHAND_ALL_INCLUDING_SELF => Shorthand::AllIncludingSelf,
            // SHORTHAND_ALL_EXCLUDING_SELF, the last of two bits' values.
            _ => Shorthand::AllExcludingSelf,
        };
        let mode = match (low >> ICR_DELIVERY_MODE_SHIFT) & ICR_DELIVERY_MODE {
            DELIVERY_FIXED => Delivery::Fixed,
            DELIVERY_LOWEST_PRIORITY => Delivery::LowestPriority,
            DELIVERY_NMI => Delivery::Nmi,
            // INIT level de-assert (level 0, level-triggered): only
            // synchronises arbitration IDs on old CPUs; nothing to do.
            DELIVERY_INIT if low & (ICR_LEVEL_ASSERT | ICR_TRIGGER_LEVEL) == ICR_TRIGGER_LEVEL => {
                return
            }
            DELIVERY_INIT => Delivery::Init,
            DELIVERY_STARTUP => Delivery::Startup,
            _ => {
                self.unsupported_ipis = self.unsupported_ipis.wrapping_add(1);
                return;
            }
        };
        if matches!(mode, Delivery::Fixed | Delivery::LowestPriority) && vector < FIRST_VALID_VECTOR
        {
            self.signal_error(ESR_SEND_ILLEGAL_VECTOR);
            return;
        }
        if shorthand == Shorthand::Self_ {
            // The self shorthand is defined for fixed IPIs only.
            match mode {
                Delivery::Fixed => self.send_to_self(vector),
                _ => self.unsupported_ipis = self.unsupported_ipis.wrapping_add(1),
            }
            return;
        }
        if self.outgoing.len() >= MAX_OUTGOING {
            self.unsupported_ipis = self.unsupported_ipis.wrapping_add(1);
            return;
        }
        self.outgoing.push(Ipi {
            vector,
            mode,
            shorthand,
            destination,
            logical: low & ICR_LOGICAL != 0,
        });
    }

    /// An IPI the guest sent through the ICR, oldest first, for the VMM
    /// to deliver to the APICs [`route`] names.
    pub fn take_ipi(&mut self) -> Option<Ipi> {
        (!self.outgoing.is_empty()).then(|| self.outgoing.remove(0))
    }

    /// This APIC's ID (x2APIC form; xAPIC shows the low 8 bits).
    pub fn apic_id(&self) -> u32 {
        self.config.apic_id
    }

    /// The processor priority (PPR), which lowest-priority delivery
    /// compares.
    pub fn processor_priority(&self) -> u8 {
        self.ppr()
    }

    /// Register `reg`'s value; `None` for a register that does not exist or
    /// cannot be read in this mode.
    fn read_register(&self, reg: u32, x2apic: bool) -> Option<u64> {
        let now = self.clock.now_ns();
        let value = match reg {
            reg::ID if x2apic => self.config.apic_id,
            reg::ID => self.config.apic_id << 24,
            reg::VERSION => VERSION,
            reg::TPR => u32::from(self.tpr),
            reg::APR | reg::RRD if !x2apic => 0,
            reg::PPR => u32::from(self.ppr()),
            reg::LDR if x2apic => self.x2apic_ldr(),
            reg::LDR => self.ldr,
            reg::DFR if !x2apic => self.dfr,
            reg::SVR => self.svr,
            r if (reg::ISR..reg::ISR + 8).contains(&r) => self.isr.word(r - reg::ISR),
            r if (reg::TMR..reg::TMR + 8).contains(&r) => self.tmr.word(r - reg::TMR),
            r if (reg::IRR..reg::IRR + 8).contains(&r) => self.irr.word(r - reg::IRR),
            reg::ESR => self.esr,
            reg::ICR if x2apic => return Some(self.icr),
            reg::ICR => self.icr as u32,
            reg::ICR_HIGH if !x2apic => (self.icr >> 32) as u32,
            r if (reg::LVT_TIMER..=reg::LVT_ERROR).contains(&r) => {
                self.lvt[(r - reg::LVT_TIMER) as usize]
            }
            reg::TIMER_INITIAL => self.timer.initial,
            reg::TIMER_CURRENT => self.current_count(now),
            reg::TIMER_DIVIDE => self.timer.divide,
            _ => return None,
        };
        Some(u64::from(value))
    }

    /// Write register `reg`; `false` if x2APIC must raise #GP (no such
    /// register, read-only, or reserved bits set). In xAPIC mode reserved
    /// bits are dropped instead.
    fn write_register(&mut self, reg: u32, value: u64, x2apic: bool) -> bool {
        if x2apic && reg != reg::ICR && value >> 32 != 0 {
            return false;
        }
        let low = value as u32;
        let fits = |writable: u32| !x2apic || low & !writable == 0;
        let now = self.clock.now_ns();
        match reg {
            reg::TPR if fits(TPR_WRITABLE) => self.tpr = low as u8,
            reg::EOI if fits(0) => {
                if let Some(vector) = self.eoi() {
                    self.level_eois.set(vector);
                }
            }
            reg::LDR if !x2apic => self.ldr = low & LDR_XAPIC,
            reg::DFR if !x2apic => self.dfr = low | DFR_RESERVED_ONES,
            reg::SVR if fits(SVR_WRITABLE) => self.write_svr(low & SVR_WRITABLE),
            reg::ESR if fits(0) => {
                self.esr = self.esr_pending;
                self.esr_pending = 0;
            }
            reg::ICR if fits(!ICR_X2APIC_RESERVED) => {
                let high = if x2apic {
                    value & !0xffff_ffff
                } else {
                    self.icr & !0xffff_ffff
                };
                self.icr = high | u64::from(low & ICR_LOW_WRITABLE);
                self.send_ipi();
            }
            reg::ICR_HIGH if !x2apic => {
                self.icr = (self.icr & 0xffff_ffff) | u64::from(low & ICR_HIGH_XAPIC) << 32;
            }
            r if (reg::LVT_TIMER..=reg::LVT_ERROR).contains(&r) => {
                let index = (r - reg::LVT_TIMER) as usize;
                // Read-only status bits may come back in a read-modify-write.
                let allowed = LVT_WRITABLE[index] | LVT_DELIVERY_STATUS | LVT_REMOTE_IRR;
                if !fits(allowed) {
                    return false;
                }
                self.write_lvt(index, low);
            }
            reg::TIMER_INITIAL => {
                if timer_mode(self.lvt[LVT_TIMER]) != TimerMode::TscDeadline {
                    self.timer.load(now, low);
                }
            }
            reg::TIMER_DIVIDE if fits(DIVIDE_WRITABLE) => {
                self.write_divide(now, low & DIVIDE_WRITABLE)
            }
            reg::SELF_IPI if x2apic && fits(VECTOR) => self.send_to_self(low as u8),
            // Read-only or reserved: ignored in xAPIC mode.
            _ => return !x2apic,
        }
        true
    }

    fn write_apic_base(&mut self, value: u64) -> bool {
        let reserved = !(BASE_ADDRESS | BASE_BSP | BASE_X2APIC | BASE_ENABLE);
        let enable = value & BASE_ENABLE != 0;
        let x2apic = value & BASE_X2APIC != 0;
        let invalid = value & reserved != 0
            || (x2apic && !enable)
            // x2APIC is left only through disabled; disabled goes to xAPIC.
            || (self.is_x2apic() && enable && !x2apic)
            || (!self.enabled() && x2apic);
        if invalid {
            return false;
        }
        let was_enabled = self.enabled();
        self.base_msr = (value & !BASE_BSP) | (self.base_msr & BASE_BSP);
        if was_enabled && !enable {
            self.reset_registers();
        }
        true
    }

    /// RDMSR of one of the APIC's MSRs; `None`: inject #GP.
    pub fn read_msr(&mut self, index: u32) -> Option<u64> {
        self.poll_timer();
        match index {
            APIC_BASE_MSR => Some(self.base_msr),
            TSC_DEADLINE_MSR => {
                let deadline_mode = timer_mode(self.lvt[LVT_TIMER]) == TimerMode::TscDeadline;
                Some(if deadline_mode {
                    self.timer.tsc_deadline
                } else {
                    0
                })
            }
            i if X2APIC_MSRS.contains(&i) && self.is_x2apic() => {
                self.read_register(i - X2APIC_MSRS.start(), true)
            }
            _ => None,
        }
    }

    /// WRMSR of one of the APIC's MSRs; `false`: inject #GP.
    pub fn write_msr(&mut self, index: u32, value: u64) -> bool {
        self.poll_timer();
        match index {
            APIC_BASE_MSR => self.write_apic_base(value),
            TSC_DEADLINE_MSR => {
                self.write_tsc_deadline(value);
                true
            }
            i if X2APIC_MSRS.contains(&i) && self.is_x2apic() => {
                let ok = self.write_register(i - X2APIC_MSRS.start(), value, true);
                self.poll_timer();
                ok
            }
            _ => false,
        }
    }

    fn mmio_enabled(&self) -> bool {
        self.enabled() && !self.is_x2apic()
    }
}

/// The register number and byte offset of an MMIO access the xAPIC
/// supports, if any.
fn mmio_register(offset: u64, len: usize) -> Option<(u32, usize)> {
    let within = (offset % 16) as usize;
    let reg = u32::try_from(offset / 16)
        .ok()
        .filter(|_| offset < WINDOW_LEN)?;
    (matches!(len, 1 | 2 | 4) && within + len <= 4).then_some((reg, within))
}

impl<C: Clock> BusDevice for Lapic<C> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match mmio_register(offset, data.len()).filter(|_| self.mmio_enabled()) {
            Some((reg, at)) => {
                self.poll_timer();
                let value = self.read_register(reg, false).unwrap_or(0) as u32;
                data.copy_from_slice(&value.to_le_bytes()[at..at + data.len()]);
            }
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some((reg, 0)), Ok(bytes)) = (mmio_register(offset, data.len()), data.try_into()) {
            if self.mmio_enabled() {
                self.poll_timer();
                self.write_register(reg, u64::from(u32::from_le_bytes(bytes)), false);
                self.poll_timer();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testutil::FakeClock;

    const TIMER_HZ: u64 = 100_000_000;
    const TSC_HZ: u64 = 2_000_000_000;
    const DIVIDE_BY_1: u32 = 0b1011;
    const ID: u32 = 3;

    fn lapic() -> (Lapic<FakeClock>, FakeClock) {
        let clock = FakeClock::default();
        let config = LapicConfig {
            apic_id: ID,
            bsp: true,
            timer_hz: TIMER_HZ,
            tsc_hz: TSC_HZ,
        };
        let mut lapic = Lapic::new(clock.clone(), config);
        write32(&mut lapic, reg::SVR, SVR_ENABLE | 0xff);
        (lapic, clock)
    }

    fn write32(lapic: &mut Lapic<FakeClock>, reg: u32, value: u32) {
        lapic.write(u64::from(reg) * 16, &value.to_le_bytes());
    }

    fn read32(lapic: &mut Lapic<FakeClock>, reg: u32) -> u32 {
        let mut b = [0; 4];
        lapic.read(u64::from(reg) * 16, &mut b);
        u32::from_le_bytes(b)
    }

    /// Inject what is pending, as the VMM does, and return it.
    fn take(lapic: &mut Lapic<FakeClock>) -> Option<u8> {
        lapic.poll_timer();
        let vector = lapic.pending_interrupt()?;
        lapic.acknowledge(vector);
        Some(vector)
    }

    fn to_x2apic(lapic: &mut Lapic<FakeClock>) {
        let base = lapic.read_msr(APIC_BASE_MSR).unwrap();
        assert!(lapic.write_msr(APIC_BASE_MSR, base | BASE_X2APIC));
    }

    #[test]
    fn one_shot_fires_once_at_its_time() {
        let (mut lapic, clock) = lapic();
        write32(&mut lapic, reg::TIMER_DIVIDE, DIVIDE_BY_1);
        write32(&mut lapic, reg::LVT_TIMER, 0xec);
        write32(&mut lapic, reg::TIMER_INITIAL, 1000);
        assert_eq!(lapic.timer_deadline_ns(), Some(10_000));
        clock.0.set(2_500);
        assert_eq!(read32(&mut lapic, reg::TIMER_CURRENT), 750);
        clock.0.set(9_999);
        assert_eq!(take(&mut lapic), None);
        clock.0.set(10_000);
        assert_eq!(take(&mut lapic), Some(0xec));
        assert_eq!(read32(&mut lapic, reg::TIMER_CURRENT), 0);
        assert_eq!(lapic.timer_deadline_ns(), None);
        clock.0.set(50_000);
        lapic.eoi();
        assert_eq!(take(&mut lapic), None, "one shot");
        // Divide by 16 stretches the count.
        write32(&mut lapic, reg::TIMER_DIVIDE, 0b0011);
        write32(&mut lapic, reg::TIMER_INITIAL, 10);
        assert_eq!(lapic.timer_deadline_ns(), Some(50_000 + 1_600));
        write32(&mut lapic, reg::TIMER_INITIAL, 0);
        assert_eq!(lapic.timer_deadline_ns(), None, "zero stops it");
    }

    #[test]
    fn periodic_reloads_and_masking_suppresses() {
        let (mut lapic, clock) = lapic();
        write32(&mut lapic, reg::TIMER_DIVIDE, 0b0000); // by 2
        write32(&mut lapic, reg::LVT_TIMER, 1 << TIMER_MODE_SHIFT | 0xef);
        write32(&mut lapic, reg::TIMER_INITIAL, 500); // 10 µs
        for period in 1..=3u64 {
            assert_eq!(lapic.timer_deadline_ns(), Some(period * 10_000));
            clock.0.set(period * 10_000 - 1);
            assert_eq!(take(&mut lapic), None);
            clock.0.set(period * 10_000);
            assert_eq!(take(&mut lapic), Some(0xef));
            lapic.eoi();
        }
        clock.0.set(32_000);
        assert_eq!(read32(&mut lapic, reg::TIMER_CURRENT), 400);
        write32(
            &mut lapic,
            reg::LVT_TIMER,
            LVT_MASKED | 1 << TIMER_MODE_SHIFT | 0xef,
        );
        assert_eq!(lapic.timer_deadline_ns(), None);
        clock.0.set(75_000);
        assert_eq!(take(&mut lapic), None, "masked");
        write32(&mut lapic, reg::LVT_TIMER, 1 << TIMER_MODE_SHIFT | 0xef);
        assert_eq!(take(&mut lapic), None, "no burst of stale expiries");
        assert_eq!(lapic.timer_deadline_ns(), Some(80_000));
        // Changing the divider mid-period keeps the count.
        write32(&mut lapic, reg::TIMER_DIVIDE, DIVIDE_BY_1);
        assert_eq!(read32(&mut lapic, reg::TIMER_CURRENT), 250);
        assert_eq!(lapic.timer_deadline_ns(), Some(77_500));
    }

    /// A guest that leaves the timer's vector in IRR (interrupts off)
    /// gives the VMM no deadline to wake for until it takes the vector:
    /// a periodic timer of one tick must not keep the VMM busy.
    #[test]
    fn no_deadline_while_the_vector_waits() {
        let (mut lapic, clock) = lapic();
        write32(&mut lapic, reg::TIMER_DIVIDE, DIVIDE_BY_1);
        write32(&mut lapic, reg::LVT_TIMER, 1 << TIMER_MODE_SHIFT | 0xef);
        write32(&mut lapic, reg::TIMER_INITIAL, 1);
        assert!(lapic.timer_deadline_ns().is_some());
        clock.0.set(1_000);
        lapic.poll_timer();
        assert_eq!(lapic.pending_interrupt(), Some(0xef));
        assert_eq!(lapic.timer_deadline_ns(), None, "vector in IRR");
        clock.0.set(2_000);
        lapic.poll_timer();
        lapic.acknowledge(0xef);
        assert!(
            lapic.timer_deadline_ns().is_some_and(|d| d > 2_000),
            "taken: the timer counts on from now"
        );
    }

    #[test]
    fn tsc_deadline_mode() {
        let (mut lapic, clock) = lapic();
        clock.0.set(1_000);
        lapic.set_guest_tsc(1_000_000);
        assert!(lapic.write_msr(TSC_DEADLINE_MSR, 1_004_000));
        assert_eq!(
            lapic.read_msr(TSC_DEADLINE_MSR),
            Some(0),
            "ignored in one-shot"
        );
        write32(&mut lapic, reg::LVT_TIMER, 2 << TIMER_MODE_SHIFT | 0xee);
        write32(&mut lapic, reg::TIMER_INITIAL, 1234);
        assert_eq!(
            read32(&mut lapic, reg::TIMER_INITIAL),
            0,
            "ignored in deadline"
        );
        assert!(lapic.write_msr(TSC_DEADLINE_MSR, 1_004_000));
        assert_eq!(lapic.timer_deadline_ns(), Some(3_000));
        clock.0.set(2_999);
        assert_eq!(take(&mut lapic), None);
        clock.0.set(3_000);
        assert_eq!(take(&mut lapic), Some(0xee));
        assert_eq!(
            lapic.read_msr(TSC_DEADLINE_MSR),
            Some(0),
            "cleared on expiry"
        );
        lapic.eoi();
        // A deadline in the past fires at once.
        assert!(lapic.write_msr(TSC_DEADLINE_MSR, 5));
        assert_eq!(lapic.pending_interrupt(), Some(0xee));
        lapic.acknowledge(0xee);
        lapic.eoi();
        // Leaving deadline mode disarms it.
        assert!(lapic.write_msr(TSC_DEADLINE_MSR, u64::MAX));
        assert!(lapic.timer_deadline_ns().is_some());
        write32(&mut lapic, reg::LVT_TIMER, 0xee);
        assert_eq!(lapic.timer_deadline_ns(), None);
        write32(&mut lapic, reg::LVT_TIMER, 2 << TIMER_MODE_SHIFT | 0xee);
        assert_eq!(lapic.read_msr(TSC_DEADLINE_MSR), Some(0));
    }

    #[test]
    fn priorities_block_lower_classes() {
        let (mut lapic, _) = lapic();
        lapic.set_tpr(0x50);
        assert!(lapic.accept(0x45, false));
        assert!(!lapic.accept(0x0f, false), "illegal vector");
        assert_eq!(lapic.pending_interrupt(), None, "TPR class 5 blocks 0x45");
        lapic.accept(0x61, false);
        assert_eq!(take(&mut lapic), Some(0x61));
        assert_eq!(read32(&mut lapic, reg::PPR), 0x60);
        lapic.accept(0x65, false);
        assert_eq!(lapic.pending_interrupt(), None, "same class as in service");
        lapic.accept(0x91, false);
        assert_eq!(take(&mut lapic), Some(0x91));
        assert_eq!(lapic.eoi(), None, "edge: nothing for the I/O APIC");
        assert_eq!(
            read32(&mut lapic, reg::ISR + 3),
            1 << 1,
            "0x61 still in service"
        );
        lapic.eoi();
        assert_eq!(take(&mut lapic), Some(0x65));
        lapic.eoi();
        lapic.set_tpr(0);
        assert_eq!(take(&mut lapic), Some(0x45));
        assert_eq!(read32(&mut lapic, reg::IRR + 2), 0);
    }

    #[test]
    fn level_eoi_reaches_the_io_apic() {
        let (mut lapic, _) = lapic();
        lapic.accept(0x30, true);
        lapic.accept(0x31, false);
        assert_eq!(read32(&mut lapic, reg::TMR + 1), 1 << 16);
        assert_eq!(take(&mut lapic), Some(0x31));
        assert_eq!(take(&mut lapic), None, "0x30 is the same class");
        write32(&mut lapic, reg::EOI, 0);
        assert_eq!(lapic.take_level_eoi(), None);
        assert_eq!(take(&mut lapic), Some(0x30));
        write32(&mut lapic, reg::EOI, 0);
        assert_eq!(lapic.take_level_eoi(), Some(0x30));
        assert_eq!(lapic.take_level_eoi(), None);
        write32(&mut lapic, reg::EOI, 0);
        assert_eq!(lapic.take_level_eoi(), None, "nothing in service");
    }

    #[test]
    fn self_ipis_errors_and_software_disable() {
        let (mut lapic, _) = lapic();
        assert_eq!(read32(&mut lapic, reg::VERSION), 0x0005_0014);
        // Shorthand self.
        write32(&mut lapic, reg::ICR, 1 << ICR_SHORTHAND_SHIFT | 0x40);
        assert_eq!(take(&mut lapic), Some(0x40));
        lapic.eoi();
        // A destination, even its own ID, is the VMM's to route.
        write32(&mut lapic, reg::ICR_HIGH, ID << 24);
        write32(&mut lapic, reg::ICR, 0x41);
        assert_eq!(take(&mut lapic), None);
        let ipi = lapic.take_ipi().unwrap();
        assert_eq!(ipi.destination, ID);
        assert_eq!(route(&ipi, 0, &[&lapic]), 1);
        assert_eq!(lapic.take_ipi(), None);
        // SMI and an INIT de-assert: nothing queued; SMI is unsupported.
        write32(&mut lapic, reg::ICR, 0x200);
        write32(&mut lapic, reg::ICR, 0x8500);
        assert_eq!(lapic.unsupported_ipis(), 1);
        assert_eq!(lapic.take_ipi(), None);
        // NMI with the self shorthand: only fixed is defined there.
        write32(&mut lapic, reg::ICR, 1 << ICR_SHORTHAND_SHIFT | 0x400);
        assert_eq!(lapic.unsupported_ipis(), 2);
        assert_eq!(take(&mut lapic), None);
        // Illegal vector: error, through the error LVT.
        write32(&mut lapic, reg::LVT_ERROR, 0xfe);
        write32(&mut lapic, reg::ICR, 1 << ICR_SHORTHAND_SHIFT | 0x05);
        assert_eq!(read32(&mut lapic, reg::ESR), 0, "latched by the next write");
        write32(&mut lapic, reg::ESR, 0);
        assert_eq!(read32(&mut lapic, reg::ESR), ESR_SEND_ILLEGAL_VECTOR);
        assert_eq!(take(&mut lapic), Some(0xfe));
        // Software disable masks the LVTs and drops interrupts.
        write32(&mut lapic, reg::SVR, 0xff);
        assert_eq!(read32(&mut lapic, reg::LVT_ERROR), LVT_MASKED | 0xfe);
        assert!(!lapic.accept(0x50, false));
        assert_eq!(lapic.pending_interrupt(), None);
        write32(&mut lapic, reg::LVT_ERROR, 0xfe);
        assert_ne!(read32(&mut lapic, reg::LVT_ERROR) & LVT_MASKED, 0);
    }

    #[test]
    fn xapic_to_x2apic_and_back() {
        let (mut lapic, _) = lapic();
        assert_eq!(lapic.base_address(), Some(DEFAULT_BASE));
        assert_eq!(read32(&mut lapic, reg::ID), ID << 24);
        assert_eq!(lapic.read_msr(0x802), None, "x2APIC MSRs #GP in xAPIC mode");
        let base = lapic.read_msr(APIC_BASE_MSR).unwrap();
        assert_eq!(base, DEFAULT_BASE | BASE_ENABLE | BASE_BSP);
        assert!(!lapic.write_msr(APIC_BASE_MSR, base | 1), "reserved bit");
        assert!(
            !lapic.write_msr(APIC_BASE_MSR, DEFAULT_BASE | BASE_X2APIC),
            "EXTD without EN"
        );
        lapic.write_msr(APIC_BASE_MSR, DEFAULT_BASE | BASE_ENABLE); // BSP stays
        assert_eq!(lapic.read_msr(APIC_BASE_MSR), Some(base));

        to_x2apic(&mut lapic);
        assert_eq!(lapic.base_address(), None);
        assert_eq!(read32(&mut lapic, reg::ID), u32::MAX, "MMIO is off");
        assert_eq!(lapic.read_msr(0x802), Some(u64::from(ID)));
        assert_eq!(lapic.read_msr(0x80d), Some(1 << ID), "derived LDR");
        assert_eq!(lapic.read_msr(0x80f), Some(u64::from(SVR_ENABLE | 0xff)));
        assert!(!lapic.write_msr(APIC_BASE_MSR, base), "x2APIC -> xAPIC");
        assert!(lapic.write_msr(APIC_BASE_MSR, DEFAULT_BASE), "-> disabled");
        assert_eq!(lapic.read_msr(0x802), None);
        assert!(
            !lapic.write_msr(APIC_BASE_MSR, base | BASE_X2APIC),
            "disabled -> x2APIC"
        );
        assert!(lapic.write_msr(APIC_BASE_MSR, base));
        assert_eq!(
            read32(&mut lapic, reg::SVR),
            SVR_RESET,
            "registers were reset"
        );
    }

    #[test]
    fn x2apic_msr_rules() {
        let (mut lapic, _) = lapic();
        to_x2apic(&mut lapic);
        assert!(lapic.write_msr(0x83f, 0x44), "SELF IPI");
        assert_eq!(take(&mut lapic), Some(0x44));
        assert!(!lapic.write_msr(0x80b, 1), "EOI must be zero");
        assert!(lapic.write_msr(0x80b, 0));
        assert_eq!(lapic.read_msr(0x80b), None, "EOI is write-only");
        assert_eq!(lapic.read_msr(0x83f), None, "SELF IPI is write-only");
        assert_eq!(lapic.read_msr(0x80e), None, "no DFR");
        assert_eq!(lapic.read_msr(0x831), None, "no ICR high half");
        assert!(!lapic.write_msr(0x802, 0), "ID is read-only");
        assert!(!lapic.write_msr(0x808, 0x100), "TPR reserved bit");
        assert!(!lapic.write_msr(0x808, 1 << 32), "bits 63:32");
        assert!(!lapic.write_msr(0x832, 1 << 20), "LVT reserved bit");
        assert!(!lapic.write_msr(0x8ff, 0));
        assert!(lapic.write_msr(0x808, 0x20));
        assert_eq!(lapic.tpr(), 0x20);
        // 64-bit ICR with a 32-bit destination.
        assert!(lapic.write_msr(0x830, u64::from(ID) << 32 | 0x45));
        assert_eq!(lapic.read_msr(0x830), Some(u64::from(ID) << 32 | 0x45));
        let ipi = lapic.take_ipi().unwrap();
        assert_eq!((ipi.destination, ipi.vector), (ID, 0x45));
        assert_eq!(route(&ipi, 0, &[&lapic]), 1);
        assert!(lapic.write_msr(0x830, 0x1234_5678 << 32 | 0x46));
        let ipi = lapic.take_ipi().unwrap();
        assert_eq!(route(&ipi, 0, &[&lapic]), 0, "nobody has that ID");
        // Timer through MSRs.
        assert!(lapic.write_msr(0x83e, u64::from(DIVIDE_BY_1)));
        assert!(lapic.write_msr(0x832, 0xe0));
        assert!(lapic.write_msr(0x838, 100));
        assert_eq!(lapic.timer_deadline_ns(), Some(1_000));
        assert!(!lapic.write_msr(0x839, 5), "current count is read-only");
    }

    #[test]
    fn odd_mmio_accesses() {
        let (mut lapic, _) = lapic();
        let mut b = [0u8; 1];
        lapic.read(u64::from(reg::VERSION) * 16 + 2, &mut b);
        assert_eq!(b, [5], "byte read of max LVT");
        let mut q = [0u8; 8];
        lapic.read(u64::from(reg::VERSION) * 16, &mut q);
        assert_eq!(q, [0xff; 8]);
        lapic.read(u64::from(reg::VERSION) * 16 + 4, &mut b);
        assert_eq!(b, [0xff]);
        lapic.write(u64::from(reg::TPR) * 16, &[0x70]);
        assert_eq!(lapic.tpr(), 0, "byte writes ignored");
        lapic.write(u64::from(reg::TPR) * 16 + 4, &[0x70, 0, 0, 0]);
        assert_eq!(lapic.tpr(), 0);
        assert_eq!(read32(&mut lapic, 0x3d), 0, "reserved register");
        lapic.read(WINDOW_LEN, &mut b);
        assert_eq!(b, [0xff]);
        lapic.read(u64::MAX - 1, &mut b);
    }

    #[test]
    fn fuzz_random_accesses() {
        let mut seed = 0xa076_1d64_78bd_642fu64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let (mut lapic, clock) = lapic();
        for _ in 0..50_000 {
            let r = next();
            let value = next();
            let offset = (r >> 8) % 0x1010;
            let len = [1, 2, 4, 4, 4, 8][(r % 6) as usize];
            let mut buf = value.to_le_bytes();
            match (r >> 24) % 12 {
                0 => clock.0.set(clock.0.get().saturating_add(value >> 44)),
                1 => {
                    lapic.accept(value as u8, value & (1 << 9) != 0);
                }
                2 => {
                    take(&mut lapic);
                }
                3 => {
                    lapic.eoi();
                    lapic.take_level_eoi();
                }
                4 => {
                    let index =
                        [0x1b, 0x6e0, 0x800 + (r >> 40) as u32 % 0x100][(r >> 32) as usize % 3];
                    lapic.read_msr(index);
                }
                5 => {
                    let index =
                        [0x1b, 0x6e0, 0x800 + (r >> 40) as u32 % 0x100][(r >> 32) as usize % 3];
                    let value = if r & (1 << 50) != 0 {
                        value & 0xffff_ffff
                    } else {
                        value
                    };
                    lapic.write_msr(index, value);
                }
                6 => lapic.set_tpr(value as u8),
                7 | 8 => lapic.read(offset, &mut buf[..len]),
                _ => {
                    // Mostly aligned 32-bit writes, to reach every register.
                    let offset = if r & (1 << 51) != 0 {
                        offset & !0xf
                    } else {
                        offset
                    };
                    lapic.write(offset, &buf[..len]);
                }
            }
            if let Some(vector) = lapic.pending_interrupt() {
                assert!(vector >= FIRST_VALID_VECTOR);
                assert!(lapic.irr.contains(vector));
                assert!(vector >> 4 > lapic.ppr() >> 4);
            }
            assert_eq!(lapic.base_msr & BASE_BSP, BASE_BSP);
            assert!(lapic.enabled() || !lapic.is_x2apic());
            for vector in 0..FIRST_VALID_VECTOR {
                assert!(!lapic.irr.contains(vector));
            }
            if r & (1 << 52) != 0 {
                lapic.poll_timer();
                assert!(lapic.timer_deadline_ns().is_none_or(|d| d > clock.0.get()));
            }
        }
    }

    /// Four APICs with IDs 0-3, software-enabled, in xAPIC mode.
    fn four() -> Vec<Lapic<FakeClock>> {
        (0..4)
            .map(|id| {
                let config = LapicConfig {
                    apic_id: id,
                    bsp: id == 0,
                    timer_hz: TIMER_HZ,
                    tsc_hz: TSC_HZ,
                };
                let mut lapic = Lapic::new(FakeClock::default(), config);
                write32(&mut lapic, reg::SVR, SVR_ENABLE | 0xff);
                lapic
            })
            .collect()
    }

    /// Writes the ICR of `lapics[from]` (xAPIC: high half first) and
    /// routes what it sent.
    fn send(lapics: &mut [Lapic<FakeClock>], from: usize, high: u32, low: u32) -> u64 {
        write32(&mut lapics[from], reg::ICR_HIGH, high);
        write32(&mut lapics[from], reg::ICR, low);
        let ipi = lapics[from].take_ipi().expect("an IPI to route");
        let all: Vec<&Lapic<FakeClock>> = lapics.iter().collect();
        route(&ipi, from, &all)
    }

    #[test]
    fn ipis_by_shorthand_and_physical_destination() {
        let mut l = four();
        const FIXED: u32 = 0x40;
        assert_eq!(send(&mut l, 1, 2 << 24, FIXED), 0b0100, "physical 2");
        assert_eq!(send(&mut l, 1, 0xff << 24, FIXED), 0b1111, "broadcast");
        assert_eq!(send(&mut l, 1, 9 << 24, FIXED), 0, "no such APIC");
        let all = 2 << ICR_SHORTHAND_SHIFT;
        let others = 3 << ICR_SHORTHAND_SHIFT;
        assert_eq!(send(&mut l, 1, 0, all | FIXED), 0b1111);
        assert_eq!(send(&mut l, 1, 0, others | FIXED), 0b1101);
        // INIT, STARTUP and NMI keep their mode and vector.
        write32(&mut l[0], reg::ICR_HIGH, 3 << 24);
        write32(&mut l[0], reg::ICR, 0x4500);
        write32(&mut l[0], reg::ICR, 0x069a);
        write32(&mut l[0], reg::ICR, others | 0x400);
        let init = l[0].take_ipi().unwrap();
        let sipi = l[0].take_ipi().unwrap();
        let nmi = l[0].take_ipi().unwrap();
        assert_eq!((init.mode, init.destination), (Delivery::Init, 3));
        assert_eq!((sipi.mode, sipi.vector), (Delivery::Startup, 0x9a));
        assert_eq!(
            (nmi.mode, nmi.shorthand),
            (Delivery::Nmi, Shorthand::AllExcludingSelf)
        );
        // A fixed IPI with an illegal vector is an error, not sent.
        write32(&mut l[0], reg::ICR, 0x0005);
        assert_eq!(l[0].take_ipi(), None);
    }

    #[test]
    fn ipis_to_logical_destinations() {
        let mut l = four();
        // xAPIC flat: one bit per APIC (as Linux's flat mode sets it).
        for (id, lapic) in l.iter_mut().enumerate() {
            write32(lapic, reg::DFR, u32::MAX);
            write32(lapic, reg::LDR, 1 << (24 + id));
        }
        let logical = ICR_LOGICAL | 0x40;
        assert_eq!(send(&mut l, 0, 0b1010 << 24, logical), 0b1010);
        assert_eq!(send(&mut l, 0, 0xff << 24, logical), 0b1111);
        // xAPIC cluster: cluster in bits 7:4, members in 3:0.
        for (id, lapic) in l.iter_mut().enumerate() {
            write32(lapic, reg::DFR, 0x0fff_ffff);
            let (cluster, member) = (id as u32 / 2, id as u32 % 2);
            write32(lapic, reg::LDR, (cluster << 4 | 1 << member) << 24);
        }
        assert_eq!(send(&mut l, 0, 0x13 << 24, logical), 0b1100, "cluster 1");
        assert_eq!(send(&mut l, 0, 0x01 << 24, logical), 0b0001, "cluster 0");
        // Lowest priority: one of the matching APICs, the least busy.
        write32(&mut l[2], reg::TPR, 0x80);
        let lowest = ICR_LOGICAL | 0x100 | 0x40;
        assert_eq!(send(&mut l, 0, 0x13 << 24, lowest), 0b1000);
        // x2APIC cluster: cluster ID in 31:16, 16 members in 15:0; the
        // LDR is derived from the ID (cluster id >> 4, bit id & 15).
        for lapic in l.iter_mut() {
            to_x2apic(lapic);
        }
        let icr = |lapic: &mut Lapic<FakeClock>, dest: u64, low: u64| {
            assert!(lapic.write_msr(0x830, dest << 32 | low));
        };
        icr(&mut l[3], 0b0110, u64::from(logical));
        icr(&mut l[3], 2, 0x40);
        icr(&mut l[3], 0xffff_ffff, 0x40);
        let ipis: Vec<Ipi> = (0..3).map(|_| l[3].take_ipi().unwrap()).collect();
        let all: Vec<&Lapic<FakeClock>> = l.iter().collect();
        let targets: Vec<u64> = ipis.iter().map(|ipi| route(ipi, 3, &all)).collect();
        assert_eq!(targets, [0b0110, 0b0100, 0b1111]);
    }
}
