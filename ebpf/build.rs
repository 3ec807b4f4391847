//! Rebuild the programs when bpf-linker changes: building this crate depends on the
//! `bpf-linker` binary, which cargo cannot express as a dependency.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(e) => println!("cargo:warning=bpf-linker not found ({e}); run `cargo xtask setup`"),
    }
}
