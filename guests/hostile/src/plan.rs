//! The seeded plan: one [`Action`] after another, each drawn from the
//! classes the executor can carry out, aimed at what the VMM emulates.

use moat_abi::HYPERCALL_IPC;

use crate::junk::{self, Junk};
use crate::pci::{Region, VirtioDevice};
use crate::virtio::{self, Ring};
use crate::{Layout, Xorshift, ECAM, ECAM_LEN, FOUR_GIB, IOAPIC, LAPIC, MMIO_HOLE};

/// Action classes; an executor enables those it can carry out.
pub mod class {
    pub const PORT: u32 = 1 << 0;
    pub const MMIO: u32 = 1 << 1;
    pub const CPUID: u32 = 1 << 2;
    pub const MSR: u32 = 1 << 3;
    pub const HYPERCALL: u32 = 1 << 4;
    pub const RING: u32 = 1 << 5;
    pub const JUNK: u32 = 1 << 6;
    pub const ALL: u32 = (1 << 7) - 1;
    pub const NAMES: [&str; 7] = ["port", "mmio", "cpuid", "msr", "hypercall", "ring", "junk"];
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action<'a> {
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
    MsrWrite {
        msr: u32,
        value: u64,
    },
    /// rax, rbx, rcx, rdx, rsi, rdi.
    Hypercall {
        regs: [u64; 6],
    },
    Ring(&'a Ring),
    Junk(Junk),
}

impl Action<'_> {
    /// Index into [`class::NAMES`].
    pub fn class(&self) -> usize {
        match self {
            Action::PortRead { .. } | Action::PortWrite { .. } => 0,
            Action::MmioRead { .. } | Action::MmioWrite { .. } => 1,
            Action::Cpuid { .. } => 2,
            Action::MsrRead { .. } | Action::MsrWrite { .. } => 3,
            Action::Hypercall { .. } => 4,
            Action::Ring(_) => 5,
            Action::Junk(_) => 6,
        }
    }
}

/// The ports of the VMM's PC: PIC, PIT, port 0x61, RTC, COM1, pvpanic,
/// ACPI PM, PCI configuration.
pub const PORTS: [u16; 29] = [
    0x20, 0x21, 0xa0, 0xa1, 0x40, 0x41, 0x42, 0x43, 0x61, 0x70, 0x71, 0x3f8, 0x3f9, 0x3fa, 0x3fb,
    0x3fc, 0x3fd, 0x3fe, 0x3ff, 0x505, 0x600, 0x601, 0x602, 0xcf8, 0xcf9, 0xcfa, 0xcfb, 0xcfc,
    0xcfe,
];
const PVPANIC: u16 = 0x505;
const ACPI_PM: u16 = 0x600;
const PCI_ADDRESS: u16 = 0xcf8;
const PCI_DATA: u16 = 0xcfc;

/// MSRs worth aiming at: what the VMM emulates (EFER, syscall, PAT, TSC,
/// APIC base, x2APIC, kvm-clock, the read-as-constant ones), TSC deadline.
const MSRS: [u32; 24] = [
    0xc000_0080,
    0xc000_0081,
    0xc000_0082,
    0xc000_0084,
    0xc000_0100,
    0xc000_0101,
    0xc000_0102,
    0x174,
    0x175,
    0x176,
    0x277,
    0x10,
    0x1b,
    0x3a,
    0x8b,
    0x1a0,
    0x1d9,
    0x6e0,
    0x4b56_4d00,
    0x4b56_4d01,
    0x11,
    0x12,
    0xc001_0015,
    0xc001_0055,
];
const EFER: u32 = 0xc000_0080;
const EFER_SCE: u64 = 1;
const EFER_NXE: u64 = 1 << 11;
const SYSENTER_CS: u32 = 0x174;
const KVM_CLOCK: [u32; 4] = [0x4b56_4d00, 0x4b56_4d01, 0x11, 0x12];
const X2APIC_FIRST: u32 = 0x800;

/// PCI configuration registers never written: the BARs and the expansion
/// ROM (the plan's map of device regions must stay true).
fn protected_config(reg: u64) -> bool {
    (0x10..0x28).contains(&reg) || (0x30..0x34).contains(&reg)
}

const COMMAND: u64 = 0x04;
const COMMAND_MEMORY: u64 = 0x2;

/// What the plan aims at, found by the executor.
#[derive(Clone, Copy, Debug)]
pub struct Targets<'a> {
    pub layout: Layout,
    pub virtio: &'a [VirtioDevice],
    /// Which classes to draw.
    pub classes: u32,
    /// Port writes the executor may make (the Linux tool leaves the
    /// console and the PCI address latch to Linux); reads go anywhere.
    pub port_writes: bool,
    /// Whether MMIO may go to the LAPIC and IOAPIC (not under Linux,
    /// whose timer and interrupts live there).
    pub interrupt_controllers: bool,
}

/// The plan's state: the generator and what its earlier actions set up.
pub struct Plan<'a> {
    rng: Xorshift,
    targets: Targets<'a>,
    /// The last 32-bit write to the PCI address port, if known.
    cf8: Option<u32>,
    ring: Ring,
}

impl<'a> Plan<'a> {
    pub fn new(seed: u64, targets: Targets<'a>) -> Self {
        Self {
            rng: Xorshift::new(seed),
            targets,
            cf8: Some(0),
            ring: Ring {
                base: 0,
                image: [0; virtio::IMAGE_LEN],
                steps: [virtio::Step::None; virtio::MAX_STEPS],
                queue: 0,
                size: 0,
            },
        }
    }

    fn size(&mut self) -> u8 {
        [1, 2, 4, 8][self.rng.below(4) as usize]
    }

    fn port_size(&mut self) -> u8 {
        [1, 2, 4][self.rng.below(3) as usize]
    }

    /// The next action.
    pub fn next_action(&mut self) -> Action<'_> {
        let classes = self.targets.classes
            & if self.targets.virtio.is_empty() {
                !class::RING
            } else {
                class::ALL
            };
        // Weights: port 30, mmio 30, cpuid 8, msr 8, hypercall 6, ring 8, junk 10.
        const WEIGHTS: [u64; 7] = [30, 30, 8, 8, 6, 8, 10];
        let total: u64 = (0..7)
            .filter(|i| classes & (1 << i) != 0)
            .map(|i| WEIGHTS[i])
            .sum();
        if total == 0 {
            return Action::Cpuid {
                leaf: 0,
                subleaf: 0,
            };
        }
        let mut pick = self.rng.below(total);
        let mut chosen = 0;
        for (i, w) in WEIGHTS.iter().enumerate() {
            if classes & (1 << i) == 0 {
                continue;
            }
            if pick < *w {
                chosen = i;
                break;
            }
            pick -= w;
        }
        match chosen {
            0 => self.port(),
            1 => self.mmio(),
            2 => self.cpuid(),
            3 => self.msr(),
            4 => self.hypercall(),
            5 => {
                let n = self.targets.virtio.len() as u64;
                let device = self.targets.virtio[self.rng.below(n) as usize];
                virtio::build(&mut self.rng, &self.targets.layout, &device, &mut self.ring);
                Action::Ring(&self.ring)
            }
            _ => {
                let regions = self.junk_targets();
                let (list, n) = regions;
                Action::Junk(junk::generate(&mut self.rng, &list[..n]))
            }
        }
    }

    fn port(&mut self) -> Action<'a> {
        let port = if self.rng.one_in(8) {
            self.rng.next_u64() as u16
        } else {
            PORTS[self.rng.below(PORTS.len() as u64) as usize]
        };
        let size = self.port_size();
        if !self.targets.port_writes || self.rng.one_in(2) {
            return Action::PortRead { port, size };
        }
        let mut value = self.rng.next_u64() as u32;
        let end = u32::from(port) + u32::from(size);
        let covers = |p: u16| u32::from(port) <= u32::from(p) && u32::from(p) < end;
        let byte_shift = |p: u16| 8 * (u32::from(p) - u32::from(port));
        // Never power off, reset or report a panic: the run must go on.
        if covers(PVPANIC) {
            value &= !(1 << byte_shift(PVPANIC));
        }
        if covers(ACPI_PM) {
            value &= !(0x20 << byte_shift(ACPI_PM));
        }
        if covers(ACPI_PM + 2) {
            value |= 0x80 << byte_shift(ACPI_PM + 2);
        }
        // Keep the map of BARs true: know what CF8 selects, and write
        // configuration data only where it is not a BAR.
        if covers(PCI_ADDRESS) || (port > PCI_ADDRESS && port < PCI_DATA) {
            self.cf8 = (port == PCI_ADDRESS && size == 4).then_some(value);
        }
        if (PCI_DATA..PCI_DATA + 4).contains(&port) || covers(PCI_DATA) {
            let Some(cf8) = self.cf8 else {
                return Action::PortRead { port, size };
            };
            let reg = u64::from(cf8 & 0xfc) + u64::from(port.saturating_sub(PCI_DATA));
            if (reg..reg + u64::from(size)).any(protected_config) {
                return Action::PortRead { port, size };
            }
            if reg <= COMMAND && COMMAND < reg + u64::from(size) {
                value |= (COMMAND_MEMORY as u32) << (8 * (COMMAND - reg));
            }
        }
        Action::PortWrite { port, size, value }
    }

    fn mmio(&mut self) -> Action<'a> {
        let t = self.targets;
        let size = self.size();
        let pick = self.rng.below(20);
        let addr = match pick {
            0..=8 if !t.virtio.is_empty() => {
                let d = t.virtio[self.rng.below(t.virtio.len() as u64) as usize];
                let r = [d.common, d.notify, d.isr, d.device, d.span()][self.rng.below(5) as usize];
                r.base + self.rng.below(r.len.max(1) + 8)
            }
            9..=11 if t.interrupt_controllers => LAPIC + self.rng.below(0x1000),
            12 | 13 if t.interrupt_controllers => IOAPIC + self.rng.below(0x50),
            14..=16 => ECAM + self.rng.below(ECAM_LEN),
            17 => MMIO_HOLE + self.rng.below(ECAM - MMIO_HOLE),
            18 => t.layout.ram_end + self.rng.below(MMIO_HOLE - t.layout.ram_end),
            _ => ECAM + ECAM_LEN + self.rng.below(IOAPIC - ECAM - ECAM_LEN),
        };
        // Natural alignment now and then, straddling otherwise.
        let addr = if self.rng.one_in(2) {
            addr & !(u64::from(size) - 1)
        } else {
            addr
        };
        if addr.saturating_add(u64::from(size)) > FOUR_GIB || self.rng.one_in(2) {
            return Action::MmioRead { addr, size };
        }
        let mut value = self.rng.next_u64();
        if (ECAM..ECAM + ECAM_LEN).contains(&addr) {
            let reg = addr & 0xfff;
            if (reg..reg + u64::from(size)).any(protected_config) {
                return Action::MmioRead { addr, size };
            }
            if reg <= COMMAND && COMMAND < reg + u64::from(size) {
                value |= COMMAND_MEMORY << (8 * (COMMAND - reg));
            }
        }
        for d in t.virtio {
            if let Some(offset) = addr.checked_sub(d.common.base) {
                if virtio::touches_queue_addresses(offset, size) {
                    // A whole half of one address field, and only an
                    // address a device may be given.
                    let field = (offset.max(virtio::common::QUEUE_DESC) & !3).min(0x34);
                    let target = t.layout.dma_target(&mut self.rng, t.layout.scratch);
                    let half = if field % 8 == 4 {
                        target >> 32
                    } else {
                        target & 0xffff_ffff
                    };
                    return Action::MmioWrite {
                        addr: d.common.base + field,
                        size: 4,
                        value: half,
                    };
                }
            }
        }
        Action::MmioWrite { addr, size, value }
    }

    fn cpuid(&mut self) -> Action<'a> {
        let leaf = match self.rng.below(6) {
            0 => self.rng.next_u64() as u32,
            1 => 0x4000_0000 + self.rng.below(0x20) as u32,
            2 => 0x8000_0000 + self.rng.below(0x30) as u32,
            _ => self.rng.below(0x20) as u32,
        };
        let subleaf = match self.rng.below(3) {
            0 => self.rng.next_u64() as u32,
            _ => self.rng.below(8) as u32,
        };
        Action::Cpuid { leaf, subleaf }
    }

    fn msr(&mut self) -> Action<'a> {
        let msr = match self.rng.below(8) {
            0 => self.rng.next_u64() as u32,
            1 => X2APIC_FIRST + self.rng.below(0x100) as u32,
            _ => MSRS[self.rng.below(MSRS.len() as u64) as usize],
        };
        if self.rng.one_in(2) {
            return Action::MsrRead { msr };
        }
        let mut value = match self.rng.below(4) {
            0 => self.rng.below(0x100),
            1 => u64::MAX,
            _ => self.rng.next_u64(),
        };
        if msr == EFER {
            // No SYSCALL (its target MSR is random too); keep NXE, which
            // the executor's page tables use.
            value = (value & !EFER_SCE) | EFER_NXE;
        }
        if msr == SYSENTER_CS {
            value = 0;
        }
        if KVM_CLOCK.contains(&msr) {
            let l = self.targets.layout;
            value = (l.dma_target(&mut self.rng, l.scratch) & !0xf) | (value & 1);
        }
        Action::MsrWrite { msr, value }
    }

    fn hypercall(&mut self) -> Action<'a> {
        let rax = match self.rng.below(6) {
            // The IPC hypercall to a selector the VM was likely not given.
            0 | 1 => HYPERCALL_IPC + self.rng.below(1 << 12),
            2 => HYPERCALL_IPC + (self.rng.next_u64() & 0xffff_ffff),
            // Its high half with other low bits set, or near it.
            3 => HYPERCALL_IPC | (self.rng.next_u64() & !0xffff_ffff),
            // KVM's hypercall numbers and anything.
            4 => self.rng.below(16),
            _ => self.rng.next_u64(),
        };
        let mut regs = [rax, 0, 0, 0, 0, 0];
        for r in regs.iter_mut().skip(1) {
            *r = match self.rng.below(3) {
                0 => self.rng.below(64),
                _ => self.rng.next_u64(),
            };
        }
        Action::Hypercall { regs }
    }

    /// Regions for junk's registers: the IOAPIC, the LAPIC and each virtio
    /// device's notify, ISR and device pages — never the virtio common
    /// configuration (queue addresses go there) or ECAM (BARs and MSI-X
    /// go there). The bare-metal executor makes just these pages user
    /// pages.
    fn junk_targets(&self) -> ([Region; 20], usize) {
        let mut list = [Region::default(); 20];
        let mut n = 0;
        let mut add = |r: Region| {
            if n < list.len() && r.len > 0 {
                list[n] = r;
                n += 1;
            }
        };
        if self.targets.interrupt_controllers {
            add(Region {
                base: LAPIC,
                len: 0x1000,
            });
            add(Region {
                base: IOAPIC,
                len: 0x40,
            });
        }
        for d in self.targets.virtio {
            add(d.notify);
            add(d.isr);
            add(d.device);
        }
        (list, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MIB;

    fn device() -> VirtioDevice {
        VirtioDevice {
            slot: 1,
            device_id: 0x1043,
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

    fn targets(devices: &[VirtioDevice]) -> Targets<'_> {
        Targets {
            layout: Layout::new(32 * MIB, 8 * MIB).unwrap(),
            virtio: devices,
            classes: class::ALL,
            port_writes: true,
            interrupt_controllers: true,
        }
    }

    /// What the plan draws for a seed, as text.
    fn trace(seed: u64, n: usize) -> Vec<String> {
        let devices = [device()];
        let mut plan = Plan::new(seed, targets(&devices));
        (0..n)
            .map(|_| format!("{:?}", plan.next_action()))
            .collect()
    }

    #[test]
    fn a_seed_replays_and_another_differs() {
        assert_eq!(trace(7, 500), trace(7, 500));
        assert_ne!(trace(7, 500), trace(8, 500));
    }

    #[test]
    fn every_class_is_drawn_and_nothing_ends_the_run() {
        let devices = [device()];
        let mut plan = Plan::new(0x5eed, targets(&devices));
        let mut seen = [0u32; 7];
        let layout = targets(&devices).layout;
        for _ in 0..100_000 {
            let action = plan.next_action();
            seen[action.class()] += 1;
            match action {
                Action::PortWrite { port, size, value } => {
                    let bytes = value.to_le_bytes();
                    for (i, p) in (port..port.saturating_add(u16::from(size))).enumerate() {
                        match p {
                            PVPANIC => assert_eq!(bytes[i] & 1, 0),
                            ACPI_PM => assert_eq!(bytes[i] & 0x20, 0),
                            0x602 => assert_ne!(bytes[i], 1),
                            _ => {}
                        }
                    }
                }
                Action::MmioWrite { addr, size, value } => {
                    assert!(addr >= layout.ram_end, "{addr:#x}");
                    if (ECAM..ECAM + ECAM_LEN).contains(&addr) {
                        let reg = addr & 0xfff;
                        assert!(!(reg..reg + u64::from(size)).any(protected_config));
                    }
                    let off = addr.wrapping_sub(0xc000_0000);
                    if virtio::touches_queue_addresses(off, size) {
                        assert_eq!((size, off % 4), (4, 0));
                        if off % 8 == 0 {
                            assert!(layout.dma_allowed(value), "{value:#x}");
                        }
                    }
                }
                Action::MsrWrite { msr: EFER, value } => {
                    assert_eq!(value & (EFER_SCE | EFER_NXE), EFER_NXE)
                }
                Action::Ring(ring) => assert!(ring.base >= layout.scratch),
                _ => {}
            }
        }
        assert!(seen.iter().all(|&n| n > 1000), "{seen:?}");
    }

    #[test]
    fn classes_can_be_left_out() {
        let mut t = targets(&[]);
        t.classes = class::PORT | class::CPUID;
        t.port_writes = false;
        let mut plan = Plan::new(1, t);
        for _ in 0..1000 {
            assert!(matches!(
                plan.next_action(),
                Action::PortRead { .. } | Action::Cpuid { .. }
            ));
        }
    }
}
