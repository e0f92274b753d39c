//! What decodes untrusted words at the kernel's edges: the ABI's call
//! words, statuses, typed items and exception messages (from any task's
//! registers and UTCB), the kernel's event conversion (from a VMM's
//! vCPU state page) and its VM-exit decoding, and the ELF parser the
//! kernel and root task load tasks with.

use arbitrary::{Arbitrary, Unstructured};
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
