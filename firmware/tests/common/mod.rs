//! Shared test helpers: synthetic kernel images, a PRNG, guest RAM reads.
#![allow(dead_code)]

pub mod aml_reader;

pub const MIB: usize = 1 << 20;

/// xorshift64*: deterministic, good enough to spray bytes.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

pub fn put(buf: &mut [u8], off: usize, bytes: &[u8]) {
    buf[off..off + bytes.len()].copy_from_slice(bytes);
}
pub fn put_u16(buf: &mut [u8], off: usize, v: u16) {
    put(buf, off, &v.to_le_bytes());
}
pub fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    put(buf, off, &v.to_le_bytes());
}
pub fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    put(buf, off, &v.to_le_bytes());
}
pub fn u16_at(buf: &[u8], off: u64) -> u16 {
    u16::from_le_bytes(buf[off as usize..][..2].try_into().unwrap())
}
pub fn u32_at(buf: &[u8], off: u64) -> u32 {
    u32::from_le_bytes(buf[off as usize..][..4].try_into().unwrap())
}
pub fn u64_at(buf: &[u8], off: u64) -> u64 {
    u64::from_le_bytes(buf[off as usize..][..8].try_into().unwrap())
}

/// Setup header offsets used to build and corrupt test images.
pub mod bz {
    pub const SETUP_SECTS: usize = 0x1f1;
    pub const BOOT_FLAG: usize = 0x1fe;
    pub const JUMP: usize = 0x200;
    pub const HEADER: usize = 0x202;
    pub const VERSION: usize = 0x206;
    pub const TYPE_OF_LOADER: usize = 0x210;
    pub const LOADFLAGS: usize = 0x211;
    pub const CODE32_START: usize = 0x214;
    pub const RAMDISK_IMAGE: usize = 0x218;
    pub const RAMDISK_SIZE: usize = 0x21c;
    pub const CMD_LINE_PTR: usize = 0x228;
    pub const INITRD_ADDR_MAX: usize = 0x22c;
    pub const KERNEL_ALIGNMENT: usize = 0x230;
    pub const RELOCATABLE: usize = 0x234;
    pub const XLOADFLAGS: usize = 0x236;
    pub const CMDLINE_SIZE: usize = 0x238;
    pub const PAYLOAD_OFFSET: usize = 0x248;
    pub const PAYLOAD_LENGTH: usize = 0x24c;
    pub const PREF_ADDRESS: usize = 0x258;
    pub const INIT_SIZE: usize = 0x260;

    pub const SETUP_SECTORS: u8 = 4;
    pub const KERNEL_OFFSET: usize = (SETUP_SECTORS as usize + 1) * 512;
    pub const PREF: u64 = 0x100_0000;
    pub const ALIGN: u32 = 0x20_0000;
    pub const INIT: u32 = 0x40_0000;
}

/// A bzImage with protocol 2.15, relocatable, 64-bit, preferring 16 MiB,
/// needing 4 MiB there, with `kernel_len` bytes of patterned code.
pub fn bzimage(kernel_len: usize) -> Vec<u8> {
    use bz::*;
    let mut img = vec![0u8; KERNEL_OFFSET + kernel_len];
    img[SETUP_SECTS] = SETUP_SECTORS;
    put_u16(&mut img, BOOT_FLAG, 0xaa55);
    img[JUMP] = 0xeb;
    img[JUMP + 1] = (0x26c - 0x202) as u8;
    put(&mut img, HEADER, b"HdrS");
    put_u16(&mut img, VERSION, 0x020f);
    img[LOADFLAGS] = 1;
    put_u32(&mut img, CODE32_START, 0x10_0000);
    put_u32(&mut img, INITRD_ADDR_MAX, 0x7fff_ffff);
    put_u32(&mut img, KERNEL_ALIGNMENT, ALIGN);
    img[RELOCATABLE] = 1;
    put_u16(&mut img, XLOADFLAGS, 0x3);
    put_u32(&mut img, CMDLINE_SIZE, 2047);
    put_u32(&mut img, PAYLOAD_OFFSET, 0x100);
    put_u32(&mut img, PAYLOAD_LENGTH, (kernel_len - 0x200) as u32);
    put_u64(&mut img, PREF_ADDRESS, PREF);
    put_u32(&mut img, INIT_SIZE, INIT);
    for (i, b) in img[KERNEL_OFFSET..].iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    img
}

/// ELF64 offsets used to build and corrupt test images.
pub mod elf {
    pub const PHOFF: usize = 0x20;
    pub const PHENTSIZE: usize = 0x36;
    pub const PHNUM: usize = 0x38;
    pub const PHDR: usize = 0x40;
    pub const PHDR_SIZE: usize = 56;
}

/// One loadable segment of a synthetic vmlinux.
pub struct Seg {
    pub paddr: u64,
    pub data: Vec<u8>,
    pub memsz: u64,
}

fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
    let mut n = Vec::new();
    n.extend_from_slice(&(name.len() as u32).to_le_bytes());
    n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    n.extend_from_slice(&kind.to_le_bytes());
    n.extend_from_slice(name);
    n.resize(n.len().next_multiple_of(4), 0);
    n.extend_from_slice(desc);
    n.resize(n.len().next_multiple_of(4), 0);
    n
}

/// A build-id note, then (if `entry`) the PVH entry note with a `desc`
/// of `entry_width` bytes.
pub fn notes(entry: Option<u64>, entry_width: usize) -> Vec<u8> {
    let mut n = note(b"GNU\0", 3, &[0xab; 20]);
    if let Some(e) = entry {
        n.extend(note(b"Xen\0", 18, &e.to_le_bytes()[..entry_width]));
    }
    n
}

/// An x86-64 ELF executable: header, program headers (loads then one
/// PT_NOTE), the note bytes, then each segment's file bytes.
pub fn vmlinux(segs: &[Seg], notes: &[u8]) -> Vec<u8> {
    let phnum = segs.len() + 1;
    let mut img = vec![0u8; elf::PHDR + phnum * elf::PHDR_SIZE];
    put(&mut img, 0, b"\x7fELF\x02\x01\x01");
    put_u16(&mut img, 0x10, 2);
    put_u16(&mut img, 0x12, 62);
    put_u32(&mut img, 0x14, 1);
    put_u64(&mut img, elf::PHOFF, elf::PHDR as u64);
    put_u16(&mut img, 0x34, 0x40);
    put_u16(&mut img, elf::PHENTSIZE, elf::PHDR_SIZE as u16);
    put_u16(&mut img, elf::PHNUM, phnum as u16);
    let mut data = notes.to_vec();
    let base = img.len();
    let mut phdr = |i: usize, kind: u32, offset: usize, paddr: u64, filesz: usize, memsz: u64| {
        let at = elf::PHDR + i * elf::PHDR_SIZE;
        put_u32(&mut img, at, kind);
        put_u64(&mut img, at + 8, offset as u64);
        put_u64(&mut img, at + 16, paddr | 0xffff_ffff_8000_0000);
        put_u64(&mut img, at + 24, paddr);
        put_u64(&mut img, at + 32, filesz as u64);
        put_u64(&mut img, at + 40, memsz);
    };
    for (i, s) in segs.iter().enumerate() {
        phdr(i, 1, base + data.len(), s.paddr, s.data.len(), s.memsz);
        data.extend_from_slice(&s.data);
    }
    phdr(segs.len(), 4, base, 0, notes.len(), notes.len() as u64);
    img.extend_from_slice(&data);
    img
}

pub const PVH_KERNEL: u64 = 0x100_0000;
pub const PVH_ENTRY: u64 = PVH_KERNEL + 0x40;

/// Two segments at 16 MiB (code, then data with bss) and the entry note.
pub fn standard_vmlinux() -> Vec<u8> {
    let text: Vec<u8> = (0..0x3000u32).map(|i| (i * 13 + 1) as u8).collect();
    let data: Vec<u8> = (0..0x800u32).map(|i| (i * 5 + 2) as u8).collect();
    vmlinux(
        &[
            Seg {
                paddr: PVH_KERNEL,
                data: text,
                memsz: 0x3000,
            },
            Seg {
                paddr: PVH_KERNEL + 0x4000,
                data,
                memsz: 0x2000,
            },
        ],
        &notes(Some(PVH_ENTRY), 8),
    )
}

/// Translates `va` through the 4-level page tables at `cr3` in `ram`.
pub fn translate(ram: &[u8], cr3: u64, va: u64) -> Option<u64> {
    const P: u64 = 1;
    const PS: u64 = 1 << 7;
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    let pml4e = u64_at(ram, (cr3 & ADDR) + ((va >> 39) & 511) * 8);
    if pml4e & P == 0 {
        return None;
    }
    let pdpte = u64_at(ram, (pml4e & ADDR) + ((va >> 30) & 511) * 8);
    if pdpte & P == 0 {
        return None;
    }
    if pdpte & PS != 0 {
        return Some((pdpte & ADDR & !((1 << 30) - 1)) | (va & ((1 << 30) - 1)));
    }
    let pde = u64_at(ram, (pdpte & ADDR) + ((va >> 21) & 511) * 8);
    if pde & P == 0 {
        return None;
    }
    if pde & PS != 0 {
        return Some((pde & ADDR & !((1 << 21) - 1)) | (va & ((1 << 21) - 1)));
    }
    let pte = u64_at(ram, (pde & ADDR) + ((va >> 12) & 511) * 8);
    (pte & P != 0).then_some((pte & ADDR) | (va & 0xfff))
}

/// Decodes the flat descriptor at `selector` of the GDT at `base` into
/// (base, byte limit, VMX access rights).
pub fn gdt_entry(ram: &[u8], base: u64, selector: u16) -> (u64, u32, u32) {
    let d = u64_at(ram, base + u64::from(selector & !7));
    let seg_base = ((d >> 16) & 0xff_ffff) | (((d >> 56) & 0xff) << 24);
    let raw_limit = ((d & 0xffff) | (((d >> 48) & 0xf) << 16)) as u32;
    let ar = (((d >> 40) & 0xff) | (((d >> 52) & 0xf) << 12)) as u32;
    let limit = if ar & (1 << 15) != 0 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    (seg_base, limit, ar)
}
