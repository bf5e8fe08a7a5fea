//! Assembles the guest workload into a flat binary with the system's GNU assembler.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let src = "guest/workload.S";
    println!("cargo:rerun-if-changed={src}");
    let obj = out.join("workload.o");
    let bin = out.join("workload.bin");
    let ok = Command::new("as")
        .args(["--64", "-o"])
        .arg(&obj)
        .arg(src)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
        && Command::new("objcopy")
            .args(["-O", "binary", "-j", ".text"])
            .arg(&obj)
            .arg(&bin)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    assert!(
        ok,
        "assembling {src} failed: needs GNU as and objcopy (binutils)"
    );
}
