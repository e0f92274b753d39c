//! `ipcbench`: round trips of the guest IPC hypercall (hypervisor/abi
//! README, "The guest IPC hypercall"): its register image, the payloads,
//! and what a reply must be.

use moat_abi::{Status, HYPERCALL_IPC, HYPERCALL_SELECTOR_MASK, MESSAGE_REGISTERS};

use crate::args::{Parsed, UsageError, Word, Words};
use crate::stats::Summary;

/// The words in `rdi`, `rsi`, `rdx`, `r10`, `r8`, `r9`, there and back.
pub type Message = [u64; MESSAGE_REGISTERS];

pub const DEFAULT_PORTAL: u64 = 20;
pub const DEFAULT_CALLS: usize = 1000;
/// Every sample is kept (8 bytes each) until the end.
const MAX_CALLS: usize = 10_000_000;
/// Payload words stay below 2^48, clear of the echo server's control words
/// (`0xec40_0000_dead_000x`, which crash it or make it sleep).
const PAYLOAD_MASK: u64 = (1 << 48) - 1;

/// The hypercall instruction of the CPU's virtualization extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Insn {
    /// Intel VMX (and any vendor not known to be AMD's).
    Vmcall,
    /// AMD SVM, also Hygon's.
    Vmmcall,
}

impl Insn {
    /// From the vendor string of CPUID leaf 0 (`ebx`, `edx`, `ecx`).
    pub fn for_vendor(vendor: &[u8; 12]) -> Insn {
        match vendor {
            b"AuthenticAMD" | b"HygonGenuine" => Insn::Vmmcall,
            _ => Insn::Vmcall,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Insn::Vmcall => "vmcall",
            Insn::Vmmcall => "vmmcall",
        }
    }
}

/// CPUID leaf 0's vendor string: `ebx`, `edx`, `ecx`, little-endian.
pub fn vendor(ebx: u32, edx: u32, ecx: u32) -> [u8; 12] {
    let mut v = [0u8; 12];
    for (chunk, reg) in v.chunks_exact_mut(4).zip([ebx, edx, ecx]) {
        chunk.copy_from_slice(&reg.to_le_bytes());
    }
    v
}

/// `rax` on entry: the magic and the portal's selector.
pub fn call_rax(portal: u64) -> u64 {
    HYPERCALL_IPC | (portal & HYPERCALL_SELECTOR_MASK)
}

/// The message of call number `call`: different words in every call and
/// every register, so a reply of stale or swapped registers shows.
pub fn payload(call: u64) -> Message {
    let mut words = [0u64; MESSAGE_REGISTERS];
    for (k, word) in (0u64..).zip(words.iter_mut()) {
        *word = call
            .wrapping_mul(MESSAGE_REGISTERS as u64)
            .wrapping_add(k)
            .wrapping_mul(0x9e37_79b9)
            & PAYLOAD_MASK;
    }
    words
}

/// What a reply must hold besides the success status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Each word plus one, as the native `echo` server answers.
    Echo,
    /// Anything.
    AnyReply,
}

impl Expect {
    pub fn check(self, sent: &Message, reply: &Message) -> Result<(), String> {
        match self {
            Expect::AnyReply => Ok(()),
            Expect::Echo => {
                for (k, (s, r)) in sent.iter().zip(reply).enumerate() {
                    let want = s.wrapping_add(1);
                    if *r != want {
                        return Err(format!("reply word {k} is {r:#x}, want {want:#x}"));
                    }
                }
                Ok(())
            }
        }
    }
}

/// A status code as the report shows it.
pub fn status_text(code: u64) -> String {
    match Status::from_code(code) {
        Ok(status) => format!("{code} ({status})"),
        Err(_) => format!("{code:#x} (unknown)"),
    }
}

/// The result line, parsed by the benchmark harness.
pub fn report(s: &Summary) -> String {
    format!(
        "ipcbench: {} calls, median {} cycles, min {} cycles",
        s.count, s.median, s.min
    )
}

#[derive(Debug, PartialEq, Eq)]
pub struct Options {
    pub calls: usize,
    pub portal: u64,
    pub expect: Expect,
}

impl Options {
    /// `[--calls N] [--portal SEL] [--expect echo|none]`.
    pub fn parse(args: &[String]) -> Result<Parsed<Options>, UsageError> {
        let mut opts = Options {
            calls: DEFAULT_CALLS,
            portal: DEFAULT_PORTAL,
            expect: Expect::Echo,
        };
        let mut words = Words::new(args);
        while let Some(word) = words.next_word() {
            match word {
                Word::Help => return Ok(Parsed::Help),
                Word::Flag("calls", v) => opts.calls = words.number("calls", v, 1..=MAX_CALLS)?,
                Word::Flag("portal", v) => {
                    opts.portal = words.number("portal", v, 0..=HYPERCALL_SELECTOR_MASK)?;
                }
                Word::Flag("expect", v) => {
                    opts.expect = match words.value("expect", v)? {
                        "echo" => Expect::Echo,
                        "none" => Expect::AnyReply,
                        other => {
                            return Err(UsageError(format!(
                                "--expect: `{other}` is neither echo nor none"
                            )))
                        }
                    };
                }
                Word::Flag(name, _) => return Err(UsageError::unknown_flag(name)),
                Word::Positional(p) => return Err(UsageError(format!("unexpected `{p}`"))),
            }
        }
        Ok(Parsed::Run(opts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::line;

    #[test]
    fn parses_options() {
        let parse = |w: &[&str]| Options::parse(&line(w));
        assert_eq!(
            parse(&[]),
            Ok(Parsed::Run(Options {
                calls: 1000,
                portal: 20,
                expect: Expect::Echo
            }))
        );
        assert_eq!(
            parse(&["--calls", "5", "--portal=0x", "1"]).map(|_| ()),
            Err(UsageError(
                "--portal: `0x` is not a number from 0 to 4294967295".into()
            ))
        );
        assert_eq!(
            parse(&["--calls", "5", "--portal", "4294967295", "--expect", "none"]),
            Ok(Parsed::Run(Options {
                calls: 5,
                portal: 0xffff_ffff,
                expect: Expect::AnyReply
            }))
        );
        assert_eq!(parse(&["-h"]), Ok(Parsed::Help));
        for bad in [
            &["--calls", "0"][..],
            &["--calls", "-1"],
            &["--portal", "4294967296"],
            &["--expect", "echoes"],
            &["--expect"],
            &["20"],
            &["--verbose"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hypercall_rax_carries_magic_and_selector() {
        assert_eq!(call_rax(20), 0x4d4f_4154_0000_0014);
        assert_eq!(call_rax(0xffff_ffff), 0x4d4f_4154_ffff_ffff);
        assert_eq!(&call_rax(0).to_be_bytes()[..4], b"MOAT");
    }

    #[test]
    fn instruction_follows_the_vendor() {
        // CPUID leaf 0 of an Intel and an AMD CPU.
        let intel = vendor(0x756e_6547, 0x4965_6e69, 0x6c65_746e);
        let amd = vendor(0x6874_7541, 0x6974_6e65, 0x444d_4163);
        assert_eq!(&intel, b"GenuineIntel");
        assert_eq!(&amd, b"AuthenticAMD");
        assert_eq!(Insn::for_vendor(&intel), Insn::Vmcall);
        assert_eq!(Insn::for_vendor(&amd), Insn::Vmmcall);
        assert_eq!(Insn::for_vendor(b"HygonGenuine"), Insn::Vmmcall);
        assert_eq!(Insn::for_vendor(b"TCGTCGTCGTCG"), Insn::Vmcall);
    }

    #[test]
    fn payloads_change_and_avoid_the_control_words() {
        let control = [0xec40_0000_dead_0001u64, 0xec40_0000_dead_0002];
        let mut seen = std::collections::BTreeSet::new();
        for call in (0..10_000).chain(u64::MAX - 100..=u64::MAX) {
            let p = payload(call);
            for w in p {
                assert!(!control.contains(&w) && !control.contains(&w.wrapping_add(1)));
                assert!(seen.insert(w), "call {call}: word {w:#x} repeats");
            }
        }
    }

    #[test]
    fn echo_expectation_checks_every_word() {
        let sent = payload(3);
        let good = sent.map(|w| w + 1);
        assert_eq!(Expect::Echo.check(&sent, &good), Ok(()));
        assert_eq!(Expect::AnyReply.check(&sent, &sent), Ok(()));
        for k in 0..MESSAGE_REGISTERS {
            let mut bad = good;
            bad[k] ^= 1 << 40;
            let err = Expect::Echo.check(&sent, &bad).unwrap_err();
            assert!(err.starts_with(&format!("reply word {k} is")), "{err}");
        }
        assert!(
            Expect::Echo.check(&sent, &sent).is_err(),
            "an unchanged reply"
        );
        let max = [u64::MAX; MESSAGE_REGISTERS];
        assert_eq!(Expect::Echo.check(&max, &[0; MESSAGE_REGISTERS]), Ok(()));
    }

    #[test]
    fn status_and_report_text() {
        assert_eq!(status_text(0), "0 (success)");
        assert_eq!(status_text(5), "5 (insufficient rights)");
        assert_eq!(
            status_text(0x4d4f_4154_0000_0014),
            "0x4d4f415400000014 (unknown)"
        );
        let s = Summary::of(&mut [30, 10, 20]).unwrap();
        assert_eq!(
            report(&s),
            "ipcbench: 3 calls, median 20 cycles, min 10 cycles"
        );
    }
}
