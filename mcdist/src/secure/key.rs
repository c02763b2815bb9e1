//! Keys: the pre-shared key ([`Psk`]), how it is parsed and loaded from a
//! file (with a permission check), and the per-sender datagram key derived
//! from it (`BLAKE3-derive_key(CONTEXT, psk ‖ session ‖ role ‖ sender_id)`)
//! with its counter nonce. A key is used by one sender only, so a
//! (key, nonce) pair never repeats.

use super::{Role, PSK_LEN};
use ring::aead::{LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// BLAKE3 key-derivation context for per-sender datagram keys.
const KDF_CONTEXT: &str = "mcdist 2026-11 per-sender AES-256-GCM datagram key v1";

/// A 256-bit pre-shared key. Its `Debug` output never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct Psk([u8; PSK_LEN]);

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Psk(<redacted>)")
    }
}

impl Drop for Psk {
    fn drop(&mut self) {
        // Best effort: the optimiser may keep other copies.
        self.0.fill(0);
    }
}

/// Errors reading or parsing a pre-shared key.
#[derive(Debug, Error)]
pub enum KeyError {
    /// The key file could not be read.
    #[error("cannot read key file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The key file is larger than any key file (a device such as `/dev/zero`, or the
    /// wrong file).
    #[error(
        "key file {path} is larger than {limit} bytes; a key is 32 raw bytes or 64 hex digits"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The most bytes a key file may hold.
        limit: u64,
    },
    /// The key is neither 32 raw bytes nor 64 hex digits.
    #[error("a key must be 32 raw bytes or 64 hex digits; got {len} bytes")]
    BadFormat {
        /// Length of what was found (after trimming whitespace).
        len: usize,
    },
}

/// Most bytes a key file may hold: 64 hex digits with generous surrounding whitespace.
/// Longer files are refused without reading them further.
pub const MAX_KEY_FILE_LEN: u64 = 4096;

/// A key read from a file, with a warning if the file is readable by others.
#[derive(Debug)]
pub struct LoadedKey {
    /// The key.
    pub psk: Psk,
    /// Set when the file's permissions let group or others read it.
    pub permission_warning: Option<String>,
}

impl Psk {
    /// A key from its bytes.
    pub fn from_bytes(bytes: [u8; PSK_LEN]) -> Psk {
        Psk(bytes)
    }

    /// A fresh random key (from `rand`'s thread generator, a CSPRNG seeded by
    /// the operating system).
    pub fn generate() -> Psk {
        Psk(rand::random())
    }

    /// Parse 32 raw bytes, or 64 hex digits (surrounding whitespace ignored).
    pub fn parse(data: &[u8]) -> Result<Psk, KeyError> {
        if let Ok(raw) = <[u8; PSK_LEN]>::try_from(data) {
            return Ok(Psk(raw));
        }
        let text = data.trim_ascii();
        if text.len() == 2 * PSK_LEN {
            let mut k = [0u8; PSK_LEN];
            let mut ok = true;
            for (i, pair) in text.chunks_exact(2).enumerate() {
                match (hex_val(pair[0]), hex_val(pair[1])) {
                    (Some(h), Some(l)) => k[i] = (h << 4) | l,
                    _ => ok = false,
                }
            }
            if ok {
                return Ok(Psk(k));
            }
        }
        Err(KeyError::BadFormat { len: text.len() })
    }

    /// Read a key file (32 raw bytes or 64 hex digits, at most [`MAX_KEY_FILE_LEN`]
    /// bytes: more is refused after reading that many). A file readable by
    /// group or others still loads, with a warning to show the user.
    pub fn load(path: &Path) -> Result<LoadedKey, KeyError> {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        let read_err = |source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read_err)?;
        let mode = meta.permissions().mode();
        let permission_warning = (mode & 0o077 != 0).then(|| {
            format!(
                "key file {} has mode {:04o}: group or others can read or change it; \
                 anyone who can read it can forge pages (run: chmod 600 {})",
                path.display(),
                mode & 0o7777,
                path.display()
            )
        });
        // Read at most one byte past the limit (a device or a FIFO has no useful size).
        let mut data = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_KEY_FILE_LEN + 1).read_to_end(&mut data))
            .map_err(read_err)?;
        if data.len() as u64 > MAX_KEY_FILE_LEN {
            data.fill(0);
            return Err(KeyError::TooLarge {
                path: path.to_path_buf(),
                limit: MAX_KEY_FILE_LEN,
            });
        }
        let psk = Psk::parse(&data);
        data.fill(0);
        Ok(LoadedKey {
            psk: psk?,
            permission_warning,
        })
    }

    /// The key as 64 lowercase hex digits (for writing a key file).
    pub fn to_hex(&self) -> String {
        crate::hex(&self.0)
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

pub(super) fn derive_key(psk: &Psk, session: u64, role: Role, sender: u64) -> Option<LessSafeKey> {
    let mut m = [0u8; PSK_LEN + 8 + 1 + 8];
    m[..PSK_LEN].copy_from_slice(&psk.0);
    m[PSK_LEN..PSK_LEN + 8].copy_from_slice(&session.to_be_bytes());
    m[PSK_LEN + 8] = role.byte();
    m[PSK_LEN + 9..].copy_from_slice(&sender.to_be_bytes());
    let mut k = blake3::derive_key(KDF_CONTEXT, &m);
    m.fill(0);
    let key = UnboundKey::new(&AES_256_GCM, &k).ok().map(LessSafeKey::new);
    k.fill(0);
    key
}

pub(super) fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}
