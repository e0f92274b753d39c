//! `probe`: what root inside the Linux guest tries in order to get out of
//! its VM, and how the answers are counted. Portals: every selector of a
//! range the VM was not given must be refused, and so must hypercalls whose
//! `rax` is not the IPC hypercall's; the given portals must answer, which
//! shows the refusals are the kernel's and not a broken probe. Memory:
//! guest-physical pages that neither RAM nor a device claims (from
//! `/proc/iomem`) must hold nothing (all ones or all zeros) or be refused.

use std::collections::BTreeMap;

use moat_abi::{Call, CallWord, Status, HYPERCALL_SELECTOR_MASK};

use crate::args::{Parsed, UsageError, Word, Words};
use crate::ipc::call_rax;

/// Most selectors one run tries: the VM's object space is far smaller, and
/// each refused call is a VM exit.
pub const MAX_PORTALS: u64 = 1 << 16;
/// Linux's page on x86-64: what `/dev/mem` maps at a time.
pub const PAGE: u64 = 4096;
/// The stride of the probe between the end of RAM and 4 GiB.
pub const STEP: u64 = 64 << 20;
const GIB: u64 = 1 << 30;
const FOUR_GIB: u64 = 4 * GIB;
/// Fixed probes above 4 GiB, taken where they lie above RAM and inside the
/// physical address width; the last page below that width is probed too.
const HIGH_PROBES: [u64; 3] = [FOUR_GIB, 16 * GIB, 64 * GIB];
/// The name Linux gives RAM in `/proc/iomem`.
const SYSTEM_RAM: &str = "System RAM";
/// At most this many failures are spelled out on the verdict line.
const FAILURES_SHOWN: usize = 4;

#[derive(Debug, PartialEq, Eq)]
pub struct Options {
    pub portals: Option<Portals>,
    pub memory: bool,
}

/// `--portals FIRST-LAST [--given SEL,...]`.
#[derive(Debug, PartialEq, Eq)]
pub struct Portals {
    pub first: u64,
    pub last: u64,
    /// Selectors the VM was given: called once each, they must answer.
    pub given: Vec<u64>,
}

impl Portals {
    /// The selectors of the range the VM was not given: each must be
    /// refused.
    pub fn ungiven(&self) -> impl Iterator<Item = u64> + '_ {
        (self.first..=self.last).filter(|s| !self.given.contains(s))
    }

    /// The selector the malformed hypercalls name: a given portal where
    /// there is one, so that a kernel taking a malformed call for the IPC
    /// hypercall would reach a live portal and the call would succeed.
    pub fn target(&self) -> u64 {
        self.given.first().copied().unwrap_or(self.first)
    }
}

impl Options {
    /// `[--portals FIRST-LAST [--given SEL,...]] [--memory]`, at least one
    /// of the two.
    pub fn parse(args: &[String]) -> Result<Parsed<Options>, UsageError> {
        let mut range = None;
        let mut given = None;
        let mut memory = false;
        let mut words = Words::new(args);
        while let Some(word) = words.next_word() {
            match word {
                Word::Help => return Ok(Parsed::Help),
                Word::Flag("portals", v) => range = Some(parse_range(words.value("portals", v)?)?),
                Word::Flag("given", v) => given = Some(parse_given(words.value("given", v)?)?),
                Word::Flag("memory", None) => memory = true,
                Word::Flag("memory", Some(_)) => {
                    return Err(UsageError("--memory takes no value".into()))
                }
                Word::Flag(name, _) => return Err(UsageError::unknown_flag(name)),
                Word::Positional(p) => return Err(UsageError(format!("unexpected `{p}`"))),
            }
        }
        let portals = match (range, given) {
            (Some((first, last)), given) => Some(Portals {
                first,
                last,
                given: given.unwrap_or_default(),
            }),
            (None, Some(_)) => return Err(UsageError("--given needs --portals".into())),
            (None, None) => None,
        };
        if portals.is_none() && !memory {
            return Err(UsageError(
                "nothing to probe: give --portals, --memory or both".into(),
            ));
        }
        Ok(Parsed::Run(Options { portals, memory }))
    }
}

fn parse_selector(flag: &str, text: &str) -> Result<u64, UsageError> {
    text.parse()
        .ok()
        .filter(|s| *s <= HYPERCALL_SELECTOR_MASK)
        .ok_or_else(|| {
            UsageError(format!(
                "--{flag}: `{text}` is not a selector from 0 to {HYPERCALL_SELECTOR_MASK}"
            ))
        })
}

fn parse_range(text: &str) -> Result<(u64, u64), UsageError> {
    let (first, last) = text
        .split_once('-')
        .ok_or_else(|| UsageError(format!("--portals: `{text}` is not FIRST-LAST")))?;
    let first = parse_selector("portals", first)?;
    let last = parse_selector("portals", last)?;
    if first > last {
        return Err(UsageError(format!("--portals: {first} is above {last}")));
    }
    if last - first >= MAX_PORTALS {
        return Err(UsageError(format!(
            "--portals: more than {MAX_PORTALS} selectors"
        )));
    }
    Ok((first, last))
}

fn parse_given(text: &str) -> Result<Vec<u64>, UsageError> {
    let mut given = Vec::new();
    for word in text.split(',') {
        let sel = parse_selector("given", word)?;
        if given.contains(&sel) {
            return Err(UsageError(format!("--given: {sel} is listed twice")));
        }
        given.push(sel);
    }
    Ok(given)
}

/// A hypercall the kernel must not take for a call to a portal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Malformed {
    pub what: &'static str,
    pub rax: u64,
}

/// Hypercalls whose `rax` is not the IPC hypercall to a given portal, all
/// naming `portals.target()` where they name a selector at all: without the
/// `MOAT` magic, with a bit of the magic flipped, with a selector wider than
/// 32 bits (native selectors have 48), the native `call` system call's word,
/// a system call word of an unknown call number with every flag set, and the
/// largest selector (beyond any VM's object space). Every one must fail.
pub fn malformed(portals: &Portals) -> Vec<Malformed> {
    let target = portals.target();
    let candidates = [
        Malformed {
            what: "no magic",
            rax: target,
        },
        Malformed {
            what: "magic with its top bit flipped",
            rax: call_rax(target) ^ (1 << 63),
        },
        Malformed {
            what: "selector above 32 bits",
            rax: call_rax(target) + (1 << 32),
        },
        Malformed {
            what: "native call word",
            rax: CallWord::new(Call::Call, 0, target).encode(),
        },
        Malformed {
            what: "unknown call number and flags",
            rax: CallWord {
                number: u8::MAX,
                flags: u8::MAX,
                selector: target,
            }
            .encode(),
        },
        Malformed {
            what: "largest selector",
            rax: call_rax(HYPERCALL_SELECTOR_MASK),
        },
    ];
    // A "malformed" call that is in fact the IPC hypercall to a given
    // portal would rightly succeed: leave it out.
    candidates
        .into_iter()
        .filter(|m| !portals.given.iter().any(|&g| call_rax(g) == m.rax))
        .collect()
}

/// Calls that must be refused, and their answers.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Refusals {
    pub tried: u64,
    /// How many calls got each status.
    pub statuses: BTreeMap<u64, u64>,
    /// The calls that were answered with success instead.
    pub answered: Vec<String>,
}

impl Refusals {
    /// One call, described by `what` if it succeeded.
    pub fn record(&mut self, status: u64, what: impl FnOnce() -> String) {
        self.tried += 1;
        *self.statuses.entry(status).or_default() += 1;
        if status == Status::Success.code() {
            self.answered.push(what());
        }
    }

    pub fn refused(&self) -> u64 {
        self.tried - self.answered.len() as u64
    }

    /// `N tried, N refused (status S xN, ...)`.
    fn text(&self) -> String {
        let refusals: Vec<String> = self
            .statuses
            .iter()
            .filter(|(&status, _)| status != Status::Success.code())
            .map(|(&status, count)| format!("{} x{count}", status_label(status)))
            .collect();
        let mut text = format!("{} tried, {} refused", self.tried, self.refused());
        if !refusals.is_empty() {
            text += &format!(" (status {})", refusals.join(", "));
        }
        text
    }
}

/// A hypercall's status as the report shows it: the ABI's name, or the
/// number as signed (the VMM answers a hypercall it does not know as KVM
/// does, with -1000).
pub fn status_label(code: u64) -> String {
    match Status::from_code(code) {
        Ok(status) => format!("{code} ({status})"),
        Err(_) if (code as i64) < 0 => (code as i64).to_string(),
        Err(_) => format!("{code:#x}"),
    }
}

/// The portal class: the range, the malformed calls, the given portals.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PortalReport {
    pub range: Refusals,
    pub malformed: Refusals,
    /// Each given selector with its status.
    pub given: Vec<(u64, u64)>,
}

/// One line of `/proc/iomem`: an inclusive range of physical addresses and
/// what claims it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IomemRange {
    pub start: u64,
    pub end: u64,
    pub name: String,
}

impl IomemRange {
    fn overlaps(&self, start: u64, len: u64) -> bool {
        start <= self.end && self.start <= start + (len - 1)
    }
}

/// Every range of `/proc/iomem`, nested ones included
/// (`  00100000-0fffffff : System RAM`).
pub fn parse_iomem(text: &str) -> Result<Vec<IomemRange>, String> {
    let mut ranges = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = || format!("/proc/iomem line {}: `{line}`", n + 1);
        let (span, name) = line.trim_start().split_once(" : ").ok_or_else(bad)?;
        let (start, end) = span.split_once('-').ok_or_else(bad)?;
        let hex = |t: &str| u64::from_str_radix(t, 16).map_err(|_| bad());
        let (start, end) = (hex(start)?, hex(end)?);
        if start > end {
            return Err(bad());
        }
        ranges.push(IomemRange {
            start,
            end,
            name: name.to_string(),
        });
    }
    if ranges.is_empty() {
        return Err("/proc/iomem lists nothing".into());
    }
    // Linux shows every address as 0 to anyone without CAP_SYS_ADMIN.
    if ranges.iter().all(|r| r.start == 0 && r.end == 0) {
        return Err("/proc/iomem hides its addresses: run as root".into());
    }
    Ok(ranges)
}

/// The physical address width from `/proc/cpuinfo`
/// (`address sizes : 40 bits physical, 48 bits virtual`).
pub fn phys_bits(cpuinfo: &str) -> Result<u32, String> {
    cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("address sizes"))
        .and_then(|rest| rest.split_once(':'))
        .and_then(|(_, sizes)| sizes.split_once(" bits physical"))
        .and_then(|(bits, _)| bits.trim().parse().ok())
        .filter(|bits| (32..=52).contains(bits))
        .ok_or_else(|| "/proc/cpuinfo gives no physical address width".into())
}

/// The pages to read: from the end of the highest RAM below 4 GiB to
/// 4 GiB every [`STEP`], then [`HIGH_PROBES`] and the last page inside the
/// address width, where they lie above all RAM; none of them touching a
/// range of `map` (RAM, a device, anything reserved).
pub fn probe_addresses(map: &[IomemRange], phys_bits: u32) -> Result<Vec<u64>, String> {
    let ram: Vec<&IomemRange> = map.iter().filter(|r| r.name == SYSTEM_RAM).collect();
    let low_end = ram
        .iter()
        .filter(|r| r.start < FOUR_GIB)
        .map(|r| (r.end + 1).min(FOUR_GIB))
        .max()
        .ok_or("/proc/iomem lists no System RAM below 4 GiB")?;
    let top = ram
        .iter()
        .map(|r| r.end.saturating_add(1))
        .max()
        .unwrap_or(0);
    let limit = 1u64 << phys_bits;
    let low = (low_end.next_multiple_of(PAGE)..FOUR_GIB).step_by(STEP as usize);
    let high = HIGH_PROBES
        .into_iter()
        .chain([limit - PAGE])
        .filter(|&a| a >= top);
    let mut addresses: Vec<u64> = low
        .chain(high)
        .filter(|&a| a + PAGE <= limit)
        .filter(|&a| !map.iter().any(|r| r.overlaps(a, PAGE)))
        .collect();
    addresses.sort_unstable();
    addresses.dedup();
    Ok(addresses)
}

/// The memory class: what the reads of unclaimed pages found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MemoryTally {
    pub reads: u64,
    /// All ones or all zeros: nothing behind the address.
    pub nothing: u64,
    /// Reads Linux refused, by errno.
    pub refused: BTreeMap<i32, u64>,
    /// Addresses that held something, with what.
    pub leaks: Vec<(u64, u64)>,
}

impl MemoryTally {
    /// The 8 bytes at `addr`, or the errno that refused them.
    pub fn record(&mut self, addr: u64, reading: Result<u64, i32>) {
        self.reads += 1;
        match reading {
            Ok(0 | u64::MAX) => self.nothing += 1,
            Ok(value) => self.leaks.push((addr, value)),
            Err(errno) => *self.refused.entry(errno).or_default() += 1,
        }
    }

    fn text(&self) -> String {
        let refused: u64 = self.refused.values().sum();
        let mut text = format!(
            "{} reads outside RAM and devices, {} found nothing, {refused} refused",
            self.reads, self.nothing
        );
        if refused > 0 {
            let errnos: Vec<String> = self
                .refused
                .iter()
                .map(|(errno, count)| format!("errno {errno} x{count}"))
                .collect();
            text += &format!(" ({})", errnos.join(", "));
        }
        text + &format!(", {} leaked", self.leaks.len())
    }
}

/// Everything one run found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub portals: Option<PortalReport>,
    pub memory: Option<MemoryTally>,
    /// What kept a class from running (e.g. `/dev/mem` would not open).
    pub problems: Vec<String>,
}

impl Report {
    /// Why the run fails; empty if every attempt was refused and every
    /// given portal answered.
    pub fn failures(&self) -> Vec<String> {
        let mut failures = self.problems.clone();
        if let Some(p) = &self.portals {
            for (sel, status) in &p.given {
                if *status != Status::Success.code() {
                    failures.push(format!(
                        "given portal {sel} refused: status {}",
                        status_label(*status)
                    ));
                }
            }
            failures.extend(p.range.answered.iter().map(|w| format!("{w} answered")));
            failures.extend(p.malformed.answered.iter().map(|w| format!("{w} answered")));
        }
        if let Some(m) = &self.memory {
            if m.reads == 0 {
                failures.push("no address outside RAM and devices to read".into());
            }
            failures.extend(
                m.leaks
                    .iter()
                    .map(|(addr, value)| format!("memory at {addr:#x} holds {value:#018x}")),
            );
        }
        failures
    }

    /// One line per class, then `probe: ok` or `probe: FAIL ...`.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some(p) = &self.portals {
            let given = if p.given.is_empty() {
                "none given".to_string()
            } else {
                let each: Vec<String> = p
                    .given
                    .iter()
                    .map(|&(sel, status)| match status {
                        0 => format!("{sel} ok"),
                        _ => format!("{sel} status {}", status_label(status)),
                    })
                    .collect();
                format!("given {}", each.join(", "))
            };
            lines.push(format!("probe: portals {}; {given}", p.range.text()));
            lines.push(format!(
                "probe: malformed hypercalls {}",
                p.malformed.text()
            ));
        }
        if let Some(m) = &self.memory {
            lines.push(format!("probe: memory {}", m.text()));
        }
        let failures = self.failures();
        lines.push(if failures.is_empty() {
            "probe: ok".to_string()
        } else {
            let mut why = failures[..failures.len().min(FAILURES_SHOWN)].join("; ");
            if failures.len() > FAILURES_SHOWN {
                why += &format!("; and {} more", failures.len() - FAILURES_SHOWN);
            }
            format!("probe: FAIL {why}")
        });
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::line;

    const MIB: u64 = 1 << 20;

    /// `/proc/iomem` of Linux 6.1 as root in Moat's guest: 256 MiB of RAM,
    /// the e820 map of `firmware/src/e820.rs`, the PCI window, the ECAM,
    /// the IOAPIC and the LAPIC.
    const MOAT_IOMEM: &str = "\
00000000-00000fff : Reserved
00001000-0009fbff : System RAM
0009fc00-000dffff : Reserved
  000a0000-000bffff : PCI Bus 0000:00
000e0000-000fffff : ACPI Tables
00100000-0fffffff : System RAM
  01000000-01e01a46 : Kernel code
  02000000-0259efff : Kernel rodata
  02600000-0289d9ff : Kernel data
  02e2e000-02ffffff : Kernel bss
c0000000-dfffffff : PCI Bus 0000:00
  c0000000-c0003fff : 0000:00:01.0
    c0000000-c0003fff : virtio-pci-modern
e0000000-e00fffff : PCI ECAM 0000 [bus 00]
  e0000000-e00fffff : Reserved
fec00000-fec003ff : IOAPIC 0
fee00000-fee00fff : Local APIC
";

    fn portals(first: u64, last: u64, given: &[u64]) -> Portals {
        Portals {
            first,
            last,
            given: given.to_vec(),
        }
    }

    #[test]
    fn parses_options() {
        let parse = |w: &[&str]| Options::parse(&line(w));
        assert_eq!(
            parse(&["--portals", "0-255", "--given=20,21", "--memory"]),
            Ok(Parsed::Run(Options {
                portals: Some(portals(0, 255, &[20, 21])),
                memory: true,
            }))
        );
        assert_eq!(
            parse(&["--memory"]),
            Ok(Parsed::Run(Options {
                portals: None,
                memory: true
            }))
        );
        assert_eq!(
            parse(&["--portals=7-7"]),
            Ok(Parsed::Run(Options {
                portals: Some(portals(7, 7, &[])),
                memory: false,
            }))
        );
        assert_eq!(
            parse(&["--portals", "0-4294967295"]),
            Err(UsageError("--portals: more than 65536 selectors".into()))
        );
        assert_eq!(parse(&["--help"]), Ok(Parsed::Help));
        for bad in [
            &[][..],
            &["--given", "20"],
            &["--portals", "20"],
            &["--portals", "9-8"],
            &["--portals", "0-4294967296"],
            &["--portals", "-5"],
            &["--portals", "0-9", "--given", "20,,21"],
            &["--portals", "0-9", "--given", "3,3"],
            &["--portals"],
            &["--memory=yes"],
            &["--memory", "all"],
            &["--verbose"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_given_portals_are_left_out_of_the_range() {
        let p = portals(18, 23, &[20, 99]);
        assert_eq!(p.ungiven().collect::<Vec<_>>(), [18, 19, 21, 22, 23]);
        assert_eq!(p.target(), 20);
        assert_eq!(portals(5, 6, &[]).target(), 5);
    }

    #[test]
    fn malformed_calls_are_never_the_ipc_hypercall_to_a_given_portal() {
        let p = portals(0, 63, &[20]);
        let calls = malformed(&p);
        assert_eq!(calls.len(), 6);
        for (k, m) in calls.iter().enumerate() {
            assert_ne!(m.rax, call_rax(20), "{m:?}");
            assert!(calls[k + 1..].iter().all(|o| o.rax != m.rax), "{m:?}");
        }
        // Those with the magic name a selector the VM cannot hold; the
        // others keep the given selector somewhere in `rax`, where a sloppy
        // decoder could find it.
        let magic = |rax: u64| rax >> 32 == call_rax(0) >> 32;
        assert_eq!(
            calls.iter().filter(|m| magic(m.rax)).count(),
            1,
            "{calls:?}"
        );
        assert_eq!(calls[0].rax, 20);
        assert_eq!(calls[3].rax, (20 << 16) | 2);
        assert_eq!(calls[4].rax, (20 << 16) | 0xffff);
        // The largest selector, when given, is called as given instead.
        let top = portals(0, 1, &[HYPERCALL_SELECTOR_MASK]);
        let calls = malformed(&top);
        assert_eq!(calls.len(), 5);
        assert!(calls
            .iter()
            .all(|m| m.rax != call_rax(HYPERCALL_SELECTOR_MASK)));
    }

    #[test]
    fn parses_iomem_with_nesting_and_wide_addresses() {
        let map = parse_iomem(MOAT_IOMEM).unwrap();
        assert_eq!(map.len(), 17);
        assert_eq!(
            map[5],
            IomemRange {
                start: MIB,
                end: 256 * MIB - 1,
                name: "System RAM".into()
            }
        );
        assert_eq!(map[12].name, "virtio-pci-modern");
        let wide = parse_iomem("100000000-63fffffff : System RAM\n").unwrap();
        assert_eq!((wide[0].start, wide[0].end), (FOUR_GIB, 0x6_3fff_ffff));
    }

    #[test]
    fn refuses_hidden_or_broken_iomem() {
        let hidden = "00000000-00000000 : Reserved\n  00000000-00000000 : System RAM\n";
        assert_eq!(
            parse_iomem(hidden),
            Err("/proc/iomem hides its addresses: run as root".into())
        );
        assert!(parse_iomem("").is_err());
        for bad in [
            "00001000-0009fbff System RAM",
            "00001000 : System RAM",
            "0000x000-0009fbff : System RAM",
            "0009fbff-00001000 : System RAM",
        ] {
            let text = format!("00000000-00000fff : Reserved\n{bad}\n");
            let err = parse_iomem(&text).unwrap_err();
            assert!(err.starts_with("/proc/iomem line 2:"), "{err}");
        }
    }

    #[test]
    fn reads_the_physical_address_width() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\n\
                       address sizes\t: 40 bits physical, 48 bits virtual\n";
        assert_eq!(phys_bits(cpuinfo), Ok(40));
        assert!(phys_bits("processor\t: 0\n").is_err());
        assert!(phys_bits("address sizes\t: 99 bits physical, 48 bits virtual").is_err());
    }

    #[test]
    fn probes_the_moat_guests_holes() {
        let map = parse_iomem(MOAT_IOMEM).unwrap();
        let addresses = probe_addresses(&map, 40).unwrap();
        // 0x1000_0000, 0x1400_0000, ... 0xfc00_0000 is 60 pages; the PCI
        // window takes 8 of them and the ECAM one.
        let below: Vec<u64> = addresses
            .iter()
            .copied()
            .filter(|&a| a < FOUR_GIB)
            .collect();
        assert_eq!(below.len(), 51);
        assert_eq!(below[0], 256 * MIB);
        assert_eq!(below[below.len() - 1], 0xfc00_0000);
        assert!(below.iter().all(|a| a % STEP == 0));
        assert!(!below.contains(&0xc000_0000) && !below.contains(&0xe000_0000));
        assert!(below.contains(&0xbc00_0000) && below.contains(&0xe400_0000));
        assert_eq!(
            &addresses[below.len()..],
            [FOUR_GIB, 16 * GIB, 64 * GIB, (1 << 40) - PAGE]
        );
        for a in &addresses {
            assert!(map.iter().all(|r| !r.overlaps(*a, PAGE)), "{a:#x}");
        }
        // A narrower CPU: 64 GiB is out of reach, its last page is not.
        let narrow = probe_addresses(&map, 36).unwrap();
        assert_eq!(
            &narrow[below.len()..],
            [FOUR_GIB, 16 * GIB, 64 * GIB - PAGE]
        );
    }

    #[test]
    fn probes_above_ram_beyond_4_gib() {
        // A cloud machine's map (trimmed): RAM on both sides of the hole,
        // a 64-bit PCI window far above it.
        let text = "\
00000000-00000fff : Reserved
00001000-0009fbff : System RAM
00100000-bfffffff : System RAM
c0001000-eebfffff : PCI Bus 0000:00
eec00000-febfffff : Reserved
  eec00000-eecfffff : PCI ECAM 0000 [bus 00-00]
fec00000-fec003ff : IOAPIC 0
100000000-63fffffff : System RAM
4000000000-7fffffffff : PCI Bus 0000:00
";
        let map = parse_iomem(text).unwrap();
        // The page below the PCI window is free; 4 and 16 GiB are RAM.
        assert_eq!(
            probe_addresses(&map, 48).unwrap(),
            [0xc000_0000, 64 * GIB, (1 << 48) - PAGE]
        );
        let no_low_ram = parse_iomem("100000000-13fffffff : System RAM\n").unwrap();
        assert_eq!(
            probe_addresses(&no_low_ram, 48),
            Err("/proc/iomem lists no System RAM below 4 GiB".into())
        );
    }

    #[test]
    fn an_unaligned_end_of_ram_starts_at_the_next_page() {
        let map = parse_iomem("00000000-10000800 : System RAM\n").unwrap();
        let addresses = probe_addresses(&map, 32).unwrap();
        assert_eq!(addresses[0], 256 * MIB + PAGE);
        assert_eq!(addresses[1], 256 * MIB + PAGE + STEP);
        // 32 bits: nothing above 4 GiB, but the last page below it.
        assert_eq!(addresses[addresses.len() - 1], FOUR_GIB - PAGE);
        assert_eq!(addresses.len(), 61);
    }

    /// The host's own map, when this runs as root (as Linux shows it to
    /// anyone else, it must be refused).
    #[test]
    fn the_hosts_iomem_parses() {
        let Ok(text) = std::fs::read_to_string("/proc/iomem") else {
            return;
        };
        match parse_iomem(&text) {
            Ok(map) => {
                assert!(map.iter().any(|r| r.name == SYSTEM_RAM), "{map:?}");
                let bits = std::fs::read_to_string("/proc/cpuinfo")
                    .map_err(|e| e.to_string())
                    .and_then(|c| phys_bits(&c))
                    .unwrap_or(36);
                for a in probe_addresses(&map, bits).unwrap() {
                    assert!(map.iter().all(|r| !r.overlaps(a, PAGE)), "{a:#x}");
                }
            }
            Err(e) => assert_eq!(e, "/proc/iomem hides its addresses: run as root"),
        }
    }

    #[test]
    fn memory_reads_count_as_nothing_refused_or_leaked() {
        let mut m = MemoryTally::default();
        m.record(0x1000_0000, Ok(u64::MAX));
        m.record(0x1400_0000, Ok(0));
        m.record(0x1800_0000, Err(14));
        assert_eq!(m.leaks, []);
        for partial in [0xff, 0xffff_ffff_0000_0000, 0x00ff_ffff_ffff_ffff] {
            m.record(0x2000_0000, Ok(partial));
        }
        assert_eq!((m.reads, m.nothing, m.leaks.len()), (6, 2, 3));
        assert_eq!(m.refused, BTreeMap::from([(14, 1)]));
        let report = Report {
            memory: Some(m),
            ..Report::default()
        };
        assert_eq!(
            report.lines(),
            [
                "probe: memory 6 reads outside RAM and devices, 2 found nothing, \
                 1 refused (errno 14 x1), 3 leaked",
                "probe: FAIL memory at 0x20000000 holds 0x00000000000000ff; \
                 memory at 0x20000000 holds 0xffffffff00000000; \
                 memory at 0x20000000 holds 0x00ffffffffffffff",
            ]
        );
    }

    #[test]
    fn a_clean_run_reports_ok() {
        let mut p = PortalReport::default();
        for sel in portals(0, 255, &[20]).ungiven() {
            p.range
                .record(Status::BadCapability.code(), || format!("{sel}"));
        }
        p.malformed.record((-1000i64) as u64, String::new);
        p.malformed
            .record(Status::BadCapability.code(), String::new);
        p.given.push((20, 0));
        let mut m = MemoryTally::default();
        m.record(0x1000_0000, Ok(u64::MAX));
        let report = Report {
            portals: Some(p),
            memory: Some(m),
            problems: Vec::new(),
        };
        assert_eq!(
            report.lines(),
            [
                "probe: portals 255 tried, 255 refused (status 4 (bad capability) x255); \
                 given 20 ok",
                "probe: malformed hypercalls 2 tried, 2 refused \
                 (status 4 (bad capability) x1, -1000 x1)",
                "probe: memory 1 reads outside RAM and devices, 1 found nothing, \
                 0 refused, 0 leaked",
                "probe: ok",
            ]
        );
    }

    #[test]
    fn an_answer_a_dead_given_portal_or_a_problem_fails() {
        let mut p = PortalReport::default();
        p.range.record(0, || "portal 33".into());
        p.range.record(4, || "portal 34".into());
        p.malformed
            .record(0, || "malformed hypercall (no magic)".into());
        p.given.push((20, Status::InsufficientRights.code()));
        let report = Report {
            portals: Some(p),
            memory: Some(MemoryTally::default()),
            problems: vec!["/dev/mem: Permission denied".into()],
        };
        assert_eq!(
            report.lines(),
            [
                "probe: portals 2 tried, 1 refused (status 4 (bad capability) x1); \
                 given 20 status 5 (insufficient rights)",
                "probe: malformed hypercalls 1 tried, 0 refused",
                "probe: memory 0 reads outside RAM and devices, 0 found nothing, \
                 0 refused, 0 leaked",
                "probe: FAIL /dev/mem: Permission denied; \
                 given portal 20 refused: status 5 (insufficient rights); \
                 portal 33 answered; malformed hypercall (no magic) answered; \
                 and 1 more",
            ]
        );
        assert_eq!(
            report.failures()[4],
            "no address outside RAM and devices to read"
        );
    }

    #[test]
    fn status_labels() {
        assert_eq!(status_label(4), "4 (bad capability)");
        assert_eq!(status_label((-1000i64) as u64), "-1000");
        assert_eq!(status_label(0x99), "0x99");
    }
}
