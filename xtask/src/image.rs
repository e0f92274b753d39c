//! Boot descriptions and the images made from them: QEMU's `-kernel`,
//! `-append` and `-initrd` arguments, and GRUB ISOs for Bochs and real machines.
//!
//! Both loaders hand the kernel multiboot command lines whose first word is
//! the file's path (QEMU does so itself; in `grub.cfg` the path is repeated);
//! the kernel names each module after the basename of that first word.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::build::Artifacts;
use crate::config::{self, ModuleSource, Plan};
use crate::util::{self, describe, shell_quote};
use crate::{Context, Error, Result};

/// Name of the kernel file in images.
pub const KERNEL_NAME: &str = "moat-kernel";
/// Asks the kernel to end the emulator (isa-debug-exit, Bochs' shutdown port)
/// when nothing is left to run.
pub const DEBUG_EXIT_ARG: &str = "debug-exit";
/// The module every default image boots.
pub const ROOT_TASK: &str = "roottask";

pub const IMAGE_DIR: &str = "target/image";

/// One multiboot module: its name, the file holding it, its arguments.
#[derive(Clone, Debug)]
pub struct Module {
    pub name: String,
    pub file: PathBuf,
    pub args: Vec<String>,
}

/// What to boot: a kernel with its arguments and modules.
#[derive(Clone, Debug)]
pub struct BootSpec {
    pub kernel: PathBuf,
    pub kernel_args: Vec<String>,
    pub modules: Vec<Module>,
    /// The emulated machine's RAM.
    pub memory_mib: u32,
    /// The emulated machine's CPUs.
    pub cpus: u32,
    /// QEMU's devices for the system (a guest's persistent disk), after
    /// the usual arguments.
    pub qemu_devices: Vec<String>,
}

/// RAM of the emulated machine unless a test needs more (a Linux guest).
pub const DEFAULT_MEMORY_MIB: u32 = 512;

impl BootSpec {
    /// QEMU's `-append`: the kernel arguments (QEMU puts the kernel path first).
    pub fn qemu_append(&self) -> String {
        self.kernel_args.join(" ")
    }

    /// QEMU's `-initrd`: `"path args,path2"`, with commas doubled as QEMU's
    /// option parser wants; `None` without modules.
    pub fn qemu_initrd(&self) -> Result<Option<String>> {
        if self.modules.is_empty() {
            return Ok(None);
        }
        let mut parts = Vec::new();
        for m in &self.modules {
            check_module(m)?;
            let path = m
                .file
                .to_str()
                .ok_or_else(|| bad_module(m, "path is not UTF-8"))?;
            let line = std::iter::once(path)
                .chain(m.args.iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join(" ");
            parts.push(line.replace(',', ",,"));
        }
        Ok(Some(parts.join(",")))
    }

    /// The arguments for `qemu-system-x86_64` that load this boot description.
    pub fn qemu_boot_args(&self) -> Result<Vec<String>> {
        let kernel = self
            .kernel
            .to_str()
            .ok_or_else(|| Error::Other("kernel path is not UTF-8".into()))?;
        let mut args = vec![
            "-kernel".to_string(),
            kernel.to_string(),
            "-append".to_string(),
            self.qemu_append(),
        ];
        if let Some(initrd) = self.qemu_initrd()? {
            args.extend(["-initrd".to_string(), initrd]);
        }
        Ok(args)
    }

    /// A `grub.cfg` that boots this description from an ISO made by [`Self::make_iso`].
    pub fn grub_cfg(&self) -> Result<String> {
        let kernel = format!("/boot/{KERNEL_NAME}");
        let mut multiboot = vec!["multiboot".to_string(), kernel.clone(), kernel];
        multiboot.extend(self.kernel_args.iter().map(|a| grub_quote(a)));
        let mut cfg = String::from("set timeout=0\nset default=0\n\nmenuentry \"moat\" {\n");
        cfg += &format!("    {}\n", multiboot.join(" "));
        for m in &self.modules {
            check_module(m)?;
            let path = format!("/boot/{}", m.name);
            let mut line = vec!["module".to_string(), path.clone(), path];
            line.extend(m.args.iter().map(|a| grub_quote(a)));
            cfg += &format!("    {}\n", line.join(" "));
        }
        cfg += "    boot\n}\n";
        Ok(cfg)
    }

    /// Lays out `staging/boot/...` and runs `grub-mkrescue` to make `iso`.
    pub fn make_iso(&self, staging: &Path, iso: &Path) -> Result<()> {
        if staging.exists() {
            fs::remove_dir_all(staging)
                .context(|| format!("cannot clear {}", staging.display()))?;
        }
        let boot = staging.join("boot");
        let grub = boot.join("grub");
        fs::create_dir_all(&grub).context(|| format!("cannot create {}", grub.display()))?;
        copy(&self.kernel, &boot.join(KERNEL_NAME))?;
        for m in &self.modules {
            copy(&m.file, &boot.join(&m.name))?;
        }
        let cfg = grub.join("grub.cfg");
        fs::write(&cfg, self.grub_cfg()?).context(|| format!("cannot write {}", cfg.display()))?;
        grub_mkrescue(staging, iso)
    }
}

/// Makes the bootable ISO `iso` from `staging`, which holds `boot/grub/grub.cfg`.
pub fn grub_mkrescue(staging: &Path, iso: &Path) -> Result<()> {
    let mut cmd = Command::new("grub-mkrescue");
    cmd.arg("-o").arg(iso).arg(staging);
    let out = util::output(&mut cmd)?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(Error::Other(format!(
            "`{}` failed ({}):\n{}",
            describe(&cmd),
            out.status,
            util::tail(&stderr, 20).join("\n")
        )));
    }
    Ok(())
}

fn bad_module(m: &Module, why: &str) -> Error {
    Error::Other(format!("module '{}': {why}", m.name))
}

/// Module names become file names, and both loaders split on whitespace.
fn check_module(m: &Module) -> Result<()> {
    let bad_name = m.name.is_empty()
        || m.name.contains('/')
        || m.name.chars().any(|c| c.is_whitespace() || c.is_control());
    if bad_name {
        return Err(bad_module(m, "not usable as a file name"));
    }
    if m.file.file_name().and_then(|n| n.to_str()) != Some(m.name.as_str()) {
        return Err(bad_module(
            m,
            &format!("file {} must be named after the module", m.file.display()),
        ));
    }
    if m.file.to_string_lossy().chars().any(char::is_whitespace) {
        return Err(bad_module(m, "path contains whitespace"));
    }
    if m.args
        .iter()
        .any(|a| a.is_empty() || a.chars().any(char::is_whitespace))
    {
        return Err(bad_module(m, "arguments must be non-empty words"));
    }
    Ok(())
}

/// Quotes one word for GRUB's shell-like config language.
pub fn grub_quote(word: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_-./=:,+@%".contains(c);
    if !word.is_empty() && word.chars().all(safe) {
        word.to_string()
    } else if !word.contains('\'') {
        format!("'{word}'")
    } else {
        let mut quoted = String::from("\"");
        for c in word.chars() {
            if matches!(c, '"' | '\\' | '$') {
                quoted.push('\\');
            }
            quoted.push(c);
        }
        quoted.push('"');
        quoted
    }
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to)
        .map(drop)
        .context(|| format!("cannot copy {} to {}", from.display(), to.display()))
}

/// The default image in `target/image/`.
pub struct Image {
    pub dir: PathBuf,
    pub boot: BootSpec,
    pub iso: PathBuf,
}

/// Copies the build into `target/image/` and makes the default image
/// (`examples/default.toml`) there: `qemu.args` and `moat.iso`.
pub fn assemble(artifacts: &Artifacts) -> Result<Image> {
    let plan = config::load_pinned_aware(
        Path::new(config::DEFAULT_CONFIG),
        &config::GuestOverride::default(),
    )?;
    assemble_plan(artifacts, &plan)
}

/// Copies the build into `target/image/` and makes the image of `plan`
/// there: `qemu.args` and `moat.iso`.
pub fn assemble_plan(artifacts: &Artifacts, plan: &Plan) -> Result<Image> {
    let dir = PathBuf::from(IMAGE_DIR);
    fs::create_dir_all(&dir).context(|| format!("cannot create {}", dir.display()))?;
    let kernel = dir.join(KERNEL_NAME);
    copy(&artifacts.kernel, &kernel)?;
    for (name, path) in &artifacts.tasks {
        copy(path, &dir.join(name))?;
    }
    let boot = plan_boot(plan, artifacts, &dir)?;
    let args_file = dir.join("qemu.args");
    fs::write(&args_file, qemu_args_text(&boot)?)
        .context(|| format!("cannot write {}", args_file.display()))?;
    let iso = dir.join("moat.iso");
    boot.make_iso(&dir.join("iso"), &iso)?;
    Ok(Image { dir, boot, iso })
}

/// The boot description of `plan`: its tasks from `target/image/` (where
/// [`assemble_plan`] copied them), its other modules written or copied
/// into `dir`.
pub fn plan_boot(plan: &Plan, artifacts: &Artifacts, dir: &Path) -> Result<BootSpec> {
    fs::create_dir_all(dir).context(|| format!("cannot create {}", dir.display()))?;
    let mut modules = Vec::new();
    for m in &plan.modules {
        let file = dir.join(&m.name);
        match &m.source {
            ModuleSource::Task(task) => {
                if artifacts.task(task).is_none() {
                    return Err(Error::Other(format!(
                        "no user task named '{task}' was built"
                    )));
                }
                let built = Path::new(IMAGE_DIR).join(task);
                if built != file {
                    copy(&built, &file)?;
                }
            }
            ModuleSource::File(from) => copy(from, &file)?,
            ModuleSource::Text(text) => {
                fs::write(&file, text).context(|| format!("cannot write {}", file.display()))?
            }
            ModuleSource::TestDisk => drop(crate::linux::write_test_disk(&file)?),
        }
        modules.push(Module {
            name: m.name.clone(),
            file,
            args: Vec::new(),
        });
    }
    let mut kernel_args = vec![DEBUG_EXIT_ARG.to_string()];
    kernel_args.extend(plan.kernel_args());
    Ok(BootSpec {
        kernel: Path::new(IMAGE_DIR).join(KERNEL_NAME),
        kernel_args,
        modules,
        memory_mib: plan.memory_mib,
        cpus: plan.cpus,
        qemu_devices: boot_spec_devices(plan),
    })
}

/// QEMU's arguments for a plan's devices: the persistent disk's, then
/// the network's.
pub fn boot_spec_devices(plan: &Plan) -> Vec<String> {
    let disk = plan.disk.iter().map(|d| d.qemu_args());
    disk.chain(plan.net.iter().map(|n| n.qemu_args()))
        .flatten()
        .collect()
}

fn qemu_args_text(boot: &BootSpec) -> Result<String> {
    let args: Vec<String> = boot
        .qemu_boot_args()?
        .iter()
        .map(|a| shell_quote(a))
        .collect();
    Ok(format!(
        "# Boot arguments for qemu-system-x86_64 (written by `cargo xtask build`).\n\
         # From the workspace root:\n\
         #   eval qemu-system-x86_64 -machine pc -m {memory}M -no-reboot -accel tcg -cpu max \\\n\
         #     -serial stdio -display none -device isa-debug-exit,iobase=0xf4,iosize=0x04 \\\n\
         #     \"$(grep -v '^#' {IMAGE_DIR}/qemu.args)\"\n\
         {}\n",
        args.join(" "),
        memory = boot.memory_mib,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(name: &str, file: &str, args: &[&str]) -> Module {
        Module {
            name: name.into(),
            file: file.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
        }
    }

    fn spec(modules: Vec<Module>) -> BootSpec {
        BootSpec {
            kernel: "target/image/moat-kernel".into(),
            kernel_args: vec!["debug-exit".into()],
            modules,
            memory_mib: DEFAULT_MEMORY_MIB,
            cpus: 1,
            qemu_devices: Vec::new(),
        }
    }

    #[test]
    fn initrd_lists_modules_with_arguments() {
        let boot = spec(vec![
            module("roottask", "target/image/roottask", &["fault"]),
            module("notelf", "target/systest/notelf/notelf", &[]),
        ]);
        assert_eq!(
            boot.qemu_initrd().unwrap().unwrap(),
            "target/image/roottask fault,target/systest/notelf/notelf"
        );
        assert_eq!(boot.qemu_append(), "debug-exit");
    }

    #[test]
    fn initrd_escapes_commas_and_is_absent_without_modules() {
        let boot = spec(vec![module("vmm", "img/vmm", &["mem=1,2"])]);
        assert_eq!(boot.qemu_initrd().unwrap().unwrap(), "img/vmm mem=1,,2");
        assert_eq!(spec(vec![]).qemu_initrd().unwrap(), None);
        assert_eq!(
            spec(vec![]).qemu_boot_args().unwrap(),
            [
                "-kernel",
                "target/image/moat-kernel",
                "-append",
                "debug-exit"
            ]
        );
    }

    #[test]
    fn module_files_must_carry_the_module_name() {
        assert!(spec(vec![module("roottask", "x/other", &[])])
            .qemu_initrd()
            .is_err());
        assert!(spec(vec![module("a b", "x/a b", &[])]).grub_cfg().is_err());
        assert!(spec(vec![module("r", "x/r", &["a b"])])
            .qemu_initrd()
            .is_err());
    }

    #[test]
    fn grub_cfg_repeats_paths_as_first_word() {
        let boot = spec(vec![
            module("roottask", "target/image/roottask", &["fault"]),
            module("notelf", "n/notelf", &[]),
        ]);
        assert_eq!(
            boot.grub_cfg().unwrap(),
            "set timeout=0\nset default=0\n\nmenuentry \"moat\" {\n\
             \x20   multiboot /boot/moat-kernel /boot/moat-kernel debug-exit\n\
             \x20   module /boot/roottask /boot/roottask fault\n\
             \x20   module /boot/notelf /boot/notelf\n\
             \x20   boot\n}\n"
        );
    }

    #[test]
    fn grub_quoting() {
        assert_eq!(grub_quote("log=debug"), "log=debug");
        assert_eq!(grub_quote("a;b"), "'a;b'");
        assert_eq!(grub_quote("#x"), "'#x'");
        assert_eq!(grub_quote("it's$"), r#""it's\$""#);
    }

    #[test]
    fn qemu_args_file_is_one_quoted_line() {
        let boot = spec(vec![module("roottask", "target/image/roottask", &[])]);
        let text = qemu_args_text(&boot).unwrap();
        assert!(text.ends_with(
            "\n-kernel target/image/moat-kernel -append debug-exit -initrd target/image/roottask\n"
        ));
    }
}
