//! What decodes untrusted words at the kernel's edges: the ABI's call
//! words, every call's typed view of its registers, statuses, typed items
//! and exception messages (from any task's registers and UTCB), the kernel's event conversion (from a VMM's
//! vCPU state page) and its VM-exit decoding, and the ELF parser the
//! kernel and root task load tasks with.

use arbitrary::{Arbitrary, Unstructured};
use core::fmt::Debug;
use moat_abi::syscall::{
    ConsoleWrite, CreateEc, CreatePd, CreatePt, CreateSc, CreateSm, CreateVcpu, Delegate, Exit,
    IpcCall, IrqAssign, IrqUnmask, MapDevice, MemPhys, Reply, Revoke, SmDown, SmUp, Syscall,
    VcpuPoke, VcpuRun,
};
use moat_abi::vcpu::Inject;
use moat_abi::{Call, CallWord, Space, Status};
use moat_abi::{ExceptionMessage, TypedItem};
use moat_kernel::elf::ElfImage;
use moat_kernel::virt::event::Event;
use moat_kernel::virt::exit::{decode_svm, decode_vmx, SvmExitInfo, VmxExitInfo};

#[derive(Arbitrary, Debug)]
struct Words {
    rax: u64,
    status: u64,
    space: u64,
    item: [u64; 3],
    message: [u64; 6],
    inject: (u8, u8, u8, u8, u32),
    args: [u64; 6],
}

/// A call's view of `word` and `args`, if it decodes: it encodes to
/// registers that decode to the same view.
fn view<V: Syscall + PartialEq + Debug>(word: CallWord, args: [u64; 6]) -> Option<V> {
    let view = V::decode(word, args).ok()?;
    let (again, again_args) = view.encode();
    assert_eq!(
        V::decode(again, again_args).as_ref(),
        Ok(&view),
        "view round trip"
    );
    Some(view)
}

/// Decodes the registers as the kernel would, with every check the
/// kernel makes of them.
fn views(word: CallWord, args: [u64; 6]) {
    let Ok(call) = Call::try_from(word.number) else {
        return;
    };
    match call {
        Call::ConsoleWrite => {
            let _ = view::<ConsoleWrite>(word, args).map(|v| v.len.check());
        }
        Call::Exit => drop(view::<Exit>(word, args)),
        Call::Call => drop(view::<IpcCall>(word, args)),
        Call::Reply => drop(view::<Reply>(word, args)),
        Call::CreatePd => {
            let _ = view::<CreatePd>(word, args).map(|v| (v.capacity.check(), v.ceiling.check()));
        }
        Call::CreateEc => {
            let _ = view::<CreateEc>(word, args).map(|v| v.utcb.check());
        }
        Call::CreateSc => {
            let _ = view::<CreateSc>(word, args).map(|v| (v.priority.check(), v.budget.check()));
        }
        Call::CreatePt => drop(view::<CreatePt>(word, args)),
        Call::CreateSm => drop(view::<CreateSm>(word, args)),
        Call::SmUp => drop(view::<SmUp>(word, args)),
        Call::SmDown => drop(view::<SmDown>(word, args)),
        Call::Delegate => {
            let _ = view::<Delegate>(word, args)
                .map(|v| (v.space.check(), v.count.check(), v.rights.check()));
        }
        Call::Revoke => drop(view::<Revoke>(word, args)),
        Call::IrqAssign => {
            let _ = view::<IrqAssign>(word, args).map(|v| v.mode.check());
        }
        Call::IrqUnmask => drop(view::<IrqUnmask>(word, args)),
        Call::CreateVcpu => {
            let _ = view::<CreateVcpu>(word, args).map(|v| v.state.check());
        }
        Call::VcpuRun => drop(view::<VcpuRun>(word, args)),
        Call::VcpuPoke => drop(view::<VcpuPoke>(word, args)),
        Call::MapDevice => {
            let _ = view::<MapDevice>(word, args).map(|v| v.checked_count());
        }
        Call::MemPhys => drop(view::<MemPhys>(word, args)),
    }
}

/// The ABI's decoders: each one either refuses a word or decodes it to
/// something that encodes back to the same word.
pub fn abi(data: &[u8]) {
    let Ok(w) = Words::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    let word = CallWord::decode(w.rax);
    assert_eq!(word.encode(), w.rax, "call word round trip");
    if let Ok(call) = Call::try_from(word.number) {
        assert_eq!(call.number(), word.number);
    }
    views(word, w.args);
    if let Ok(status) = Status::from_code(w.status) {
        assert_eq!(status.code(), w.status);
        let _ = status.to_string();
    }
    if let Ok(space) = Space::try_from(w.space) {
        assert_eq!(space as u64, w.space);
    }
    if let Some(item) = TypedItem::decode(w.item) {
        assert_eq!(item.encode(), w.item, "typed item round trip");
    }
    let message = ExceptionMessage::from_words(w.message);
    assert_eq!(message.to_words(), w.message);

    // A VMM's injection request, as the kernel turns it into VMX and SVM
    // event fields and back.
    let (vector, kind, has_error_code, reserved, error_code) = w.inject;
    let inject = Inject {
        vector,
        kind,
        has_error_code,
        reserved,
        error_code,
    };
    let event = Event::from_abi(&inject);
    let (info, code) = event.to_vmx();
    assert_eq!(Event::from_vmx(info, code), Some(event), "VMX round trip");
    assert_eq!(
        Event::from_svm(event.to_svm()),
        Some(event),
        "SVM round trip"
    );
    let _ = event.to_abi();
}

#[derive(Arbitrary, Debug)]
struct ExitInfo {
    vmx: (u32, u64, u64, u32, u32),
    svm: (u64, u64, u64),
}

/// The kernel's VM-exit decoding for both vendors.
pub fn kernel_exit(data: &[u8]) {
    let Ok(info) = ExitInfo::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    let (reason, qualification, guest_physical, interruption_info, interruption_error) = info.vmx;
    decode_vmx(&VmxExitInfo {
        reason,
        qualification,
        guest_physical,
        interruption_info,
        interruption_error,
    });
    let (exitcode, exitinfo1, exitinfo2) = info.svm;
    decode_svm(&SvmExitInfo {
        exitcode,
        exitinfo1,
        exitinfo2,
    });
}

/// The user half of the address space tasks are loaded into.
const USER: std::ops::Range<u64> = 0x1000..0x0000_8000_0000_0000;

/// The kernel's ELF parser (root task and components are loaded through
/// it), and the root task's page filling from what it accepted.
pub fn elf(data: &[u8]) {
    let Ok(image) = ElfImage::parse(data, USER) else {
        return;
    };
    let mut page = vec![0u8; 4096];
    for segment in image.segments() {
        let pages = segment.pages();
        assert!(pages.start >= USER.start && pages.end <= USER.end);
        assert!(segment.data.len() as u64 <= segment.mem_size);
        moat_roottask::image::fill_page(&mut page, pages.start, segment.vaddr, segment.data);
    }
    moat_roottask::image::segment_regions(&image);
}
