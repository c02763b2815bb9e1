//! Assembles the demo guest program with GNU `as` and `objcopy` (binutils).
use std::path::PathBuf;
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (binutils needed to build the guest): {e}"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR set by cargo"));
    let src = PathBuf::from("guest/hash32.S");
    println!("cargo:rerun-if-changed={}", src.display());
    let obj = out.join("hash32.o");
    let bin = out.join("hash32.bin");
    run(Command::new("as").arg("--32").arg("-o").arg(&obj).arg(&src));
    run(Command::new("objcopy")
        .args(["-O", "binary", "-j", ".text"])
        .arg(&obj)
        .arg(&bin));
}
