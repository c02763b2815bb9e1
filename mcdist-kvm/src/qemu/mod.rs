//! Real Linux clones under QEMU, with guest RAM as a lazy file served by mcdist.
//!
//! The parent boots Debian's cloud kernel with a busybox initramfs under
//! `qemu-system-x86_64` (`-accel kvm` where `/dev/kvm` is backed by VMX/SVM, TCG otherwise),
//! RAM in a shared file (`memory-backend-file,share=on`). When the guest prints its fork
//! marker the parent stops, saves only device state (`x-ignore-shared`), writes a versioned
//! [`descriptor::QemuDescriptor`] and the memory server serves the frozen RAM file. On each
//! clone host one `mcdist-fuse` exposes the image as a file; clones map it `share=off`
//! (MAP_PRIVATE) through a launcher that neutralises QEMU's `MADV_HUGEPAGE`, start with
//! `-incoming defer`, load the device state and `cont`.
//!
//! Modules: [`descriptor`] (the descriptor), [`qmp`] (a QMP client), [`vm`] (one QEMU
//! process), [`guest`] (init script, expected results), [`parent`] (boot and freeze),
//! [`clone`] (start a clone, collect its result), [`fork`] (the `fork` driver over network
//! namespaces).

pub mod clone;
pub mod descriptor;
pub mod fork;
pub mod guest;
pub mod parent;
pub mod qmp;
mod sys;
pub mod vm;

use std::path::{Path, PathBuf};

/// Errors finding what QEMU clones need on this host.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A Debian package is missing.
    #[error("{what} not found: install Debian's {package} package")]
    Missing {
        /// What was looked for.
        what: &'static str,
        /// The package that provides it.
        package: &'static str,
    },
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The QEMU binary, or the missing package.
pub fn find_qemu() -> Result<PathBuf, HostError> {
    if let Some(p) = std::env::var_os("MCDIST_QEMU") {
        return Ok(PathBuf::from(p));
    }
    which("qemu-system-x86_64").ok_or(HostError::Missing {
        what: "qemu-system-x86_64",
        package: "qemu-system-x86",
    })
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// First line of `qemu --version`.
pub fn qemu_version(qemu: &Path) -> Result<String, HostError> {
    let out = std::process::Command::new(qemu)
        .arg("--version")
        .output()
        .map_err(|source| HostError::Read {
            path: qemu.to_path_buf(),
            source,
        })?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string())
}

/// `kvm` when `/dev/kvm` exists and the CPU shows VMX or SVM, else `tcg`, with the reason.
pub fn detect_accel() -> (&'static str, &'static str) {
    if !Path::new("/dev/kvm").exists() {
        return ("tcg", "no /dev/kvm");
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if hw {
        ("kvm", "/dev/kvm backed by VMX/SVM")
    } else {
        ("tcg", "/dev/kvm is not backed by VMX/SVM")
    }
}

/// Where downloaded Debian packages are unpacked: `$MCDIST_CACHE`, else
/// `$XDG_CACHE_HOME/mcdist`, else `~/.cache/mcdist`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("MCDIST_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("mcdist");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/mcdist")
}

fn newest_in(dir: &Path, pred: impl Fn(&str) -> bool) -> Option<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(&pred))
        .collect();
    v.sort();
    v.pop()
}

/// Debian's cloud kernel: `$MCDIST_KERNEL`, else the cache folder's
/// (`examples/qemu-setup.sh` fills it), else `/boot/vmlinuz-*-cloud-amd64`.
pub fn find_kernel() -> Result<PathBuf, HostError> {
    if let Some(p) = std::env::var_os("MCDIST_KERNEL") {
        return Ok(PathBuf::from(p));
    }
    let cloud = |n: &str| n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64");
    newest_in(&cache_dir().join("kernel/boot"), cloud)
        .or_else(|| newest_in(Path::new("/boot"), cloud))
        .ok_or(HostError::Missing {
            what: "Debian's cloud kernel (run examples/qemu-setup.sh, or set MCDIST_KERNEL)",
            package: "linux-image-cloud-amd64",
        })
}

/// Debian's static busybox: `$MCDIST_BUSYBOX`, else `/bin/busybox`.
pub fn find_busybox() -> Result<PathBuf, HostError> {
    crate::linux::find_busybox().map_err(|_| HostError::Missing {
        what: "a static busybox",
        package: "busybox-static",
    })
}

/// BLAKE3 of a file, hex.
pub fn file_digest(path: &Path) -> Result<String, HostError> {
    mcdist::source::file_digest(path)
        .map(|d| mcdist::hex(&d))
        .map_err(|source| HostError::Read {
            path: path.to_path_buf(),
            source,
        })
}

/// Moves the calling thread into network namespace `name` (threads it starts later follow).
pub fn enter_netns(name: &str) -> std::io::Result<()> {
    crate::sys::setns_net(&Path::new("/var/run/netns").join(name))
}
