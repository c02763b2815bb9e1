//! An initramfs built at run time: a cpio "newc" archive with busybox (static) and an `/init`
//! shell script.

use super::LinuxError;

/// A cpio "newc" archive being written.
#[derive(Debug, Default)]
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let name_z = name.len() + 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name_z as u32,
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    /// Adds a directory.
    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, (0, 0), &[]);
    }

    /// Adds a regular file with permission bits `perm`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | (perm & 0o7777), (0, 0), data);
    }

    /// Adds a symbolic link `name` → `target`.
    pub fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120_777, (0, 0), target.as_bytes());
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.entry(name, 0o020_000 | (perm & 0o7777), (major, minor), &[]);
    }

    /// Finishes the archive.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        while self.buf.len() % 512 != 0 {
            self.buf.push(0);
        }
        self.buf
    }
}

/// Builds the initramfs: `busybox` (a static binary) at `/bin/busybox`, applet links for
/// `sh`, and `init_script` as `/init`.
pub fn build_initramfs(busybox: &[u8], init_script: &str) -> Result<Vec<u8>, LinuxError> {
    if busybox.len() < 4 || &busybox[..4] != b"\x7fELF" {
        return Err(LinuxError::BadBusybox("not an ELF file"));
    }
    let mut c = Cpio::new();
    for d in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp",
    ] {
        c.dir(d);
    }
    c.char_dev("dev/console", 0o600, 5, 1);
    c.char_dev("dev/null", 0o666, 1, 3);
    c.file("bin/busybox", 0o755, busybox);
    c.symlink("bin/sh", "busybox");
    c.file("init", 0o755, init_script.as_bytes());
    Ok(c.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_headers_are_well_formed() {
        let mut c = Cpio::new();
        c.file("init", 0o755, b"#!/bin/sh\n");
        let a = c.finish();
        assert_eq!(&a[..6], b"070701");
        let namesize = u32::from_str_radix(std::str::from_utf8(&a[94..102]).unwrap(), 16).unwrap();
        assert_eq!(namesize, 5);
        assert_eq!(&a[110..114], b"init");
        let size = u32::from_str_radix(std::str::from_utf8(&a[54..62]).unwrap(), 16).unwrap();
        assert_eq!(size, 10);
        // name "init\0" ends at 115, padded to 116; data follows.
        assert_eq!(&a[116..126], b"#!/bin/sh\n");
        let trailer = a.windows(10).position(|w| w == b"TRAILER!!!");
        assert!(trailer.is_some());
        assert_eq!(a.len() % 512, 0);
    }
}
