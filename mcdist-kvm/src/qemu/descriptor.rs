//! The QEMU clone descriptor: everything a clone host needs besides the memory contents, as
//! one versioned JSON document. It is the trusted input of a clone: the FUSE file checks the
//! session and digest against it, and a clone refuses another QEMU version or kernel.

use mcdist::bitmap::PageBitmap;
use mcdist::secure::{Protection, Security};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Version of the descriptor format written by this build.
pub const FORMAT: u32 = 1;

/// Errors reading or checking a descriptor.
#[derive(Debug, thiserror::Error)]
pub enum DescriptorError {
    /// The file cannot be read or written.
    #[error("descriptor {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a descriptor.
    #[error("descriptor is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Written by another version of the format.
    #[error("descriptor format {got}, this build reads format {FORMAT}")]
    Format {
        /// The file's format.
        got: u32,
    },
    /// A hex field is malformed.
    #[error("descriptor field {0} is not valid hex")]
    Hex(&'static str),
    /// The clone host runs another QEMU than the parent did.
    #[error("descriptor was made by {want}, this host has {got}: refusing to clone")]
    QemuVersion {
        /// The parent's QEMU.
        want: String,
        /// This host's QEMU.
        got: String,
    },
    /// The clone host's kernel or initramfs differs from the parent's.
    #[error("{what} digest differs from the descriptor's ({want}, this host has {got}): refusing to clone")]
    Digest {
        /// "kernel" or "initramfs".
        what: &'static str,
        /// The descriptor's digest (hex prefix).
        want: String,
        /// This host's digest (hex prefix).
        got: String,
    },
}

/// What the guest computes after the fork.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Workload {
    /// MiB of table the parent wrote to tmpfs (1 MiB chunks).
    pub table_mib: u32,
}

/// A frozen QEMU parent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QemuDescriptor {
    /// [`FORMAT`].
    pub format: u32,
    /// First line of `qemu-system-x86_64 --version` on the parent host.
    pub qemu_version: String,
    /// `tcg` or `kvm`.
    pub accel: String,
    /// QEMU arguments shared by parent and clones (machine, CPU, kernel, command line); the
    /// memory backend, console, QMP and `-incoming` are added per side.
    pub machine_args: Vec<String>,
    /// Guest RAM in bytes (the memory file's size).
    pub mem_bytes: u64,
    /// Kernel image path on the parent host (clone hosts may override with `MCDIST_KERNEL`).
    pub kernel: String,
    /// BLAKE3 of the kernel image (hex).
    pub kernel_digest: String,
    /// Initramfs path (the parent's work folder; clones use the same file).
    pub initramfs: String,
    /// BLAKE3 of the initramfs (hex).
    pub initramfs_digest: String,
    /// The device state saved with `x-ignore-shared` (hex).
    pub device_state: String,
    /// BLAKE3 of the frozen RAM file (hex).
    pub image_digest: String,
    /// Set bit = all-zero page (hex of the bitmap bytes).
    pub zero_map: String,
    /// mcdist page size.
    pub page_size: usize,
    /// mcdist session id.
    pub session_id: u64,
    /// Multicast group `239.255.x.y:port`.
    pub group: String,
    /// The memory server's request address.
    pub server: String,
    /// The guest's work.
    pub workload: Workload,
    /// Whether the session is keyed, and how (never the key itself): a host joins a keyed
    /// session only with its key, and an unkeyed one only without. Absent: unkeyed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keying: Option<Keying>,
}

/// How a keyed session protects its datagrams, as a descriptor records it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Keying {
    /// Authenticated and encrypted.
    Encrypted,
    /// Authenticated, page contents in the clear.
    AuthOnly,
}

impl From<Protection> for Keying {
    fn from(p: Protection) -> Keying {
        match p {
            Protection::Encrypted => Keying::Encrypted,
            Protection::AuthOnly => Keying::AuthOnly,
        }
    }
}

impl From<Keying> for Protection {
    fn from(k: Keying) -> Protection {
        match k {
            Keying::Encrypted => Protection::Encrypted,
            Keying::AuthOnly => Protection::AuthOnly,
        }
    }
}

/// Decodes lowercase or uppercase hex.
pub fn unhex(s: &str, field: &'static str) -> Result<Vec<u8>, DescriptorError> {
    if s.len() % 2 != 0 {
        return Err(DescriptorError::Hex(field));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(DescriptorError::Hex(field))
        })
        .collect()
}

fn digest32(s: &str, field: &'static str) -> Result<[u8; 32], DescriptorError> {
    unhex(s, field)?
        .try_into()
        .map_err(|_| DescriptorError::Hex(field))
}

impl QemuDescriptor {
    /// Reads and checks the format version.
    pub fn load(path: &Path) -> Result<Self, DescriptorError> {
        let text = std::fs::read_to_string(path).map_err(|source| DescriptorError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let d: QemuDescriptor = serde_json::from_str(&text)?;
        if d.format != FORMAT {
            return Err(DescriptorError::Format { got: d.format });
        }
        Ok(d)
    }

    /// Writes the descriptor as JSON.
    pub fn save(&self, path: &Path) -> Result<(), DescriptorError> {
        let text = serde_json::to_string(self)?;
        std::fs::write(path, text).map_err(|source| DescriptorError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Checks that `security` fits the session this descriptor records: a keyed session
    /// needs its key (of its mode), an unkeyed one takes none.
    pub fn check_keyed(
        &self,
        security: Option<&Security>,
    ) -> Result<(), crate::session::SessionError> {
        crate::session::check_protection(self.keying.map(Protection::from), security)
    }

    /// Number of pages of the image.
    pub fn page_count(&self) -> u64 {
        self.mem_bytes.div_ceil(self.page_size.max(1) as u64)
    }

    /// The zero-page map.
    pub fn zero_map(&self) -> Result<PageBitmap, DescriptorError> {
        let bytes = unhex(&self.zero_map, "zero_map")?;
        let pages = self.page_count();
        if (bytes.len() as u64) < pages.div_ceil(8) {
            return Err(DescriptorError::Hex("zero_map"));
        }
        Ok(PageBitmap::from_bytes(pages, &bytes))
    }

    /// The image digest.
    pub fn image_digest(&self) -> Result<[u8; 32], DescriptorError> {
        digest32(&self.image_digest, "image_digest")
    }

    /// The device state blob.
    pub fn device_state(&self) -> Result<Vec<u8>, DescriptorError> {
        unhex(&self.device_state, "device_state")
    }

    /// Refuses a host whose QEMU or kernel/initramfs digests differ from the parent's.
    pub fn check_host(
        &self,
        qemu_version: &str,
        kernel_digest: &str,
        initramfs_digest: &str,
    ) -> Result<(), DescriptorError> {
        if qemu_version != self.qemu_version {
            return Err(DescriptorError::QemuVersion {
                want: self.qemu_version.clone(),
                got: qemu_version.to_string(),
            });
        }
        for (what, want, got) in [
            ("kernel", &self.kernel_digest, kernel_digest),
            ("initramfs", &self.initramfs_digest, initramfs_digest),
        ] {
            if want != got {
                return Err(DescriptorError::Digest {
                    what,
                    want: want.chars().take(16).collect(),
                    got: got.chars().take(16).collect(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> QemuDescriptor {
        let mut zero = PageBitmap::new(10);
        zero.set(3);
        QemuDescriptor {
            format: FORMAT,
            qemu_version: "QEMU emulator version 7.2.0".into(),
            accel: "tcg".into(),
            machine_args: vec!["-M".into(), "microvm".into()],
            mem_bytes: 10 * 4096,
            kernel: "/k".into(),
            kernel_digest: "aa".repeat(32),
            initramfs: "/i".into(),
            initramfs_digest: "bb".repeat(32),
            device_state: mcdist::hex(b"state"),
            image_digest: "cc".repeat(32),
            zero_map: mcdist::hex(&zero.to_bytes()),
            page_size: 4096,
            session_id: 7,
            group: "239.255.0.1:7000".into(),
            server: "10.0.0.1:7001".into(),
            workload: Workload { table_mib: 1 },
            keying: None,
        }
    }

    #[test]
    fn keying_is_recorded_and_checked() {
        use crate::session::SessionError;
        let key = |p| Security {
            protection: p,
            ..Security::new(mcdist::secure::Psk::from_bytes([9; 32]))
        };
        let mut d = sample();
        // Unkeyed: no key taken, and the field is left out of the file.
        assert!(d.check_keyed(None).is_ok());
        assert!(matches!(
            d.check_keyed(Some(&key(Protection::Encrypted))),
            Err(SessionError::NotKeyed)
        ));
        assert!(!serde_json::to_string(&d).unwrap().contains("keying"));
        // Keyed, authentication only: it survives a round trip; no key, or an encrypting
        // key, is refused.
        d.keying = Some(Keying::AuthOnly);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.json");
        d.save(&path).unwrap();
        let back = QemuDescriptor::load(&path).unwrap();
        assert_eq!(back.keying, Some(Keying::AuthOnly));
        assert!(back.check_keyed(Some(&key(Protection::AuthOnly))).is_ok());
        assert!(matches!(
            back.check_keyed(None),
            Err(SessionError::KeyRequired(Protection::AuthOnly))
        ));
        assert!(matches!(
            back.check_keyed(Some(&key(Protection::Encrypted))),
            Err(SessionError::ProtectionMismatch { .. })
        ));
    }

    #[test]
    fn round_trips_and_refuses_other_hosts() {
        let d = sample();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.json");
        d.save(&p).unwrap();
        let back = QemuDescriptor::load(&p).unwrap();
        assert!(back.zero_map().unwrap().get(3));
        assert!(!back.zero_map().unwrap().get(2));
        assert_eq!(back.device_state().unwrap(), b"state");
        assert_eq!(back.image_digest().unwrap(), [0xcc; 32]);
        back.check_host(&d.qemu_version, &d.kernel_digest, &d.initramfs_digest)
            .unwrap();
        let e = back
            .check_host(
                "QEMU emulator version 8.2.0",
                &d.kernel_digest,
                &d.initramfs_digest,
            )
            .unwrap_err();
        assert!(e.to_string().contains("refusing"), "{e}");
        let e = back
            .check_host(&d.qemu_version, &"dd".repeat(32), &d.initramfs_digest)
            .unwrap_err();
        assert!(e.to_string().starts_with("kernel digest differs"), "{e}");
    }

    #[test]
    fn rejects_other_formats_and_bad_hex() {
        let mut d = sample();
        d.format = FORMAT + 1;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.json");
        d.save(&p).unwrap();
        assert!(matches!(
            QemuDescriptor::load(&p),
            Err(DescriptorError::Format { .. })
        ));
        assert!(unhex("zz", "x").is_err());
        assert!(unhex("abc", "x").is_err());
    }
}
