//! A lazy memory file over FUSE: one file, the image's size, whose reads are answered from
//! the descriptor's zero map locally and from one mcdist client per host otherwise.
//!
//! VMMs that map guest RAM from a file (QEMU's `memory-backend-file,share=off`) map it
//! MAP_PRIVATE, so the kernel's page cache is the per-host cache shared by every clone on the
//! host and every write stays private to its clone. Reads stay at one page: the mount asks for
//! no readahead (and the QEMU launcher turns QEMU's `MADV_HUGEPAGE` into a no-op).
//!
//! Rules: many reads are outstanding at once (a READ waiting for the network does not block
//! the FUSE loop); pages the server sends unasked are stored into the page cache with
//! `notify_store`; once the session is lost every read of a missing page fails with EIO, never
//! with zeros. Every page the file stores was verified first by the host's mcdist client,
//! against the image's root digest from the descriptor (the BLAKE3 tree's hash pages above it).

mod host;
mod store;

pub use host::{HostFile, HostFileError, HostFileOptions};
pub use store::{percentiles, FuseCounters, PageStore};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry,
    ReplyOpen, Request,
};
use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Inode of the one file.
const FILE_INO: INodeNo = INodeNo(2);

/// Errors mounting the lazy file.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    /// `/dev/fuse` is absent.
    #[error("/dev/fuse is missing: install Debian's fuse3 package and load the fuse module")]
    Missing,
    /// The mount failed.
    #[error("mounting FUSE on {path}: {source}")]
    Mount {
        /// The mount point.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Why FUSE cannot be used here, if it cannot.
pub fn unavailable() -> Option<&'static str> {
    (!Path::new("/dev/fuse").exists()).then_some("/dev/fuse is missing (Debian's fuse3 package)")
}

/// The filesystem: a root directory holding one read-only file.
struct LazyFs {
    store: Arc<PageStore>,
    name: String,
    uid: u32,
    gid: u32,
}

impl LazyFs {
    fn attr(&self, ino: INodeNo) -> FileAttr {
        let file = ino == FILE_INO;
        let t = SystemTime::UNIX_EPOCH;
        let size = if file { self.store.image_size() } else { 0 };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: if file {
                FileType::RegularFile
            } else {
                FileType::Directory
            },
            // Writable bits so a VMM may open the file O_RDWR to map it MAP_PRIVATE; WRITE
            // itself is refused.
            perm: if file { 0o600 } else { 0o755 },
            nlink: if file { 1 } else { 2 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

const TTL: Duration = Duration::from_secs(3600);

impl Filesystem for LazyFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // One byte rounds down to zero readahead pages in the kernel (fuser refuses 0).
        let _ = config.set_max_readahead(1);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name.to_str() == Some(self.name.as_str()) {
            reply.entry(&TTL, &self.attr(FILE_INO), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == FILE_INO || ino == INodeNo::ROOT {
            reply.attr(&TTL, &self.attr(ino));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino != FILE_INO {
            reply.error(Errno::EISDIR);
            return;
        }
        // Keep the page cache across opens: every clone on this host shares it.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        if ino != FILE_INO {
            reply.error(Errno::EISDIR);
            return;
        }
        self.store.read(offset, size, reply);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (FILE_INO, FileType::RegularFile, self.name.as_str()),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// A mounted lazy file; unmounted on drop.
pub struct LazyMount {
    session: Option<fuser::BackgroundSession>,
    store: Arc<PageStore>,
    path: std::path::PathBuf,
}

impl std::fmt::Debug for LazyMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyMount")
            .field("path", &self.path)
            .finish()
    }
}

impl LazyMount {
    /// Mounts `store` on directory `mountpoint` as the file `name`. Requests for missing
    /// pages go to the store's requester; unasked pages are pushed into the page cache.
    pub fn mount(mountpoint: &Path, name: &str, store: Arc<PageStore>) -> Result<Self, FuseError> {
        if unavailable().is_some() {
            return Err(FuseError::Missing);
        }
        let fs = LazyFs {
            store: store.clone(),
            name: name.to_string(),
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
        };
        let mut cfg = Config::default();
        cfg.mount_options = vec![
            MountOption::FSName("mcdist".into()),
            MountOption::Subtype("mcdist".into()),
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
        ];
        let session =
            fuser::spawn_mount(fs, mountpoint, &cfg).map_err(|source| FuseError::Mount {
                path: mountpoint.to_path_buf(),
                source,
            })?;
        let notifier = session.notifier();
        store.set_storer(move |offset, data| notifier.store(FILE_INO, offset, data).is_ok());
        Ok(Self {
            session: Some(session),
            store,
            path: mountpoint.join(name),
        })
    }

    /// Path of the lazy file.
    pub fn file(&self) -> &Path {
        &self.path
    }

    /// The page store (counters, latencies).
    pub fn store(&self) -> &Arc<PageStore> {
        &self.store
    }

    /// Unmounts now.
    pub fn unmount(mut self) -> io::Result<()> {
        match self.session.take() {
            Some(s) => s.umount_and_join(),
            None => Ok(()),
        }
    }
}

impl Drop for LazyMount {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = s.umount_and_join();
        }
    }
}
