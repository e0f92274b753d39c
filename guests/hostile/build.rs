//! Links the bare-metal guest as a flat bzImage (x86_64-unknown-none only):
//! the linker script puts the boot protocol's header first, the 64-bit
//! entry 0x200 bytes into the code at 1 MiB, and `--oformat=binary` writes
//! the file as memory from there on.
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rerun-if-changed=linker.ld");
    if std::env::var("TARGET").as_deref() == Ok("x86_64-unknown-none") {
        println!("cargo:rustc-link-arg-bins=-T{dir}/linker.ld");
        println!("cargo:rustc-link-arg-bins=--oformat=binary");
        println!("cargo:rustc-link-arg-bins=--no-pie");
    }
}
