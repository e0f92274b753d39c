use super::*;
use crate::cpu::{access, CpuState};
use crate::testutil::{cpu_in, CpuMode, FakePlatform, PageTables, Paging, Rng};

const RAM: usize = 0x40_0000;
const POOL: u64 = 0x20_0000;
const ALL_PAGING: [Paging; 4] = [Paging::Legacy32, Paging::Pae, Paging::Long4, Paging::Long5];

fn setup(paging: Paging) -> (FakePlatform, PageTables, CpuState) {
    let mut platform = FakePlatform::new(RAM);
    let tables = PageTables::new(&mut platform, paging, POOL);
    let long = matches!(paging, Paging::Long4 | Paging::Long5);
    let mut cpu = cpu_in(if long {
        CpuMode::Long
    } else {
        CpuMode::Protected32
    });
    tables.enable(&mut cpu);
    (platform, tables, cpu)
}

fn pf(code: u32, linear: u64) -> Result<u64, WalkError> {
    Err(WalkError::PageFault(Exception::page_fault(code, linear)))
}

fn set_cpl(cpu: &mut CpuState, cpl: u32) {
    cpu.ss.access = (cpu.ss.access & !access::DPL_MASK) | (cpl << access::DPL_SHIFT);
}

#[test]
fn without_paging_linear_is_physical() {
    let mut platform = FakePlatform::new(0x1000);
    let cpu = cpu_in(CpuMode::Protected32);
    assert_eq!(
        translate(&mut platform, &cpu, 0xfee0_0abc, AccessKind::Write),
        Ok(0xfee0_0abc)
    );
}

#[test]
fn four_kib_pages_in_every_mode() {
    for paging in ALL_PAGING {
        let (mut platform, mut tables, cpu) = setup(paging);
        tables.map(&mut platform, 0x1234_5000, 0x3000, 1, pte::RW);
        tables.map(&mut platform, 0x1234_6000, 0x7000, 1, pte::RW);
        for (linear, gpa) in [(0x1234_5abc, 0x3abc), (0x1234_6001, 0x7001)] {
            assert_eq!(
                translate(&mut platform, &cpu, linear, AccessKind::Read),
                Ok(gpa),
                "{paging:?}"
            );
        }
        assert_eq!(
            translate(&mut platform, &cpu, 0x1234_7000, AccessKind::Read),
            pf(0, 0x1234_7000),
            "{paging:?}"
        );
    }
}

#[test]
fn high_kernel_addresses_in_long_modes() {
    for (paging, linear) in [
        (Paging::Long4, 0xffff_8880_0010_0000),
        (Paging::Long5, 0xff11_0000_0010_0000),
    ] {
        let (mut platform, mut tables, cpu) = setup(paging);
        tables.map(&mut platform, linear, 0x5000, 1, pte::RW);
        assert_eq!(
            translate(&mut platform, &cpu, linear + 0x10, AccessKind::Write),
            Ok(0x5010)
        );
    }
}

#[test]
fn large_pages() {
    // 4 MiB (32-bit paging with PSE), 2 MiB (PAE, 4-level), 1 GiB (4-level).
    let cases = [
        (
            Paging::Legacy32,
            2,
            0x8040_0000u64,
            0x0080_0000u64,
            0x8056_7890u64,
            0x0096_7890u64,
        ),
        (
            Paging::Pae,
            2,
            0x8040_0000,
            0x0060_0000,
            0x8050_0010,
            0x0070_0010,
        ),
        (
            Paging::Long4,
            2,
            0x4000_0000,
            0x0020_0000,
            0x401f_ffff,
            0x003f_ffff,
        ),
        (
            Paging::Long4,
            3,
            0xffff_ffff_c000_0000,
            0x4000_0000,
            0xffff_ffff_e000_0008,
            0x6000_0008,
        ),
    ];
    for (paging, level, linear, phys, probe, expected) in cases {
        let (mut platform, mut tables, cpu) = setup(paging);
        tables.map(&mut platform, linear, phys, level, pte::RW);
        assert_eq!(
            translate(&mut platform, &cpu, probe, AccessKind::Read),
            Ok(expected),
            "{paging:?}"
        );
    }
}

#[test]
fn pse36_high_address_bits() {
    let (mut platform, mut tables, cpu) = setup(Paging::Legacy32);
    let pde = tables.entry_gpa(&mut platform, 0x0040_0000, 2);
    // Physical bits 33:32 = 0b11 in PDE bits 14:13.
    platform.write_u32(pde, 0x00c0_0000 | (0b11 << 13) | (pte::PS | pte::P) as u32);
    assert_eq!(
        translate(&mut platform, &cpu, 0x0040_1234, AccessKind::Read),
        Ok(0x3_00c0_1234)
    );
    // Above a 34-bit MAXPHYADDR the same bits are reserved.
    platform.phys_bits = 33;
    assert_eq!(
        translate(&mut platform, &cpu, 0x0040_1234, AccessKind::Read),
        pf(pf::P | pf::RSVD, 0x0040_1234)
    );
}

#[test]
fn not_present_error_codes() {
    let (mut platform, mut tables, mut cpu) = setup(Paging::Long4);
    // The PT exists (one page mapped next door), the PTE does not.
    tables.map(&mut platform, 0x6000, 0x6000, 1, pte::RW | pte::US);
    let linear = 0x5008;
    assert_eq!(
        translate(&mut platform, &cpu, linear, AccessKind::Read),
        pf(0, linear)
    );
    assert_eq!(
        translate(&mut platform, &cpu, linear, AccessKind::Write),
        pf(pf::W, linear)
    );
    assert_eq!(
        translate(&mut platform, &cpu, linear, AccessKind::Fetch),
        pf(pf::ID, linear)
    );
    set_cpl(&mut cpu, 3);
    assert_eq!(
        translate(&mut platform, &cpu, linear, AccessKind::Write),
        pf(pf::W | pf::U, linear)
    );
    // Not present at the PML4 level.
    let far = 0x7f00_0000_0000;
    assert_eq!(
        translate(&mut platform, &cpu, far, AccessKind::Read),
        pf(pf::U, far)
    );
}

#[test]
fn write_to_read_only_page_follows_cr0_wp() {
    let (mut platform, mut tables, mut cpu) = setup(Paging::Long4);
    tables.map(&mut platform, 0x5000, 0x5000, 1, pte::US);
    tables.map(&mut platform, 0x6000, 0x6000, 1, 0);
    assert_eq!(
        translate(&mut platform, &cpu, 0x6000, AccessKind::Read),
        Ok(0x6000)
    );
    assert_eq!(
        translate(&mut platform, &cpu, 0x6000, AccessKind::Write),
        pf(pf::P | pf::W, 0x6000)
    );
    cpu.cr0 &= !cr0::WP;
    assert_eq!(
        translate(&mut platform, &cpu, 0x6000, AccessKind::Write),
        Ok(0x6000)
    );
    // User mode never writes read-only pages, whatever WP says.
    set_cpl(&mut cpu, 3);
    assert_eq!(
        translate(&mut platform, &cpu, 0x5000, AccessKind::Write),
        pf(pf::P | pf::W | pf::U, 0x5000)
    );
}

#[test]
fn read_only_intermediate_level_applies_to_the_leaf() {
    let (mut platform, mut tables, cpu) = setup(Paging::Pae);
    tables.map(&mut platform, 0x5000, 0x5000, 1, pte::RW);
    let pde = tables.entry_gpa(&mut platform, 0x5000, 2);
    let entry = platform.read_u64(pde);
    platform.write_u64(pde, entry & !pte::RW);
    assert_eq!(
        translate(&mut platform, &cpu, 0x5000, AccessKind::Write),
        pf(pf::P | pf::W, 0x5000)
    );
}

#[test]
fn user_mode_cannot_touch_supervisor_pages() {
    let (mut platform, mut tables, mut cpu) = setup(Paging::Legacy32);
    tables.map(&mut platform, 0x5000, 0x5000, 1, pte::RW);
    assert_eq!(
        translate(&mut platform, &cpu, 0x5000, AccessKind::Read),
        Ok(0x5000)
    );
    set_cpl(&mut cpu, 3);
    assert_eq!(
        translate(&mut platform, &cpu, 0x5000, AccessKind::Read),
        pf(pf::P | pf::U, 0x5000)
    );
    // No SMEP and no PAE: a fetch fault has no I/D bit in 32-bit paging.
    assert_eq!(
        translate(&mut platform, &cpu, 0x5000, AccessKind::Fetch),
        pf(pf::P | pf::U, 0x5000)
    );
}

#[test]
fn execute_disable() {
    let (mut platform, mut tables, mut cpu) = setup(Paging::Long4);
    tables.map(&mut platform, 0x5000, 0x5000, 1, pte::RW | pte::XD);
    assert_eq!(
        translate(&mut platform, &cpu, 0x5000, AccessKind::Read),
        Ok(0x5000)
    );
    assert_eq!(
        translate(&mut platform, &cpu, 0x5000, AccessKind::Fetch),
        pf(pf::P | pf::ID, 0x5000)
    );
    // Without EFER.NXE the XD bit is reserved.
    cpu.efer &= !efer::NXE;
    assert_eq!(
        translate(&mut platform, &cpu, 0x5000, AccessKind::Read),
        pf(pf::P | pf::RSVD, 0x5000)
    );
}

#[test]
fn smep_and_smap_guard_user_pages_from_the_kernel() {
    let (mut platform, mut tables, mut cpu) = setup(Paging::Long4);
    tables.map(&mut platform, 0x5000, 0x5000, 1, pte::RW | pte::US);
    cpu.cr4 |= cr4::SMEP | cr4::SMAP;
    assert_eq!(
        translate(&mut platform, &cpu, 0x5000, AccessKind::Fetch),
        pf(pf::P | pf::ID, 0x5000)
    );
    assert_eq!(
        translate(&mut platform, &cpu, 0x5000, AccessKind::Read),
        pf(pf::P, 0x5000)
    );
    assert_eq!(
        translate(&mut platform, &cpu, 0x5000, AccessKind::Write),
        pf(pf::P | pf::W, 0x5000)
    );
    cpu.rflags |= rflags::AC;
    assert_eq!(
        translate(&mut platform, &cpu, 0x5000, AccessKind::Write),
        Ok(0x5000)
    );
    cpu.rflags &= !rflags::AC;
    set_cpl(&mut cpu, 3);
    assert_eq!(
        translate(&mut platform, &cpu, 0x5000, AccessKind::Read),
        Ok(0x5000)
    );
    assert_eq!(
        translate(&mut platform, &cpu, 0x5000, AccessKind::Fetch),
        Ok(0x5000)
    );
}

#[test]
fn reserved_bits() {
    let rsvd = |linear| pf(pf::P | pf::RSVD, linear);
    // A 2 MiB page with bit 13 set.
    let (mut platform, mut tables, cpu) = setup(Paging::Long4);
    tables.map(&mut platform, 0x20_0000, 0x20_0000 | (1 << 13), 2, pte::RW);
    assert_eq!(
        translate(&mut platform, &cpu, 0x20_0000, AccessKind::Read),
        rsvd(0x20_0000)
    );
    // PS in a PML4 entry.
    let pml4e = tables.entry_gpa(&mut platform, 0x20_0000, 4);
    let entry = platform.read_u64(pml4e);
    platform.write_u64(pml4e, entry | pte::PS);
    assert_eq!(
        translate(&mut platform, &cpu, 0x20_0000, AccessKind::Read),
        rsvd(0x20_0000)
    );
    // A physical address above MAXPHYADDR (46 bits in the fake).
    let (mut platform, mut tables, cpu) = setup(Paging::Long4);
    tables.map(&mut platform, 0x5000, 1 << 47, 1, pte::RW);
    assert_eq!(
        translate(&mut platform, &cpu, 0x5000, AccessKind::Read),
        rsvd(0x5000)
    );
    // PAE: R/W in a PDPTE is reserved.
    let (mut platform, mut tables, cpu) = setup(Paging::Pae);
    tables.map(&mut platform, 0x5000, 0x5000, 1, pte::RW);
    let pdpte = tables.entry_gpa(&mut platform, 0x5000, 3);
    let entry = platform.read_u64(pdpte);
    platform.write_u64(pdpte, entry | pte::RW);
    assert_eq!(
        translate(&mut platform, &cpu, 0x5000, AccessKind::Read),
        rsvd(0x5000)
    );
    // 32-bit paging: bit 21 of a 4 MiB PDE.
    let (mut platform, mut tables, cpu) = setup(Paging::Legacy32);
    tables.map(&mut platform, 0x40_0000, 0x40_0000 | (1 << 21), 2, pte::RW);
    assert_eq!(
        translate(&mut platform, &cpu, 0x40_0000, AccessKind::Read),
        rsvd(0x40_0000)
    );
}

#[test]
fn pae_pdpte_not_present() {
    let (mut platform, _tables, cpu) = setup(Paging::Pae);
    assert_eq!(
        translate(&mut platform, &cpu, 0xc000_0000, AccessKind::Write),
        pf(pf::W, 0xc000_0000)
    );
}

#[test]
fn accessed_and_dirty_bits_are_set_like_hardware() {
    for paging in ALL_PAGING {
        let (mut platform, mut tables, cpu) = setup(paging);
        tables.map(&mut platform, 0x5000, 0x9000, 1, pte::RW);
        let levels = match paging {
            Paging::Legacy32 | Paging::Pae => 2, // PAE PDPTEs have no accessed bit
            Paging::Long4 => 4,
            Paging::Long5 => 5,
        };
        let entries: Vec<u64> = (1..=levels)
            .map(|level| tables.entry_gpa(&mut platform, 0x5000, level))
            .collect();
        let flags = |platform: &FakePlatform, gpa: u64| platform.read_u64(gpa) & (pte::A | pte::D);
        assert!(entries.iter().all(|&gpa| flags(&platform, gpa) == 0));

        translate(&mut platform, &cpu, 0x5000, AccessKind::Read).unwrap();
        assert!(
            entries.iter().all(|&gpa| flags(&platform, gpa) == pte::A),
            "{paging:?}"
        );

        translate(&mut platform, &cpu, 0x5000, AccessKind::Write).unwrap();
        assert_eq!(
            flags(&platform, entries[0]),
            pte::A | pte::D,
            "{paging:?} leaf"
        );
        assert!(
            entries[1..]
                .iter()
                .all(|&gpa| flags(&platform, gpa) == pte::A),
            "{paging:?} upper"
        );
    }
}

#[test]
fn dirty_bit_on_large_page_leaf() {
    let (mut platform, mut tables, cpu) = setup(Paging::Long4);
    tables.map(&mut platform, 0x4000_0000, 0x4000_0000, 3, pte::RW);
    translate(&mut platform, &cpu, 0x4000_1000, AccessKind::Write).unwrap();
    let pdpte = tables.entry_gpa(&mut platform, 0x4000_0000, 3);
    assert_eq!(
        platform.read_u64(pdpte) & (pte::A | pte::D),
        pte::A | pte::D
    );
}

#[test]
fn accessed_bit_update_retries_a_racing_guest_then_gives_up() {
    let (mut platform, mut tables, cpu) = setup(Paging::Long4);
    tables.map(&mut platform, 0x5000, 0x9000, 1, pte::RW);
    platform.cmpxchg_failures = AD_RETRIES - 1;
    assert_eq!(
        translate(&mut platform, &cpu, 0x5000, AccessKind::Read),
        Ok(0x9000)
    );

    let (mut platform, mut tables, cpu) = setup(Paging::Long4);
    tables.map(&mut platform, 0x5000, 0x9000, 1, pte::RW);
    platform.cmpxchg_failures = AD_RETRIES;
    assert_eq!(
        translate(&mut platform, &cpu, 0x5000, AccessKind::Read),
        Err(WalkError::Raced)
    );
}

#[test]
fn a_table_outside_ram_is_an_error_not_a_panic() {
    let (mut platform, _, mut cpu) = setup(Paging::Long4);
    cpu.cr3 = 0x8000_0000;
    assert_eq!(
        translate(&mut platform, &cpu, 0x5000, AccessKind::Read),
        Err(WalkError::TableNotRam(0x8000_0000))
    );
    // A PDE pointing into the MMIO hole.
    let (mut platform, mut tables, cpu) = setup(Paging::Long4);
    tables.map(&mut platform, 0x5000, 0x5000, 1, pte::RW);
    let pde = tables.entry_gpa(&mut platform, 0x5000, 2);
    platform.write_u64(pde, 0xa_0000 | pte::P | pte::RW);
    assert_eq!(
        translate(&mut platform, &cpu, 0x5000, AccessKind::Read),
        Err(WalkError::TableNotRam(0xa_0028))
    );
}

#[test]
fn fuzz_walks_over_random_tables() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut platform = FakePlatform::new(0x10_000);
    let (mut ok, mut faults) = (0, 0);
    for round in 0..20_000 {
        if round % 256 == 0 {
            for chunk in platform.ram.chunks_mut(8) {
                // Mostly small entries so walks stay in RAM and go deep.
                let entry = rng.next() & if rng.below(4) == 0 { u64::MAX } else { 0xf1ff };
                chunk.copy_from_slice(&entry.to_le_bytes());
            }
        }
        let paging = ALL_PAGING[rng.below(4) as usize];
        let mut cpu = cpu_in(CpuMode::Long);
        paging.enable(
            &mut cpu,
            rng.next() & if rng.below(8) == 0 { u64::MAX } else { 0xf000 },
        );
        cpu.cr0 ^= rng.next() & cr0::WP;
        cpu.cr4 |= rng.next() & (cr4::PSE | cr4::SMEP | cr4::SMAP);
        cpu.efer ^= rng.next() & efer::NXE;
        set_cpl(&mut cpu, (rng.next() & 3) as u32);
        platform.phys_bits = 32 + rng.below(21) as u32;
        platform.cmpxchg_failures = rng.below(3) as usize;
        let linear = rng.next();
        let kind = [AccessKind::Read, AccessKind::Write, AccessKind::Fetch][rng.below(3) as usize];
        match translate(&mut platform, &cpu, linear, kind) {
            Ok(gpa) => {
                assert_eq!(gpa & 0xfff, linear & 0xfff);
                ok += 1;
            }
            Err(WalkError::PageFault(e)) => {
                assert_eq!((e.vector, e.cr2), (Exception::PF, Some(linear)));
                assert_eq!(
                    e.error_code.unwrap() & pf::W != 0,
                    kind == AccessKind::Write
                );
                faults += 1;
            }
            Err(WalkError::TableNotRam(_) | WalkError::Raced) => {}
        }
    }
    assert!(ok > 100 && faults > 100, "ok {ok} faults {faults}");
}
