//! Whether QEMU with KVM (`-accel kvm -cpu host`) can run Moat here, and if
//! not, what is missing.
//!
//! Moat is a hypervisor: under KVM it needs the host's KVM to lend it VMX
//! or SVM (nested virtualization). That takes four things, each visible
//! without privileges: `/dev/kvm` that this user can open, the CPU flag
//! `vmx` (Intel) or `svm` (AMD) in `/proc/cpuinfo`, the matching module
//! `kvm_intel` or `kvm_amd` loaded (`/sys/module/…`), and its `nested`
//! parameter on. A `/dev/kvm` from KVM's PVM module (`kvm_pvm`, as on
//! this project's own machines) runs only PVM-aware guests and lends no
//! VMX or SVM: Moat cannot run there at all.

use std::fs;

/// What the host shows about KVM: read from `/dev`, `/proc` and `/sys`
/// ([`KvmHost::read`]), or made up by a test.
#[derive(Clone, Debug)]
pub struct KvmHost {
    /// Opening `/dev/kvm` read-write: `Ok`, or why not.
    pub device: Result<(), String>,
    /// `/proc/cpuinfo`.
    pub cpuinfo: String,
    /// Which of `kvm_intel`, `kvm_amd`, `kvm_pvm` are loaded.
    pub modules: Vec<String>,
    /// `(module, its nested parameter)` for `kvm_intel` and `kvm_amd`,
    /// where readable.
    pub nested: Vec<(String, String)>,
}

const KVM_MODULES: [&str; 3] = ["kvm_intel", "kvm_amd", "kvm_pvm"];

impl KvmHost {
    pub fn read() -> Self {
        let device = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map(drop)
            .map_err(|e| e.to_string());
        let modules = KVM_MODULES
            .iter()
            .filter(|m| fs::metadata(format!("/sys/module/{m}")).is_ok())
            .map(|m| m.to_string())
            .collect();
        let nested = ["kvm_intel", "kvm_amd"]
            .iter()
            .filter_map(|m| {
                let value = fs::read_to_string(format!("/sys/module/{m}/parameters/nested"));
                value.ok().map(|v| (m.to_string(), v.trim().to_string()))
            })
            .collect();
        Self {
            device,
            cpuinfo: fs::read_to_string("/proc/cpuinfo").unwrap_or_default(),
            modules,
            nested,
        }
    }

    fn loaded(&self, module: &str) -> bool {
        self.modules.iter().any(|m| m == module)
    }

    fn cpu_flags(&self) -> Vec<&str> {
        self.cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, f)| f.split_whitespace().collect())
            .unwrap_or_default()
    }
}

/// `Ok`: KVM can run Moat (it names the module that nests); `Err`: one
/// sentence saying what is missing.
pub fn verdict(host: &KvmHost) -> Result<&'static str, String> {
    let flags = host.cpu_flags();
    let (flag, module) = if flags.contains(&"vmx") {
        (Some("vmx"), "kvm_intel")
    } else if flags.contains(&"svm") {
        (Some("svm"), "kvm_amd")
    } else {
        (None, "kvm_intel or kvm_amd")
    };
    if host.loaded("kvm_pvm") && !host.loaded("kvm_intel") && !host.loaded("kvm_amd") {
        return Err(
            "this machine's /dev/kvm is KVM's PVM module (kvm_pvm), which runs only \
                    PVM-aware guests and lends them no VMX or SVM: it cannot run Moat"
                .to_string(),
        );
    }
    let mut missing = Vec::new();
    if let Err(why) = &host.device {
        missing.push(format!(
            "/dev/kvm cannot be opened ({why}; is KVM loaded, and is this user in group kvm?)"
        ));
    }
    match flag {
        None => missing.push(
            "the CPU shows neither vmx nor svm in /proc/cpuinfo (no hardware virtualization \
             to lend: off in the firmware, or, inside a VM, its hypervisor does not nest)"
                .to_string(),
        ),
        Some(_) if !host.loaded(module) => missing.push(format!(
            "the module {module} is not loaded (modprobe {module})"
        )),
        Some(_) => {
            let nested = host.nested.iter().find(|(m, _)| m == module);
            if let Some((_, value)) = nested {
                if !matches!(value.as_str(), "Y" | "y" | "1") {
                    missing.push(format!(
                        "{module}'s nested parameter is {value} (reload it with nested=1: \
                         modprobe -r {module} && modprobe {module} nested=1)"
                    ));
                }
            }
        }
    }
    if missing.is_empty() {
        return Ok(if flag == Some("vmx") {
            "kvm_intel"
        } else {
            "kvm_amd"
        });
    }
    Err(format!(
        "KVM cannot run Moat here: {}",
        missing.join("; and ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(cpu_flags: &str, modules: &[&str], nested: &[(&str, &str)]) -> KvmHost {
        KvmHost {
            device: Ok(()),
            cpuinfo: format!("processor\t: 0\nflags\t\t: fpu {cpu_flags} sse2\n"),
            modules: modules.iter().map(|m| m.to_string()).collect(),
            nested: nested
                .iter()
                .map(|(m, v)| (m.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn nesting_hosts_are_usable() {
        let intel = host("vmx", &["kvm_intel"], &[("kvm_intel", "Y")]);
        assert_eq!(verdict(&intel), Ok("kvm_intel"));
        let amd = host("svm", &["kvm_amd"], &[("kvm_amd", "1")]);
        assert_eq!(verdict(&amd), Ok("kvm_amd"));
        // No nested parameter to read: not known to be off.
        assert_eq!(verdict(&host("svm", &["kvm_amd"], &[])), Ok("kvm_amd"));
    }

    /// This project's machines: /dev/kvm opens, but it is PVM's.
    #[test]
    fn the_pvm_module_cannot_run_moat() {
        let pvm = host("hypervisor", &["kvm_pvm"], &[]);
        let e = verdict(&pvm).unwrap_err();
        assert!(e.contains("PVM module (kvm_pvm)"), "{e}");
        assert!(e.ends_with("it cannot run Moat"), "{e}");
    }

    #[test]
    fn each_missing_piece_is_named() {
        let no_device = KvmHost {
            device: Err("No such file or directory (os error 2)".into()),
            ..host("vmx", &["kvm_intel"], &[("kvm_intel", "Y")])
        };
        let e = verdict(&no_device).unwrap_err();
        assert!(
            e.starts_with("KVM cannot run Moat here: /dev/kvm cannot be opened (No such file"),
            "{e}"
        );

        let e = verdict(&host("hypervisor", &[], &[])).unwrap_err();
        assert!(e.contains("neither vmx nor svm"), "{e}");

        let e = verdict(&host("vmx", &[], &[])).unwrap_err();
        assert!(e.contains("the module kvm_intel is not loaded"), "{e}");

        let e = verdict(&host("svm", &["kvm_amd"], &[("kvm_amd", "0")])).unwrap_err();
        assert!(e.contains("kvm_amd's nested parameter is 0"), "{e}");
        assert!(e.contains("modprobe kvm_amd nested=1"), "{e}");

        let e = verdict(&host("vmx", &["kvm_intel"], &[("kvm_intel", "N")])).unwrap_err();
        assert!(e.contains("kvm_intel's nested parameter is N"), "{e}");

        // Two at once: both said.
        let both = KvmHost {
            device: Err("Permission denied (os error 13)".into()),
            ..host("sse3", &[], &[])
        };
        let e = verdict(&both).unwrap_err();
        assert!(
            e.contains("Permission denied") && e.contains("neither vmx nor svm"),
            "{e}"
        );
        let nothing = KvmHost {
            device: Err("No such file or directory (os error 2)".into()),
            cpuinfo: String::new(),
            modules: Vec::new(),
            nested: Vec::new(),
        };
        assert!(verdict(&nothing).is_err());
    }
}
