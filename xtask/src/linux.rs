//! The Linux test guest (`guests/linux/`): a stock Debian kernel and an
//! initramfs made here — busybox, the virtio modules, the test `/init` and
//! the guest tools (`guests/tools/`) — and the baseline boot of both
//! straight in QEMU or Bochs, without Moat.
//!
//! The packages are fetched with `apt-get download` and unpacked with
//! `dpkg-deb -x`, never installed. Everything lives under [`LINUX_DIR`]; the
//! initramfs is rebuilt only when an input changes (see [`cache_key`]).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::thread;
use std::time::{Duration, Instant};

use crate::build;
use crate::emu::{self, BochsFiles, Emulator, Exit};
use crate::image;
use crate::util::{self, describe};
use crate::{Context, Error, Result};

pub const RECIPE: &str = "guests/linux/recipe.toml";
pub const INIT: &str = "guests/linux/init";
pub const LINUX_DIR: &str = "target/linux";

/// Lines `/init` prints (see its header).
pub const INIT_START: &str = "MOAT-INIT start";
pub const INIT_DONE: &str = "MOAT-INIT done";
pub const CHECK: &str = "MOAT-CHECK ";

/// Bump when the initramfs layout changes without an input changing (3: the
/// `cpio` crate writes the archive, with lower-case hex headers).
const LAYOUT: u32 = 3;
/// Where `/init` finds the modules to load, one name a line, in order.
const MODULE_LIST: &str = "etc/moat-modules";

/// The guest tools: static x86-64 Linux programs, each in the initramfs as
/// `/bin/<name>`.
const TOOLS_PACKAGE: &str = "moat-guest-tools";
pub const TOOLS: &[&str] = &[
    "at",
    "ipcbench",
    "stress",
    "pingpong",
    "portbench",
    "probe",
    "hostile",
    "iobench",
];
const TOOLS_TARGET: &str = "x86_64-unknown-linux-musl";
const TOOLS_TARGET_DIR: &str = "target/guest-tools";

/// Kernel arguments of every direct boot: the console on COM1, and a panic
/// ends the run instead of hanging (with QEMU's `-no-reboot`).
pub(crate) const DIRECT_ARGS: &[&str] = &["console=ttyS0", "panic=-1"];
const QEMU_DIRECT_TIMEOUT: Duration = Duration::from_secs(180);
const BOCHS_DIRECT_TIMEOUT: Duration = Duration::from_secs(900);

// ---------------------------------------------------------------- recipe

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Package {
    pub name: String,
    pub version: String,
}

impl Package {
    /// `name=version`, as `apt-get download` takes it.
    fn spec(&self) -> String {
        format!("{}={}", self.name, self.version)
    }
}

/// `guests/linux/recipe.toml`.
#[derive(Debug, PartialEq, Eq)]
pub struct Recipe {
    pub kernel: Package,
    pub busybox: Package,
    /// The modules `/init` loads; their dependencies are added.
    pub modules: Vec<String>,
    /// Other kernels a user is likely to bring, each booted with the same
    /// `/init` and tools (`pinned:NAME/bzImage`, [`build_other`]).
    pub other_kernels: Vec<OtherKernel>,
}

/// One of the recipe's `[[other_kernel]]` tables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtherKernel {
    /// Its name in `pinned:NAME/bzImage` and under [`OTHER_KERNELS_DIR`].
    pub name: String,
    pub package: Package,
}

/// Where the other kernels' guests are built, each in a folder of its name.
pub const OTHER_KERNELS_DIR: &str = "target/linux/kernels";

/// The recipe file as written: every key required, no other key.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RecipeFile {
    kernel_package: String,
    kernel_version: String,
    busybox_package: String,
    busybox_version: String,
    /// Module names separated by spaces.
    modules: String,
    #[serde(default)]
    other_kernel: Vec<OtherKernelFile>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct OtherKernelFile {
    name: String,
    package: String,
    version: String,
}

impl Recipe {
    pub fn parse(text: &str) -> Result<Recipe, String> {
        let file: RecipeFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut other_kernels: Vec<OtherKernel> = Vec::new();
        for k in file.other_kernel {
            let good_name = !k.name.is_empty()
                && k.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
                && !k.name.starts_with('.');
            if !good_name {
                return Err(format!(
                    "other_kernel: name \"{}\": use letters, digits, '.', '-' and '_' \
                     (it names a folder)",
                    k.name
                ));
            }
            if other_kernels.iter().any(|o| o.name == k.name) {
                return Err(format!("other_kernel: name \"{}\" twice", k.name));
            }
            other_kernels.push(OtherKernel {
                name: k.name,
                package: Package {
                    name: k.package,
                    version: k.version,
                },
            });
        }
        Ok(Recipe {
            kernel: Package {
                name: file.kernel_package,
                version: file.kernel_version,
            },
            busybox: Package {
                name: file.busybox_package,
                version: file.busybox_version,
            },
            modules: file.modules.split_whitespace().map(String::from).collect(),
            other_kernels,
        })
    }

    /// The other kernel called `name`.
    pub fn other_kernel(&self, name: &str) -> Option<&OtherKernel> {
        self.other_kernels.iter().find(|k| k.name == name)
    }
}

pub(crate) fn load_recipe() -> Result<Recipe> {
    let path = util::workspace_root().join(RECIPE);
    let text = fs::read_to_string(&path).context(|| format!("cannot read {RECIPE}"))?;
    Recipe::parse(&text).map_err(|e| Error::Other(format!("{RECIPE}: {e}")))
}

/// Everything a guest's initramfs and kernel are made from, as text:
/// equal keys mean equal outputs. `kernel` is the recipe's or one of its
/// other kernels.
pub fn cache_key(kernel: &Package, recipe: &Recipe, init: &[u8], tools: &[Tool]) -> String {
    let mut key = format!(
        "layout {LAYOUT}\nkernel {}\nbusybox {}\nmodules {}\ninit fnv1a64:{:016x}\n",
        kernel.spec(),
        recipe.busybox.spec(),
        recipe.modules.join(" "),
        fnv1a64(init)
    );
    for tool in tools {
        let _ = writeln!(
            key,
            "tool {} fnv1a64:{:016x}",
            tool.name,
            fnv1a64(&tool.bytes)
        );
    }
    key
}

pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

// ---------------------------------------------------------------- packages

/// The `.deb` of `pkg` in `debs`, downloaded unless a file there already
/// carries that package and version.
fn fetch(pkg: &Package, debs: &Path) -> Result<PathBuf> {
    if let Some(deb) = find_deb(pkg, debs)? {
        return Ok(deb);
    }
    let download = || {
        let mut cmd = Command::new("apt-get");
        cmd.arg("download").arg(pkg.spec()).current_dir(debs);
        println!("linux: {}", describe(&cmd));
        util::run(&mut cmd)
    };
    if download().is_err() {
        println!("linux: download failed; refreshing the package lists");
        util::run(Command::new("apt-get").arg("update"))?;
        download()?;
    }
    find_deb(pkg, debs)?.ok_or_else(|| {
        Error::Other(format!(
            "apt-get download {} left no matching .deb in {}",
            pkg.spec(),
            debs.display()
        ))
    })
}

fn find_deb(pkg: &Package, debs: &Path) -> Result<Option<PathBuf>> {
    let prefix = format!("{}_", pkg.name);
    for entry in fs::read_dir(debs).context(|| format!("cannot list {}", debs.display()))? {
        let path = entry
            .context(|| format!("cannot list {}", debs.display()))?
            .path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !name.starts_with(&prefix) || !name.ends_with(".deb") {
            continue;
        }
        let out = util::output(
            Command::new("dpkg-deb")
                .arg("-f")
                .arg(&path)
                .args(["Package", "Version"]),
        )?;
        let fields = String::from_utf8_lossy(&out.stdout);
        let want = format!("Package: {}\nVersion: {}", pkg.name, pkg.version);
        if out.status.success() && fields.trim() == want {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// The package's files, unpacked once into `LINUX_DIR/pkg/<name>_<version>`.
fn unpacked(pkg: &Package, root: &Path) -> Result<PathBuf> {
    let dir = root
        .join("pkg")
        .join(format!("{}_{}", pkg.name, pkg.version));
    if dir.is_dir() {
        return Ok(dir);
    }
    let debs = root.join("debs");
    fs::create_dir_all(&debs).context(|| format!("cannot create {}", debs.display()))?;
    let deb = fetch(pkg, &debs)?;
    // Unpack beside, then rename: an interrupted unpack is never taken as done.
    let part = dir.with_extension("part");
    if part.exists() {
        fs::remove_dir_all(&part).context(|| format!("cannot clear {}", part.display()))?;
    }
    fs::create_dir_all(&part).context(|| format!("cannot create {}", part.display()))?;
    util::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&part))?;
    fs::rename(&part, &dir).context(|| format!("cannot rename {}", part.display()))?;
    Ok(dir)
}

/// The one entry of `dir` whose name starts with `prefix`.
fn only_entry(dir: &Path, prefix: &str) -> Result<PathBuf> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).context(|| format!("cannot list {}", dir.display()))? {
        let path = entry
            .context(|| format!("cannot list {}", dir.display()))?
            .path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(prefix))
        {
            found.push(path);
        }
    }
    match <[PathBuf; 1]>::try_from(found) {
        Ok([path]) => Ok(path),
        Err(found) => Err(Error::Other(format!(
            "expected one {prefix}* in {}, found {}",
            dir.display(),
            found.len()
        ))),
    }
}

// ---------------------------------------------------------------- modules

/// The modules of one unpacked kernel: `lib/modules/<release>/`.
struct ModuleTree {
    /// Loadable modules by name (`virtio-rng.ko` is `virtio_rng`).
    files: BTreeMap<String, PathBuf>,
    builtin: BTreeSet<String>,
}

/// A module's name from its file name, as the kernel spells it.
fn module_name(file_name: &str) -> Option<String> {
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file_name.strip_suffix(ext))?;
    Some(stem.replace('-', "_"))
}

impl ModuleTree {
    fn open(release_dir: &Path) -> Result<ModuleTree> {
        let mut files = BTreeMap::new();
        let mut dirs = vec![release_dir.join("kernel")];
        while let Some(dir) = dirs.pop() {
            for entry in fs::read_dir(&dir).context(|| format!("cannot list {}", dir.display()))? {
                let entry = entry.context(|| format!("cannot list {}", dir.display()))?;
                let path = entry.path();
                if entry
                    .file_type()
                    .context(|| format!("cannot stat {}", path.display()))?
                    .is_dir()
                {
                    dirs.push(path);
                } else if let Some(name) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(module_name)
                {
                    files.insert(name, path);
                }
            }
        }
        let builtin_list = release_dir.join("modules.builtin");
        let builtin = fs::read_to_string(&builtin_list)
            .context(|| format!("cannot read {}", builtin_list.display()))?
            .lines()
            .filter_map(|l| module_name(l.rsplit('/').next()?))
            .collect();
        Ok(ModuleTree { files, builtin })
    }

    /// The module's bytes, as `insmod` takes them: uncompressed (Debian's
    /// 6.1 kernels ship plain `.ko` files, its 6.12 kernels `.ko.xz`).
    fn read(&self, name: &str) -> Result<Vec<u8>> {
        let path = self.files.get(name).ok_or_else(|| unknown_module(name))?;
        let bytes = fs::read(path).context(|| format!("cannot read {}", path.display()))?;
        match path.extension().and_then(|e| e.to_str()) {
            Some("ko") => Ok(bytes),
            Some("xz") => {
                unxz(&bytes).map_err(|e| Error::Other(format!("{}: {e}", path.display())))
            }
            _ => Err(Error::Other(format!(
                "{}: only plain and xz-compressed modules are supported",
                path.display()
            ))),
        }
    }

    /// `None` for a built-in module, else what its `.modinfo` says it needs.
    fn depends(&self, name: &str) -> Result<Option<Vec<String>>> {
        if self.builtin.contains(name) {
            return Ok(None);
        }
        let ko = self.read(name)?;
        modinfo_depends(&ko)
            .map(Some)
            .map_err(|e| Error::Other(format!("module {name}: {e}")))
    }
}

/// An xz file's contents.
pub fn unxz(xz: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    lzma_rs::xz_decompress(&mut &xz[..], &mut out)
        .map_err(|e| format!("not a valid xz file: {e}"))?;
    Ok(out)
}

fn unknown_module(name: &str) -> Error {
    Error::Other(format!("no module `{name}` in the kernel package"))
}

/// Orders `wanted` and everything they need so that each module comes after
/// its dependencies, each once. `depends` answers `None` for a module built
/// into the kernel (left out, as are its dependencies, which are too).
pub fn load_order(
    wanted: &[String],
    mut depends: impl FnMut(&str) -> Result<Option<Vec<String>>>,
) -> Result<Vec<String>> {
    #[derive(PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit(
        name: &str,
        depends: &mut dyn FnMut(&str) -> Result<Option<Vec<String>>>,
        marks: &mut BTreeMap<String, Mark>,
        order: &mut Vec<String>,
        path: &mut Vec<String>,
    ) -> Result<()> {
        match marks.get(name) {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::Visiting) => {
                return Err(Error::Other(format!(
                    "module dependency cycle: {} -> {name}",
                    path.join(" -> ")
                )))
            }
            None => {}
        }
        marks.insert(name.to_string(), Mark::Visiting);
        path.push(name.to_string());
        let deps = depends(name)?;
        for dep in deps.iter().flatten() {
            visit(dep, depends, marks, order, path)?;
        }
        path.pop();
        marks.insert(name.to_string(), Mark::Done);
        if deps.is_some() {
            order.push(name.to_string());
        }
        Ok(())
    }
    let mut marks = BTreeMap::new();
    let mut order = Vec::new();
    for name in wanted {
        visit(name, &mut depends, &mut marks, &mut order, &mut Vec::new())?;
    }
    Ok(order)
}

/// The `depends=` field of a module's `.modinfo` section: what modpost found
/// it needs, the same facts `depmod` writes to `modules.dep`.
pub fn modinfo_depends(ko: &[u8]) -> Result<Vec<String>, String> {
    let modinfo = elf_section(ko, b".modinfo")?;
    let depends = modinfo
        .split(|&b| b == 0)
        .find_map(|field| field.strip_prefix(b"depends="))
        .unwrap_or_default();
    let depends = std::str::from_utf8(depends).map_err(|_| "depends= is not UTF-8")?;
    Ok(depends
        .split(',')
        .filter(|d| !d.is_empty())
        .map(String::from)
        .collect())
}

/// The contents of the section called `name` in a 64-bit little-endian ELF.
fn elf_section<'a>(elf: &'a [u8], name: &[u8]) -> Result<&'a [u8], String> {
    const MAGIC: &[u8] = b"\x7fELF";
    const CLASS_64: u8 = 2;
    const LITTLE_ENDIAN: u8 = 1;
    const SHDR_SIZE: usize = 64;
    let field = |at: usize, len: usize| -> Result<u64, String> {
        let bytes = at
            .checked_add(len)
            .and_then(|end| elf.get(at..end))
            .ok_or("truncated ELF")?;
        Ok(bytes.iter().rev().fold(0, |v, &b| (v << 8) | u64::from(b)))
    };
    let usize_field = |at, len| -> Result<usize, String> {
        usize::try_from(field(at, len)?).map_err(|_| "ELF offset too large".to_string())
    };
    if elf.get(..4) != Some(MAGIC)
        || elf.get(4) != Some(&CLASS_64)
        || elf.get(5) != Some(&LITTLE_ENDIAN)
    {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let shoff = usize_field(0x28, 8)?;
    let shentsize = usize_field(0x3a, 2)?;
    let shnum = usize_field(0x3c, 2)?;
    let shstrndx = usize_field(0x3e, 2)?;
    if shentsize < SHDR_SIZE {
        return Err("bad section header size".into());
    }
    let table_fits = shnum
        .checked_mul(shentsize)
        .and_then(|len| len.checked_add(shoff))
        .is_some_and(|end| end <= elf.len());
    if !table_fits {
        return Err("section header table out of range".into());
    }
    let header = |i: usize| {
        i.checked_mul(shentsize)
            .and_then(|o| o.checked_add(shoff))
            .ok_or_else(|| "section header out of range".to_string())
    };
    let contents = |i: usize| -> Result<&'a [u8], String> {
        let h = header(i)?;
        let offset = usize_field(h + 24, 8)?;
        let size = usize_field(h + 32, 8)?;
        offset
            .checked_add(size)
            .and_then(|end| elf.get(offset..end))
            .ok_or_else(|| format!("section {i} out of range"))
    };
    let names = contents(shstrndx)?;
    for i in 0..shnum {
        let at = usize_field(header(i)?, 4)?;
        let section_name = names
            .get(at..)
            .and_then(|s| s.split(|&b| b == 0).next())
            .ok_or("section name out of range")?;
        if section_name == name {
            return contents(i);
        }
    }
    Err(format!("no {} section", String::from_utf8_lossy(name)))
}

// ---------------------------------------------------------------- tools

/// A guest tool, built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tool {
    pub name: &'static str,
    pub bytes: Vec<u8>,
}

/// `cargo build` of the guest tools for static Linux (the musl target links
/// statically by default), without the caller's RUSTFLAGS and without debug
/// info or symbols, which would only grow the initramfs.
fn tools_cargo() -> Command {
    let mut cmd = build::host_cargo();
    cmd.env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
        .args([
            "build",
            "--release",
            "-p",
            TOOLS_PACKAGE,
            "--target",
            TOOLS_TARGET,
        ])
        .args(["--target-dir", TOOLS_TARGET_DIR]);
    cmd
}

pub fn tool_path(name: &str) -> PathBuf {
    Path::new(TOOLS_TARGET_DIR)
        .join(TOOLS_TARGET)
        .join("release")
        .join(name)
}

/// Builds the guest tools (cargo does nothing when they are current) and
/// reads each, checked to start without a dynamic loader.
fn build_tools() -> Result<Vec<Tool>> {
    build::run_build("guest tools", &mut tools_cargo())?;
    TOOLS
        .iter()
        .map(|&name| {
            let path = tool_path(name);
            let bytes = fs::read(&path).context(|| format!("cannot read {}", path.display()))?;
            static_elf(&bytes).map_err(|e| Error::Other(format!("{}: {e}", path.display())))?;
            Ok(Tool { name, bytes })
        })
        .collect()
}

/// Checks that `elf` is a 64-bit x86-64 executable the kernel starts without
/// a dynamic loader: no `PT_INTERP`. (A static-pie has `PT_DYNAMIC`, for the
/// relocations it applies itself.)
pub fn static_elf(elf: &[u8]) -> Result<(), String> {
    const ET_EXEC: u64 = 2;
    const ET_DYN: u64 = 3;
    const EM_X86_64: u64 = 62;
    const PT_INTERP: u64 = 3;
    const PHDR_SIZE: u64 = 56;
    let field = |at: u64, len: u64| -> Result<u64, String> {
        let bytes = usize::try_from(at)
            .ok()
            .zip(usize::try_from(at.saturating_add(len)).ok())
            .and_then(|(start, end)| elf.get(start..end))
            .ok_or("truncated ELF")?;
        Ok(bytes.iter().rev().fold(0, |v, &b| (v << 8) | u64::from(b)))
    };
    if elf.get(..6) != Some(b"\x7fELF\x02\x01") {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    if !matches!(field(0x10, 2)?, ET_EXEC | ET_DYN) {
        return Err("not an executable".into());
    }
    if field(0x12, 2)? != EM_X86_64 {
        return Err("not an x86-64 program".into());
    }
    let phoff = field(0x20, 8)?;
    let phentsize = field(0x36, 2)?;
    let phnum = field(0x38, 2)?;
    if phentsize < PHDR_SIZE {
        return Err("bad program header size".into());
    }
    // phnum and phentsize are 16-bit: their product cannot overflow.
    let table_fits = phoff
        .checked_add(phnum * phentsize)
        .is_some_and(|end| end <= elf.len() as u64);
    if !table_fits {
        return Err("program header table out of range".into());
    }
    for i in 0..phnum {
        if field(phoff + i * phentsize, 4)? == PT_INTERP {
            return Err("dynamically linked (it has an interpreter)".into());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- cpio

/// A newc ("070701") cpio archive, the format the kernel unpacks as an
/// initramfs: per entry a 110-byte ASCII header, the NUL-terminated name and
/// the data, each of the two padded to a multiple of 4 bytes, and a final
/// entry named `TRAILER!!!`. Entries are written in order, so parents first;
/// the `cpio` crate writes the headers, this type checks paths and numbers
/// the inodes.
pub struct Cpio {
    out: Vec<u8>,
    next_ino: u32,
}

#[cfg(test)]
const CPIO_MAGIC: &[u8; 6] = b"070701";
#[cfg(test)]
const CPIO_HEADER_LEN: usize = 110;
pub const CPIO_TRAILER: &str = "TRAILER!!!";

pub const S_IFDIR: u32 = 0o040_000;
pub const S_IFREG: u32 = 0o100_000;
pub const S_IFLNK: u32 = 0o120_000;
pub const S_IFCHR: u32 = 0o020_000;

impl Default for Cpio {
    fn default() -> Self {
        Self::new()
    }
}

impl Cpio {
    pub fn new() -> Self {
        Cpio {
            out: Vec::new(),
            next_ino: 1,
        }
    }

    pub fn dir(&mut self, path: &str) -> Result<()> {
        self.entry(path, S_IFDIR | 0o755, 2, (0, 0), &[])
    }

    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> Result<()> {
        self.entry(path, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> Result<()> {
        self.entry(path, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    /// The archive with its trailer.
    pub fn finish(self) -> Vec<u8> {
        cpio::newc::trailer(self.out).expect("writing to a Vec cannot fail")
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<()> {
        let bad_path = path.is_empty()
            || path.starts_with('/')
            || path.contains('\0')
            || path == CPIO_TRAILER
            || path
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..");
        if bad_path {
            return Err(Error::Other(format!("cpio: bad path `{path}`")));
        }
        let Ok(size) = u32::try_from(data.len()) else {
            return Err(Error::Other(format!("cpio: `{path}` is 4 GiB or more")));
        };
        let ino = self.next_ino;
        self.next_ino += 1;
        // uid, gid and mtime stay 0: equal inputs give equal archives.
        let mut writer = cpio::newc::Builder::new(path)
            .ino(ino)
            .mode(mode)
            .nlink(nlink)
            .rdev_major(rdev.0)
            .rdev_minor(rdev.1)
            .write(std::mem::take(&mut self.out), size);
        let written = std::io::Write::write_all(&mut writer, data).and_then(|()| writer.finish());
        self.out = written.map_err(|e| Error::Other(format!("cpio: `{path}`: {e}")))?;
        Ok(())
    }
}

// ---------------------------------------------------------------- build

/// The built guest: a bzImage and its initramfs.
#[derive(Clone, Debug)]
pub struct Guest {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

/// Fetches, unpacks and builds whatever is not cached; returns the guest.
pub fn build() -> Result<Guest> {
    let recipe = load_recipe()?;
    build_guest(&recipe, &recipe.kernel, Path::new(LINUX_DIR))
}

/// The test guest with the recipe's other kernel `name` instead of the
/// pinned one: the same `/init`, busybox and tools, that kernel's modules
/// (those it has built in left out), under `OTHER_KERNELS_DIR/name`.
pub fn build_other(name: &str) -> Result<Guest> {
    let recipe = load_recipe()?;
    let other = recipe.other_kernel(name).ok_or_else(|| {
        Error::Other(format!(
            "{RECIPE} has no other_kernel named \"{name}\" (it has: {})",
            other_kernel_names(&recipe)
        ))
    })?;
    build_guest(
        &recipe,
        &other.package,
        &Path::new(OTHER_KERNELS_DIR).join(name),
    )
}

pub(crate) fn other_kernel_names(recipe: &Recipe) -> String {
    let names: Vec<_> = recipe
        .other_kernels
        .iter()
        .map(|k| format!("\"{}\"", k.name))
        .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// The guest of `kernel` (the pinned one or an other) in `out`.
fn build_guest(recipe: &Recipe, kernel: &Package, out: &Path) -> Result<Guest> {
    let init = fs::read(INIT).context(|| format!("cannot read {INIT}"))?;
    let tools = build_tools()?;
    let guest = Guest {
        kernel: out.join("bzImage"),
        initramfs: out.join("initramfs.cpio"),
    };
    let key = cache_key(kernel, recipe, &init, &tools);
    let key_file = out.join("build.key");
    let cached = fs::read_to_string(&key_file).is_ok_and(|k| k == key)
        && guest.kernel.is_file()
        && guest.initramfs.is_file();
    if cached {
        println!("linux: up to date ({})", kernel.spec());
        return Ok(guest);
    }
    fs::create_dir_all(out).context(|| format!("cannot create {}", out.display()))?;
    emu::remove_stale(&key_file)?;

    let (parts, vmlinuz) = unpack_kernel(kernel, &recipe.busybox, &recipe.modules)?;
    println!(
        "linux: kernel {}, modules in load order: {}",
        parts.release,
        parts
            .modules
            .iter()
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let archive = initramfs(&Contents {
        busybox: &parts.busybox,
        init: &init,
        modules: &parts.modules,
        tools: &tools,
    })?;
    write_atomically(&guest.initramfs, &archive)?;
    let kernel = fs::read(&vmlinuz).context(|| format!("cannot read {}", vmlinuz.display()))?;
    write_atomically(&guest.kernel, &kernel)?;
    fs::write(&key_file, key).context(|| format!("cannot write {}", key_file.display()))?;
    println!(
        "linux: built {} and {}",
        guest.kernel.display(),
        guest.initramfs.display()
    );
    Ok(guest)
}

/// What an initrd of the pinned kernel holds (`pinned_modules_and_busybox`).
pub(crate) struct InitrdParts {
    /// The kernel's release (`6.1.0-50-amd64`).
    pub release: String,
    /// Each module's name and bytes, in load order.
    pub modules: Vec<(String, Vec<u8>)>,
    pub busybox: Vec<u8>,
}

/// The pinned kernel's release and the modules `wanted` with everything
/// they need, in load order, each with its bytes; and busybox (the
/// Debian example's initrd, `debian.rs`).
pub(crate) fn pinned_modules_and_busybox(wanted: &[String]) -> Result<InitrdParts> {
    let recipe = load_recipe()?;
    Ok(unpack_kernel(&recipe.kernel, &recipe.busybox, wanted)?.0)
}

/// Unpacks a kernel and the busybox package (cached): the parts of an
/// initrd with the modules `wanted` and what they need, and the kernel's
/// `vmlinuz`.
fn unpack_kernel(
    kernel: &Package,
    busybox: &Package,
    wanted: &[String],
) -> Result<(InitrdParts, PathBuf)> {
    let root = Path::new(LINUX_DIR);
    fs::create_dir_all(root).context(|| format!("cannot create {}", root.display()))?;
    let kernel_pkg = unpacked(kernel, root)?;
    let busybox_pkg = unpacked(busybox, root)?;
    let release_dir = only_entry(&kernel_pkg.join("lib/modules"), "")?;
    let release = release_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let vmlinuz = kernel_pkg.join("boot").join(format!("vmlinuz-{release}"));
    let tree = ModuleTree::open(&release_dir)?;
    let order = load_order(wanted, |m| tree.depends(m))?;
    let modules = order
        .iter()
        .map(|name| Ok((name.clone(), tree.read(name)?)))
        .collect::<Result<Vec<_>>>()?;
    let busybox_bin = busybox_pkg.join("bin/busybox");
    let busybox =
        fs::read(&busybox_bin).context(|| format!("cannot read {}", busybox_bin.display()))?;
    let parts = InitrdParts {
        release,
        modules,
        busybox,
    };
    Ok((parts, vmlinuz))
}

/// What the initramfs holds besides its directories and device nodes.
struct Contents<'a> {
    busybox: &'a [u8],
    init: &'a [u8],
    /// Each module's name and bytes, in load order.
    modules: &'a [(String, Vec<u8>)],
    tools: &'a [Tool],
}

/// The initramfs (its layout: guests/linux/README.md).
fn initramfs(c: &Contents) -> Result<Vec<u8>> {
    let mut cpio = Cpio::new();
    for dir in [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "etc",
        "lib",
        "lib/modules",
        "mnt",
    ] {
        cpio.dir(dir)?;
    }
    // The kernel opens /dev/console for init before devtmpfs is mounted.
    cpio.char_dev("dev/console", 0o600, 5, 1)?;
    cpio.char_dev("dev/null", 0o666, 1, 3)?;
    cpio.file("bin/busybox", 0o755, c.busybox)?;
    cpio.symlink("bin/sh", "busybox")?;
    for tool in c.tools {
        cpio.file(&format!("bin/{}", tool.name), 0o755, &tool.bytes)?;
    }
    cpio.file("init", 0o755, c.init)?;
    let mut list = String::new();
    for (name, ko) in c.modules {
        cpio.file(&format!("lib/modules/{name}.ko"), 0o644, ko)?;
        let _ = writeln!(list, "{name}");
    }
    cpio.file(MODULE_LIST, 0o644, list.as_bytes())?;
    Ok(cpio.finish())
}

pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let part = path.with_extension("part");
    fs::write(&part, bytes).context(|| format!("cannot write {}", part.display()))?;
    fs::rename(&part, path).context(|| format!("cannot rename {}", part.display()))
}

// ---------------------------------------------------------------- test disk

pub const SECTOR: usize = 512;
/// The test disk: 1 MiB, of which the first [`DISK_SUM_SECTORS`] hold a
/// known pattern; `/init` keeps its reboot marker and written data after it.
pub const DISK_SECTORS: usize = 2048;
pub const DISK_SUM_SECTORS: usize = 1024;

/// A test disk image and what `/init` must find on it.
#[derive(Clone, Debug)]
pub struct TestDisk {
    pub path: PathBuf,
    /// crc32 (busybox `crc32`, zlib's) of the first `sum_sectors` sectors.
    pub crc32: u32,
    pub sum_sectors: usize,
}

impl TestDisk {
    /// The kernel arguments that tell `/init` what to expect.
    pub fn kernel_args(&self) -> [String; 2] {
        [
            format!("moat.disk_sum={:08x}", self.crc32),
            format!("moat.disk_sectors={}", self.sum_sectors),
        ]
    }
}

/// The test disk's bytes: each patterned sector starts with its number in
/// ASCII (readable in a hex dump), then bytes from a generator seeded by it.
pub fn test_disk_image() -> Vec<u8> {
    let mut image = vec![0u8; DISK_SECTORS * SECTOR];
    for (n, sector) in image
        .chunks_exact_mut(SECTOR)
        .take(DISK_SUM_SECTORS)
        .enumerate()
    {
        let label = format!("moat test disk sector {n:04}\n");
        let (head, rest) = sector.split_at_mut(label.len());
        head.copy_from_slice(label.as_bytes());
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (n as u64 + 1);
        for b in rest {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x >> 32) as u8;
        }
    }
    image
}

/// Writes a fresh test disk to `path` (the guest writes to it).
pub fn write_test_disk(path: &Path) -> Result<TestDisk> {
    let image = test_disk_image();
    fs::write(path, &image).context(|| format!("cannot write {}", path.display()))?;
    Ok(TestDisk {
        path: path.to_path_buf(),
        ..TestDisk::for_image(&image)
    })
}

impl TestDisk {
    /// What `/init` must know about `image` (no file written; `path` empty).
    pub fn for_image(image: &[u8]) -> TestDisk {
        TestDisk {
            path: PathBuf::new(),
            crc32: crc32(&image[..DISK_SUM_SECTORS * SECTOR]),
            sum_sectors: DISK_SUM_SECTORS,
        }
    }
}

/// CRC-32 as zlib and busybox `crc32` compute it (IEEE, reflected).
pub fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

// ---------------------------------------------------------------- timing

/// Follows an emulator's serial log while it runs and notes when each marker
/// first appears, measured from the clock's creation (create it right before
/// starting the emulator). Call [`SerialClock::poll`] often: from the
/// `decided` hook of [`emu::supervise`], [`emu::run_qemu`] or
/// [`emu::run_bochs`], which ask every 50 ms.
pub struct SerialClock {
    serial: PathBuf,
    start: Instant,
    state: RefCell<ClockState>,
}

struct ClockState {
    text: Vec<u8>,
    seen: Vec<(String, Option<Duration>)>,
}

impl SerialClock {
    pub fn start(serial: &Path, markers: &[&str]) -> Self {
        SerialClock {
            serial: serial.to_path_buf(),
            start: Instant::now(),
            state: RefCell::new(ClockState {
                text: Vec::new(),
                seen: markers.iter().map(|m| (m.to_string(), None)).collect(),
            }),
        }
    }

    /// Reads what was appended since the last call; true once every marker
    /// has been seen.
    pub fn poll(&self) -> bool {
        let now = self.start.elapsed();
        let mut state = self.state.borrow_mut();
        let old_len = state.text.len();
        if let Ok(text) = fs::read(&self.serial) {
            if text.len() > old_len {
                state.text = text;
            }
        }
        let ClockState { text, seen } = &mut *state;
        for (marker, at) in seen.iter_mut().filter(|(_, at)| at.is_none()) {
            // Only the new bytes, and a marker that straddles the old end.
            let from = old_len.saturating_sub(marker.len());
            if contains(&text[from..], marker.as_bytes()) {
                *at = Some(now);
            }
        }
        seen.iter().all(|(_, at)| at.is_some())
    }

    /// When `marker` first appeared, if it did.
    pub fn seen(&self, marker: &str) -> Option<Duration> {
        let state = self.state.borrow();
        state
            .seen
            .iter()
            .find(|(m, _)| m == marker)
            .and_then(|(_, at)| *at)
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// What one boot showed on its serial console.
#[derive(Debug, Default, PartialEq)]
pub struct InitReport {
    /// `uptime=` of the first `MOAT-INIT start` line: the guest's own clock.
    pub uptime_at_init: Option<f64>,
    pub passed: Vec<String>,
    /// Name and detail of each failed check.
    pub failed: Vec<(String, String)>,
    pub done: bool,
}

/// Reads `/init`'s lines out of a serial log (kernel lines in between are
/// ignored; a check that appears on both boots counts as its last result).
pub fn init_report(serial: &str) -> InitReport {
    let mut report = InitReport::default();
    let mut results: BTreeMap<String, Result<(), String>> = BTreeMap::new();
    let mut names = Vec::new();
    for line in serial.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(rest) = line
            .split(INIT_START)
            .nth(1)
            .filter(|_| report.uptime_at_init.is_none())
        {
            report.uptime_at_init = rest
                .trim()
                .strip_prefix("uptime=")
                .and_then(|u| u.parse().ok());
        }
        report.done |= line.contains(INIT_DONE);
        let Some(rest) = line.split(CHECK).nth(1) else {
            continue;
        };
        let mut words = rest.splitn(3, ' ');
        let (Some(name), Some(status)) = (words.next(), words.next()) else {
            continue;
        };
        let detail = words.next().unwrap_or("").to_string();
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
        let result = if status == "ok" { Ok(()) } else { Err(detail) };
        results.insert(name.to_string(), result);
    }
    for name in names {
        match results.remove(&name) {
            Some(Ok(())) => report.passed.push(name),
            Some(Err(detail)) => report.failed.push((name, detail)),
            None => {}
        }
    }
    report
}

// ---------------------------------------------------------------- direct boot

/// `cargo xtask linux direct`: boots the guest in the emulator itself (no
/// Moat) and reports the time from the emulator's start to `/init`. With
/// `virtio` (QEMU only), QEMU's own virtio devices stand in for the VMM's,
/// so every check of `/init` can pass.
pub fn direct(emu: Emulator, virtio: bool, extra_args: &[String]) -> Result<ExitCode> {
    if virtio && emu != Emulator::Qemu {
        return Err(Error::Usage("--virtio needs --emu qemu".into()));
    }
    let guest = build()?;
    let dir = Path::new(LINUX_DIR).join("direct");
    fs::create_dir_all(&dir).context(|| format!("cannot create {}", dir.display()))?;
    let mut args: Vec<String> = DIRECT_ARGS.iter().map(|a| a.to_string()).collect();
    let disk = if virtio {
        let disk = write_test_disk(&dir.join("disk.img"))?;
        args.extend(disk.kernel_args());
        Some(disk)
    } else {
        None
    };
    args.extend(extra_args.iter().cloned());

    let tag = if virtio { "qemu-virtio" } else { emu.name() };
    let serial = dir.join(format!("{tag}-serial.log"));
    let output = dir.join(format!("{tag}.out"));
    emu::remove_stale(&serial)?;
    let clock;
    let outcome = match emu {
        Emulator::Qemu => {
            let mut qemu_args =
                direct_qemu_args(&guest, &args, &serial, crate::image::DEFAULT_MEMORY_MIB);
            if let Some(disk) = &disk {
                qemu_args.extend(virtio_qemu_args(disk, &dir)?);
            } else {
                qemu_args.push("-no-reboot".into());
            }
            let mut cmd = emu::qemu_command(&qemu_args);
            println!("linux: {}", describe(&cmd));
            println!(
                "linux: serial below; QEMU's own output in {}",
                output.display()
            );
            clock = SerialClock::start(&serial, &[INIT_START, INIT_DONE]);
            let child = emu::spawn_logged(&mut cmd, &output)?;
            let poll = || {
                clock.poll();
                false
            };
            emu::supervise(child, Some(QEMU_DIRECT_TIMEOUT), Some(&serial), Some(&poll))?
        }
        Emulator::Bochs => {
            let iso = dir.join("linux.iso");
            make_iso(&guest, &args, &dir.join("iso"), &iso)?;
            let files = BochsFiles {
                iso,
                serial: serial.clone(),
                log: dir.join("bochs.log"),
                bochsrc: dir.join("bochsrc"),
                debugger_rc: dir.join("bochs.rc"),
                memory_mib: crate::image::DEFAULT_MEMORY_MIB,
                cpus: 1,
            };
            emu::prepare_bochs(&files)?;
            println!("linux: {}", describe(&emu::bochs_command(&files)));
            println!(
                "linux: serial below; Bochs' output in {}, its log in {}",
                output.display(),
                files.log.display()
            );
            clock = SerialClock::start(&serial, &[INIT_START, INIT_DONE]);
            let poll = || {
                clock.poll();
                false
            };
            emu::run_bochs(
                &files,
                Some(BOCHS_DIRECT_TIMEOUT),
                true,
                Some(&poll),
                &output,
            )?
        }
    };
    clock.poll();
    let exit = match outcome.exit {
        Exit::Status(status) => emu.describe_exit(status),
        Exit::TimedOut => "timed out".into(),
        Exit::Decided => "stopped".into(),
    };
    let log = fs::read(&serial).unwrap_or_default();
    let report = init_report(&String::from_utf8_lossy(&log));
    let at = |marker| clock.seen(marker).map_or("never".to_string(), util::secs);
    println!(
        "\nlinux direct [{tag}]: {} exited ({exit}) after {}",
        emu.name(),
        util::secs(outcome.elapsed)
    );
    println!("  emulator start to `{INIT_START}`: {}", at(INIT_START));
    if let Some(uptime) = report.uptime_at_init {
        println!("  guest uptime at /init: {uptime:.2}s");
    }
    println!("  emulator start to `{INIT_DONE}`: {}", at(INIT_DONE));
    println!(
        "  checks: {} ok, {} FAIL{}",
        report.passed.len(),
        report.failed.len(),
        if virtio {
            ""
        } else {
            " (no virtio devices: expected)"
        }
    );
    for (name, detail) in &report.failed {
        println!("    FAIL {name}: {detail}");
    }
    println!("  serial log: {}", serial.display());
    Ok(if report.done {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub(crate) fn direct_qemu_args(
    guest: &Guest,
    kernel_args: &[String],
    serial: &Path,
    memory_mib: u32,
) -> Vec<String> {
    let mut args: Vec<String> = [
        "-machine", "pc", "-accel", "tcg", "-cpu", "max", "-smp", "1", "-display", "none",
        "-monitor", "none",
    ]
    .map(String::from)
    .to_vec();
    args.extend([
        "-m".into(),
        format!("{memory_mib}M"),
        "-serial".into(),
        format!("file:{}", serial.display()),
        "-kernel".into(),
        guest.kernel.display().to_string(),
        "-initrd".into(),
        guest.initramfs.display().to_string(),
        "-append".into(),
        kernel_args.join(" "),
    ]);
    args
}

/// QEMU's virtio-pci devices as `/init` expects them from the VMM: a disk,
/// hvc0 and the port `moat0` (both echoed back by this process), a NIC whose
/// user-mode peer 10.0.2.2 answers ping (restricted: nothing leaves QEMU), and
/// an entropy source. Without `-no-reboot`, so `/init` can reboot once.
fn virtio_qemu_args(disk: &TestDisk, dir: &Path) -> Result<Vec<String>> {
    let hvc = dir.join("hvc0.sock");
    let port = dir.join("moat0.sock");
    echo_socket(&hvc)?;
    echo_socket(&port)?;
    Ok([
        format!(
            "-drive file={},format=raw,if=none,id=disk0",
            disk.path.display()
        ),
        "-device virtio-blk-pci,drive=disk0".into(),
        "-device virtio-serial-pci".into(),
        format!("-chardev socket,id=hvc0,path={}", hvc.display()),
        "-device virtconsole,chardev=hvc0".into(),
        format!("-chardev socket,id=moat0,path={}", port.display()),
        "-device virtserialport,chardev=moat0,name=moat0".into(),
        "-netdev user,id=net0,restrict=on".into(),
        "-device virtio-net-pci,netdev=net0".into(),
        "-device virtio-rng-pci".into(),
    ]
    .iter()
    .flat_map(|pair| pair.splitn(2, ' ').map(String::from).collect::<Vec<_>>())
    .collect())
}

/// Listens on a Unix socket and echoes whatever its one client sends, until
/// the client goes away.
fn echo_socket(path: &Path) -> Result<()> {
    emu::remove_stale(path)?;
    let listener =
        UnixListener::bind(path).context(|| format!("cannot listen on {}", path.display()))?;
    thread::spawn(move || {
        if let Ok((stream, _)) = listener.accept() {
            if let Ok(mut reader) = stream.try_clone() {
                let mut writer = stream;
                // Ends when QEMU closes the socket.
                let _ = io::copy(&mut reader, &mut writer);
            }
        }
    });
    Ok(())
}

/// A GRUB ISO that boots the guest with `kernel_args` (Bochs has no -kernel).
pub fn make_iso(guest: &Guest, kernel_args: &[String], staging: &Path, iso: &Path) -> Result<()> {
    if staging.exists() {
        fs::remove_dir_all(staging).context(|| format!("cannot clear {}", staging.display()))?;
    }
    let grub = staging.join("boot/grub");
    fs::create_dir_all(&grub).context(|| format!("cannot create {}", grub.display()))?;
    for (from, name) in [
        (&guest.kernel, "vmlinuz"),
        (&guest.initramfs, "initramfs.cpio"),
    ] {
        let to = staging.join("boot").join(name);
        fs::copy(from, &to)
            .context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    }
    let cfg = grub.join("grub.cfg");
    fs::write(&cfg, grub_cfg(kernel_args)).context(|| format!("cannot write {}", cfg.display()))?;
    image::grub_mkrescue(staging, iso)
}

fn grub_cfg(kernel_args: &[String]) -> String {
    let args: Vec<String> = kernel_args.iter().map(|a| image::grub_quote(a)).collect();
    format!(
        "set timeout=0\nset default=0\n\nmenuentry \"linux\" {{\n    \
         linux /boot/vmlinuz {}\n    initrd /boot/initramfs.cpio\n    boot\n}}\n",
        args.join(" ")
    )
}

/// `cargo xtask linux build`.
pub fn build_command() -> Result<ExitCode> {
    let guest = build()?;
    for path in [&guest.kernel, &guest.initramfs] {
        let len = fs::metadata(path)
            .context(|| format!("cannot stat {}", path.display()))?
            .len();
        println!("  {} ({} KiB)", path.display(), len / 1024);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- cpio

    /// One parsed entry: (ino, mode, nlink, rdev major, rdev minor, name, data).
    type Entry = (u32, u32, u32, u32, u32, String, Vec<u8>);

    /// Parses a newc archive the way the kernel does, checking every
    /// alignment rule; stops after the trailer, which must end the archive.
    fn parse_cpio(mut a: &[u8]) -> Vec<Entry> {
        let total = a.len();
        let mut entries = Vec::new();
        loop {
            let at = total - a.len();
            assert_eq!(at % 4, 0, "entry at {at} not 4-aligned");
            assert_eq!(&a[..6], CPIO_MAGIC);
            let field = |i: usize| {
                let s = std::str::from_utf8(&a[6 + 8 * i..14 + 8 * i]).unwrap();
                assert!(s.chars().all(|c| c.is_ascii_hexdigit()), "{s}");
                u32::from_str_radix(s, 16).unwrap()
            };
            let (ino, mode, uid, gid, nlink, mtime, size) = (
                field(0),
                field(1),
                field(2),
                field(3),
                field(4),
                field(5),
                field(6),
            );
            let (rmaj, rmin, namesize, check) = (field(9), field(10), field(11), field(12));
            assert_eq!((uid, gid, mtime, check), (0, 0, 0, 0));
            let namesize = namesize as usize;
            let name_end = CPIO_HEADER_LEN + namesize;
            assert_eq!(a[name_end - 1], 0, "name not NUL-terminated");
            let name = String::from_utf8(a[CPIO_HEADER_LEN..name_end - 1].to_vec()).unwrap();
            let data_at = name_end.next_multiple_of(4);
            assert!(a[name_end..data_at].iter().all(|&b| b == 0));
            let data_end = data_at + size as usize;
            let data = a[data_at..data_end].to_vec();
            let next = data_end.next_multiple_of(4);
            assert!(a[data_end..next].iter().all(|&b| b == 0));
            a = &a[next..];
            let trailer = name == CPIO_TRAILER;
            entries.push((ino, mode, nlink, rmaj, rmin, name, data));
            if trailer {
                assert!(a.is_empty(), "bytes after the trailer");
                return entries;
            }
        }
    }

    #[test]
    fn cpio_round_trips_every_entry_kind() {
        let mut c = Cpio::new();
        c.dir("bin").unwrap();
        c.file("bin/busybox", 0o755, b"\x7fELF12345").unwrap();
        c.symlink("bin/sh", "busybox").unwrap();
        c.char_dev("dev/console", 0o600, 5, 1).unwrap();
        c.file("init", 0o755, b"").unwrap();
        let archive = c.finish();
        assert_eq!(archive.len() % 4, 0);
        let e = parse_cpio(&archive);
        let names: Vec<&str> = e.iter().map(|x| x.5.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/busybox",
                "bin/sh",
                "dev/console",
                "init",
                CPIO_TRAILER
            ]
        );
        assert_eq!((e[0].1, e[0].2), (S_IFDIR | 0o755, 2));
        assert_eq!(
            (e[1].1, e[1].6.as_slice()),
            (S_IFREG | 0o755, &b"\x7fELF12345"[..])
        );
        assert_eq!(
            (e[2].1, e[2].6.as_slice()),
            (S_IFLNK | 0o777, &b"busybox"[..])
        );
        assert_eq!((e[3].1, e[3].3, e[3].4), (S_IFCHR | 0o600, 5, 1));
        assert!(e[4].6.is_empty());
        // Distinct inodes (the kernel would hard-link equal ones), trailer 0.
        let inos: BTreeSet<u32> = e[..5].iter().map(|x| x.0).collect();
        assert_eq!(inos.len(), 5);
        assert!(!inos.contains(&0));
        assert_eq!((e[5].0, e[5].1, e[5].2), (0, 0, 1));
    }

    #[test]
    fn cpio_pads_names_and_data_of_every_length() {
        // Name lengths 1..=8 and data lengths 0..=8 cover every residue mod 4
        // of both paddings; the parser asserts alignment and zero padding.
        let mut c = Cpio::new();
        let mut want = Vec::new();
        for n in 1..=8 {
            let name = "abcdefgh"[..n].to_string();
            let data = vec![0xa5u8; n + n % 3];
            c.file(&name, 0o644, &data).unwrap();
            want.push((name, data));
        }
        let e = parse_cpio(&c.finish());
        let got: Vec<(String, Vec<u8>)> =
            e[..8].iter().map(|x| (x.5.clone(), x.6.clone())).collect();
        assert_eq!(got, want);
        // The first header: 110 bytes + "a\0" = 112, already aligned.
        assert_eq!(
            Cpio::new().finish().len(),
            (CPIO_HEADER_LEN + CPIO_TRAILER.len() + 1).next_multiple_of(4)
        );
    }

    #[test]
    fn cpio_is_deterministic() {
        let make = || {
            let mut c = Cpio::new();
            c.file("x", 0o644, &[1; 300]).unwrap();
            c.finish()
        };
        let a = make();
        assert_eq!(a, make());
        // mode 0o100644 = 0x81A4, size 300 = 0x12C
        assert_eq!(&a[6..22], b"00000001000081a4");
        assert_eq!(&a[54..62], b"0000012c");
    }

    #[test]
    fn cpio_rejects_bad_paths() {
        let mut c = Cpio::new();
        for bad in [
            "",
            "/init",
            "a//b",
            "a/",
            "./x",
            "a/../b",
            "x\0y",
            CPIO_TRAILER,
        ] {
            assert!(c.file(bad, 0o644, b"").is_err(), "{bad:?}");
        }
        // Nothing was written for the rejected entries.
        assert_eq!(parse_cpio(&c.finish()).len(), 1);
    }

    // ---- modules

    fn deps_from<'a>(
        table: &'a [(&'a str, Option<&'a [&'a str]>)],
    ) -> impl FnMut(&str) -> Result<Option<Vec<String>>> + 'a {
        |name: &str| {
            let (_, deps) = table
                .iter()
                .find(|(n, _)| *n == name)
                .ok_or_else(|| unknown_module(name))?;
            Ok(deps.map(|d| d.iter().map(|s| s.to_string()).collect()))
        }
    }

    fn strings(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    /// The dependency facts of Debian's 6.1.0-50 virtio modules.
    const VIRTIO: &[(&str, Option<&[&str]>)] = &[
        ("virtio", Some(&[])),
        ("virtio_ring", Some(&[])),
        ("virtio_pci_modern_dev", Some(&[])),
        ("virtio_pci_legacy_dev", Some(&[])),
        (
            "virtio_pci",
            Some(&[
                "virtio_ring",
                "virtio_pci_modern_dev",
                "virtio_pci_legacy_dev",
                "virtio",
            ]),
        ),
        ("virtio_console", Some(&["virtio", "virtio_ring"])),
        (
            "virtio_net",
            Some(&["virtio_ring", "virtio", "net_failover"]),
        ),
        ("net_failover", Some(&["failover"])),
        ("failover", Some(&[])),
        ("virtio_rng", Some(&["virtio", "virtio_ring", "rng_core"])),
        ("rng_core", None), // built in
    ];

    #[test]
    fn load_order_puts_dependencies_first_once() {
        let order = load_order(
            &strings(&["virtio_pci", "virtio_console", "virtio_net", "virtio_rng"]),
            deps_from(VIRTIO),
        )
        .unwrap();
        assert_eq!(
            order,
            [
                "virtio_ring",
                "virtio_pci_modern_dev",
                "virtio_pci_legacy_dev",
                "virtio",
                "virtio_pci",
                "virtio_console",
                "failover",
                "net_failover",
                "virtio_net",
                "virtio_rng",
            ]
        );
        let position = |m: &str| order.iter().position(|o| o == m).unwrap();
        for (name, deps) in VIRTIO {
            for dep in deps.iter().flat_map(|d| d.iter()) {
                if order.iter().any(|o| o == name) && *dep != "rng_core" {
                    assert!(position(dep) < position(name), "{dep} after {name}");
                }
            }
        }
    }

    #[test]
    fn load_order_rejects_unknown_modules_and_cycles() {
        let err = load_order(&strings(&["virtio_blk"]), deps_from(VIRTIO)).unwrap_err();
        assert!(err.to_string().contains("virtio_blk"), "{err}");
        let cyclic: &[(&str, Option<&[&str]>)] = &[
            ("a", Some(&["b"])),
            ("b", Some(&["c"])),
            ("c", Some(&["a"])),
        ];
        let err = load_order(&strings(&["a"]), deps_from(cyclic)).unwrap_err();
        assert!(err.to_string().contains("a -> b -> c -> a"), "{err}");
        // A built-in module is not loaded, and a wanted one twice is one.
        assert_eq!(
            load_order(
                &strings(&["rng_core", "virtio", "virtio"]),
                deps_from(VIRTIO)
            )
            .unwrap(),
            ["virtio"]
        );
    }

    #[test]
    fn module_names_follow_the_kernel() {
        assert_eq!(module_name("virtio-rng.ko").as_deref(), Some("virtio_rng"));
        assert_eq!(
            module_name("virtio_blk.ko.xz").as_deref(),
            Some("virtio_blk")
        );
        assert_eq!(module_name("modules.order"), None);
        assert_eq!(module_name("x.kobj"), None);
    }

    /// A minimal relocatable ELF: a null section, `.modinfo` and `.shstrtab`.
    fn elf_with_modinfo(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.modinfo\0.shstrtab\0";
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let modinfo_at = elf.len();
        elf.extend_from_slice(modinfo);
        let shstrtab_at = elf.len();
        elf.extend_from_slice(shstrtab);
        let shoff = elf.len().next_multiple_of(8);
        elf.resize(shoff, 0);
        for (name, offset, size) in [
            (0u32, 0usize, 0usize),
            (1, modinfo_at, modinfo.len()),
            (10, shstrtab_at, shstrtab.len()),
        ] {
            let mut sh = [0u8; 64];
            sh[..4].copy_from_slice(&name.to_le_bytes());
            sh[24..32].copy_from_slice(&(offset as u64).to_le_bytes());
            sh[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&sh);
        }
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        elf
    }

    #[test]
    fn modinfo_depends_is_read_from_the_section() {
        let ko = elf_with_modinfo(b"license=GPL\0depends=virtio_ring,virtio\0name=virtio_blk\0");
        assert_eq!(modinfo_depends(&ko).unwrap(), ["virtio_ring", "virtio"]);
        let ko = elf_with_modinfo(b"depends=\0name=virtio\0");
        assert!(modinfo_depends(&ko).unwrap().is_empty());
        let ko = elf_with_modinfo(b"name=old\0");
        assert!(modinfo_depends(&ko).unwrap().is_empty());
    }

    /// 20,000 copies of `good`, each with one byte overwritten at a place
    /// and with a value drawn from a xorshift generator seeded with `seed`.
    fn corrupted(good: &[u8], seed: u64) -> impl Iterator<Item = Vec<u8>> + '_ {
        let mut x = seed;
        (0..20_000).map(move |_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut bad = good.to_vec();
            let at = (x % bad.len() as u64) as usize;
            bad[at] = (x >> 40) as u8;
            bad
        })
    }

    #[test]
    fn modinfo_of_broken_files_is_an_error_not_a_panic() {
        let good = elf_with_modinfo(b"depends=a\0");
        assert!(modinfo_depends(b"").is_err());
        assert!(modinfo_depends(b"\x7fELF\x01\x01").is_err());
        // Every truncation, and every single corrupted byte, of a valid file.
        for len in 0..good.len() {
            assert!(modinfo_depends(&good[..len]).is_err(), "truncated to {len}");
        }
        for bad in corrupted(&good, 0x2545_f491_4f6c_dd1d) {
            let _ = modinfo_depends(&bad);
        }
    }

    // ---- recipe, disk, checksums

    #[test]
    fn recipe_parses_and_rejects() {
        let text = "# c\nkernel_package = \"linux-image-x\"\nkernel_version=\"1-2\"\n\
                    busybox_package = \"busybox-static\"\nbusybox_version = \"1:1.35\"\n\
                    modules = \"a  b\"\n";
        let r = Recipe::parse(text).unwrap();
        assert_eq!(r.kernel.spec(), "linux-image-x=1-2");
        assert_eq!(r.busybox.spec(), "busybox-static=1:1.35");
        assert_eq!(r.modules, ["a", "b"]);
        assert!(Recipe::parse(&text.replace("modules", "nodules")).is_err());
        assert!(Recipe::parse(&format!("{text}modules = \"c\"\n")).is_err());
        assert!(Recipe::parse(&format!("{text}extra = \"c\"\n")).is_err());
        assert!(Recipe::parse(&text.replace("\"1-2\"", "1-2")).is_err());
    }

    #[test]
    fn the_pinned_recipe_parses() {
        let text = fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(RECIPE),
        )
        .unwrap();
        let r = Recipe::parse(&text).unwrap();
        assert!(r.kernel.name.starts_with("linux-image-6.1.0-"));
        assert!(r.modules.contains(&"virtio_pci".to_string()));
        let names: Vec<_> = r.other_kernels.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["6.12", "cloud"]);
        assert!(r
            .other_kernel("cloud")
            .unwrap()
            .package
            .name
            .ends_with("-cloud-amd64"));
    }

    #[test]
    fn other_kernels_parse_and_reject() {
        let base = "kernel_package = \"k\"\nkernel_version = \"1\"\nbusybox_package = \"b\"\n\
                    busybox_version = \"2\"\nmodules = \"m\"\n";
        let other = |name: &str| {
            format!("[[other_kernel]]\nname = \"{name}\"\npackage = \"p\"\nversion = \"3\"\n")
        };
        let r = Recipe::parse(&format!("{base}{}{}", other("6.12"), other("cloud_2"))).unwrap();
        assert_eq!(r.other_kernels.len(), 2);
        assert_eq!(r.other_kernel("6.12").unwrap().package.spec(), "p=3");
        assert!(r.other_kernel("6.1").is_none());
        assert!(Recipe::parse(base).unwrap().other_kernels.is_empty());
        for bad in ["", "a/b", "..", ".hidden", "a b"] {
            let e = Recipe::parse(&format!("{base}{}", other(bad))).unwrap_err();
            assert!(e.contains("it names a folder"), "{bad}: {e}");
        }
        let twice = Recipe::parse(&format!("{base}{}{}", other("x"), other("x")));
        assert_eq!(twice.unwrap_err(), "other_kernel: name \"x\" twice");
        let extra = format!("{base}{}flavour = \"rt\"\n", other("x"));
        assert!(Recipe::parse(&extra).is_err(), "unknown key");
        let missing = format!("{base}[[other_kernel]]\nname = \"x\"\npackage = \"p\"\n");
        assert!(Recipe::parse(&missing).is_err(), "no version");
    }

    #[test]
    fn xz_modules_unpack_and_bad_ones_are_errors() {
        // `printf 'hello module\n' | xz --check=crc32`, as Debian compresses
        // its modules.
        const XZ: &[u8] = &[
            0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00, 0x00, 0x01, 0x69, 0x22, 0xde, 0x36, 0x02, 0x00,
            0x21, 0x01, 0x16, 0x00, 0x00, 0x00, 0x74, 0x2f, 0xe5, 0xa3, 0x01, 0x00, 0x0c, 0x68,
            0x65, 0x6c, 0x6c, 0x6f, 0x20, 0x6d, 0x6f, 0x64, 0x75, 0x6c, 0x65, 0x0a, 0x00, 0x00,
            0x00, 0x00, 0xba, 0xcd, 0xce, 0x9a, 0x00, 0x01, 0x21, 0x0d, 0x75, 0xdc, 0xa8, 0xd2,
            0x90, 0x42, 0x99, 0x0d, 0x01, 0x00, 0x00, 0x00, 0x00, 0x01, 0x59, 0x5a,
        ];
        assert_eq!(unxz(XZ).unwrap(), b"hello module\n");
        assert!(unxz(&XZ[..XZ.len() / 2]).is_err());
        assert!(unxz(b"\x7fELF not compressed").is_err());
        let mut bad = XZ.to_vec();
        bad[30] ^= 0xff;
        assert!(unxz(&bad).is_err());
    }

    #[test]
    fn cache_key_changes_with_every_input() {
        let r = Recipe::parse(
            "kernel_package=\"k\"\nkernel_version=\"1\"\nbusybox_package=\"b\"\n\
             busybox_version=\"2\"\nmodules=\"m\"\n",
        )
        .unwrap();
        let tools = [tool("at", b"\x7fELF at"), tool("stress", b"\x7fELF stress")];
        let key = cache_key(&r.kernel, &r, b"#!/bin/sh\n", &tools);
        assert_eq!(key, cache_key(&r.kernel, &r, b"#!/bin/sh\n", &tools));
        assert_ne!(key, cache_key(&r.kernel, &r, b"#!/bin/sh \n", &tools));
        // A rebuilt tool, a tool more or less.
        let rebuilt = [tools[0].clone(), tool("stress", b"\x7fELF stress2")];
        assert_ne!(key, cache_key(&r.kernel, &r, b"#!/bin/sh\n", &rebuilt));
        assert_ne!(key, cache_key(&r.kernel, &r, b"#!/bin/sh\n", &tools[..1]));
        let mut other = Recipe {
            modules: strings(&["m", "n"]),
            ..r
        };
        assert_ne!(
            key,
            cache_key(&other.kernel, &other, b"#!/bin/sh\n", &tools)
        );
        other.modules = strings(&["m"]);
        other.kernel.version = "1a".into();
        assert_ne!(
            key,
            cache_key(&other.kernel, &other, b"#!/bin/sh\n", &tools)
        );
    }

    fn tool(name: &'static str, bytes: &[u8]) -> Tool {
        Tool {
            name,
            bytes: bytes.to_vec(),
        }
    }

    // ---- the initramfs and its tools

    #[test]
    fn initramfs_holds_init_busybox_modules_and_tools() {
        let modules = [
            ("virtio".to_string(), b"ko1".to_vec()),
            ("virtio_ring".to_string(), b"ko2".to_vec()),
        ];
        let tools: Vec<Tool> = TOOLS.iter().map(|&n| tool(n, n.as_bytes())).collect();
        let archive = initramfs(&Contents {
            busybox: b"bb",
            init: b"#!/bin/sh\n",
            modules: &modules,
            tools: &tools,
        })
        .unwrap();
        let entries = parse_cpio(&archive);
        let find = |name: &str| {
            let e = entries.iter().find(|e| e.5 == name);
            e.unwrap_or_else(|| panic!("no {name}"))
        };
        for name in ["at", "ipcbench", "stress"] {
            let e = find(&format!("bin/{name}"));
            assert_eq!((e.1, e.6.as_slice()), (S_IFREG | 0o755, name.as_bytes()));
        }
        assert_eq!(find("init").6, b"#!/bin/sh\n");
        assert_eq!(find("bin/busybox").6, b"bb");
        assert_eq!(find("lib/modules/virtio_ring.ko").6, b"ko2");
        assert_eq!(find(MODULE_LIST).6, b"virtio\nvirtio_ring\n");
        assert_eq!(find("dev/console").1, S_IFCHR | 0o600);
        // Every entry's directory comes before it.
        for (i, e) in entries.iter().enumerate() {
            if let Some((parent, _)) = e.5.rsplit_once('/') {
                let at = entries.iter().position(|p| p.5 == parent);
                assert!(at.is_some_and(|at| at < i), "{} before its directory", e.5);
            }
        }
    }

    #[test]
    fn tools_build_for_static_linux_without_inherited_flags() {
        let cmd = tools_cargo();
        let args: Vec<_> = cmd.get_args().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            args,
            [
                "build",
                "--release",
                "-p",
                "moat-guest-tools",
                "--target",
                "x86_64-unknown-linux-musl",
                "--target-dir",
                "target/guest-tools"
            ]
        );
        let env = |key: &str| {
            cmd.get_envs()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.map(|v| v.to_str().unwrap()))
        };
        assert_eq!(env("RUSTFLAGS"), Some(None), "removed");
        assert_eq!(env("CARGO_ENCODED_RUSTFLAGS"), Some(None), "removed");
        assert_eq!(env("CARGO_PROFILE_RELEASE_DEBUG"), Some(Some("false")));
        assert_eq!(
            tool_path("at"),
            Path::new("target/guest-tools/x86_64-unknown-linux-musl/release/at")
        );
    }

    /// An ELF header and program headers of the given types.
    fn elf_with_segments(types: &[u32]) -> Vec<u8> {
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x10] = 3; // ET_DYN: a static-pie
        elf[0x12] = 62; // EM_X86_64
        elf[0x20] = 64; // e_phoff
        elf[0x36] = 56; // e_phentsize
        elf[0x38] = types.len() as u8;
        for &t in types {
            let mut phdr = [0u8; 56];
            phdr[..4].copy_from_slice(&t.to_le_bytes());
            elf.extend_from_slice(&phdr);
        }
        elf
    }

    #[test]
    fn static_elf_rejects_interpreters_and_other_machines() {
        const PT_LOAD: u32 = 1;
        const PT_DYNAMIC: u32 = 2;
        const PT_INTERP: u32 = 3;
        let good = elf_with_segments(&[PT_LOAD, PT_DYNAMIC, PT_LOAD]);
        assert_eq!(static_elf(&good), Ok(()));
        let dynamic = elf_with_segments(&[PT_LOAD, PT_INTERP]);
        assert!(static_elf(&dynamic).unwrap_err().contains("interpreter"));
        let mut arm = good.clone();
        arm[0x12] = 183; // EM_AARCH64
        assert!(static_elf(&arm).is_err());
        let mut object = good.clone();
        object[0x10] = 1; // ET_REL
        assert!(static_elf(&object).is_err());
        let mut small = good.clone();
        small[0x36] = 32;
        assert!(static_elf(&small).is_err());
        for len in 0..good.len() {
            assert!(static_elf(&good[..len]).is_err(), "truncated to {len}");
        }
        for bad in corrupted(&good, 0x9e37_79b9_7f4a_7c15) {
            let _ = static_elf(&bad);
        }
    }

    /// Checks a real build: `cargo xtask linux build`, then
    /// `cargo test -p xtask -- --ignored built_initramfs`.
    #[test]
    #[ignore = "needs the output of `cargo xtask linux build`"]
    fn built_initramfs_holds_the_built_tools() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let archive = fs::read(root.join(LINUX_DIR).join("initramfs.cpio")).unwrap();
        let entries = parse_cpio(&archive);
        for name in TOOLS {
            let built = fs::read(root.join(tool_path(name))).unwrap();
            assert_eq!(static_elf(&built), Ok(()), "{name}");
            let e = entries.iter().find(|e| e.5 == format!("bin/{name}"));
            let e = e.unwrap_or_else(|| panic!("no bin/{name}"));
            assert_eq!(e.1, S_IFREG | 0o755);
            assert!(e.6 == built, "bin/{name} is not the built {name}");
        }
    }

    #[test]
    fn crc32_matches_zlib() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"hello world"), 0x0d4a_1185);
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn test_disk_is_deterministic_and_labelled() {
        let image = test_disk_image();
        assert_eq!(image.len(), 1 << 20);
        assert_eq!(image, test_disk_image());
        assert!(image.starts_with(b"moat test disk sector 0000\n"));
        assert!(image[SECTOR * 1023..].starts_with(b"moat test disk sector 1023\n"));
        // Sectors differ, and everything after the summed part is zero.
        assert_ne!(image[100..SECTOR], image[SECTOR + 100..2 * SECTOR]);
        assert!(image[DISK_SUM_SECTORS * SECTOR..].iter().all(|&b| b == 0));
        let dir = std::env::temp_dir().join(format!("xtask-disk-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let disk = write_test_disk(&dir.join("d.img")).unwrap();
        assert_eq!(fs::read(&disk.path).unwrap(), image);
        assert_eq!(disk.crc32, crc32(&image[..DISK_SUM_SECTORS * SECTOR]));
        assert_eq!(
            disk.kernel_args(),
            [
                format!("moat.disk_sum={:08x}", disk.crc32),
                "moat.disk_sectors=1024".into()
            ]
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    // ---- serial

    #[test]
    fn init_report_reads_checks_across_a_reboot() {
        let serial = "\
[    0.1] Linux version 6.1\r
MOAT-INIT start uptime=3.25\r
MOAT-CHECK insmod-virtio ok
MOAT-CHECK blk-read ok crc32 1234abcd of 1024 sectors
MOAT-CHECK blk-write ok crc32 0
MOAT-INIT reboot
MOAT-INIT start uptime=2.50
MOAT-CHECK insmod-virtio ok
MOAT-CHECK blk-persist FAIL crc32 1 after reboot, wrote 2
[    5.0] random: crng init done MOAT-CHECK clocksource FAIL tsc, want kvm-clock
MOAT-CHECK garbled
MOAT-INIT done checks=5 failed=2
";
        let r = init_report(serial);
        assert_eq!(r.uptime_at_init, Some(3.25), "the first boot's");
        assert_eq!(r.passed, ["insmod-virtio", "blk-read", "blk-write"]);
        assert_eq!(
            r.failed,
            [
                (
                    "blk-persist".to_string(),
                    "crc32 1 after reboot, wrote 2".to_string()
                ),
                ("clocksource".to_string(), "tsc, want kvm-clock".to_string()),
            ]
        );
        assert!(r.done);
        assert_eq!(init_report(""), InitReport::default());
    }

    #[test]
    fn serial_clock_notes_markers_as_they_appear() {
        let dir = std::env::temp_dir().join(format!("xtask-clock-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join("serial.log");
        let clock = SerialClock::start(&log, &["MOAT-INIT start", "MOAT-INIT done"]);
        assert!(!clock.poll(), "no file yet");
        fs::write(&log, "boot\nMOAT-INI").unwrap();
        assert!(!clock.poll());
        assert_eq!(clock.seen("MOAT-INIT start"), None);
        std::thread::sleep(Duration::from_millis(20));
        // The marker straddles the previous end of the file.
        fs::write(&log, "boot\nMOAT-INIT start uptime=1\n").unwrap();
        assert!(!clock.poll());
        let first = clock.seen("MOAT-INIT start").unwrap();
        assert!(first >= Duration::from_millis(20));
        fs::write(&log, "boot\nMOAT-INIT start uptime=1\nMOAT-INIT done\n").unwrap();
        assert!(clock.poll());
        assert_eq!(
            clock.seen("MOAT-INIT start"),
            Some(first),
            "first sighting kept"
        );
        assert!(clock.seen("MOAT-INIT done").unwrap() >= first);
        assert_eq!(clock.seen("other"), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn grub_cfg_boots_linux_with_quoted_arguments() {
        let cfg = grub_cfg(&strings(&["console=ttyS0", "moat.disk_sum=00ff", "a;b"]));
        assert_eq!(
            cfg,
            "set timeout=0\nset default=0\n\nmenuentry \"linux\" {\n    \
             linux /boot/vmlinuz console=ttyS0 moat.disk_sum=00ff 'a;b'\n    \
             initrd /boot/initramfs.cpio\n    boot\n}\n"
        );
    }

    #[test]
    fn virtio_qemu_devices() {
        let dir = std::env::temp_dir().join(format!("xtask-virtio-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let disk = TestDisk {
            path: dir.join("disk.img"),
            crc32: 1,
            sum_sectors: 1,
        };
        let args = virtio_qemu_args(&disk, &dir).unwrap();
        assert_eq!(args.len() % 2, 0);
        for pair in args.chunks(2) {
            assert!(
                pair[0].starts_with('-') && !pair[1].starts_with('-'),
                "{pair:?}"
            );
        }
        assert!(args.contains(&"virtserialport,chardev=moat0,name=moat0".to_string()));
        assert!(args.contains(&"user,id=net0,restrict=on".to_string()));
        // Both echo sockets listen, and echo.
        use std::io::{BufRead, BufReader, Write};
        let mut s = std::os::unix::net::UnixStream::connect(dir.join("moat0.sock")).unwrap();
        s.write_all(b"ping 1\n").unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        assert_eq!(line, "ping 1\n");
        assert!(dir.join("hvc0.sock").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
