//! Test doubles: a guest with RAM in a Vec, an MMIO recorder with
//! scripted read values, page-table builders for every paging mode and
//! vCPU states for every execution mode.

use std::collections::VecDeque;
use std::ops::Range;
use std::vec::Vec;

use crate::cpu::{access, cr0, cr4, efer, CpuState, Segment};
use crate::paging::pte;
use crate::{NotRam, Platform};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mmio {
    Read { gpa: u64, len: usize, value: u64 },
    Write { gpa: u64, len: usize, value: u64 },
}

/// RAM from GPA 0 to `ram.len()` minus `hole`; everything else is MMIO.
pub struct FakePlatform {
    pub ram: Vec<u8>,
    pub hole: Range<u64>,
    pub log: Vec<Mmio>,
    /// Values MMIO reads return, in order; 0 once exhausted.
    pub reads: VecDeque<u64>,
    pub phys_bits: u32,
    /// The next this many compare-exchanges fail, as if the guest raced.
    pub cmpxchg_failures: usize,
    pub ram_written: bool,
}

pub const PC_HOLE: Range<u64> = 0xa_0000..0xc_0000;

impl FakePlatform {
    pub fn new(ram_size: usize) -> Self {
        Self {
            ram: vec![0; ram_size],
            hole: PC_HOLE,
            log: Vec::new(),
            reads: VecDeque::new(),
            phys_bits: 46,
            cmpxchg_failures: 0,
            ram_written: false,
        }
    }

    fn ram_range(&self, gpa: u64, len: usize) -> Result<Range<usize>, NotRam> {
        let end = gpa.checked_add(len as u64).ok_or(NotRam(gpa))?;
        if end > self.ram.len() as u64 || (gpa < self.hole.end && end > self.hole.start) {
            return Err(NotRam(gpa));
        }
        Ok(gpa as usize..end as usize)
    }

    pub fn read_u64(&self, gpa: u64) -> u64 {
        let at = gpa as usize;
        u64::from_le_bytes(self.ram[at..at + 8].try_into().unwrap())
    }

    pub fn write_u64(&mut self, gpa: u64, value: u64) {
        let at = gpa as usize;
        self.ram[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }

    pub fn write_u32(&mut self, gpa: u64, value: u32) {
        let at = gpa as usize;
        self.ram[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }

    pub fn poke(&mut self, gpa: u64, bytes: &[u8]) {
        let at = gpa as usize;
        self.ram[at..at + bytes.len()].copy_from_slice(bytes);
    }
}

fn le(bytes: &[u8]) -> u64 {
    let mut full = [0u8; 8];
    full[..bytes.len()].copy_from_slice(bytes);
    u64::from_le_bytes(full)
}

impl Platform for FakePlatform {
    fn read_ram(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), NotRam> {
        let range = self.ram_range(gpa, buf.len())?;
        buf.copy_from_slice(&self.ram[range]);
        Ok(())
    }

    fn write_ram(&mut self, gpa: u64, data: &[u8]) -> Result<(), NotRam> {
        let range = self.ram_range(gpa, data.len())?;
        self.ram[range].copy_from_slice(data);
        self.ram_written = true;
        Ok(())
    }

    fn cmpxchg_ram_u32(&mut self, gpa: u64, current: u32, new: u32) -> Result<bool, NotRam> {
        let range = self.ram_range(gpa, 4)?;
        if self.cmpxchg_failures > 0 {
            self.cmpxchg_failures -= 1;
            return Ok(false);
        }
        if le(&self.ram[range.clone()]) as u32 != current {
            return Ok(false);
        }
        self.ram[range].copy_from_slice(&new.to_le_bytes());
        self.ram_written = true;
        Ok(true)
    }

    fn mmio_read(&mut self, gpa: u64, data: &mut [u8]) {
        assert!(
            (1..=8).contains(&data.len()),
            "MMIO read of {} bytes",
            data.len()
        );
        let value = self.reads.pop_front().unwrap_or(0);
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
        self.log.push(Mmio::Read {
            gpa,
            len: data.len(),
            value: le(data),
        });
    }

    fn mmio_write(&mut self, gpa: u64, data: &[u8]) {
        assert!(
            (1..=8).contains(&data.len()),
            "MMIO write of {} bytes",
            data.len()
        );
        self.log.push(Mmio::Write {
            gpa,
            len: data.len(),
            value: le(data),
        });
    }

    fn phys_addr_bits(&self) -> u32 {
        self.phys_bits
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Paging {
    Legacy32,
    Pae,
    Long4,
    Long5,
}

pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Page tables built in the fake's RAM, allocating pages upward from a
/// pool the test reserves. Intermediate entries allow everything, so the
/// leaf's flags decide the access rights.
pub struct PageTables {
    pub paging: Paging,
    pub root: u64,
    next: u64,
}

impl PageTables {
    pub fn new(platform: &mut FakePlatform, paging: Paging, pool: u64) -> Self {
        let mut tables = Self {
            paging,
            root: 0,
            next: pool,
        };
        tables.root = tables.alloc(platform);
        tables
    }

    fn alloc(&mut self, platform: &mut FakePlatform) -> u64 {
        let page = self.next;
        self.next += 0x1000;
        platform.ram[page as usize..page as usize + 0x1000].fill(0);
        page
    }

    /// (levels, index bits, entry size); level 1 is the page table.
    fn shape(&self) -> (u32, u32, u64) {
        match self.paging {
            Paging::Legacy32 => (2, 10, 4),
            Paging::Pae => (3, 9, 8),
            Paging::Long4 => (4, 9, 8),
            Paging::Long5 => (5, 9, 8),
        }
    }

    fn read_entry(&self, platform: &FakePlatform, gpa: u64) -> u64 {
        let entry = platform.read_u64(gpa);
        if self.paging == Paging::Legacy32 {
            entry & 0xffff_ffff
        } else {
            entry
        }
    }

    fn write_entry(&self, platform: &mut FakePlatform, gpa: u64, entry: u64) {
        if self.paging == Paging::Legacy32 {
            platform.write_u32(gpa, entry as u32);
        } else {
            platform.write_u64(gpa, entry);
        }
    }

    /// Where the entry at `level` for `linear` lives, creating the tables
    /// above it.
    pub fn entry_gpa(&mut self, platform: &mut FakePlatform, linear: u64, level: u32) -> u64 {
        let (levels, bits, size) = self.shape();
        let mut table = self.root;
        for l in (level..=levels).rev() {
            let index = (linear >> (12 + bits * (l - 1))) & ((1 << bits) - 1);
            let gpa = table + index * size;
            if l == level {
                return gpa;
            }
            let mut entry = self.read_entry(platform, gpa);
            if entry & pte::P == 0 {
                let upper = if self.paging == Paging::Pae && l == 3 {
                    0
                } else {
                    pte::RW | pte::US
                };
                entry = self.alloc(platform) | pte::P | upper;
                self.write_entry(platform, gpa, entry);
            }
            table = entry
                & ADDR_MASK
                & if self.paging == Paging::Legacy32 {
                    0xffff_f000
                } else {
                    !0
                };
        }
        unreachable!("level {level} above the root");
    }

    /// Map the page of size given by `level` (1: 4 KiB, 2: 2/4 MiB, 3: 1 GiB)
    /// at `linear` to `phys` with `flags` (P is added).
    pub fn map(
        &mut self,
        platform: &mut FakePlatform,
        linear: u64,
        phys: u64,
        level: u32,
        flags: u64,
    ) {
        let gpa = self.entry_gpa(platform, linear, level);
        let ps = if level > 1 { pte::PS } else { 0 };
        self.write_entry(platform, gpa, phys | flags | pte::P | ps);
    }

    /// Identity-map the first 4 GiB with the largest pages the mode has.
    pub fn identity_4g(&mut self, platform: &mut FakePlatform, flags: u64) {
        let (level, size) = match self.paging {
            Paging::Legacy32 | Paging::Pae => (
                2,
                if self.paging == Paging::Pae {
                    1 << 21
                } else {
                    1 << 22
                },
            ),
            Paging::Long4 | Paging::Long5 => (3, 1 << 30),
        };
        for page in 0..(1u64 << 32) / size {
            self.map(platform, page * size, page * size, level, flags);
        }
    }

    /// Turn paging on in `cpu` with these tables.
    pub fn enable(&self, cpu: &mut CpuState) {
        self.paging.enable(cpu, self.root);
    }
}

impl Paging {
    /// Turn this paging mode on in `cpu` (CR0.PE/PG/WP, CR3, CR4, EFER).
    pub fn enable(self, cpu: &mut CpuState, cr3: u64) {
        cpu.cr0 |= cr0::PE | cr0::PG | cr0::WP;
        cpu.cr3 = cr3;
        cpu.cr4 = match self {
            Paging::Legacy32 => cr4::PSE,
            Paging::Pae | Paging::Long4 => cr4::PAE,
            Paging::Long5 => cr4::PAE | cr4::LA57,
        };
        cpu.efer = match self {
            Paging::Legacy32 => 0,
            Paging::Pae => efer::NXE,
            Paging::Long4 | Paging::Long5 => efer::LME | efer::LMA | efer::NXE,
        };
    }
}

const CODE_TYPE: u32 = 0xb; // execute/read, accessed
const DATA_TYPE: u32 = 0x3; // read/write, accessed

fn segment(selector: u16, base: u64, limit: u32, kind: u32, extra: u32) -> Segment {
    Segment {
        selector,
        base,
        limit,
        access: kind | access::S | access::P | extra,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuMode {
    Real,
    Protected16,
    Protected32,
    Compat32,
    Long,
}

/// A vCPU in `mode` with flat (real mode: zero-based) segments at CPL 0.
/// Paging modes are set up separately with [`PageTables::enable`].
pub fn cpu_in(mode: CpuMode) -> CpuState {
    let mut cpu = CpuState {
        rflags: 0x2,
        ..CpuState::default()
    };
    let flat = |kind, extra| segment(0x10, 0, 0xffff_ffff, kind, extra | access::G);
    match mode {
        CpuMode::Real => {
            cpu.cs = segment(0, 0, 0xffff, CODE_TYPE, 0);
            let data = segment(0, 0, 0xffff, DATA_TYPE, 0);
            (cpu.ss, cpu.ds, cpu.es, cpu.fs, cpu.gs) = (data, data, data, data, data);
            return cpu;
        }
        CpuMode::Protected16 => cpu.cs = flat(CODE_TYPE, 0),
        CpuMode::Protected32 | CpuMode::Compat32 => cpu.cs = flat(CODE_TYPE, access::DB),
        CpuMode::Long => cpu.cs = flat(CODE_TYPE, access::L),
    }
    let data = flat(DATA_TYPE, access::DB);
    (cpu.ss, cpu.ds, cpu.es, cpu.fs, cpu.gs) = (data, data, data, data, data);
    cpu.cr0 = cr0::PE;
    if matches!(mode, CpuMode::Compat32 | CpuMode::Long) {
        cpu.efer = efer::LME | efer::LMA;
    }
    cpu
}

/// xorshift64*: a fixed-seed PRNG for the fuzz-style tests.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
