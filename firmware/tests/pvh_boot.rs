//! The PVH path: a synthetic vmlinux ELF loaded by its program headers,
//! `hvm_start_info` read back; broken ELF files give their errors.

mod common;

use common::{
    elf, notes, put_u16, put_u64, standard_vmlinux, u32_at, u64_at, vmlinux, Seg, MIB, PVH_ENTRY,
    PVH_KERNEL,
};
use firmware::cpu::{ar, cr0};
use firmware::e820;
use firmware::layout::low;
use firmware::pvh::{self, Error, Vmlinux};
use firmware::{boot_pvh, GuestLayout, Payload};

const RAM: usize = 64 * MIB;

fn load(image: &[u8], ram_size: usize, initrd: Option<&[u8]>) -> Result<pvh::Loaded, Error> {
    let map = e820::memory_map(&GuestLayout::standard(ram_size as u64, 1));
    let mut ram = vec![0u8; ram_size];
    pvh::load(
        &mut ram,
        image,
        &firmware::BootInfo {
            cmdline: b"",
            initrd,
            e820: &map,
            rsdp: None,
        },
    )
}

#[test]
fn boots_with_start_info() {
    let image = standard_vmlinux();
    let rd: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let layout = GuestLayout::standard(RAM as u64, 1);
    let mut ram = vec![0xaau8; RAM];
    let payload = Payload {
        kernel: &image,
        cmdline: b"console=hvc0",
        initrd: Some(&rd),
    };
    let s = boot_pvh(&mut ram, &layout, &payload).unwrap();

    assert_eq!(s.rip, PVH_ENTRY);
    assert_eq!(s.rbx, low::PVH_START_INFO);
    assert_eq!(
        s.cr0 & (cr0::PE | cr0::PG),
        cr0::PE,
        "protected mode, paging off"
    );
    assert_eq!((s.cr4, s.efer), (0, 0));
    assert_eq!(s.cs.access_rights, ar::CODE32);
    assert_eq!(s.cs.access_rights & ar::L, 0);
    assert_eq!(s.ds.access_rights, ar::DATA);
    for seg in [s.cs, s.ds] {
        assert_eq!(
            common::gdt_entry(&ram, s.gdt_base, seg.selector),
            (0, u32::MAX, seg.access_rights)
        );
    }

    // Segments at their physical addresses; bss zeroed over stale RAM.
    let text: Vec<u8> = (0..0x3000u32).map(|i| (i * 13 + 1) as u8).collect();
    assert_eq!(ram[PVH_KERNEL as usize..][..0x3000], text[..]);
    let data_at = PVH_KERNEL as usize + 0x4000;
    assert_eq!(
        ram[data_at..data_at + 0x800],
        (0..0x800u32).map(|i| (i * 5 + 2) as u8).collect::<Vec<_>>()[..]
    );
    assert!(ram[data_at + 0x800..data_at + 0x2000]
        .iter()
        .all(|&b| b == 0));
    assert_eq!(ram[data_at + 0x2000], 0xaa, "nothing written past memsz");

    let si = low::PVH_START_INFO;
    assert_eq!(u32_at(&ram, si), 0x336e_c578);
    assert_eq!(u32_at(&ram, si + 4), 1);
    let cmdline = u64_at(&ram, si + 24);
    assert_eq!(&ram[cmdline as usize..][..13], b"console=hvc0\0");
    assert_eq!(u64_at(&ram, si + 32), 0xe_0000, "rsdp_paddr");
    assert_eq!(&ram[0xe_0000..0xe_0008], b"RSD PTR ");

    assert_eq!(u32_at(&ram, si + 12), 1, "nr_modules");
    let m = u64_at(&ram, si + 16);
    let (rd_addr, rd_size) = (u64_at(&ram, m), u64_at(&ram, m + 8));
    assert_eq!(rd_size, rd.len() as u64);
    assert_eq!(rd_addr, (RAM - rd.len()) as u64 & !0xfff);
    assert_eq!(ram[rd_addr as usize..][..rd.len()], rd[..]);
    assert_eq!(
        (u64_at(&ram, m + 16), u64_at(&ram, m + 24)),
        (0, 0),
        "module cmdline and reserved"
    );

    let map = e820::memory_map(&layout);
    let (mm, n) = (u64_at(&ram, si + 40), u32_at(&ram, si + 48));
    assert_eq!(n as usize, map.len());
    for (i, e) in map.iter().enumerate() {
        let at = mm + 24 * i as u64;
        let got = (
            u64_at(&ram, at),
            u64_at(&ram, at + 8),
            u32_at(&ram, at + 16),
            u32_at(&ram, at + 20),
        );
        assert_eq!(got, (e.addr, e.size, e.kind as u32, 0));
    }
}

#[test]
fn no_initrd_means_no_modules() {
    let image = standard_vmlinux();
    let l = load(&image, RAM, None).unwrap();
    assert_eq!(l.initrd, None);
    assert_eq!(l.kernel_end, PVH_KERNEL + 0x6000);
}

#[test]
fn the_entry_note_may_be_four_bytes() {
    let seg = Seg {
        paddr: PVH_KERNEL,
        data: vec![0x90; 0x100],
        memsz: 0x100,
    };
    let image = vmlinux(&[seg], &notes(Some(PVH_KERNEL + 0x10), 4));
    assert_eq!(
        Vmlinux::parse(&image).unwrap().entry,
        PVH_KERNEL as u32 + 0x10
    );
}

#[test]
fn missing_or_bad_notes() {
    let seg = || Seg {
        paddr: PVH_KERNEL,
        data: vec![0x90; 0x100],
        memsz: 0x100,
    };
    assert_eq!(
        Vmlinux::parse(&vmlinux(&[seg()], &notes(None, 8))),
        Err(Error::NoPvhNote)
    );
    assert_eq!(
        Vmlinux::parse(&vmlinux(&[seg()], &[])),
        Err(Error::NoPvhNote)
    );
    assert_eq!(
        Vmlinux::parse(&vmlinux(&[seg()], &notes(Some(PVH_KERNEL), 2))),
        Err(Error::NoPvhNote)
    );
    // A note whose sizes run past its segment ends the scan.
    let mut n = notes(Some(PVH_KERNEL), 8);
    n[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        Vmlinux::parse(&vmlinux(&[seg()], &n)),
        Err(Error::NoPvhNote)
    );
    let outside = vmlinux(&[seg()], &notes(Some(PVH_KERNEL + 0x100), 8));
    assert_eq!(
        Vmlinux::parse(&outside),
        Err(Error::BadEntry(PVH_KERNEL + 0x100))
    );
    let high = vmlinux(&[seg()], &notes(Some(1 << 32), 8));
    assert_eq!(Vmlinux::parse(&high), Err(Error::BadEntry(1 << 32)));
}

#[test]
fn segments_must_lie_in_ram() {
    // The entry lies in a good segment; the one under test is beside it.
    let at = |paddr, memsz| {
        let good = Seg {
            paddr: PVH_KERNEL,
            data: vec![1; 0x100],
            memsz: 0x100,
        };
        let image = vmlinux(
            &[
                good,
                Seg {
                    paddr,
                    data: vec![1; 0x100],
                    memsz,
                },
            ],
            &notes(Some(PVH_KERNEL), 8),
        );
        load(&image, RAM, None)
    };
    assert!(at(PVH_KERNEL + 0x1000, 0x100).is_ok());
    let outside = |paddr, memsz| Err(Error::SegmentOutsideRam { paddr, memsz });
    assert_eq!(
        at(60 * MIB as u64, 8 * MIB as u64),
        outside(60 * MIB as u64, 8 * MIB as u64)
    );
    assert_eq!(at(0x8000, 0x100), outside(0x8000, 0x100));
    assert_eq!(at(0xf_0000, 0x2_0000), outside(0xf_0000, 0x2_0000));
    assert_eq!(at(u64::MAX - 0x10, 0x100), outside(u64::MAX - 0x10, 0x100));
    let image = vmlinux(
        &[Seg {
            paddr: PVH_KERNEL,
            data: vec![1; 0x100],
            memsz: 0x80,
        }],
        &notes(Some(PVH_KERNEL), 8),
    );
    assert_eq!(
        Vmlinux::parse(&image),
        Err(Error::SegmentOutsideFile),
        "filesz > memsz"
    );
}

#[test]
fn initrd_must_fit_above_the_kernel() {
    let image = standard_vmlinux();
    assert_eq!(
        load(&image, 20 * MIB, Some(&vec![0; 4 * MIB])),
        Err(Error::InitrdDoesNotFit)
    );
    let l = load(&image, 24 * MIB, Some(&vec![0; 4 * MIB])).unwrap();
    assert_eq!(l.initrd, Some((20 * MIB as u64, 4 * MIB as u64)));
}

#[test]
fn truncated_and_foreign_headers() {
    let good = standard_vmlinux();
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut img = good.clone();
        f(&mut img);
        Vmlinux::parse(&img)
    };
    assert!(with(&|_| {}).is_ok());
    assert_eq!(with(&|i| i.truncate(0x30)), Err(Error::TooShort));
    assert_eq!(with(&|i| i.truncate(elf::PHDR + 20)), Err(Error::TooShort));
    assert_eq!(
        with(&|i| put_u16(i, elf::PHNUM, 0xffff)),
        Err(Error::TooShort)
    );
    assert_eq!(
        with(&|i| put_u64(i, elf::PHOFF, u64::MAX - 8)),
        Err(Error::TooShort)
    );
    assert_eq!(
        with(&|i| put_u16(i, elf::PHNUM, 0)),
        Err(Error::NoLoadableSegment)
    );
    assert_eq!(
        with(&|i| put_u16(i, elf::PHENTSIZE, 32)),
        Err(Error::BadProgramHeaderSize)
    );
    assert_eq!(with(&|i| i[0] = 0), Err(Error::BadMagic));
    assert_eq!(
        with(&|i| i[4] = 1),
        Err(Error::NotX86_64Executable),
        "ELF32"
    );
    assert_eq!(
        with(&|i| i[5] = 2),
        Err(Error::NotX86_64Executable),
        "big endian"
    );
    assert_eq!(
        with(&|i| put_u16(i, 0x12, 3)),
        Err(Error::NotX86_64Executable),
        "i386"
    );
    assert_eq!(
        with(&|i| put_u16(i, 0x10, 3)),
        Err(Error::NotX86_64Executable),
        "ET_DYN"
    );
    // First segment's p_offset, then its p_filesz, pointing past the file.
    assert_eq!(
        with(&|i| put_u64(i, elf::PHDR + 8, 1 << 40)),
        Err(Error::SegmentOutsideFile)
    );
    assert_eq!(
        with(&|i| put_u64(i, elf::PHDR + 32, u64::MAX)),
        Err(Error::SegmentOutsideFile)
    );
    let last = good.len() - 1;
    assert_eq!(with(&|i| i.truncate(last)), Err(Error::SegmentOutsideFile));
}

#[test]
fn cmdline_and_map_limits() {
    let image = standard_vmlinux();
    let map = e820::memory_map(&GuestLayout::standard(RAM as u64, 1));
    let mut ram = vec![0u8; RAM];
    let mut info = firmware::BootInfo {
        cmdline: b"a\0",
        initrd: None,
        e820: &map,
        rsdp: None,
    };
    assert_eq!(
        pvh::load(&mut ram, &image, &info),
        Err(Error::CmdlineHasNul)
    );
    let long = vec![b'x'; 0x1_0000];
    info.cmdline = &long;
    assert_eq!(
        pvh::load(&mut ram, &image, &info),
        Err(Error::CmdlineTooLong)
    );
    info.cmdline = &long[1..];
    assert!(pvh::load(&mut ram, &image, &info).is_ok());
    let big_map = vec![map[0]; 200];
    info.e820 = &big_map;
    assert_eq!(
        pvh::load(&mut ram, &image, &info),
        Err(Error::TooManyE820Entries)
    );
}
