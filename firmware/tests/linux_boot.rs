//! The bzImage path: a synthetic image loaded into RAM, the zero page,
//! page tables and GDT read back; corrupted images give their errors.

mod common;

use common::{bz, bzimage, gdt_entry, put_u16, put_u32, put_u64, translate, u32_at, u64_at, MIB};
use firmware::cpu::{ar, cr0, cr4, efer};
use firmware::e820::{self, E820Type};
use firmware::layout::low;
use firmware::linux::{self, Error};
use firmware::{boot_linux, GuestLayout, Payload};

const KERNEL_LEN: usize = 0x6000;
const RAM: usize = 64 * MIB;

fn payload<'a>(kernel: &'a [u8], initrd: Option<&'a [u8]>) -> Payload<'a> {
    Payload {
        kernel,
        cmdline: b"console=ttyS0 panic=-1",
        initrd,
    }
}

fn initrd(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Loads `image` into `ram_size` bytes of RAM through the low-level
/// loader with the standard map.
fn load(
    image: &[u8],
    ram_size: usize,
    initrd: Option<&[u8]>,
    cmdline: &[u8],
) -> Result<linux::Loaded, Error> {
    let layout = GuestLayout::standard(ram_size as u64, 1);
    let map = e820::memory_map(&layout);
    let mut ram = vec![0u8; ram_size];
    let info = firmware::BootInfo {
        cmdline,
        initrd,
        e820: &map,
        rsdp: Some(0xe_0000),
    };
    linux::load(&mut ram, image, &info)
}

fn zp(off: u64) -> u64 {
    low::ZERO_PAGE + off
}

#[test]
fn boots_at_the_preferred_address_with_a_full_zero_page() {
    let image = bzimage(KERNEL_LEN);
    let rd = initrd(300_000);
    let layout = GuestLayout::standard(RAM as u64, 1);
    let mut ram = vec![0u8; RAM];
    let s = boot_linux(&mut ram, &layout, &payload(&image, Some(&rd))).unwrap();

    assert_eq!(s.rip, bz::PREF + 0x200);
    assert_eq!(s.rsi, low::ZERO_PAGE);
    assert_eq!(
        ram[bz::PREF as usize..][..KERNEL_LEN],
        image[bz::KERNEL_OFFSET..]
    );

    // The setup header is copied, then the loader's fields are filled.
    assert_eq!(&ram[zp(0x202) as usize..][..4], b"HdrS");
    assert_eq!(ram[zp(0x1f1) as usize], bz::SETUP_SECTORS);
    assert_eq!(u32_at(&ram, zp(bz::INIT_SIZE as u64)), bz::INIT);
    assert_eq!(ram[zp(bz::TYPE_OF_LOADER as u64) as usize], 0xff);
    assert_eq!(ram[zp(0x1ef) as usize], 0, "sentinel must stay clear");

    let cmdline = u64::from(u32_at(&ram, zp(bz::CMD_LINE_PTR as u64)));
    assert_eq!(cmdline, low::CMDLINE);
    assert_eq!(u32_at(&ram, zp(0xc8)), 0, "ext_cmd_line_ptr");
    assert_eq!(&ram[cmdline as usize..][..23], b"console=ttyS0 panic=-1\0");

    let rd_addr = u64::from(u32_at(&ram, zp(bz::RAMDISK_IMAGE as u64)));
    let rd_size = u32_at(&ram, zp(bz::RAMDISK_SIZE as u64));
    assert_eq!(rd_size as usize, rd.len());
    assert_eq!(
        rd_addr,
        (RAM - rd.len()) as u64 & !0xfff,
        "as high as possible, page aligned"
    );
    assert_eq!((u32_at(&ram, zp(0xc0)), u32_at(&ram, zp(0xc4))), (0, 0));
    assert_eq!(ram[rd_addr as usize..][..rd.len()], rd[..]);

    assert_eq!(u64_at(&ram, zp(0x70)), 0xe_0000, "acpi_rsdp_addr");
    assert_eq!(&ram[0xe_0000..0xe_0008], b"RSD PTR ");

    let map = e820::memory_map(&layout);
    assert_eq!(usize::from(ram[zp(0x1e8) as usize]), map.len());
    for (i, e) in map.iter().enumerate() {
        let at = zp(0x2d0 + 20 * i as u64);
        assert_eq!(
            (
                u64_at(&ram, at),
                u64_at(&ram, at + 8),
                u32_at(&ram, at + 16)
            ),
            (e.addr, e.size, e.kind as u32)
        );
    }
    assert!(map
        .iter()
        .any(|e| e.kind == E820Type::Ram && e.addr == MIB as u64));
}

#[test]
fn long_mode_state_and_identity_map() {
    let image = bzimage(KERNEL_LEN);
    let mut ram = vec![0u8; RAM];
    let s = boot_linux(
        &mut ram,
        &GuestLayout::standard(RAM as u64, 1),
        &payload(&image, None),
    )
    .unwrap();

    assert_eq!(s.cr0 & (cr0::PE | cr0::PG), cr0::PE | cr0::PG);
    assert_ne!(s.cr4 & cr4::PAE, 0);
    assert_eq!(s.efer & (efer::LME | efer::LMA), efer::LME | efer::LMA);
    assert_eq!(s.rflags & (1 << 9), 0, "interrupts off");
    assert!(s.rsp < 0x9_fc00 && s.rsp > 0);

    // The boot protocol's __BOOT_CS / __BOOT_DS, matching the GDT in RAM.
    assert_eq!((s.cs.selector, s.ds.selector), (0x10, 0x18));
    assert!(s.gdt_base < 0x9_fc00 && usize::from(s.gdt_limit) >= 0x1f);
    for seg in [s.cs, s.ds] {
        let (base, limit, rights) = gdt_entry(&ram, s.gdt_base, seg.selector);
        assert_eq!(
            (base, limit, rights),
            (seg.base, seg.limit, seg.access_rights)
        );
    }
    assert_eq!(s.cs.access_rights, ar::CODE64);
    assert_ne!(s.cs.access_rights & ar::L, 0);
    assert_eq!(
        s.cs.access_rights & ar::DB,
        0,
        "L and D must not both be set"
    );
    assert_eq!(
        s.ds.access_rights & 0x1f,
        ar::S | ar::TYPE_DATA_READ_WRITE_ACCESSED
    );
    assert_eq!(s.tr.access_rights, ar::TSS);

    // Every 2 MiB page of the first 4 GiB maps to itself; nothing above.
    let mut rng = common::Rng::new(7);
    let samples = (0..4096u64)
        .map(|i| i << 20)
        .chain((0..2000).map(|_| rng.next() & 0xffff_ffff));
    for va in samples.chain([0, s.rip, s.rsi, low::CMDLINE, 0xffff_ffff]) {
        assert_eq!(translate(&ram, s.cr3, va), Some(va), "va {va:#x}");
    }
    assert_eq!(translate(&ram, s.cr3, 1 << 32), None);
}

#[test]
fn relocates_when_the_preferred_address_does_not_fit() {
    let image = bzimage(KERNEL_LEN);
    let rd = initrd(0x1000);
    let l = load(&image, 12 * MIB, Some(&rd), b"").unwrap();
    assert_eq!(
        l.kernel_addr,
        2 * MIB as u64,
        "lowest 2 MiB-aligned address from 1 MiB"
    );
    assert_eq!(l.state.rip, l.kernel_addr + 0x200);
    assert_eq!(l.kernel_end, l.kernel_addr + u64::from(bz::INIT));
    assert_eq!(l.initrd, Some((12 * MIB as u64 - 0x1000, 0x1000)));

    let mut fixed = image.clone();
    fixed[bz::RELOCATABLE] = 0;
    assert_eq!(
        load(&fixed, 12 * MIB, None, b""),
        Err(Error::KernelDoesNotFit)
    );
    assert!(load(&fixed, RAM, None, b"").is_ok());

    let mut odd = image.clone();
    put_u32(&mut odd, bz::KERNEL_ALIGNMENT, 0x30_0000);
    assert_eq!(load(&odd, RAM, None, b""), Err(Error::BadAlignment));
}

#[test]
fn setup_sects_zero_means_four() {
    let mut image = bzimage(KERNEL_LEN);
    image[bz::SETUP_SECTS] = 0;
    let l = load(&image, RAM, None, b"").unwrap();
    assert_eq!(l.kernel_addr, bz::PREF);
}

#[test]
fn corrupted_images_give_their_errors() {
    let good = bzimage(KERNEL_LEN);
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut img = good.clone();
        f(&mut img);
        load(&img, RAM, None, b"")
    };
    assert_eq!(with(&|i| i[bz::HEADER] = b'X'), Err(Error::BadMagic));
    assert_eq!(
        with(&|i| put_u16(i, bz::BOOT_FLAG, 0)),
        Err(Error::BadMagic)
    );
    assert_eq!(
        with(&|i| put_u16(i, bz::VERSION, 0x020b)),
        Err(Error::ProtocolTooOld(0x020b))
    );
    assert_eq!(with(&|i| i[bz::LOADFLAGS] = 0), Err(Error::NotBzImage));
    assert_eq!(
        with(&|i| put_u16(i, bz::XLOADFLAGS, 0x2)),
        Err(Error::No64BitEntry)
    );
    assert_eq!(
        with(&|i| i[bz::SETUP_SECTS] = 200),
        Err(Error::SetupPastEnd)
    );
    assert_eq!(
        with(&|i| i.truncate(bz::KERNEL_OFFSET)),
        Err(Error::NoKernel)
    );
    assert_eq!(
        with(&|i| put_u32(i, bz::PAYLOAD_LENGTH, KERNEL_LEN as u32)),
        Err(Error::BadPayload)
    );
    assert_eq!(
        with(&|i| put_u32(i, bz::PAYLOAD_OFFSET, u32::MAX)),
        Err(Error::BadPayload)
    );
    assert_eq!(with(&|i| i.truncate(0x1f0)), Err(Error::TooShort));
    assert_eq!(with(&|i| i.truncate(0x250)), Err(Error::TooShort));
    assert_eq!(with(&|i| i.clear()), Err(Error::TooShort));
    // A kernel needing more than all of RAM.
    assert_eq!(
        with(&|i| put_u32(i, bz::INIT_SIZE, 0x7000_0000)),
        Err(Error::KernelDoesNotFit)
    );
    assert_eq!(
        with(&|i| put_u64(i, bz::PREF_ADDRESS, u64::MAX)).map(|l| l.kernel_addr),
        Ok(2 * MIB as u64)
    );
}

/// What the VMM prints when it cannot boot a kernel ("vmm: FAIL cannot load
/// the guest: …", through `boot_detected` as the VMM calls it): each case a
/// user may meet, said in words.
#[test]
fn what_cannot_boot_is_said_in_words() {
    let good = bzimage(KERNEL_LEN);
    let layout = GuestLayout::standard(RAM as u64, 1);
    let say = |kernel: &[u8]| {
        let mut ram = vec![0u8; RAM];
        match firmware::boot_detected(&mut ram, &layout, &payload(kernel, None), &[]) {
            Ok(_) => "booted".to_string(),
            Err(e) => e.to_string(),
        }
    };
    assert_eq!(say(&good), "booted");
    let mut cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated in its payload",
            good[..good.len() / 2].to_vec(),
            "bzImage: file truncated or corrupt: the compressed kernel reaches past the end of the file",
        ),
        (
            "truncated after its setup",
            good[..bz::KERNEL_OFFSET].to_vec(),
            "bzImage: file truncated: nothing after the setup sectors",
        ),
        (
            "truncated inside its setup header",
            good[..0x240].to_vec(),
            "bzImage: file too short: it ends inside the setup header",
        ),
        (
            "not a kernel",
            b"\x7fELF\x02\x01\x01 a vmlinux or anything else".repeat(400),
            "the kernel is neither a bzImage (no \"HdrS\" setup header) nor a Multiboot \
             kernel (no header in its first 8 KiB)",
        ),
    ];
    let mut old = good.clone();
    put_u16(&mut old, bz::VERSION, 0x0204);
    cases.push((
        "boot protocol 2.04",
        old,
        "bzImage: boot protocol 2.04 too old (2.12 or later needed for the 64-bit entry)",
    ));
    let mut big = good.clone();
    put_u32(&mut big, bz::INIT_SIZE, 2 * RAM as u32);
    cases.push((
        "needs more than guest RAM",
        big,
        "bzImage: kernel does not fit in guest RAM (it needs init_size bytes of RAM from its \
         load address)",
    ));
    // A file bigger than all of guest RAM (its init_size, which covers
    // the file, too).
    let mut huge = bzimage(RAM + MIB);
    put_u32(&mut huge, bz::INIT_SIZE, (RAM + 2 * MIB) as u32);
    cases.push((
        "a file bigger than guest RAM",
        huge,
        "bzImage: kernel does not fit in guest RAM (it needs init_size bytes of RAM from its \
         load address)",
    ));
    for (what, kernel, said) in cases {
        assert_eq!(say(&kernel), said, "{what}");
    }
}

#[test]
fn ram_too_small() {
    let image = bzimage(KERNEL_LEN);
    assert_eq!(
        load(&image, 4 * MIB, None, b""),
        Err(Error::KernelDoesNotFit)
    );
    // Too small even for the ACPI tables and boot structures.
    let layout = GuestLayout::standard(0x8_0000, 1);
    let mut ram = vec![0u8; 0x8_0000];
    let err = boot_linux(&mut ram, &layout, &payload(&image, None)).unwrap_err();
    assert!(
        matches!(err, firmware::Error::Acpi(firmware::acpi::Error::Ram(_))),
        "{err:?}"
    );
}

#[test]
fn initrd_respects_initrd_addr_max_and_the_kernel() {
    let mut image = bzimage(KERNEL_LEN);
    // The kernel claims 16..20 MiB; the initrd must end by 24 MiB.
    put_u32(&mut image, bz::INITRD_ADDR_MAX, 24 * MIB as u32 - 1);
    let rd = initrd(2 * MIB + 5);
    let l = load(&image, RAM, Some(&rd), b"").unwrap();
    let (addr, size) = l.initrd.unwrap();
    assert_eq!(addr, (24 * MIB - rd.len()) as u64 & !0xfff);
    assert!(addr + size <= 24 * MIB as u64 && addr >= l.kernel_end);

    assert_eq!(
        load(&image, RAM, Some(&initrd(4 * MIB + 1)), b""),
        Err(Error::InitrdDoesNotFit)
    );
    assert!(load(&image, RAM, Some(&initrd(4 * MIB)), b"").is_ok());
    assert_eq!(
        load(&bzimage(KERNEL_LEN), RAM, Some(&initrd(RAM)), b""),
        Err(Error::InitrdDoesNotFit)
    );
}

#[test]
fn cmdline_limits() {
    let image = bzimage(KERNEL_LEN);
    assert!(load(&image, RAM, None, &[b'a'; 2047]).is_ok());
    assert_eq!(
        load(&image, RAM, None, &[b'a'; 2048]),
        Err(Error::CmdlineTooLong)
    );
    assert_eq!(load(&image, RAM, None, b"a\0b"), Err(Error::CmdlineHasNul));
    let mut huge = image.clone();
    put_u32(&mut huge, bz::CMDLINE_SIZE, u32::MAX);
    // Our buffer below the EBDA caps it then: 64 KiB with the NUL.
    assert!(load(&huge, RAM, None, &vec![b'a'; 0xffff]).is_ok());
    assert_eq!(
        load(&huge, RAM, None, &vec![b'a'; 0x1_0000]),
        Err(Error::CmdlineTooLong)
    );
}

#[test]
fn rsdp_field_needs_protocol_2_14() {
    let mut image = bzimage(KERNEL_LEN);
    put_u16(&mut image, bz::VERSION, 0x020c);
    let layout = GuestLayout::standard(RAM as u64, 1);
    let mut ram = vec![0u8; RAM];
    boot_linux(&mut ram, &layout, &payload(&image, None)).unwrap();
    assert_eq!(u64_at(&ram, low::ZERO_PAGE + 0x70), 0);
}

#[test]
fn too_many_e820_entries() {
    let image = bzimage(KERNEL_LEN);
    let entry = e820::E820Entry {
        addr: 0,
        size: 0x1000,
        kind: E820Type::Reserved,
    };
    let map = vec![entry; 129];
    let mut ram = vec![0u8; RAM];
    let info = firmware::BootInfo {
        cmdline: b"",
        initrd: None,
        e820: &map,
        rsdp: None,
    };
    assert_eq!(
        linux::load(&mut ram, &image, &info),
        Err(Error::TooManyE820Entries)
    );
}

/// The real Debian kernel, when `cargo xtask linux build` has fetched it;
/// skipped otherwise.
#[test]
fn debian_kernel_if_present() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/linux");
    let (Ok(image), Ok(rd)) = (
        std::fs::read(dir.join("bzImage")),
        std::fs::read(dir.join("initramfs.cpio")),
    ) else {
        eprintln!("no kernel in {}: skipped", dir.display());
        return;
    };
    let header = linux::SetupHeader::parse(&image).unwrap();
    assert!(header.version >= 0x020c && header.relocatable);
    let layout = GuestLayout::standard(256 * MIB as u64, 1);
    let mut ram = vec![0u8; 256 * MIB];
    let map = e820::memory_map(&layout);
    let info = firmware::BootInfo {
        cmdline: b"console=ttyS0",
        initrd: Some(&rd),
        e820: &map,
        rsdp: Some(0xe_0000),
    };
    let l = linux::load(&mut ram, &image, &info).unwrap();
    assert_eq!(l.kernel_addr, header.pref_address);
    assert_eq!(l.kernel_end, header.pref_address + header.init_size);
    let (addr, size) = l.initrd.unwrap();
    assert!(addr >= l.kernel_end && addr + size <= 256 * MIB as u64);
    assert_eq!(
        ram[l.kernel_addr as usize..][..0x1000],
        image[header.kernel_offset..][..0x1000]
    );
}

/// The other kernels of guests/linux/recipe.toml (Debian's 6.12 and cloud
/// kernels), each where a system test built it: it loads, and its first
/// half is refused as truncated; skipped when none is built.
#[test]
fn other_kernels_if_present() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/linux/kernels");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!("no kernels in {}: skipped", dir.display());
        return;
    };
    let layout = GuestLayout::standard(256 * MIB as u64, 1);
    for entry in entries.flatten() {
        let Ok(image) = std::fs::read(entry.path().join("bzImage")) else {
            continue;
        };
        let name = entry.file_name();
        let header = linux::SetupHeader::parse(&image).unwrap();
        assert!(header.version >= 0x020c && header.relocatable, "{name:?}");
        let mut ram = vec![0u8; 256 * MIB];
        firmware::boot_detected(&mut ram, &layout, &payload(&image, None), &[])
            .unwrap_or_else(|e| panic!("{name:?}: {e}"));
        let half = &image[..image.len() / 2];
        let err = firmware::boot_detected(&mut ram, &layout, &payload(half, None), &[]);
        assert!(
            err.is_err_and(|e| e.to_string().starts_with("bzImage: file truncated")),
            "{name:?}"
        );
    }
}
