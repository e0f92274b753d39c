//! The CPUID a guest sees: the host's, cut down to what this VMM and the
//! kernel provide, with KVM's paravirtual leaves. Topology as KVM with
//! QEMU's `-smp N` shows it: one package of N cores, one thread each,
//! APIC ID = x2APIC ID = the vCPU's number (leaves 1, 4, 0xb/0x1f and
//! AMD's 0x8000_0008).
//!
//! Features whose MSRs or instructions nobody emulates are hidden (VMX/SVM,
//! MONITOR, performance counters, speculation-control MSRs, PKU, LA57,
//! RDTSCP); the local APIC is the VMM's model, so x2APIC, the TSC-deadline
//! timer and ARAT (its timer runs in every C-state) are offered whatever
//! the host has, and so are machine checks and MTRRs, whose few MSRs
//! `msr.rs` emulates (no error banks, no variable ranges, default type
//! WB). The choices: docs/architecture.md, "What the guest's CPU offers".
#![forbid(unsafe_code)]

/// `eax, ebx, ecx, edx`.
pub type Regs = [u32; 4];

pub const KVM_SIGNATURE_LEAF: u32 = 0x4000_0000;
pub const KVM_FEATURES_LEAF: u32 = 0x4000_0001;
/// Linux looks for hypervisor signatures up to here.
const HYPERVISOR_LEAVES_END: u32 = 0x4001_0000;

/// `KVM_FEATURE_*` bits of leaf 0x4000_0001 eax.
pub mod kvm_feature {
    pub const CLOCKSOURCE: u32 = 1 << 0;
    pub const CLOCKSOURCE2: u32 = 1 << 3;
    pub const CLOCKSOURCE_STABLE_BIT: u32 = 1 << 24;
}

mod leaf1 {
    pub mod ecx {
        pub const DTES64: u32 = 1 << 2;
        pub const MONITOR: u32 = 1 << 3;
        pub const DS_CPL: u32 = 1 << 4;
        pub const VMX: u32 = 1 << 5;
        pub const SMX: u32 = 1 << 6;
        pub const EST: u32 = 1 << 7;
        pub const TM2: u32 = 1 << 8;
        pub const SDBG: u32 = 1 << 11;
        pub const PDCM: u32 = 1 << 15;
        pub const DCA: u32 = 1 << 18;
        pub const X2APIC: u32 = 1 << 21;
        pub const TSC_DEADLINE: u32 = 1 << 24;
        pub const OSXSAVE: u32 = 1 << 27;
        pub const HYPERVISOR: u32 = 1 << 31;
    }
    pub mod edx {
        pub const MCE: u32 = 1 << 7;
        pub const APIC: u32 = 1 << 9;
        pub const MTRR: u32 = 1 << 12;
        pub const MCA: u32 = 1 << 14;
        pub const PSN: u32 = 1 << 18;
        pub const DS: u32 = 1 << 21;
        pub const ACPI: u32 = 1 << 22;
        pub const HTT: u32 = 1 << 28;
        /// What the VMM emulates: machine checks with no banks, MTRRs
        /// with no ranges (`msr.rs`).
        pub const EMULATED: u32 = MCE | MTRR | MCA;
        pub const TM: u32 = 1 << 29;
        pub const PBE: u32 = 1 << 31;
    }
    /// ebx: initial APIC ID (31:24) and logical processors (23:16).
    pub const EBX_TOPOLOGY: u32 = 0xffff_0000;
    pub const EBX_ONE_LOGICAL: u32 = 1 << 16;
}

/// Leaf 6 eax bit 2: the APIC timer runs in every C-state.
const ARAT: u32 = 1 << 2;

mod leaf7 {
    pub mod ebx {
        pub const TSC_ADJUST: u32 = 1 << 1;
        pub const SGX: u32 = 1 << 2;
        /// VMX runs it in a guest only with a secondary control the
        /// kernel does not set: it would be #UD.
        pub const INVPCID: u32 = 1 << 10;
        pub const PQM: u32 = 1 << 12;
        pub const PQE: u32 = 1 << 15;
        pub const INTEL_PT: u32 = 1 << 25;
    }
    pub mod ecx {
        pub const PKU: u32 = 1 << 3;
        pub const OSPKE: u32 = 1 << 4;
        pub const WAITPKG: u32 = 1 << 5;
        pub const LA57: u32 = 1 << 16;
        /// Reads IA32_TSC_AUX, which the kernel does not switch.
        pub const RDPID: u32 = 1 << 22;
        pub const SGX_LC: u32 = 1 << 30;
    }
    pub mod edx {
        pub const SPEC_CTRL: u32 = 1 << 26;
        pub const STIBP: u32 = 1 << 27;
        pub const FLUSH_L1D: u32 = 1 << 28;
        pub const ARCH_CAPABILITIES: u32 = 1 << 29;
        pub const CORE_CAPABILITIES: u32 = 1 << 30;
        pub const SSBD: u32 = 1 << 31;
    }
}

mod ext1 {
    pub mod ecx {
        pub const SVM: u32 = 1 << 2;
        pub const EXT_APIC_SPACE: u32 = 1 << 3;
        pub const IBS: u32 = 1 << 10;
        pub const SKINIT: u32 = 1 << 12;
        pub const WDT: u32 = 1 << 13;
        pub const TOPOEXT: u32 = 1 << 22;
        pub const PERFCTR_CORE: u32 = 1 << 23;
        pub const PERFCTR_NB: u32 = 1 << 24;
        pub const PERFCTR_LLC: u32 = 1 << 28;
    }
    pub mod edx {
        /// Reads IA32_TSC_AUX, which the kernel does not switch.
        pub const RDTSCP: u32 = 1 << 27;
    }
}

/// Leaf 0xd subleaf 1 eax bit 3: XSAVES/XRSTORS and IA32_XSS, for
/// supervisor state the kernel's XSAVE image does not hold.
const XSAVES: u32 = 1 << 3;

/// Leaf 0x8000_0008 ebx: AMD's speculation-control bits (IBPB, IBRS,
/// STIBP, SSBD and friends), all backed by MSRs nobody emulates.
const EXT8_EBX_SPECULATION: u32 = 0x0f00_f000;

/// What of the guest's state CPUID reflects.
#[derive(Clone, Copy, Debug, Default)]
pub struct GuestView {
    /// CR4.OSXSAVE.
    pub osxsave: bool,
    /// XCR0: leaf 0xd's sizes are those of the enabled components.
    pub xcr0: u64,
    /// The asking vCPU's APIC ID (its number).
    pub apic_id: u32,
    /// The guest's vCPUs (0 counts as 1).
    pub vcpus: u32,
}

impl GuestView {
    fn cores(&self) -> u32 {
        self.vcpus.max(1)
    }

    /// APIC ID bits the cores take: ceil(log2(cores)).
    fn core_bits(&self) -> u32 {
        u32::BITS - (self.cores() - 1).leading_zeros()
    }
}

/// The XSAVE header and the legacy (x87/SSE) area.
const XSAVE_BASE_SIZE: u32 = 576;
/// Leaf 0xd subleaf i ecx bit 1: aligned to 64 bytes in the compacted form.
const XSAVE_ALIGN64: u32 = 1 << 1;

/// The XSAVE area's size for the components in `xcr0`, in the standard
/// or the compacted form (what leaf 0xd reports for the current XCR0; the
/// host's answer is for the host's XCR0).
fn xsave_size(host: &dyn Fn(u32, u32) -> Regs, xcr0: u64, compacted: bool) -> u32 {
    let mut size = XSAVE_BASE_SIZE;
    for component in (2..63).filter(|i| xcr0 & (1 << i) != 0) {
        let [len, offset, flags, _] = host(0xd, component);
        size = if compacted {
            let start = if flags & XSAVE_ALIGN64 != 0 {
                size.next_multiple_of(64)
            } else {
                size
            };
            start.saturating_add(len)
        } else {
            size.max(offset.saturating_add(len))
        };
    }
    size
}

/// The guest's CPUID for `leaf`/`subleaf`. `host` answers the real CPUID.
pub fn guest_cpuid(
    host: &dyn Fn(u32, u32) -> Regs,
    leaf: u32,
    subleaf: u32,
    guest: GuestView,
) -> Regs {
    if (KVM_SIGNATURE_LEAF..HYPERVISOR_LEAVES_END).contains(&leaf) {
        return hypervisor_leaf(leaf);
    }
    let max_basic = host(0, 0)[0];
    let max_extended = host(0x8000_0000, 0)[0];
    let beyond = if leaf >= 0x8000_0000 {
        leaf > max_extended
    } else {
        leaf > max_basic
    };
    if beyond {
        return [0; 4];
    }
    let [eax, ebx, ecx, edx] = host(leaf, subleaf);
    match leaf {
        1 => {
            use leaf1::{ecx as c, edx as d};
            let hidden_ecx = c::DTES64
                | c::MONITOR
                | c::DS_CPL
                | c::VMX
                | c::SMX
                | c::EST
                | c::TM2
                | c::SDBG
                | c::PDCM
                | c::DCA
                | c::OSXSAVE;
            let mut ecx = (ecx & !hidden_ecx) | c::X2APIC | c::TSC_DEADLINE | c::HYPERVISOR;
            if guest.osxsave {
                ecx |= c::OSXSAVE;
            }
            let hidden_edx = d::PSN | d::DS | d::ACPI | d::HTT | d::TM | d::PBE;
            // Addressable IDs in the package, and HTT when there are more
            // than one (as KVM/QEMU set them).
            let logical = 1u32 << guest.core_bits();
            let ebx = (ebx & !leaf1::EBX_TOPOLOGY)
                | ((guest.apic_id & 0xff) << 24)
                | ((logical & 0xff) * leaf1::EBX_ONE_LOGICAL);
            let htt = if guest.cores() > 1 { d::HTT } else { 0 };
            [
                eax,
                ebx,
                ecx,
                (edx & !hidden_edx) | d::APIC | d::EMULATED | htt,
            ]
        }
        // Cache parameters: one thread per cache, the package's cores
        // in 31:26.
        4 => {
            let cores = if eax & 0x1f == 0 {
                0
            } else {
                ((1 << guest.core_bits()) - 1) << 26
            };
            [(eax & 0x3fff) | cores, ebx, ecx, edx]
        }
        // Thermal and power: only that the (emulated) APIC timer never stops.
        6 => [ARAT, 0, 0, 0],
        // MONITOR/MWAIT, performance monitoring, resource-director
        // monitoring/allocation, SGX, processor trace.
        5 | 0xa | 0xf | 0x10 | 0x12 | 0x14 => [0; 4],
        7 if subleaf == 0 => {
            use leaf7::{ebx as b, ecx as c, edx as d};
            let ebx = ebx & !(b::TSC_ADJUST | b::SGX | b::INVPCID | b::PQM | b::PQE | b::INTEL_PT);
            let ecx = ecx & !(c::PKU | c::OSPKE | c::WAITPKG | c::LA57 | c::RDPID | c::SGX_LC);
            let edx = edx
                & !(d::SPEC_CTRL
                    | d::STIBP
                    | d::FLUSH_L1D
                    | d::ARCH_CAPABILITIES
                    | d::CORE_CAPABILITIES
                    | d::SSBD);
            [eax, ebx, ecx, edx]
        }
        7 => [0; 4],
        // Extended topology: the SMT level (one thread), the core level
        // (the package's cores); EDX the x2APIC ID at every level.
        0xb | 0x1f => match subleaf {
            0 => [0, 1, 1 << 8, guest.apic_id],
            1 => [
                guest.core_bits(),
                guest.cores(),
                (2 << 8) | 1,
                guest.apic_id,
            ],
            _ => [0, 0, subleaf & 0xff, guest.apic_id],
        },
        0x8000_0001 => {
            use ext1::ecx as c;
            let hidden = c::SVM
                | c::EXT_APIC_SPACE
                | c::IBS
                | c::SKINIT
                | c::WDT
                | c::TOPOEXT
                | c::PERFCTR_CORE
                | c::PERFCTR_NB
                | c::PERFCTR_LLC;
            [eax, ebx, ecx & !hidden, edx & !ext1::edx::RDTSCP]
        }
        0xd if subleaf == 0 => [eax, xsave_size(host, guest.xcr0, false), ecx, edx],
        0xd if subleaf == 1 => [eax & !XSAVES, xsave_size(host, guest.xcr0, true), ecx, edx],
        // Power management, including the invariant-TSC bit: with it Linux
        // prefers the raw TSC to kvm-clock, whose offsets the VMM controls.
        0x8000_0007 => [0; 4],
        // Address sizes stay; the cores (ECX 7:0 NC = cores - 1, 15:12
        // the APIC ID bits they take); no speculation-control MSRs.
        0x8000_0008 => {
            let ecx = (guest.cores() - 1) | guest.core_bits() << 12;
            [eax, ebx & !EXT8_EBX_SPECULATION, ecx, 0]
        }
        // SVM, AMD's extended topology and memory encryption.
        0x8000_000a | 0x8000_001e | 0x8000_001f => [0; 4],
        _ => [eax, ebx, ecx, edx],
    }
}

fn hypervisor_leaf(leaf: u32) -> Regs {
    match leaf {
        KVM_SIGNATURE_LEAF => {
            let word = |i: usize| {
                let sig = b"KVMKVMKVM\0\0\0";
                u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]])
            };
            [KVM_FEATURES_LEAF, word(0), word(4), word(8)]
        }
        KVM_FEATURES_LEAF => {
            use kvm_feature::*;
            [CLOCKSOURCE | CLOCKSOURCE2 | CLOCKSOURCE_STABLE_BIT, 0, 0, 0]
        }
        _ => [0; 4],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host that has everything: every bit set, max leaves 0x1f and
    /// 0x8000_0021.
    fn host(leaf: u32, _subleaf: u32) -> Regs {
        match leaf {
            0 => [0x1f, 0x6874_7541, 0x444d_4163, 0x6974_6e65],
            0x8000_0000 => [0x8000_0021, 0, 0, 0],
            _ => [u32::MAX; 4],
        }
    }

    fn cpuid(leaf: u32, subleaf: u32) -> Regs {
        guest_cpuid(&host, leaf, subleaf, GuestView::default())
    }

    #[test]
    fn xsave_sizes_follow_the_guest_xcr0() {
        // AVX (256 bytes at 576), MPX BNDREGS (64 at 960), PKRU (8 at 2688,
        // 64-byte aligned when compacted).
        fn xsave_host(leaf: u32, subleaf: u32) -> Regs {
            match (leaf, subleaf) {
                (0, _) => [0xd, 0, 0, 0],
                (0x8000_0000, _) => [0x8000_0000, 0, 0, 0],
                (0xd, 0) => [0x21f, 0x240, 0xa88, 0],
                (0xd, 1) => [0xf, 0x240, 0, 0],
                (0xd, 2) => [256, 576, 0, 0],
                (0xd, 3) => [64, 960, 0, 0],
                (0xd, 9) => [8, 2688, XSAVE_ALIGN64, 0],
                _ => [0; 4],
            }
        }
        let size = |xcr0, subleaf| {
            let view = GuestView {
                osxsave: true,
                xcr0,
                ..GuestView::default()
            };
            guest_cpuid(&xsave_host, 0xd, subleaf, view)[1]
        };
        assert_eq!(size(0x3, 0), 576);
        assert_eq!(size(0x7, 0), 832);
        assert_eq!(size(0x7, 1), 832);
        assert_eq!(size(0x207, 0), 2696);
        assert_eq!(size(0x207, 1), 840, "PKRU at 832, already aligned");
        assert_eq!(size(0x20f, 1), 904, "BNDREGS to 896, PKRU at 896");
        let max = guest_cpuid(&xsave_host, 0xd, 0, GuestView::default())[2];
        assert_eq!(max, 0xa88, "the maximum stays the host's");
    }

    #[test]
    fn kvm_leaves() {
        let [max, b, c, d] = cpuid(KVM_SIGNATURE_LEAF, 0);
        assert_eq!(max, KVM_FEATURES_LEAF);
        let mut sig = [0u8; 12];
        sig[0..4].copy_from_slice(&b.to_le_bytes());
        sig[4..8].copy_from_slice(&c.to_le_bytes());
        sig[8..12].copy_from_slice(&d.to_le_bytes());
        assert_eq!(&sig, b"KVMKVMKVM\0\0\0");
        let features = cpuid(KVM_FEATURES_LEAF, 0)[0];
        assert_ne!(features & kvm_feature::CLOCKSOURCE2, 0);
        assert_ne!(features & kvm_feature::CLOCKSOURCE_STABLE_BIT, 0);
        assert_eq!(cpuid(0x4000_0100, 0), [0; 4]);
    }

    #[test]
    fn leaf_one_is_one_virtual_cpu() {
        use leaf1::{ecx as c, edx as d};
        let [_, ebx, ecx, edx] = cpuid(1, 0);
        assert_eq!(ebx >> 16, 1, "APIC ID 0, one logical processor");
        for (bit, name) in [
            (c::HYPERVISOR, "hypervisor"),
            (c::X2APIC, "x2apic"),
            (c::TSC_DEADLINE, "tsc deadline"),
        ] {
            assert_ne!(ecx & bit, 0, "{name}");
        }
        for bit in [c::VMX, c::MONITOR, c::PDCM, c::OSXSAVE] {
            assert_eq!(ecx & bit, 0, "{bit:#x}");
        }
        assert_ne!(edx & d::APIC, 0);
        assert_eq!(edx & d::HTT, 0);
        let no_host = |leaf, _| if leaf == 0 { [0x1f, 0, 0, 0] } else { [0; 4] };
        let bare = guest_cpuid(&no_host, 1, 0, GuestView::default())[3];
        for bit in [d::MCE, d::MCA, d::MTRR] {
            assert_ne!(edx & bit, 0, "{bit:#x}");
            assert_ne!(bare & bit, 0, "{bit:#x} emulated, not the host's");
        }
        let view = GuestView {
            osxsave: true,
            xcr0: 1,
            ..GuestView::default()
        };
        let with_osxsave = guest_cpuid(&host, 1, 0, view)[2];
        assert_ne!(with_osxsave & c::OSXSAVE, 0);
    }

    #[test]
    fn hidden_features_and_topology() {
        assert_eq!(cpuid(0x8000_0001, 0)[2] & ext1::ecx::SVM, 0);
        assert_eq!(cpuid(7, 0)[3] & leaf7::edx::SPEC_CTRL, 0);
        assert_eq!(cpuid(7, 0)[1] & leaf7::ebx::INVPCID, 0);
        assert_eq!(cpuid(7, 0)[2] & leaf7::ecx::LA57, 0);
        assert_eq!(cpuid(0xa, 0), [0; 4]);
        assert_eq!(cpuid(5, 0), [0; 4], "no MONITOR/MWAIT");
        assert_eq!(cpuid(6, 0), [ARAT, 0, 0, 0], "ARAT only");
        assert_eq!(cpuid(0x8000_0007, 0), [0; 4], "no invariant TSC");
        assert_eq!(cpuid(0x8000_000a, 0), [0; 4]);
        assert_eq!(cpuid(0xb, 0), [0, 1, 0x100, 0]);
        assert_eq!(cpuid(0xb, 1), [0, 1, 0x201, 0]);
        assert_eq!(cpuid(0xb, 2), [0, 0, 2, 0]);
        assert_eq!(cpuid(4, 0)[0] >> 14, 0, "no sharing, one core");
    }

    #[test]
    fn each_vcpu_sees_its_apic_id_and_the_cores() {
        let view = |apic_id| GuestView {
            apic_id,
            vcpus: 3,
            ..GuestView::default()
        };
        let ask = |apic_id, leaf, subleaf| guest_cpuid(&host, leaf, subleaf, view(apic_id));
        let [_, ebx, _, edx] = ask(2, 1, 0);
        assert_eq!((ebx >> 24, (ebx >> 16) & 0xff), (2, 4), "APIC ID 2, 4 IDs");
        assert_ne!(edx & leaf1::edx::HTT, 0);
        assert_eq!(ask(1, 0xb, 0), [0, 1, 0x100, 1]);
        assert_eq!(ask(1, 0xb, 1), [2, 3, 0x201, 1]);
        assert_eq!(ask(2, 0x1f, 5), [0, 0, 5, 2]);
        assert_eq!(ask(0, 4, 0)[0] >> 26, 3, "cores per package - 1");
        assert_eq!(ask(0, 0x8000_0008, 0)[2], 2 | 2 << 12);
        // Beyond the host's maximum leaves.
        assert_eq!(cpuid(0x20, 0), [0; 4]);
        assert_eq!(cpuid(0x8000_0022, 0), [0; 4]);
        // Passed through as is, but for what the kernel does not switch.
        assert_eq!(cpuid(0xd, 1)[0] & XSAVES, 0);
        assert_eq!(cpuid(0x8000_0001, 0)[3] & ext1::edx::RDTSCP, 0);
        assert_eq!(cpuid(7, 0)[2] & leaf7::ecx::RDPID, 0);
    }
}
