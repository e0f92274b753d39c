//! A typed view of every call's arguments, used on both sides: the user
//! runtime builds a view and [`Syscall::encode`]s it into `rax` and the six
//! argument registers; the kernel [`Syscall::decode`]s those registers into
//! the same view. The register a value travels in is written here only
//! (README.md's tables say the same for readers; a host test holds them to
//! it).
//!
//! An argument that has a range is an [`Unchecked`] of its type: the
//! kernel checks it at the point of the call where it always has — after
//! the capability lookups that come first — so a call with a bad
//! capability and a bad value still fails for the capability. Only checks
//! that come before anything else (`revoke`'s) make `decode` itself fail.
//! Flag bits a call does not use are ignored, as are the selector of a
//! call that names no object and the registers it does not read.

use core::marker::PhantomData;

use crate::{
    flags, layout, Call, CallWord, Space, Status, CONSOLE_WRITE_MAX, CPU_OF_CALLER, PAGE_SIZE,
    PRIORITIES,
};

/// A selector in the caller's object space (or, for `exception_portal`,
/// in the new EC's PD's). Any value may be passed: one that names nothing
/// fails the lookup.
pub type Sel = u64;

/// One call's arguments.
pub trait Syscall: Sized {
    const CALL: Call;
    /// What the argument registers hold after the call succeeded.
    type Output;

    fn encode(&self) -> (CallWord, [u64; 6]);

    /// The kernel's reading of the registers; `BadCall` if `word` is
    /// another call's.
    fn decode(word: CallWord, args: [u64; 6]) -> Result<Self, Status>;

    /// The caller's reading of the registers after a successful call.
    fn output(regs: [u64; 6]) -> Self::Output;

    /// The kernel's writing of them: only the registers the output names
    /// change.
    fn write_output(_output: &Self::Output, _regs: &mut [u64; 6]) {}

    /// The caller's reading of `rax` and the registers after the call: a
    /// code this ABI does not know is a failure (`BadCall`).
    fn result(rax: u64, regs: [u64; 6]) -> Result<Self::Output, Status> {
        match Status::from_code(rax) {
            Ok(Status::Success) => Ok(Self::output(regs)),
            Ok(error) => Err(error),
            Err(_) => Err(Status::BadCall),
        }
    }
}

/// A value that fits one argument register, and the status a register
/// that holds no such value fails with.
pub trait Register: Sized + Copy {
    fn from_register(raw: u64) -> Result<Self, Status>;
    fn to_register(self) -> u64;
}

/// An argument as the caller put it in its register, read as a `T` when
/// the kernel comes to check it ([`Unchecked::check`]). Built from a `T`
/// it always checks; [`Unchecked::from_raw`] passes anything, for a
/// caller that leaves the check to the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unchecked<T> {
    raw: u64,
    kind: PhantomData<T>,
}

impl<T: Register> Unchecked<T> {
    pub const fn from_raw(raw: u64) -> Self {
        Self {
            raw,
            kind: PhantomData,
        }
    }

    pub const fn raw(self) -> u64 {
        self.raw
    }

    pub fn check(self) -> Result<T, Status> {
        T::from_register(self.raw)
    }
}

impl<T: Register> From<T> for Unchecked<T> {
    fn from(value: T) -> Self {
        Self::from_raw(value.to_register())
    }
}

/// An integer type limited to `MIN..=MAX`; a register outside fails with
/// the given status.
macro_rules! bounded {
    ($(#[$doc:meta])* $name:ident($inner:ty), $min:expr, $max:expr, $status:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
        pub struct $name($inner);

        impl $name {
            pub const MIN: $inner = $min;
            pub const MAX: $inner = $max;

            pub const fn new(value: $inner) -> Option<Self> {
                if value >= Self::MIN && value <= Self::MAX {
                    Some(Self(value))
                } else {
                    None
                }
            }

            pub const fn get(self) -> $inner {
                self.0
            }
        }

        impl Register for $name {
            fn from_register(raw: u64) -> Result<Self, Status> {
                <$inner>::try_from(raw)
                    .ok()
                    .and_then(Self::new)
                    .ok_or($status)
            }

            fn to_register(self) -> u64 {
                u64::from(self.0)
            }
        }
    };
}

bounded!(
    /// `console_write`: bytes in one call.
    ConsoleLen(u16),
    0,
    CONSOLE_WRITE_MAX as u16,
    Status::BadParameter
);
bounded!(
    /// A scheduling priority, 0 (lowest) to 63.
    Priority(u8),
    0,
    PRIORITIES - 1,
    Status::BadParameter
);
bounded!(
    /// `create_pd`: the new PD's priority ceiling; 0 gives it the
    /// caller's. Above the caller's own ceiling (at most 63) is
    /// `InsufficientRights`.
    Ceiling(u8),
    0,
    PRIORITIES - 1,
    Status::InsufficientRights
);
bounded!(
    /// `create_pd`: capabilities the new PD's object space holds.
    Capacity(u32),
    1,
    1 << 20,
    Status::BadParameter
);
bounded!(
    /// `create_sc`: budget per period in microseconds (at most 10 s).
    BudgetUs(u32),
    1,
    10_000_000,
    Status::BadParameter
);
bounded!(
    /// `delegate`, `revoke`: capabilities in one call.
    CapCount(u32),
    1,
    65536,
    Status::BadParameter
);
bounded!(
    /// `map_device`: pages in one call.
    DevicePages(u16),
    1,
    512,
    Status::BadParameter
);

/// A rights mask (`crate::rights`), whose meaning depends on the space.
impl Register for u8 {
    fn from_register(raw: u64) -> Result<Self, Status> {
        u8::try_from(raw).map_err(|_| Status::BadParameter)
    }

    fn to_register(self) -> u64 {
        u64::from(self)
    }
}

impl Register for Space {
    fn from_register(raw: u64) -> Result<Self, Status> {
        Space::try_from(raw)
    }

    fn to_register(self) -> u64 {
        self as u64
    }
}

bitflags::bitflags! {
    /// `irq_assign`: how a GSI signals (0 for an MSI or the debug event).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct IrqMode: u8 {
        const LEVEL = 1 << 0;
        const ACTIVE_LOW = 1 << 1;
    }
}

impl Register for IrqMode {
    fn from_register(raw: u64) -> Result<Self, Status> {
        u8::try_from(raw)
            .ok()
            .and_then(IrqMode::from_bits)
            .ok_or(Status::BadParameter)
    }

    fn to_register(self) -> u64 {
        u64::from(self.bits())
    }
}

/// A page-aligned user address the kernel maps a page of its own at (a
/// UTCB, a vCPU state page): `PAGE_SIZE..layout::USER_END`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserPage(u64);

impl UserPage {
    pub const fn new(address: u64) -> Option<Self> {
        if address.is_multiple_of(PAGE_SIZE) && address >= PAGE_SIZE && address < layout::USER_END {
            Some(Self(address))
        } else {
            None
        }
    }

    pub const fn address(self) -> u64 {
        self.0
    }
}

impl Register for UserPage {
    fn from_register(raw: u64) -> Result<Self, Status> {
        Self::new(raw).ok_or(Status::BadParameter)
    }

    fn to_register(self) -> u64 {
        self.0
    }
}

/// `create_ec`: the CPU a global EC is bound to, in the low 12 bits of the
/// UTCB address (as in NOVA). Whether it schedules is the kernel's check
/// (`BadCpu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cpu {
    /// The calling EC's CPU ([`CPU_OF_CALLER`]).
    OfCaller,
    /// CPU `n`, `n` below [`CPU_OF_CALLER`].
    Number(u16),
}

impl Cpu {
    /// The CPU the low 12 bits of `bits` name.
    pub const fn from_bits(bits: u64) -> Self {
        match bits & CPU_OF_CALLER {
            CPU_OF_CALLER => Cpu::OfCaller,
            n => Cpu::Number(n as u16),
        }
    }

    pub const fn bits(self) -> u64 {
        match self {
            Cpu::OfCaller => CPU_OF_CALLER,
            Cpu::Number(n) => n as u64 & CPU_OF_CALLER,
        }
    }
}

fn flag(set: bool, bit: u8) -> u8 {
    if set {
        bit
    } else {
        0
    }
}

fn has(word: CallWord, bit: u8) -> bool {
    word.flags & bit != 0
}

fn expect(word: CallWord, call: Call) -> Result<(), Status> {
    if word.number == call.number() {
        Ok(())
    } else {
        Err(Status::BadCall)
    }
}

/// The `Syscall` impl of a call that returns nothing in the registers.
macro_rules! no_output {
    () => {
        type Output = ();
        fn output(_regs: [u64; 6]) {}
    };
}

/// `console_write`: `len` bytes at `address` to the kernel console; `raw`
/// as they are (needs COM1's data port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsoleWrite {
    pub raw: bool,
    pub address: u64,
    pub len: Unchecked<ConsoleLen>,
}

impl Syscall for ConsoleWrite {
    const CALL: Call = Call::ConsoleWrite;
    no_output!();

    fn encode(&self) -> (CallWord, [u64; 6]) {
        let word = CallWord::new(Self::CALL, flag(self.raw, flags::RAW), 0);
        (word, [self.address, self.len.raw(), 0, 0, 0, 0])
    }

    fn decode(word: CallWord, args: [u64; 6]) -> Result<Self, Status> {
        expect(word, Self::CALL)?;
        Ok(Self {
            raw: has(word, flags::RAW),
            address: args[0],
            len: Unchecked::from_raw(args[1]),
        })
    }
}

/// `exit`: ends the calling EC with `code`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    pub code: u64,
}

impl Syscall for Exit {
    const CALL: Call = Call::Exit;
    no_output!();

    fn encode(&self) -> (CallWord, [u64; 6]) {
        (CallWord::new(Self::CALL, 0, 0), [self.code, 0, 0, 0, 0, 0])
    }

    fn decode(word: CallWord, args: [u64; 6]) -> Result<Self, Status> {
        expect(word, Self::CALL)?;
        Ok(Self { code: args[0] })
    }
}

/// `call`: message words 0–5 to `portal`; the reply's words come back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpcCall {
    pub portal: Sel,
    pub nonblock: bool,
    pub words: [u64; 6],
}

impl Syscall for IpcCall {
    const CALL: Call = Call::Call;
    type Output = [u64; 6];

    fn encode(&self) -> (CallWord, [u64; 6]) {
        let word = CallWord::new(
            Self::CALL,
            flag(self.nonblock, flags::NONBLOCK),
            self.portal,
        );
        (word, self.words)
    }

    fn decode(word: CallWord, args: [u64; 6]) -> Result<Self, Status> {
        expect(word, Self::CALL)?;
        Ok(Self {
            portal: word.selector,
            nonblock: has(word, flags::NONBLOCK),
            words: args,
        })
    }

    fn output(regs: [u64; 6]) -> [u64; 6] {
        regs
    }

    fn write_output(output: &[u64; 6], regs: &mut [u64; 6]) {
        *regs = *output;
    }
}

/// `reply`: words 0–5 to the caller; ends the handler's activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    pub words: [u64; 6],
}

impl Syscall for Reply {
    const CALL: Call = Call::Reply;
    no_output!();

    fn encode(&self) -> (CallWord, [u64; 6]) {
        (CallWord::new(Self::CALL, 0, 0), self.words)
    }

    fn decode(word: CallWord, args: [u64; 6]) -> Result<Self, Status> {
        expect(word, Self::CALL)?;
        Ok(Self { words: args })
    }
}

/// `create_pd`: a PD (a VM with `vm`) at `dst`, paid for by `owner`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreatePd {
    pub dst: Sel,
    pub vm: bool,
    pub user_hypercalls: bool,
    pub owner: Sel,
    pub quota_bytes: u64,
    pub capacity: Unchecked<Capacity>,
    pub ceiling: Unchecked<Ceiling>,
}

impl Syscall for CreatePd {
    const CALL: Call = Call::CreatePd;
    no_output!();

    fn encode(&self) -> (CallWord, [u64; 6]) {
        let bits = flag(self.vm, flags::VM) | flag(self.user_hypercalls, flags::USER_HYPERCALLS);
        let word = CallWord::new(Self::CALL, bits, self.dst);
        let args = [
            self.owner,
            self.quota_bytes,
            self.capacity.raw(),
            self.ceiling.raw(),
            0,
            0,
        ];
        (word, args)
    }

    fn decode(word: CallWord, args: [u64; 6]) -> Result<Self, Status> {
        expect(word, Self::CALL)?;
        Ok(Self {
            dst: word.selector,
            vm: has(word, flags::VM),
            user_hypercalls: has(word, flags::USER_HYPERCALLS),
            owner: args[0],
            quota_bytes: args[1],
            capacity: Unchecked::from_raw(args[2]),
            ceiling: Unchecked::from_raw(args[3]),
        })
    }
}

/// `create_ec`: a global EC (or, with `handler`, a portal handler) at
/// `dst` in PD `pd`, its UTCB at `utcb` there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreateEc {
    pub dst: Sel,
    pub handler: bool,
    pub pd: Sel,
    pub rip: u64,
    pub rsp: u64,
    /// The page part of the register (its low 12 bits are `cpu`).
    pub utcb: Unchecked<UserPage>,
    pub cpu: Cpu,
    /// A selector in `pd`'s object space, looked up when the EC faults.
    pub exception_portal: Option<Sel>,
    pub ec_id: u64,
}

impl Syscall for CreateEc {
    const CALL: Call = Call::CreateEc;
    no_output!();

    fn encode(&self) -> (CallWord, [u64; 6]) {
        let word = CallWord::new(Self::CALL, flag(self.handler, flags::HANDLER), self.dst);
        let args = [
            self.pd,
            self.rip,
            self.rsp,
            self.utcb.raw() & !CPU_OF_CALLER | self.cpu.bits(),
            self.exception_portal.unwrap_or(u64::MAX),
            self.ec_id,
        ];
        (word, args)
    }

    fn decode(word: CallWord, args: [u64; 6]) -> Result<Self, Status> {
        expect(word, Self::CALL)?;
        Ok(Self {
            dst: word.selector,
            handler: has(word, flags::HANDLER),
            pd: args[0],
            rip: args[1],
            rsp: args[2],
            utcb: Unchecked::from_raw(args[3] & !CPU_OF_CALLER),
            cpu: Cpu::from_bits(args[3]),
            exception_portal: Some(args[4]).filter(|&sel| sel != u64::MAX),
            ec_id: args[5],
        })
    }
}

/// `create_sc`: an SC at `dst` bound to the global EC `ec`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreateSc {
    pub dst: Sel,
    pub owner: Sel,
    pub ec: Sel,
    pub priority: Unchecked<Priority>,
    pub budget: Unchecked<BudgetUs>,
}

impl Syscall for CreateSc {
    const CALL: Call = Call::CreateSc;
    no_output!();

    fn encode(&self) -> (CallWord, [u64; 6]) {
        let word = CallWord::new(Self::CALL, 0, self.dst);
        let args = [
            self.owner,
            self.ec,
            self.priority.raw(),
            self.budget.raw(),
            0,
            0,
        ];
        (word, args)
    }

    fn decode(word: CallWord, args: [u64; 6]) -> Result<Self, Status> {
        expect(word, Self::CALL)?;
        Ok(Self {
            dst: word.selector,
            owner: args[0],
            ec: args[1],
            priority: Unchecked::from_raw(args[2]),
            budget: Unchecked::from_raw(args[3]),
        })
    }
}

/// `create_pt`: a portal at `dst` into the handler EC `ec`, entered at
/// `entry` with `id` in `rax`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreatePt {
    pub dst: Sel,
    pub owner: Sel,
    pub ec: Sel,
    pub entry: u64,
    pub id: u64,
}

impl Syscall for CreatePt {
    const CALL: Call = Call::CreatePt;
    no_output!();

    fn encode(&self) -> (CallWord, [u64; 6]) {
        let word = CallWord::new(Self::CALL, 0, self.dst);
        (word, [self.owner, self.ec, self.entry, self.id, 0, 0])
    }

    fn decode(word: CallWord, args: [u64; 6]) -> Result<Self, Status> {
        expect(word, Self::CALL)?;
        Ok(Self {
            dst: word.selector,
            owner: args[0],
            ec: args[1],
            entry: args[2],
            id: args[3],
        })
    }
}

/// `create_sm`: a semaphore at `dst` counting from `count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreateSm {
    pub dst: Sel,
    pub owner: Sel,
    pub count: u64,
}

impl Syscall for CreateSm {
    const CALL: Call = Call::CreateSm;
    no_output!();

    fn encode(&self) -> (CallWord, [u64; 6]) {
        let word = CallWord::new(Self::CALL, 0, self.dst);
        (word, [self.owner, self.count, 0, 0, 0, 0])
    }

    fn decode(word: CallWord, args: [u64; 6]) -> Result<Self, Status> {
        expect(word, Self::CALL)?;
        Ok(Self {
            dst: word.selector,
            owner: args[0],
            count: args[1],
        })
    }
}

/// `sm_up`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmUp {
    pub sm: Sel,
}

impl Syscall for SmUp {
    const CALL: Call = Call::SmUp;
    no_output!();

    fn encode(&self) -> (CallWord, [u64; 6]) {
        (CallWord::new(Self::CALL, 0, self.sm), [0; 6])
    }

    fn decode(word: CallWord, _args: [u64; 6]) -> Result<Self, Status> {
        expect(word, Self::CALL)?;
        Ok(Self { sm: word.selector })
    }
}

/// `sm_down`: until the TSC reaches `deadline_tsc` (0: no deadline), or
/// with `nonblock` not at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmDown {
    pub sm: Sel,
    pub nonblock: bool,
    pub deadline_tsc: u64,
}

impl Syscall for SmDown {
    const CALL: Call = Call::SmDown;
    no_output!();

    fn encode(&self) -> (CallWord, [u64; 6]) {
        let word = CallWord::new(Self::CALL, flag(self.nonblock, flags::NONBLOCK), self.sm);
        (word, [self.deadline_tsc, 0, 0, 0, 0, 0])
    }

    fn decode(word: CallWord, args: [u64; 6]) -> Result<Self, Status> {
        expect(word, Self::CALL)?;
        Ok(Self {
            sm: word.selector,
            nonblock: has(word, flags::NONBLOCK),
            deadline_tsc: args[0],
        })
    }
}

/// `delegate`: `count` capabilities of `space` from the caller's `src` on
/// to PD `dst_pd`'s `dst` on, with at most `rights`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delegate {
    pub dst_pd: Sel,
    pub space: Unchecked<Space>,
    pub src: u64,
    pub dst: u64,
    pub count: Unchecked<CapCount>,
    pub rights: Unchecked<u8>,
}

impl Syscall for Delegate {
    const CALL: Call = Call::Delegate;
    no_output!();

    fn encode(&self) -> (CallWord, [u64; 6]) {
        let word = CallWord::new(Self::CALL, 0, self.dst_pd);
        let args = [
            self.space.raw(),
            self.src,
            self.dst,
            self.count.raw(),
            self.rights.raw(),
            0,
        ];
        (word, args)
    }

    fn decode(word: CallWord, args: [u64; 6]) -> Result<Self, Status> {
        expect(word, Self::CALL)?;
        Ok(Self {
            dst_pd: word.selector,
            space: Unchecked::from_raw(args[0]),
            src: args[1],
            dst: args[2],
            count: Unchecked::from_raw(args[3]),
            rights: Unchecked::from_raw(args[4]),
        })
    }
}

/// `revoke`: what was derived from the caller's `count` capabilities of
/// `space` from `base` on (and with `include_self` those too). Its checks
/// come first, so `decode` makes them: a bad space or count, or a range
/// past the end of the keys, is `BadParameter`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Revoke {
    pub include_self: bool,
    pub space: Space,
    pub base: u64,
    pub count: CapCount,
}

impl Syscall for Revoke {
    const CALL: Call = Call::Revoke;
    no_output!();

    fn encode(&self) -> (CallWord, [u64; 6]) {
        let word = CallWord::new(Self::CALL, flag(self.include_self, flags::SELF), 0);
        let args = [
            self.space.to_register(),
            self.base,
            self.count.to_register(),
            0,
            0,
            0,
        ];
        (word, args)
    }

    fn decode(word: CallWord, args: [u64; 6]) -> Result<Self, Status> {
        expect(word, Self::CALL)?;
        let space = Space::from_register(args[0])?;
        let count = CapCount::from_register(args[2])?;
        let base = args[1];
        base.checked_add(u64::from(count.get()))
            .ok_or(Status::BadParameter)?;
        Ok(Self {
            include_self: has(word, flags::SELF),
            space,
            base,
            count,
        })
    }
}

/// `irq_assign`: interrupt `key` (a GSI, the debug event or an MSI) ups
/// semaphore `sm`. For an MSI the output is the message that raises it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqAssign {
    pub sm: Sel,
    pub key: u64,
    pub mode: Unchecked<IrqMode>,
}

/// `irq_assign` of an MSI: what a device writes, and where, to raise it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u64,
}

impl Syscall for IrqAssign {
    const CALL: Call = Call::IrqAssign;
    /// Meaningful for an MSI only; for a GSI the registers are preserved.
    type Output = MsiMessage;

    fn encode(&self) -> (CallWord, [u64; 6]) {
        let word = CallWord::new(Self::CALL, 0, self.sm);
        (word, [self.key, self.mode.raw(), 0, 0, 0, 0])
    }

    fn decode(word: CallWord, args: [u64; 6]) -> Result<Self, Status> {
        expect(word, Self::CALL)?;
        Ok(Self {
            sm: word.selector,
            key: args[0],
            mode: Unchecked::from_raw(args[1]),
        })
    }

    fn output(regs: [u64; 6]) -> MsiMessage {
        MsiMessage {
            address: regs[0],
            data: regs[1],
        }
    }

    fn write_output(output: &MsiMessage, regs: &mut [u64; 6]) {
        regs[0] = output.address;
        regs[1] = output.data;
    }
}

/// `irq_unmask`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqUnmask {
    pub key: u64,
}

impl Syscall for IrqUnmask {
    const CALL: Call = Call::IrqUnmask;
    no_output!();

    fn encode(&self) -> (CallWord, [u64; 6]) {
        (CallWord::new(Self::CALL, 0, 0), [self.key, 0, 0, 0, 0, 0])
    }

    fn decode(word: CallWord, args: [u64; 6]) -> Result<Self, Status> {
        expect(word, Self::CALL)?;
        Ok(Self { key: args[0] })
    }
}

/// `create_vcpu`: a vCPU of VM `vm` at `dst`, its state page mapped at
/// `state` in the caller's PD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreateVcpu {
    pub dst: Sel,
    pub vm: Sel,
    pub state: Unchecked<UserPage>,
}

impl Syscall for CreateVcpu {
    const CALL: Call = Call::CreateVcpu;
    no_output!();

    fn encode(&self) -> (CallWord, [u64; 6]) {
        let word = CallWord::new(Self::CALL, 0, self.dst);
        (word, [self.vm, self.state.raw(), 0, 0, 0, 0])
    }

    fn decode(word: CallWord, args: [u64; 6]) -> Result<Self, Status> {
        expect(word, Self::CALL)?;
        Ok(Self {
            dst: word.selector,
            vm: args[0],
            state: Unchecked::from_raw(args[1]),
        })
    }
}

/// `vcpu_run` and `vcpu_poke` name only the vCPU.
macro_rules! vcpu_call {
    ($(#[$doc:meta])* $name:ident, $call:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct $name {
            pub vcpu: Sel,
        }

        impl Syscall for $name {
            const CALL: Call = $call;
            no_output!();

            fn encode(&self) -> (CallWord, [u64; 6]) {
                (CallWord::new(Self::CALL, 0, self.vcpu), [0; 6])
            }

            fn decode(word: CallWord, _args: [u64; 6]) -> Result<Self, Status> {
                expect(word, Self::CALL)?;
                Ok(Self { vcpu: word.selector })
            }
        }
    };
}

vcpu_call!(
    /// `vcpu_run`: enter the guest until an exit needs the VMM.
    VcpuRun,
    Call::VcpuRun
);
vcpu_call!(
    /// `vcpu_poke`: make the vCPU return from `vcpu_run` soon.
    VcpuPoke,
    Call::VcpuPoke
);

/// `map_device`: capabilities for `count` device pages from physical page
/// `first_frame` on, mapped at page `vpn` of the caller's space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapDevice {
    pub first_frame: u64,
    pub vpn: u64,
    pub count: Unchecked<DevicePages>,
}

impl MapDevice {
    /// The count, if both ranges fit the address space (else
    /// `BadParameter`); whether the frames are device memory is the
    /// kernel's check.
    pub fn checked_count(&self) -> Result<DevicePages, Status> {
        let count = self.count.check()?;
        let pages = u64::from(count.get());
        self.first_frame
            .checked_add(pages)
            .and_then(|end| end.checked_mul(PAGE_SIZE))
            .ok_or(Status::BadParameter)?;
        self.vpn.checked_add(pages).ok_or(Status::BadParameter)?;
        Ok(count)
    }
}

impl Syscall for MapDevice {
    const CALL: Call = Call::MapDevice;
    no_output!();

    fn encode(&self) -> (CallWord, [u64; 6]) {
        let word = CallWord::new(Self::CALL, 0, 0);
        (
            word,
            [self.first_frame, self.vpn, self.count.raw(), 0, 0, 0],
        )
    }

    fn decode(word: CallWord, args: [u64; 6]) -> Result<Self, Status> {
        expect(word, Self::CALL)?;
        Ok(Self {
            first_frame: args[0],
            vpn: args[1],
            count: Unchecked::from_raw(args[2]),
        })
    }
}

/// `mem_phys`: the physical address of the caller's page `vpn`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemPhys {
    pub vpn: u64,
}

impl Syscall for MemPhys {
    const CALL: Call = Call::MemPhys;
    type Output = u64;

    fn encode(&self) -> (CallWord, [u64; 6]) {
        (CallWord::new(Self::CALL, 0, 0), [self.vpn, 0, 0, 0, 0, 0])
    }

    fn decode(word: CallWord, args: [u64; 6]) -> Result<Self, Status> {
        expect(word, Self::CALL)?;
        Ok(Self { vpn: args[0] })
    }

    fn output(regs: [u64; 6]) -> u64 {
        regs[0]
    }

    fn write_output(output: &u64, regs: &mut [u64; 6]) {
        regs[0] = *output;
    }
}

#[cfg(test)]
mod tests;
