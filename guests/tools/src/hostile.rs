//! `hostile`: the seeded plan of the bare-metal hostile guest
//! (`guests/hostile`, crate `hostile`) carried out by root inside Linux —
//! port I/O (instructions after `iopl(3)`, and `/dev/port`), MMIO through
//! `/dev/mem`, CPUID, MSR reads through `/dev/cpu/0/msr`, malformed and
//! random IPC hypercalls — and what Linux itself must be spared so that
//! the run goes on long enough to matter: its console, its interrupt
//! controllers, MSR writes, and device DMA into RAM it owns. Each spared
//! action is still made, as a harmless access of the same kind and
//! device (a read instead of a write), and counted.

use std::collections::BTreeMap;
use std::fmt::Write;

use hostile::pci::VirtioDevice;
use hostile::plan::{class, Action};
use hostile::{virtio, Config, Layout, FOUR_GIB, IOAPIC, LAPIC};

use crate::args::{Parsed, UsageError};
use crate::probe::IomemRange;

/// The classes the tool carries out by default: every one but virtio
/// rings (their buffers would be Linux's RAM unless the top of RAM is
/// withheld from it, see [`linux_layout`]) and junk instructions (which
/// need code executed from device memory).
pub const DEFAULT_CLASSES: u32 =
    class::PORT | class::MMIO | class::CPUID | class::MSR | class::HYPERCALL;
/// The classes the tool can carry out at all (rings: not yet).
pub const CLASSES: u32 = DEFAULT_CLASSES;
/// A progress line every this many actions.
pub const PROGRESS_EVERY: u64 = 10_000;

/// COM1, the guest's console (`console=ttyS0`), and the one register of
/// it that nobody reads back: the scratch register.
const UART: std::ops::Range<u32> = 0x3f8..0x400;
const UART_SCRATCH: u16 = 0x3ff;
/// The line status register: reading it changes nothing.
const UART_LSR: u16 = 0x3fd;
const APIC_PAGE: u64 = 0x1000;

/// `[seed=N] [actions=N] [classes=MASK]`, numbers decimal or `0x` hex.
pub fn parse(args: &[String]) -> Result<Parsed<Config>, UsageError> {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        return Ok(Parsed::Help);
    }
    if let Some(odd) = args.iter().find(|a| {
        !["seed=", "actions=", "classes="]
            .iter()
            .any(|p| a.starts_with(p))
    }) {
        return Err(UsageError(format!("unexpected `{odd}`")));
    }
    let mut config = Config::parse(&args.join(" "), "")
        .map_err(|bad| UsageError(format!("`{}` is not a number", bad.0)))?;
    if !args.iter().any(|a| a.starts_with("classes=")) {
        config.classes = DEFAULT_CLASSES;
    }
    if config.classes & !CLASSES != 0 || config.classes == 0 {
        return Err(UsageError(format!(
            "classes={:#x}: the tool carries out {CLASSES:#x} (port, mmio, cpuid, msr, \
             hypercall), at least one",
            config.classes
        )));
    }
    Ok(Parsed::Run(config))
}

/// One range of `/sys/firmware/memmap` (the memory map the firmware gave
/// Linux, before `memmap=` took parts of it away): inclusive, with its type.
pub fn firmware_ram_end(ranges: &[(u64, u64, String)]) -> Option<u64> {
    ranges
        .iter()
        .filter(|(start, _, kind)| kind == "System RAM" && *start < FOUR_GIB)
        .map(|(_, end, _)| end.saturating_add(1).min(FOUR_GIB))
        .max()
}

/// Where the plan may aim devices: the scratch area at the top of the
/// firmware's RAM below 4 GiB, and whether Linux keeps its hands off it
/// (the guest booted with `memmap=16M$<ram end - 16M>`, so that RAM is not
/// Linux's). Without that the plan still runs, but no device is given an
/// address there ([`Carry::DmaKept`]) and rings are not built.
pub fn linux_layout(firmware_end: u64, iomem: &[IomemRange]) -> Option<(Layout, bool)> {
    let linux_end = iomem
        .iter()
        .filter(|r| r.name == "System RAM" && r.start < FOUR_GIB)
        .map(|r| r.end.saturating_add(1).min(FOUR_GIB))
        .max()?;
    match Layout::new(firmware_end, linux_end) {
        Some(layout) => Some((layout, true)),
        None => Layout::new(firmware_end, 0).map(|layout| (layout, false)),
    }
}

/// An access the tool makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    PortRead {
        port: u16,
        size: u8,
    },
    PortWrite {
        port: u16,
        size: u8,
        value: u32,
    },
    MmioRead {
        addr: u64,
        size: u8,
    },
    MmioWrite {
        addr: u64,
        size: u8,
        value: u64,
    },
    Cpuid {
        leaf: u32,
        subleaf: u32,
    },
    MsrRead {
        msr: u32,
    },
    /// rax and the six message registers.
    Hypercall {
        rax: u64,
        words: [u64; 6],
    },
}

/// Why an action of the plan became a milder one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Spared {
    /// COM1 carries the guest's console: its registers are read instead
    /// (but for the scratch register), and never the receive buffer or
    /// the interrupt identification (reading those takes what the driver
    /// waits for).
    Console,
    /// Linux's timer and interrupts live in the LAPIC and IOAPIC: writes
    /// become reads.
    InterruptController,
    /// `/dev/cpu/0/msr` writes the real MSR under Linux (EFER, LSTAR...):
    /// reads only.
    MsrWrite,
    /// A device address in RAM Linux owns: the register is read instead.
    DmaKept,
}

impl Spared {
    pub const ALL: [Spared; 4] = [
        Spared::Console,
        Spared::InterruptController,
        Spared::MsrWrite,
        Spared::DmaKept,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Spared::Console => "console",
            Spared::InterruptController => "interrupt controllers",
            Spared::MsrWrite => "msr writes",
            Spared::DmaKept => "dma into linux ram",
        }
    }
}

/// What the tool does for one action of the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Carry {
    pub access: Access,
    pub spared: Option<Spared>,
}

/// COM1's receive buffer and interrupt identification: reading either
/// takes what the driver waits for (a character, a transmitter-empty
/// interrupt).
const UART_TAKEN: [u16; 2] = [0x3f8, 0x3fa];

fn covers(port: u16, size: u8, p: u16) -> bool {
    (u32::from(port)..u32::from(port) + u32::from(size)).contains(&u32::from(p))
}

fn touches_uart(port: u16, size: u8) -> bool {
    let (start, end) = (u32::from(port), u32::from(port) + u32::from(size));
    start < UART.end && UART.start < end
}

fn in_apic(addr: u64) -> bool {
    (LAPIC..LAPIC + APIC_PAGE).contains(&addr) || (IOAPIC..IOAPIC + APIC_PAGE).contains(&addr)
}

/// How `action` is carried out under Linux; `dma_safe` says whether the
/// plan's scratch area is withheld from Linux.
pub fn carry(action: &Action<'_>, virtio: &[VirtioDevice], dma_safe: bool) -> Carry {
    let plain = |access| Carry {
        access,
        spared: None,
    };
    let spared = |access, why| Carry {
        access,
        spared: Some(why),
    };
    let uart_read = Access::PortRead {
        port: UART_LSR,
        size: 1,
    };
    match *action {
        Action::PortRead { port, size } => {
            if UART_TAKEN.iter().any(|&p| covers(port, size, p)) {
                // Still a COM1 exit, of a register whose reading changes
                // nothing.
                return spared(uart_read, Spared::Console);
            }
            plain(Access::PortRead { port, size })
        }
        Action::PortWrite { port, size, value } => {
            if touches_uart(port, size) {
                if port == UART_SCRATCH && size == 1 {
                    return plain(Access::PortWrite { port, size, value });
                }
                return spared(uart_read, Spared::Console);
            }
            plain(Access::PortWrite { port, size, value })
        }
        Action::MmioRead { addr, size } => plain(Access::MmioRead { addr, size }),
        Action::MmioWrite { addr, size, value } => {
            if in_apic(addr) {
                return spared(Access::MmioRead { addr, size }, Spared::InterruptController);
            }
            let queue_address = virtio.iter().any(|d| {
                addr.checked_sub(d.common.base)
                    .is_some_and(|offset| virtio::touches_queue_addresses(offset, size))
            });
            if queue_address && !dma_safe {
                return spared(Access::MmioRead { addr, size }, Spared::DmaKept);
            }
            plain(Access::MmioWrite { addr, size, value })
        }
        Action::Cpuid { leaf, subleaf } => plain(Access::Cpuid { leaf, subleaf }),
        Action::MsrRead { msr } => plain(Access::MsrRead { msr }),
        Action::MsrWrite { msr, .. } => spared(Access::MsrRead { msr }, Spared::MsrWrite),
        Action::Hypercall { regs } => plain(Access::Hypercall {
            rax: regs[0],
            words: [regs[1], regs[2], regs[3], regs[4], regs[5], 0],
        }),
        // Never drawn: the command line refuses their classes.
        Action::Ring(_) | Action::Junk(_) => plain(Access::Cpuid {
            leaf: 0,
            subleaf: 0,
        }),
    }
}

/// What a run did, for its summary lines.
#[derive(Debug, Default)]
pub struct Tally {
    pub actions: u64,
    pub by_class: [u64; class::NAMES.len()],
    pub spared: BTreeMap<Spared, u64>,
    /// Accesses the guest's kernel refused: a mapping of `/dev/mem` or a
    /// `/dev/port` or MSR read (errno), by class name.
    pub refused: BTreeMap<&'static str, u64>,
    /// Signals an access raised (the VMM injected an exception, or Linux
    /// found the access bad), by name.
    pub signals: BTreeMap<&'static str, u64>,
    /// Hypercalls by status returned (0 = an IPC that went through).
    pub hypercalls_answered: u64,
}

impl Tally {
    pub fn record(&mut self, action_class: usize, spared: Option<Spared>) {
        self.actions += 1;
        if let Some(n) = self.by_class.get_mut(action_class) {
            *n += 1;
        }
        if let Some(why) = spared {
            *self.spared.entry(why).or_default() += 1;
        }
    }

    /// `hostile: by class ...`, `hostile: spared ...`, `hostile: refused
    /// ...`, `hostile: signals ...`.
    pub fn lines(&self) -> Vec<String> {
        let mut by_class = String::from("hostile: by class");
        for (name, n) in class::NAMES.iter().zip(self.by_class) {
            let _ = write!(by_class, " {name} {n}");
        }
        let mut spared = String::from("hostile: spared for Linux");
        for why in Spared::ALL {
            let n = self.spared.get(&why).copied().unwrap_or(0);
            let _ = write!(spared, ", {} {n}", why.name());
        }
        let list = |title: &str, map: &BTreeMap<&'static str, u64>| {
            let mut line = format!("hostile: {title}");
            if map.is_empty() {
                line += " none";
            }
            for (name, n) in map {
                let _ = write!(line, " {name} {n}");
            }
            line
        };
        vec![
            by_class,
            spared,
            list("refused by Linux", &self.refused),
            list("signals", &self.signals),
            format!(
                "hypercalls answered with status 0: {}",
                self.hypercalls_answered
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::line;
    use hostile::pci::Region;
    use hostile::plan::{Plan, Targets};
    use hostile::MIB;

    fn device() -> VirtioDevice {
        VirtioDevice {
            slot: 3,
            device_id: 0x1042,
            common: Region {
                base: 0xc000_0000,
                len: 0x38,
            },
            notify: Region {
                base: 0xc000_3000,
                len: 0x1000,
            },
            notify_multiplier: 4,
            isr: Region {
                base: 0xc000_1000,
                len: 0x1000,
            },
            device: Region {
                base: 0xc000_2000,
                len: 0x1000,
            },
        }
    }

    #[test]
    fn parses_the_words_of_the_bare_metal_guest() {
        let run = |w: &[&str]| parse(&line(w));
        let Ok(Parsed::Run(c)) = run(&["seed=0x1234", "actions=7"]) else {
            panic!()
        };
        assert_eq!((c.seed, c.actions, c.classes), (0x1234, 7, DEFAULT_CLASSES));
        let Ok(Parsed::Run(c)) = run(&["classes=0x11"]) else {
            panic!()
        };
        assert_eq!((c.seed, c.classes), (hostile::DEFAULT_SEED, 0x11));
        assert_eq!(run(&["x", "--help"]), Ok(Parsed::Help));
        for bad in [
            &["seed=zz"][..],
            &["--seed", "1"],
            &["classes=0x40"],
            &["classes=0x20"],
            &["classes=0"],
        ] {
            assert!(run(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_scratch_area_is_safe_only_when_linux_does_not_own_it() {
        let ram = |end: u64| IomemRange {
            start: 0x10_0000,
            end: end - 1,
            name: "System RAM".into(),
        };
        let firmware = firmware_ram_end(&[
            (0, 0x9_fbff, "System RAM".into()),
            (0x10_0000, 0xfff_ffff, "System RAM".into()),
            (0xe000_0000, 0xe00f_ffff, "Reserved".into()),
        ])
        .unwrap();
        assert_eq!(firmware, 256 * MIB);
        let (layout, safe) = linux_layout(firmware, &[ram(240 * MIB)]).unwrap();
        assert!(safe);
        assert_eq!(layout.scratch, 240 * MIB);
        let (_, safe) = linux_layout(firmware, &[ram(256 * MIB)]).unwrap();
        assert!(!safe, "Linux owns all of RAM");
        assert!(linux_layout(firmware, &[]).is_none());
    }

    #[test]
    fn linux_keeps_its_console_interrupts_and_msrs() {
        let d = [device()];
        let c = |a: Action<'_>| carry(&a, &d, false);
        for port in [0x3f8, 0x3f9, 0x3fa, 0x3fb, 0x3fe] {
            let write = c(Action::PortWrite {
                port,
                size: 1,
                value: 0x80,
            });
            assert_eq!(write.spared, Some(Spared::Console), "{port:#x}");
            assert!(matches!(write.access, Access::PortRead { port: 0x3fd, .. }));
        }
        // A wide write from below reaching into COM1.
        assert_eq!(
            c(Action::PortWrite {
                port: 0x3f6,
                size: 4,
                value: 0
            })
            .spared,
            Some(Spared::Console)
        );
        for (port, size) in [(0x3f8, 1), (0x3fa, 1), (0x3f9, 2)] {
            assert_eq!(
                c(Action::PortRead { port, size }).spared,
                Some(Spared::Console)
            );
        }
        for (port, size) in [(0x3fd, 1), (0x3fe, 2), (0x3ff, 1), (0x3f9, 1), (0x2f8, 4)] {
            assert_eq!(
                c(Action::PortRead { port, size }),
                Carry {
                    access: Access::PortRead { port, size },
                    spared: None
                }
            );
        }
        let scratch = Action::PortWrite {
            port: 0x3ff,
            size: 1,
            value: 7,
        };
        assert_eq!(c(scratch).spared, None);
        for addr in [LAPIC + 0x320, IOAPIC, IOAPIC + 0x10] {
            let w = c(Action::MmioWrite {
                addr,
                size: 4,
                value: 0,
            });
            assert_eq!(w.spared, Some(Spared::InterruptController));
            assert_eq!(w.access, Access::MmioRead { addr, size: 4 });
        }
        let msr = c(Action::MsrWrite {
            msr: 0xc000_0080,
            value: 0,
        });
        assert_eq!(
            (msr.access, msr.spared),
            (Access::MsrRead { msr: 0xc000_0080 }, Some(Spared::MsrWrite))
        );
    }

    #[test]
    fn device_addresses_only_where_linux_does_not_live() {
        let d = [device()];
        let queue_desc = Action::MmioWrite {
            addr: d[0].common.base + virtio::common::QUEUE_DESC,
            size: 4,
            value: 0x0f00_0000,
        };
        assert_eq!(carry(&queue_desc, &d, false).spared, Some(Spared::DmaKept));
        assert_eq!(carry(&queue_desc, &d, true).spared, None);
        let status = Action::MmioWrite {
            addr: d[0].common.base + 0x14,
            size: 1,
            value: 0,
        };
        assert_eq!(carry(&status, &d, false).spared, None);
    }

    /// The plan under Linux, over many seeds: nothing reaches COM1's live
    /// registers, the interrupt controllers or an MSR, and every class the
    /// tool carries out is drawn.
    #[test]
    fn a_long_plan_under_linux_spares_what_it_must() {
        let d = [device()];
        let targets = Targets {
            layout: Layout::new(256 * MIB, 0).unwrap(),
            virtio: &d,
            classes: DEFAULT_CLASSES,
            port_writes: true,
            interrupt_controllers: true,
        };
        let mut tally = Tally::default();
        for seed in 1..5 {
            let mut plan = Plan::new(seed, targets);
            for _ in 0..20_000 {
                let action = plan.next_action();
                let carried = carry(&action, &d, false);
                tally.record(action.class(), carried.spared);
                match carried.access {
                    Access::PortWrite { port, size, .. } => {
                        assert!(!touches_uart(port, size) || port == UART_SCRATCH)
                    }
                    Access::PortRead { port, size } => {
                        assert!(!UART_TAKEN.iter().any(|&p| covers(port, size, p)))
                    }
                    Access::MmioWrite { addr, .. } => assert!(!in_apic(addr)),
                    _ => {}
                }
            }
        }
        assert_eq!(tally.actions, 80_000);
        for (i, name) in class::NAMES.iter().enumerate() {
            let drawn = DEFAULT_CLASSES & (1 << i) != 0;
            assert_eq!(tally.by_class[i] > 0, drawn, "{name}");
        }
        for why in [
            Spared::Console,
            Spared::InterruptController,
            Spared::MsrWrite,
        ] {
            assert!(tally.spared[&why] > 0, "{why:?}");
        }
        let lines = tally.lines();
        assert!(lines[0].starts_with("hostile: by class port "), "{lines:?}");
        assert!(lines[1].contains("msr writes "), "{lines:?}");
    }
}
