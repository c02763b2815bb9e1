//! Command-line options of the binaries that send or receive pages: the session key
//! ([`KeyArgs`], as `mcdist serve/fetch --key`) and, for the clone-side binaries
//! (`mcdist-clone`, `mcdist-host-cache`), the mcdist session ([`SessionArgs`]).

#![allow(dead_code)] // Each binary uses a part.

use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};

use mcdist::secure::Security;
use mcdist_kvm::descriptor::DescriptorError;
use mcdist_kvm::session::{check_keyed, load_security, UNKEYED_WARNING};
use mcdist_kvm::Descriptor;
use mcdist_kvm::DescriptorFile;

/// The session key.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KeyArgs {
    /// Pre-shared 256-bit key file (32 raw bytes or 64 hex digits), as `mcdist serve --key`:
    /// authenticate and encrypt every datagram. Without it the session has integrity (every
    /// page is verified against the descriptor's root) but no confidentiality and no
    /// authentication of the control plane.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// With --key: authenticate only, send page contents in the clear (trusted networks).
    #[arg(long, requires = "key")]
    pub auth_only: bool,
}

impl KeyArgs {
    /// Loads the key (printing the file-permission warning, or the one-line warning of an
    /// unkeyed session, on standard error). `Err` is the CLI's last line.
    pub fn security(&self) -> Result<Option<Security>, String> {
        self.checked(|_| Ok(()))
    }

    fn load(&self) -> Result<Option<Security>, String> {
        let l = load_security(self.key.as_deref(), self.auth_only).map_err(|e| e.to_string())?;
        if let Some(w) = &l.permission_warning {
            eprintln!("warning: {w}");
        }
        Ok(l.security)
    }

    /// The key for joining the session `desc` names: a keyed descriptor without `--key`
    /// (or a key for an unkeyed one) is refused with one line.
    pub fn for_descriptor(&self, desc: &Descriptor) -> Result<Option<Security>, String> {
        self.checked(|sec| check_keyed(desc, sec).map_err(|e| e.to_string()))
    }

    /// Loads the key and runs `check` on it (whether it fits the session a descriptor
    /// records) before any warning is printed, so that a refusal is the only line.
    pub fn checked(
        &self,
        check: impl FnOnce(Option<&Security>) -> Result<(), String>,
    ) -> Result<Option<Security>, String> {
        let sec = self.load()?;
        check(sec.as_ref())?;
        if sec.is_none() {
            eprintln!("warning: {UNKEYED_WARNING}");
        }
        Ok(sec)
    }

    /// The arguments that hand this key to a child process.
    pub fn child_args(&self) -> Vec<std::ffi::OsString> {
        let mut v = Vec::new();
        if let Some(k) = &self.key {
            v.push("--key".into());
            v.push(k.clone().into_os_string());
            if self.auth_only {
                v.push("--auth-only".into());
            }
        }
        v
    }
}

/// The mcdist session (the descriptor's, unless overridden) and the interface to join it on.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SessionArgs {
    /// Multicast group (overrides the descriptor).
    #[arg(long)]
    pub group: Option<SocketAddrV4>,
    /// Interface for multicast.
    #[arg(long)]
    pub iface: Option<String>,
    /// Memory server request address (overrides the descriptor).
    #[arg(long)]
    pub server: Option<SocketAddr>,
    #[command(flatten)]
    pub keys: KeyArgs,
}

impl SessionArgs {
    /// Loads the descriptor at `path` and applies the overrides to its session.
    pub fn load(&self, path: &Path) -> Result<Descriptor, DescriptorError> {
        let mut desc = Descriptor::load(path)?;
        if let Some(s) = desc.session.as_mut() {
            if let Some(g) = self.group {
                s.group = g;
            }
            if let Some(a) = self.server {
                s.server = a;
            }
        }
        Ok(desc)
    }
}
