//! Links the Xen user-space libraries when the `xen` feature is on.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_XEN").is_some() {
        for lib in ["xenctrl", "xenevtchn", "xenforeignmemory"] {
            println!("cargo:rustc-link-lib=dylib={lib}");
        }
    }
}
