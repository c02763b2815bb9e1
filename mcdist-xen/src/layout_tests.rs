//! Checks the hand-written ABI against the installed Xen headers by compiling
//! a C program with the system C compiler.

use crate::abi;
use std::path::Path;
use std::process::Command;

const HEADER: &str = "/usr/include/xen/vm_event.h";

fn headers_present() -> bool {
    let present = Path::new(HEADER).exists() && Path::new("/usr/include/xenctrl.h").exists();
    if !present {
        if cfg!(feature = "xen") {
            panic!("feature `xen` is on but the Xen headers are missing (install libxen-dev)");
        }
        eprintln!("skipping: Xen headers not installed (libxen-dev); layout not checked");
    }
    present
}

fn compile_and_run(src: &str) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let c = dir.path().join("layout.c");
    let exe = dir.path().join("layout");
    std::fs::write(&c, src).expect("write C source");
    let out = Command::new("cc")
        .arg("-std=gnu11")
        .arg("-Wall")
        .arg("-Werror")
        .arg(&c)
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("run cc");
    assert!(
        out.status.success(),
        "C layout program failed to compile:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().expect("run layout program");
    assert!(run.status.success());
    String::from_utf8(run.stdout).expect("utf-8 output")
}

const PRELUDE: &str = "#define __XEN_TOOLS__ 1\n#include <stdio.h>\n#include <stddef.h>\n#include <stdint.h>\n#include <xenctrl.h>\n#include <xenevtchn.h>\n#include <xenforeignmemory.h>\n#include <xen/vm_event.h>\n#include <xen/hvm/params.h>\n";

#[test]
fn vm_event_struct_and_ring_layout_match_the_installed_headers() {
    if !headers_present() {
        return;
    }
    let table = abi::layout_table();
    assert_eq!(table.len(), abi::C_LAYOUT_EXPRS.len());
    let mut src = String::from(PRELUDE);
    src.push_str("int main(void) {\n");
    for e in abi::C_LAYOUT_EXPRS {
        src.push_str(&format!("    printf(\"%lu\\n\", (unsigned long)({e}));\n"));
    }
    src.push_str("    return 0;\n}\n");
    let out = compile_and_run(&src);
    let c_values: Vec<usize> = out
        .lines()
        .map(|l| l.trim().parse().expect("number"))
        .collect();
    assert_eq!(c_values.len(), table.len());
    let mut mismatches = Vec::new();
    for ((name, rust), (c_expr, c)) in table.iter().zip(abi::C_LAYOUT_EXPRS.iter().zip(&c_values)) {
        if rust != c {
            mismatches.push(format!("{name}: rust {rust}, C `{c_expr}` = {c}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "ABI mismatches:\n{}",
        mismatches.join("\n")
    );
}

#[cfg(feature = "xen")]
#[test]
fn ffi_prototypes_match_the_installed_headers() {
    assert!(headers_present());
    let mut src = String::from(PRELUDE);
    for (func, ty) in crate::sys::xen::C_PROTOTYPE_CHECKS {
        src.push_str(&format!(
            "_Static_assert(__builtin_types_compatible_p(__typeof__(&{func}), {ty}), \"prototype of {func}\");\n"
        ));
    }
    src.push_str("int main(void) { puts(\"ok\"); return 0; }\n");
    assert_eq!(compile_and_run(&src).trim(), "ok");
}
