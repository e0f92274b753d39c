//! Small bare-metal test guests, each checking one thing about the
//! virtualization core, and the protocol they share with the test VMM
//! (`components/testvmm`).
//!
//! A guest is a position-independent blob of machine code (assembled by
//! `global_asm!` in `blobs.rs`) that the VMM copies to
//! [`layout::LOAD_ADDRESS`] of a zeroed guest RAM of [`layout::RAM_SIZE`]
//! bytes at guest-physical 0. It prints lines one byte per `OUT` to
//! [`port::DEBUG`]; the VMM prints each as `testvmm: <name>: <line>`. A guest
//! ends with `HLT` once its [`TestGuest::events`] are used up.
//!
//! [`Mode::Long`] guests start in 64-bit mode on the VMM's flat GDT
//! ([`selector`]) with the first 4 GiB identity-mapped in 2 MiB pages
//! (tables at [`layout::PML4`]) and `rsp` = [`layout::STACK_TOP`].
#![no_std]
#![deny(unsafe_code)]

// The blobs: `global_asm!` (counted as unsafe code, though it only
// assembles bytes that are copied, never run, here) and the one accessor
// that turns two of its symbols into a slice.
#[allow(unsafe_code)]
mod blobs;

use moat_abi::HYPERCALL_IPC;

/// Guest-physical layout.
pub mod layout {
    /// Guest RAM: guest-physical 0 up to this, given by the VMM.
    pub const RAM_SIZE: u64 = 256 * 1024;
    /// Where every blob is loaded and entered.
    pub const LOAD_ADDRESS: u64 = 0x1000;
    /// The `modes` guest's own page tables (three pages).
    pub const MODES_TABLES: u64 = 0x1_0000;
    /// Structures the long-mode guests build: their IDT (one page) ...
    pub const IDT: u64 = 0x2_0000;
    /// ... the `pagefault` guest's page table for the first 2 MiB ...
    pub const PAGE_TABLE: u64 = 0x2_1000;
    /// ... and the page it maps only when it faults on it.
    pub const FAULT_PAGE: u64 = 0x2_2000;
    /// Initial `rsp` of long-mode guests.
    pub const STACK_TOP: u64 = 0x3_8000;
    /// The VMM's GDT for long-mode guests, and the TSS its TR names.
    pub const GDT: u64 = 0x3_9000;
    pub const TSS: u64 = 0x3_9100;
    /// The VMM's identity page tables: PML4, PDPT, then [`PDS`] PDs.
    pub const PML4: u64 = 0x3_a000;
    pub const PDPT: u64 = 0x3_b000;
    pub const PD: u64 = 0x3_c000;
    pub const PDS: u64 = 4;
}

/// Selectors of the VMM's GDT for long-mode guests.
pub mod selector {
    pub const CODE64: u16 = 0x08;
    pub const DATA: u16 = 0x10;
    pub const TSS: u16 = 0x18;
}

/// I/O ports the VMM emulates.
pub mod port {
    /// Debug console: one byte per `OUT`, a line ends at `\n`.
    pub const DEBUG: u16 = 0xe9;
    /// The VMM records every `OUT` here (size and value).
    pub const RECORD: u16 = 0x80;
    /// `IN` here reads [`super::ANSWER`] (zero-extended), at any size.
    pub const ANSWER: u16 = 0x81;
    /// Marks for the exit count: a byte from [`super::mark`].
    pub const MARK: u16 = 0x82;
}

/// What `IN` from [`port::ANSWER`] reads.
pub const ANSWER: u8 = 0x5a;

/// Values written to [`port::MARK`].
pub mod mark {
    /// Start counting exits.
    pub const BEGIN: u8 = 0;
    /// Stop counting; the guest's own check passed ...
    pub const PASSED: u8 = 1;
    /// ... or failed.
    pub const FAILED: u8 = 2;
}

/// An `OUT` the VMM saw on [`port::RECORD`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortWrite {
    pub size: u8,
    pub value: u32,
}

/// What `portio` writes to [`port::RECORD`], in order.
pub const PORTIO_WRITES: &[PortWrite] = &[
    PortWrite {
        size: 1,
        value: 0x11,
    },
    PortWrite {
        size: 2,
        value: 0x2222,
    },
    PortWrite {
        size: 4,
        value: 0x4444_4444,
    },
    PortWrite {
        size: 1,
        value: 0x88,
    },
];

/// The emulated MMIO device: two 32-bit registers in an unmapped page.
pub mod mmio {
    pub const BASE: u64 = 0xfee0_0000;
    /// Page the VMM emulates (anything else unmapped is "not given").
    pub const SIZE: u64 = 0x1000;
    /// Read-write register.
    pub const SCRATCH: u64 = 0;
    /// Read-only register holding [`ID`].
    pub const ID_OFFSET: u64 = 4;
    pub const ID: u32 = u32::from_le_bytes(*b"MMIO");
}

/// The VMM's CPUID leaf and its answer in ebx, ecx, edx.
pub const CPUID_LEAF: u32 = 0x4000_0000;
/// The `debug` guest asks the VMM to check the debug registers the kernel
/// reports with this CPUID leaf; the VMM then gives DR3 a new value.
pub const DEBUG_CHECK_LEAF: u32 = CPUID_LEAF + 0x10;
/// DR0-DR3 as the `debug` guest sets them.
pub const DEBUG_VALUES: [u64; 4] = [0x1000, 0x2000, 0x3000, 0x4000];
/// DR3 as the VMM sets it after its check.
pub const DEBUG_NEW_DR3: u64 = 0x5000;
/// The `cr8` guest asks the VMM to check the CR8 the kernel reports with
/// this CPUID leaf; the VMM then gives CR8 a new value.
pub const CR8_CHECK_LEAF: u32 = CPUID_LEAF + 0x12;
/// CR8 as the `cr8` guest sets it, and as the VMM sets it after its check.
pub const CR8_GUEST: u64 = 5;
pub const CR8_NEW: u64 = 9;
/// The `tsc` guest asks the VMM for a TSC offset with this CPUID leaf.
pub const TSC_OFFSET_LEAF: u32 = CPUID_LEAF + 0x11;
/// The offset the VMM gives: far above any TSC value of an emulator run.
pub const TSC_OFFSET: u64 = 1 << 50;
pub const CPUID_SIGNATURE: [u8; 12] = *b"MoatTestVMM!";
/// An MSR only the VMM knows: it keeps what the guest writes.
pub const TEST_MSR: u32 = 0x4b56_4d00;
/// EFER: the VMM emulates writes (the `modes` guest sets LME).
pub const MSR_EFER: u32 = 0xc000_0080;

/// Where the VMM delegates the `echo` portal in the VM's object space, and
/// a selector it gives nothing at.
pub const ECHO_SELECTOR: u64 = 20;
pub const MISSING_SELECTOR: u64 = 21;

/// The vector `interrupt` expects as an external interrupt.
pub const INTERRUPT_VECTOR: u8 = 0x30;
/// Interrupts `irqonce` takes, and the loop iterations its handler spins
/// with IF=0 for each (a few million instructions in all).
pub const IRQONCE_ROUNDS: u32 = 64;
pub const IRQONCE_SPIN: u32 = 200_000;
/// Invalid opcode, the exception `interrupt` expects.
pub const UD_VECTOR: u8 = 6;

/// What `nogive` reads: far beyond [`layout::RAM_SIZE`].
pub const NOT_GIVEN: u64 = 0x0800_0000;

/// How a guest starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Real mode, `cs:ip` = 0:entry.
    Real,
    /// 64-bit mode on the VMM's GDT and page tables.
    Long,
}

/// An event the VMM delivers at a `HLT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// External interrupt; waits for an interrupt window when the guest
    /// cannot take it yet.
    Interrupt(u8),
    /// Hardware exception without error code.
    Exception(u8),
    Nmi,
    /// NMI once the guest can take one (the VMM asks for the NMI window).
    NmiWindow,
}

/// How a guest ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// `HLT` with no event left to deliver.
    Halt,
    /// A memory exit at this guest-physical address, which the VMM reports
    /// as `memory exit at 0x… (not given)` and then stops the guest.
    MemoryExit(u64),
}

pub struct TestGuest {
    pub name: &'static str,
    blob: fn() -> &'static [u8],
    pub load_address: u64,
    pub entry: u64,
    pub start_mode: Mode,
    /// Delivered one per `HLT`, in order.
    pub events: &'static [Event],
    pub end: End,
    /// What the VMM must see on [`port::RECORD`].
    pub port_writes: &'static [PortWrite],
    /// The verdict lines (after `testvmm: <name>: `), in order.
    pub expect: &'static [&'static str],
}

impl TestGuest {
    /// The machine code, to be copied to [`Self::load_address`].
    pub fn code(&self) -> &'static [u8] {
        (self.blob)()
    }
}

impl core::fmt::Debug for TestGuest {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TestGuest")
            .field("name", &self.name)
            .field("code_len", &self.code().len())
            .field("start_mode", &self.start_mode)
            .finish_non_exhaustive()
    }
}

const BASE: TestGuest = TestGuest {
    name: "",
    blob: blobs::modes,
    load_address: layout::LOAD_ADDRESS,
    entry: layout::LOAD_ADDRESS,
    start_mode: Mode::Long,
    events: &[],
    end: End::Halt,
    port_writes: &[],
    expect: &[],
};

static GUESTS: [TestGuest; 12] = [
    TestGuest {
        name: "modes",
        blob: blobs::modes,
        start_mode: Mode::Real,
        expect: &["real protected long ok"],
        ..BASE
    },
    TestGuest {
        name: "portio",
        blob: blobs::portio,
        port_writes: PORTIO_WRITES,
        expect: &["string ok", "ok"],
        ..BASE
    },
    TestGuest {
        name: "mmio",
        blob: blobs::mmio,
        expect: &["ok"],
        ..BASE
    },
    TestGuest {
        name: "cpuid_msr",
        blob: blobs::cpuid_msr,
        expect: &["ok"],
        ..BASE
    },
    TestGuest {
        name: "debug",
        blob: blobs::debug,
        expect: &["ok"],
        ..BASE
    },
    TestGuest {
        name: "cr8",
        blob: blobs::cr8,
        expect: &["ok, 0 exits", "ok"],
        ..BASE
    },
    TestGuest {
        name: "tsc",
        blob: blobs::tsc,
        expect: &["ok"],
        ..BASE
    },
    TestGuest {
        name: "interrupt",
        blob: blobs::interrupt,
        events: &[
            Event::Interrupt(INTERRUPT_VECTOR),
            Event::Exception(UD_VECTOR),
            Event::Nmi,
            Event::NmiWindow,
        ],
        expect: &["ok", "exception: ok", "nmi: ok", "nmi window: ok"],
        ..BASE
    },
    TestGuest {
        name: "irqonce",
        blob: blobs::irqonce,
        events: &[Event::Interrupt(INTERRUPT_VECTOR); IRQONCE_ROUNDS as usize],
        expect: &["ok"],
        ..BASE
    },
    TestGuest {
        name: "pagefault",
        blob: blobs::pagefault,
        expect: &["ok, 0 exits"],
        ..BASE
    },
    TestGuest {
        name: "hypercall",
        blob: blobs::hypercall,
        expect: &["ok"],
        ..BASE
    },
    TestGuest {
        name: "nogive",
        blob: blobs::nogive,
        end: End::MemoryExit(NOT_GIVEN),
        expect: &["memory exit at 0x8000000 (not given)"],
        ..BASE
    },
];

/// Every test guest, in the order the VMM runs them.
pub fn all() -> &'static [TestGuest] {
    &GUESTS
}

pub fn find(name: &str) -> Option<&'static TestGuest> {
    GUESTS.iter().find(|g| g.name == name)
}

/// `rax` of the hypercall guest's calls.
const HYPERCALL_ECHO: u64 = HYPERCALL_IPC + ECHO_SELECTOR;
const HYPERCALL_MISSING: u64 = HYPERCALL_IPC + MISSING_SELECTOR;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_guest_fits_below_the_structures_it_shares_ram_with() {
        for guest in all() {
            let code = guest.code();
            assert!(!code.is_empty(), "{}", guest.name);
            let end = guest.load_address + code.len() as u64;
            assert!(end <= layout::MODES_TABLES, "{}: {end:#x}", guest.name);
            assert_eq!(guest.entry, guest.load_address);
            assert!(!guest.expect.is_empty());
            assert_eq!(find(guest.name).map(|g| g.name), Some(guest.name));
        }
    }

    #[test]
    fn names_are_distinct() {
        for (i, guest) in all().iter().enumerate() {
            assert!(all()[..i].iter().all(|g| g.name != guest.name));
        }
    }

    fn contains(code: &[u8], needle: &[u8]) -> bool {
        code.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn the_guests_use_the_shared_constants() {
        let cpuid = find("cpuid_msr").unwrap().code();
        for word in CPUID_SIGNATURE.chunks(4) {
            assert!(contains(cpuid, word), "{word:?}");
        }
        assert!(contains(cpuid, &TEST_MSR.to_le_bytes()));
        let hypercall = find("hypercall").unwrap().code();
        assert!(contains(hypercall, &HYPERCALL_ECHO.to_le_bytes()));
        assert!(contains(hypercall, &HYPERCALL_MISSING.to_le_bytes()));
        let mmio = find("mmio").unwrap().code();
        assert!(contains(mmio, &mmio::ID.to_le_bytes()));
        let nogive = find("nogive").unwrap().code();
        assert!(contains(nogive, &(NOT_GIVEN as u32).to_le_bytes()));
    }

    #[test]
    fn every_guest_reports_and_halts() {
        // OUT dx, al or OUT imm8, al, and HLT.
        for guest in all() {
            let code = guest.code();
            assert!(code.contains(&0xf4), "{}: no hlt", guest.name);
            assert!(
                code.contains(&0xee) || code.contains(&0xe6),
                "{}: no out",
                guest.name
            );
        }
    }

    #[test]
    fn the_modes_guest_starts_in_real_mode() {
        assert_eq!(find("modes").unwrap().start_mode, Mode::Real);
        assert!(all()
            .iter()
            .filter(|g| g.name != "modes")
            .all(|g| g.start_mode == Mode::Long));
    }
}
