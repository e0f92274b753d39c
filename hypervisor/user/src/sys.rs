//! One safe wrapper per kernel call (hypervisor/abi/README.md documents
//! each), each built from the call's view in `moat_abi::syscall` (which
//! alone knows the registers), plus [`invoke`] for any view and [`raw`]
//! for callers that want to feed the kernel anything.

use core::arch::asm;

use moat_abi::syscall::{
    CapCount, ConsoleLen, ConsoleWrite, Cpu, CreateEc, CreatePd, CreatePt, CreateSc, CreateSm,
    CreateVcpu, Delegate, Exit, IpcCall, IrqAssign, IrqMode, IrqUnmask, MapDevice, MemPhys,
    Register, Reply, Revoke, SmDown, SmUp, Syscall, Unchecked, VcpuPoke, VcpuRun,
};
use moat_abi::{Space, Status};

use crate::Sel;

/// Any `rax` with any six argument registers (`rdi`, `rsi`, `rdx`, `r10`,
/// `r8`, `r9`); returns `rax` and those six registers after the call, as
/// the kernel left them. For fuzzing and probing the kernel.
pub fn raw(rax: u64, args: [u64; 6]) -> (u64, [u64; 6]) {
    let [mut a0, mut a1, mut a2, mut a3, mut a4, mut a5] = args;
    let status: u64;
    // SAFETY: `syscall` enters the kernel, which by the ABI preserves every
    // register except rax (status), rcx and r11 (clobbered by the
    // instruction) and the six argument registers (message words, declared
    // in-out here). The kernel reads and writes user memory only where an
    // argument or the caller's UTCB says, which cannot alias anything the
    // compiler keeps in registers across this block. Calls that do not return
    // (`exit`, a successful `reply`) just never come back here.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") rax => status,
            inlateout("rdi") a0,
            inlateout("rsi") a1,
            inlateout("rdx") a2,
            inlateout("r10") a3,
            inlateout("r8") a4,
            inlateout("r9") a5,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    (status, [a0, a1, a2, a3, a4, a5])
}

/// Makes the call `view` describes; on success, what it returns in the
/// argument registers.
pub fn invoke<V: Syscall>(view: &V) -> Result<V::Output, Status> {
    let (word, args) = view.encode();
    let (rax, regs) = raw(word.encode(), args);
    V::result(rax, regs)
}

/// Writes at most [`moat_abi::CONSOLE_WRITE_MAX`] bytes to the kernel
/// console (see [`crate::console::write`] for any length).
pub fn console_write(bytes: &[u8]) -> Result<(), Status> {
    invoke(&console_bytes(bytes, false))
}

/// Writes at most [`moat_abi::CONSOLE_WRITE_MAX`] bytes to the console as
/// they are (`flags::RAW`): `InsufficientRights` unless this PD holds the
/// console UART's data port ([`moat_abi::CONSOLE_PORT`]).
pub fn console_write_raw(bytes: &[u8]) -> Result<(), Status> {
    invoke(&console_bytes(bytes, true))
}

fn console_bytes(bytes: &[u8], raw: bool) -> ConsoleWrite {
    ConsoleWrite {
        raw,
        address: bytes.as_ptr() as u64,
        len: Unchecked::<ConsoleLen>::from_raw(bytes.len() as u64),
    }
}

/// Ends the calling EC; its exception portal's handler sees an exception
/// message with vector [`moat_abi::EXIT_VECTOR`] and `code`.
pub fn exit(code: i64) -> ! {
    let _ = invoke(&Exit { code: code as u64 });
    // The kernel never returns from `exit`; should it, stop here for good.
    loop {
        core::hint::spin_loop();
    }
}

/// Calls portal `pt` with message words 0–5 (more words and typed items go
/// in the caller's UTCB); returns the reply's words 0–5.
pub fn call(pt: Sel, words: [u64; 6]) -> Result<[u64; 6], Status> {
    invoke(&IpcCall {
        portal: pt,
        nonblock: false,
        words,
    })
}

/// [`call`], failing with `WouldBlock` instead of waiting for a busy handler.
pub fn call_nonblock(pt: Sel, words: [u64; 6]) -> Result<[u64; 6], Status> {
    invoke(&IpcCall {
        portal: pt,
        nonblock: true,
        words,
    })
}

/// Replies to the current call and ends the handler's activation. Returns
/// only with `Aborted` (the caller is gone; reply again to end the
/// activation) or `BadCall` (not handling a call).
pub fn reply(words: [u64; 6]) -> Status {
    invoke(&Reply { words }).err().unwrap_or(Status::Success)
}

/// Creates a PD at `dst`, paid for by `owner`, with `quota_bytes` of
/// `owner`'s kernel-memory quota and room for `capacity` capabilities;
/// its SCs may not run above `ceiling` (0: the caller's own ceiling).
pub fn create_pd(
    dst: Sel,
    owner: Sel,
    quota_bytes: u64,
    capacity: u64,
    ceiling: u8,
) -> Result<(), Status> {
    invoke(&CreatePd {
        dst,
        vm: false,
        user_hypercalls: false,
        owner,
        quota_bytes,
        capacity: Unchecked::from_raw(capacity),
        ceiling: Unchecked::from_raw(u64::from(ceiling)),
    })
}

/// Creates an EC at `dst` in PD `pd`: a global EC that starts at `rip` once
/// an SC is bound, or (`handler`) a portal handler EC entered at each call
/// with `rsp`. The kernel maps its UTCB at `utcb` in `pd`. A global EC is
/// bound to CPU `cpu` (`moat_abi::CPU_OF_CALLER`: the caller's); a handler
/// runs on its callers' CPUs and ignores it. `exception_portal` is a selector in `pd`'s space (`u64::MAX`: none).
#[allow(clippy::too_many_arguments)]
pub fn create_ec(
    dst: Sel,
    pd: Sel,
    handler: bool,
    cpu: u64,
    rip: u64,
    rsp: u64,
    utcb: u64,
    exception_portal: Sel,
    ec_id: u64,
) -> Result<(), Status> {
    invoke(&CreateEc {
        dst,
        handler,
        pd,
        rip,
        rsp,
        utcb: Unchecked::from_raw(utcb & !moat_abi::CPU_OF_CALLER),
        cpu: Cpu::from_bits(utcb | (cpu & moat_abi::CPU_OF_CALLER)),
        exception_portal: Some(exception_portal).filter(|&sel| sel != u64::MAX),
        ec_id,
    })
}

/// Creates a VM (a PD whose memory space is guest-physical) at `dst`, as
/// [`create_pd`] with the caller's ceiling; with `user_hypercalls` guest
/// CPL 3 may make the IPC hypercall too.
pub fn create_vm(
    dst: Sel,
    owner: Sel,
    quota_bytes: u64,
    capacity: u64,
    user_hypercalls: bool,
) -> Result<(), Status> {
    invoke(&CreatePd {
        dst,
        vm: true,
        user_hypercalls,
        owner,
        quota_bytes,
        capacity: Unchecked::from_raw(capacity),
        ceiling: Unchecked::from_raw(0),
    })
}

/// Creates a vCPU of VM `vm` at `dst`, bound to the calling EC's CPU; the
/// kernel maps its state page (`moat_abi::vcpu::VcpuState`) at
/// `state_page` in the caller's PD.
pub fn create_vcpu(dst: Sel, vm: Sel, state_page: u64) -> Result<(), Status> {
    invoke(&CreateVcpu {
        dst,
        vm,
        state: Unchecked::from_raw(state_page),
    })
}

/// Runs `vcpu` until an exit needs the VMM (the state page holds it).
pub fn vcpu_run(vcpu: Sel) -> Result<(), Status> {
    invoke(&VcpuRun { vcpu })
}

/// Makes `vcpu` return from `vcpu_run` soon, from any CPU.
pub fn vcpu_poke(vcpu: Sel) -> Result<(), Status> {
    invoke(&VcpuPoke { vcpu })
}

/// Binds a new SC (`priority` 0..63, `budget_us` per period) at `dst` to
/// the global EC `ec`, which starts running.
pub fn create_sc(
    dst: Sel,
    owner: Sel,
    ec: Sel,
    priority: u8,
    budget_us: u64,
) -> Result<(), Status> {
    invoke(&CreateSc {
        dst,
        owner,
        ec,
        priority: Unchecked::from_raw(u64::from(priority)),
        budget: Unchecked::from_raw(budget_us),
    })
}

/// Creates a portal at `dst` into handler EC `ec`, entered at `rip` with
/// `id` in `rax`.
pub fn create_pt(dst: Sel, owner: Sel, ec: Sel, rip: u64, id: u64) -> Result<(), Status> {
    invoke(&CreatePt {
        dst,
        owner,
        ec,
        entry: rip,
        id,
    })
}

/// Creates a semaphore at `dst` counting from `count`.
pub fn create_sm(dst: Sel, owner: Sel, count: u64) -> Result<(), Status> {
    invoke(&CreateSm { dst, owner, count })
}

pub fn sm_up(sm: Sel) -> Result<(), Status> {
    invoke(&SmUp { sm })
}

/// Counts `sm` down, waiting until it is positive, until the TSC reaches
/// `deadline_tsc` (`Timeout`; 0: no deadline) or, with `nonblock`, not at
/// all (`WouldBlock`).
pub fn sm_down(sm: Sel, deadline_tsc: u64, nonblock: bool) -> Result<(), Status> {
    invoke(&SmDown {
        sm,
        nonblock,
        deadline_tsc,
    })
}

/// Delegates `count` capabilities of `space` from the caller's `src` on to
/// PD `dst_pd`'s `dst` on, with at most `rights`.
pub fn delegate(
    dst_pd: Sel,
    space: Space,
    src: u64,
    dst: u64,
    count: u64,
    rights: u8,
) -> Result<(), Status> {
    invoke(&Delegate {
        dst_pd,
        space: space.into(),
        src,
        dst,
        count: Unchecked::from_raw(count),
        rights: rights.into(),
    })
}

/// Removes everything derived from the caller's `count` capabilities of
/// `space` from `base` on; with `include_self` those capabilities too. A
/// count or range the kernel refuses is `BadParameter` without a call.
pub fn revoke(space: Space, base: u64, count: u64, include_self: bool) -> Result<(), Status> {
    let count = CapCount::from_register(count)?;
    if base.checked_add(u64::from(count.get())).is_none() {
        return Err(Status::BadParameter);
    }
    invoke(&Revoke {
        include_self,
        space,
        base,
        count,
    })
}

/// Routes interrupt `gsi` to semaphore `sm` (`flags` bit 0 level-triggered,
/// bit 1 active low).
pub fn irq_assign(sm: Sel, gsi: u64, flags: u64) -> Result<(), Status> {
    invoke(&IrqAssign {
        sm,
        key: gsi,
        mode: Unchecked::<IrqMode>::from_raw(flags),
    })
    .map(|_| ())
}

/// Routes MSI `key` (`moat_abi::MSI_FIRST + n`) to `sm`; returns the MSI
/// address and data the device must write to raise it.
pub fn irq_assign_msi(sm: Sel, key: u64) -> Result<(u64, u64), Status> {
    let message = invoke(&IrqAssign {
        sm,
        key,
        mode: IrqMode::empty().into(),
    })?;
    Ok((message.address, message.data))
}

/// Root task only: makes capabilities for `count` device pages from
/// physical page `first_frame` on, mapped uncached at page `vpn`.
pub fn map_device(first_frame: u64, vpn: u64, count: u64) -> Result<(), Status> {
    invoke(&MapDevice {
        first_frame,
        vpn,
        count: Unchecked::from_raw(count),
    })
}

/// The physical address of the caller's page `vpn` (its capability must
/// carry `MEM_DMA`).
pub fn mem_phys(vpn: u64) -> Result<u64, Status> {
    invoke(&MemPhys { vpn })
}

pub fn irq_unmask(gsi: u64) -> Result<(), Status> {
    invoke(&IrqUnmask { key: gsi })
}
