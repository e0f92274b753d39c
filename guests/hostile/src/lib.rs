//! Hostile guests: what a guest that wants to break its VMM does, as a
//! seeded, reproducible plan of actions — port I/O and MMIO of every width
//! to every device the VMM emulates, virtio rings built to mislead, CPUID
//! leaves, MSR reads and writes, malformed hypercalls, and junk
//! instruction bytes aimed at MMIO (so the VMM's instruction emulator
//! decodes garbage).
//!
//! The plan is pure and host-tested; two executors carry it out: the
//! bare-metal guest in `src/main.rs` (booted by the real VMM as a bzImage)
//! and the Linux tool `hostile` in `guests/tools` (root, through
//! `/dev/mem`, `iopl` and the hypercall). Both print the seed and the
//! count, so a failing run replays with the same `seed=`.
//!
//! The plan never lets a device write where its own guest keeps code or
//! data: every guest-physical address it hands a device (queue rings,
//! descriptor buffers, the kvm-clock pages) comes from [`Layout::dma_target`],
//! which picks among the scratch area at the top of RAM, the ring being
//! built, addresses straddling the end of RAM, beyond RAM, in MMIO, and
//! near the top of the address space — never below [`Layout::scratch`].
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod junk;
pub mod pci;
pub mod plan;
pub mod virtio;

pub use common::rng::Xorshift;

/// `hostile.seed=` and `hostile.actions=` (bare-metal command line) or
/// `seed=`/`actions=` (the Linux tool's words), with defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub seed: u64,
    pub actions: u64,
    /// Which action classes to draw ([`plan::class`] bits; default all),
    /// to narrow a failing seed down.
    pub classes: u32,
}

pub const DEFAULT_SEED: u64 = 0x5eed;
pub const DEFAULT_ACTIONS: u64 = 100_000;

/// A word of the command line that is not a number where one belongs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadWord<'a>(pub &'a str);

impl Config {
    /// Reads `PREFIXseed=N` and `PREFIXactions=N` (decimal or `0x` hex)
    /// from whitespace-separated `words`; other words are ignored.
    pub fn parse<'a>(words: &'a str, prefix: &str) -> Result<Self, BadWord<'a>> {
        let mut config = Config {
            seed: DEFAULT_SEED,
            actions: DEFAULT_ACTIONS,
            classes: plan::class::ALL,
        };
        let mut classes = u64::from(config.classes);
        for word in words.split_whitespace() {
            let Some(rest) = word.strip_prefix(prefix) else {
                continue;
            };
            let (slot, text) = if let Some(text) = rest.strip_prefix("seed=") {
                (&mut config.seed, text)
            } else if let Some(text) = rest.strip_prefix("actions=") {
                (&mut config.actions, text)
            } else if let Some(text) = rest.strip_prefix("classes=") {
                (&mut classes, text)
            } else {
                continue;
            };
            *slot = common::args::parse_number(text).ok_or(BadWord(word))?;
        }
        config.classes = u32::try_from(classes).map_err(|_| BadWord("classes"))?;
        Ok(config)
    }
}

/// Where things are in the guest-physical space the plan attacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// End of RAM below 4 GiB.
    pub ram_end: u64,
    /// `[scratch, ram_end)`: the only RAM the plan gives devices. Rings
    /// are built here; everything the executor must keep lies below.
    pub scratch: u64,
}

pub const MIB: u64 = 1 << 20;
/// The device window of the VMM's standard layout: PCI MMIO from 3 GiB,
/// ECAM, IOAPIC and LAPIC up to 4 GiB.
pub const MMIO_HOLE: u64 = 0xc000_0000;
pub const FOUR_GIB: u64 = 1 << 32;
pub const IOAPIC: u64 = 0xfec0_0000;
pub const LAPIC: u64 = 0xfee0_0000;
pub const ECAM: u64 = 0xe000_0000;
pub const ECAM_LEN: u64 = MIB;

impl Layout {
    /// The scratch area: the top quarter of RAM, at most 16 MiB, from a
    /// page boundary; `None` if RAM is too small to leave room below.
    pub fn new(ram_end: u64, keep_below: u64) -> Option<Self> {
        let size = (ram_end / 4).min(16 * MIB) & !0xfff;
        let scratch = ram_end.checked_sub(size)?;
        (size >= MIB && scratch >= keep_below).then_some(Self { ram_end, scratch })
    }

    /// A guest-physical address to give a device (a ring, a buffer, a
    /// clock page), `near` being the ring under construction: mostly in
    /// scratch, else the ring itself, straddling the end of RAM, beyond
    /// it, in device memory, or at the top of the address space.
    ///
    /// The low 32 bits alone are such an address too: a device's 64-bit
    /// address register is written in halves, and a high half of zero
    /// left from before must not turn a high address into a low one.
    pub fn dma_target(&self, rng: &mut Xorshift, near: u64) -> u64 {
        let in_scratch = |rng: &mut Xorshift| self.scratch + rng.below(self.ram_end - self.scratch);
        let low = |rng: &mut Xorshift| self.scratch + rng.below(FOUR_GIB - self.scratch);
        match rng.below(16) {
            0..=7 => in_scratch(rng),
            8 | 9 if near < FOUR_GIB => near.saturating_add(rng.below(0x100)).min(FOUR_GIB - 1),
            10 => self.ram_end - rng.below(64),
            11 => self.ram_end + rng.below(MIB),
            12 => MMIO_HOLE + rng.below(FOUR_GIB - MMIO_HOLE),
            13 => u64::MAX - rng.below(0x1000),
            14 => (rng.next_u64() & !0xffff_ffff) | low(rng),
            _ => (1 + rng.below(1 << 4)) << 32 | low(rng),
        }
    }

    /// Whether a device may be given an address: not in RAM below
    /// [`Self::scratch`]. (A range that wraps past the top of the address
    /// space is given on purpose: the device must not wrap into RAM.)
    pub fn dma_allowed(&self, addr: u64) -> bool {
        addr >= self.scratch
    }
}

/// The end of the highest RAM range (type 1) below 4 GiB in the Linux
/// boot protocol's zero page (`e820_entries` at 0x1e8, the table at 0x2d0,
/// 20-byte entries).
pub fn ram_end_from_zero_page(zero_page: &[u8]) -> Option<u64> {
    const ENTRIES: usize = 0x1e8;
    const TABLE: usize = 0x2d0;
    const ENTRY: usize = 20;
    const RAM: u32 = 1;
    let count = usize::from(*zero_page.get(ENTRIES)?).min(128);
    let mut end = None;
    for i in 0..count {
        let e = zero_page.get(TABLE + i * ENTRY..TABLE + (i + 1) * ENTRY)?;
        let addr = u64::from_le_bytes(e[0..8].try_into().ok()?);
        let size = u64::from_le_bytes(e[8..16].try_into().ok()?);
        let kind = u32::from_le_bytes(e[16..20].try_into().ok()?);
        let top = addr.saturating_add(size);
        if kind == RAM && top <= FOUR_GIB {
            end = end.max(Some(top));
        }
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_from_words() {
        let c = Config::parse(
            "console=ttyS0 hostile.seed=0x1234 hostile.actions=7 hostile.classes=0x3",
            "hostile.",
        )
        .unwrap();
        assert_eq!((c.seed, c.actions, c.classes), (0x1234, 7, 3));
        let d = Config::parse("", "hostile.").unwrap();
        assert_eq!((d.seed, d.actions), (DEFAULT_SEED, DEFAULT_ACTIONS));
        assert_eq!(Config::parse("seed=12x", ""), Err(BadWord("seed=12x")));
        // Another prefix's words are not ours.
        assert_eq!(
            Config::parse("seed=5", "hostile.").unwrap().seed,
            DEFAULT_SEED
        );
    }

    #[test]
    fn dma_targets_never_reach_below_scratch() {
        let layout = Layout::new(32 * MIB, 8 * MIB).unwrap();
        assert_eq!(layout.scratch, 24 * MIB);
        let mut rng = Xorshift::new(3);
        for _ in 0..100_000 {
            let near = layout.dma_target(&mut rng, layout.scratch + 0x1000);
            let addr = layout.dma_target(&mut rng, near);
            assert!(layout.dma_allowed(addr), "{addr:#x}");
            assert!(layout.dma_allowed(addr & 0xffff_ffff), "{addr:#x}");
        }
        assert!(!layout.dma_allowed(0x10_0000));
        assert!(layout.dma_allowed(layout.ram_end + 5));
        assert!(Layout::new(2 * MIB, MIB).is_none());
    }

    #[test]
    fn ram_end_from_e820() {
        let mut zp = [0u8; 4096];
        zp[0x1e8] = 3;
        let mut put = |i: usize, addr: u64, size: u64, kind: u32| {
            let at = 0x2d0 + i * 20;
            zp[at..at + 8].copy_from_slice(&addr.to_le_bytes());
            zp[at + 8..at + 16].copy_from_slice(&size.to_le_bytes());
            zp[at + 16..at + 20].copy_from_slice(&kind.to_le_bytes());
        };
        put(0, 0, 0x9_fc00, 1);
        put(1, 0x10_0000, 31 * MIB, 1);
        put(2, 0xe000_0000, MIB, 2);
        assert_eq!(ram_end_from_zero_page(&zp), Some(32 * MIB));
        assert_eq!(ram_end_from_zero_page(&zp[..0x100]), None);
    }
}
