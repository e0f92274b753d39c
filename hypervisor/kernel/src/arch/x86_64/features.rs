//! What the CPU offers, read once at boot with CPUID (and, for VMX, the VMX
//! capability MSRs, which only exist when CPUID announces VMX).

use super::cpu::read_msr;
use raw_cpuid::CpuId;

const IA32_VMX_BASIC: u32 = 0x480;
const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48b;
const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48e;
const VMX_BASIC_TRUE_CONTROLS: u64 = 1 << 55;
const PROCBASED_ACTIVATE_SECONDARY: u64 = 1 << 31;
const SECONDARY_EPT: u64 = 1 << 1;
const SECONDARY_VPID: u64 = 1 << 5;
const SECONDARY_UNRESTRICTED_GUEST: u64 = 1 << 7;

#[derive(Clone, Copy, Debug, Default)]
pub struct VmxFeatures {
    pub ept: bool,
    pub vpid: bool,
    pub unrestricted_guest: bool,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct SvmFeatures {
    pub npt: bool,
    pub asids: u32,
    pub nrip_save: bool,
}

#[derive(Clone, Copy, Debug)]
pub enum Virtualization {
    Vmx(VmxFeatures),
    Svm(SvmFeatures),
    None,
}

#[derive(Clone, Copy, Debug)]
pub struct Features {
    pub vendor: [u8; 12],
    pub x2apic: bool,
    pub no_execute: bool,
    pub virtualization: Virtualization,
}

impl Features {
    pub fn vendor(&self) -> &str {
        core::str::from_utf8(&self.vendor).unwrap_or("unknown")
    }
}

pub fn detect() -> Features {
    let cpuid = CpuId::new();
    let mut vendor = [b'?'; 12];
    if let Some(info) = cpuid.get_vendor_info() {
        let name = info.as_str().as_bytes();
        let len = name.len().min(vendor.len());
        vendor[..len].copy_from_slice(&name[..len]);
    }
    let feature_info = cpuid.get_feature_info();
    let x2apic = feature_info.as_ref().is_some_and(|f| f.has_x2apic());
    let has_vmx = feature_info.as_ref().is_some_and(|f| f.has_vmx());
    let extended = cpuid.get_extended_processor_and_feature_identifiers();
    let no_execute = extended.as_ref().is_some_and(|e| e.has_execute_disable());
    let virtualization = if has_vmx {
        Virtualization::Vmx(vmx_features())
    } else if let Some(svm) = cpuid.get_svm_info() {
        Virtualization::Svm(SvmFeatures {
            npt: svm.has_nested_paging(),
            asids: svm.supported_asids(),
            nrip_save: svm.has_nrip(),
        })
    } else {
        Virtualization::None
    };
    Features {
        vendor,
        x2apic,
        no_execute,
        virtualization,
    }
}

/// Reads the allowed-1 settings of the secondary processor-based controls.
fn vmx_features() -> VmxFeatures {
    let basic = read_msr(IA32_VMX_BASIC);
    let procbased = if basic & VMX_BASIC_TRUE_CONTROLS != 0 {
        read_msr(IA32_VMX_TRUE_PROCBASED_CTLS)
    } else {
        read_msr(IA32_VMX_PROCBASED_CTLS)
    };
    if (procbased >> 32) & PROCBASED_ACTIVATE_SECONDARY == 0 {
        return VmxFeatures::default();
    }
    let secondary = read_msr(IA32_VMX_PROCBASED_CTLS2) >> 32;
    VmxFeatures {
        ept: secondary & SECONDARY_EPT != 0,
        vpid: secondary & SECONDARY_VPID != 0,
        unrestricted_guest: secondary & SECONDARY_UNRESTRICTED_GUEST != 0,
    }
}

fn yes(flag: bool) -> &'static str {
    if flag {
        "yes"
    } else {
        "no"
    }
}

/// One banner line per feature group.
pub fn log_banner(features: &Features) {
    let cpuid = CpuId::new();
    let brand = cpuid.get_processor_brand_string();
    log::info!(
        "cpu: {} \"{}\"",
        features.vendor(),
        brand.as_ref().map_or("", |b| b.as_str().trim())
    );
    match features.virtualization {
        Virtualization::Vmx(vmx) => log::info!(
            "cpu: vmx, ept {}, vpid {}, unrestricted guest {}",
            yes(vmx.ept),
            yes(vmx.vpid),
            yes(vmx.unrestricted_guest)
        ),
        Virtualization::Svm(svm) => log::info!(
            "cpu: svm, npt {}, {} asids, nrip save {}",
            yes(svm.npt),
            svm.asids,
            yes(svm.nrip_save)
        ),
        Virtualization::None => log::warn!("cpu: no hardware virtualization (neither VMX nor SVM)"),
    }
    log::info!(
        "cpu: x2apic {}, nx {}",
        yes(features.x2apic),
        yes(features.no_execute)
    );
}
