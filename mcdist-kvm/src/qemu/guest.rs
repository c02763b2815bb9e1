//! The guest side: an initramfs of Debian's static busybox whose `/init` fills a table in
//! tmpfs, asks to be forked with a console marker, then (in each clone) reads `ID N` from the
//! console, hashes its share of the table with `sha256sum` and prints a result line that the
//! host checks against its own computation.

use super::descriptor::Workload;
use crate::linux::initramfs::build_initramfs;
use crate::linux::LinuxError;

/// Printed once the table is ready; the parent stops the VM when it sees it.
pub const FORK_MARKER: &str = "MCDIST-FORK-READY";
/// Printed by a clone once it read its id.
pub const CLONE_UP: &str = "MCDIST-CLONE-UP";
/// Prefix of a clone's result line.
pub const RESULT: &str = "MCDIST-RESULT";

/// Size of one table chunk.
pub const CHUNK: usize = 1 << 20;

/// The `/init` script for `w`.
pub fn init_script(w: Workload) -> String {
    let t = w.table_mib;
    format!(
        "#!/bin/sh\n\
         /bin/busybox mount -t proc proc /proc\n\
         /bin/busybox --install -s\n\
         mount -t devtmpfs dev /dev\n\
         mount -t tmpfs -o size={tmp}m tmpfs /tmp\n\
         echo \"MCDIST-BOOTED uptime=$(cut -d' ' -f1 /proc/uptime)\"\n\
         mkdir /tmp/t\n\
         i=0\n\
         while [ $i -lt {t} ]; do yes row-$i | head -c {CHUNK} > /tmp/t/$i; i=$((i+1)); done\n\
         echo \"{FORK_MARKER} chunks=$(ls /tmp/t | wc -l) uptime=$(cut -d' ' -f1 /proc/uptime)\"\n\
         read id n\n\
         echo \"{CLONE_UP} id=$id n=$n\"\n\
         last=$(({t} - 1))\n\
         sha=$(for i in $(seq $id $n $last); do cat /tmp/t/$i; done | sha256sum | cut -d' ' -f1)\n\
         echo \"{RESULT} id=$id n=$n sha256=$sha\"\n\
         poweroff -f\n",
        tmp = t + 16,
    )
}

/// The initramfs for `w` built from the static busybox at `busybox`.
pub fn initramfs(busybox: &[u8], w: Workload) -> Result<Vec<u8>, LinuxError> {
    build_initramfs(busybox, &init_script(w))
}

/// Chunk `i` of the table, as the guest writes it (`yes row-$i | head -c CHUNK`).
pub fn chunk(i: u32) -> Vec<u8> {
    let line = format!("row-{i}\n");
    line.as_bytes()
        .iter()
        .copied()
        .cycle()
        .take(CHUNK)
        .collect()
}

/// The SHA-256 (hex) clone `id` of `n` must print.
pub fn expected(w: Workload, id: u32, n: u32) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    if n > 0 {
        for i in (id..w.table_mib).step_by(n as usize) {
            ctx.update(&chunk(i));
        }
    }
    mcdist::hex(ctx.finish().as_ref())
}

/// Parses `MCDIST-RESULT id=I n=N sha256=H` into `(I, N, H)`.
pub fn parse_result(line: &str) -> Option<(u32, u32, String)> {
    let rest = line.trim().strip_prefix(RESULT)?;
    let mut id = None;
    let mut n = None;
    let mut sha = None;
    for kv in rest.split_whitespace() {
        match kv.split_once('=') {
            Some(("id", v)) => id = v.parse().ok(),
            Some(("n", v)) => n = v.parse().ok(),
            Some(("sha256", v)) => sha = Some(v.to_string()),
            _ => {}
        }
    }
    Some((id?, n?, sha?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_and_expected_digests() {
        let c = chunk(3);
        assert_eq!(c.len(), CHUNK);
        assert!(c.starts_with(b"row-3\nrow-3\n"));
        let w = Workload { table_mib: 2 };
        // A clone beyond the table hashes nothing.
        assert_eq!(
            expected(w, 5, 8),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_ne!(expected(w, 0, 2), expected(w, 1, 2));
        assert_eq!(
            parse_result("MCDIST-RESULT id=1 n=2 sha256=ab\r"),
            Some((1, 2, "ab".into()))
        );
        assert_eq!(parse_result("MCDIST-RESULT id=x"), None);
        assert!(init_script(w).contains(FORK_MARKER));
    }
}
