//! Command-line options of the clone-side binaries naming the mcdist session (shared by
//! `mcdist-clone` and `mcdist-host-cache`).

use std::net::{SocketAddr, SocketAddrV4};
use std::path::Path;

use mcdist_kvm::descriptor::DescriptorError;
use mcdist_kvm::Descriptor;
use mcdist_kvm::DescriptorFile;

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
