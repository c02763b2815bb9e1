//! Dom0 helper for the real-Xen tests and demo (cargo feature `xen`, run as
//! root in dom0):
//!
//! ```text
//! mcdist-xen-dom0 enable-paging DOMID [PAGES]   # enable mem_paging, evict + reload PAGES pages
//! mcdist-xen-dom0 dump DOMID PAGES FILE         # write gfns 0..PAGES of a paused domain
//! mcdist-xen-dom0 clone-context PARENT CLONE ID N  # parent's vCPU state, rbx=ID rdx=N
//! mcdist-xen-dom0 where DOMID                   # vCPU 0's rip and ring (paused domain)
//! ```

use mcdist_xen::{CpuReg, EvictOutcome, Hypervisor, PageBuf, XenControl, XenHypervisor};
use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mcdist-xen-dom0: {e}");
            ExitCode::FAILURE
        }
    }
}

fn num<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Result<T, String> {
    args.get(i)
        .ok_or_else(|| format!("missing {what}"))?
        .parse()
        .map_err(|_| format!("{what}: not a number: {}", args[i]))
}

fn run(args: &[String]) -> Result<(), String> {
    match args.first().map(String::as_str) {
        Some("enable-paging") => {
            let domid: u32 = num(args, 1, "DOMID")?;
            let pages: u64 = if args.len() > 2 {
                num(args, 2, "PAGES")?
            } else {
                8
            };
            enable_paging(domid, pages)
        }
        Some("dump") => {
            let domid: u32 = num(args, 1, "DOMID")?;
            let pages: u64 = num(args, 2, "PAGES")?;
            let path = args.get(3).ok_or("missing FILE")?;
            let mut ctl = XenControl::open().map_err(|e| e.to_string())?;
            let file = std::fs::File::create(path).map_err(|e| format!("{path}: {e}"))?;
            let mut out = std::io::BufWriter::new(file);
            let t = Instant::now();
            let holes = ctl
                .read_memory(domid, pages, &mut out)
                .map_err(|e| e.to_string())?;
            std::io::Write::flush(&mut out).map_err(|e| format!("{path}: {e}"))?;
            println!(
                "dump: domain {domid}: {pages} pages to {path} ({holes} holes) in {:.3} s",
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Some("clone-context") => {
            let parent: u32 = num(args, 1, "PARENT")?;
            let clone: u32 = num(args, 2, "CLONE")?;
            let id: u64 = num(args, 3, "ID")?;
            let n: u64 = num(args, 4, "N")?;
            let mut ctl = XenControl::open().map_err(|e| e.to_string())?;
            ctl.copy_context(parent, clone, &[(CpuReg::Rbx, id), (CpuReg::Rdx, n)])
                .map_err(|e| e.to_string())?;
            println!("clone-context: domain {clone} has domain {parent}'s vCPU state, id {id} of {n}");
            Ok(())
        }
        Some("where") => {
            let domid: u32 = num(args, 1, "DOMID")?;
            let mut ctl = XenControl::open().map_err(|e| e.to_string())?;
            let (rip, ring) = ctl.vcpu_position(domid).map_err(|e| e.to_string())?;
            println!("where: domain {domid} vcpu0 rip={rip:#x} ring={ring}");
            Ok(())
        }
        _ => Err("usage: mcdist-xen-dom0 enable-paging DOMID [PAGES] | dump DOMID PAGES FILE | clone-context PARENT CLONE ID N | where DOMID".into()),
    }
}

/// Enable mem_paging on a paused domain through the memtap's own backend,
/// then page `pages` gfns out and back in with their content, and disable.
fn enable_paging(domid: u32, pages: u64) -> Result<(), String> {
    let t = Instant::now();
    let mut hv = XenHypervisor::open(domid).map_err(|e| e.to_string())?;
    let max = hv.max_pages().map_err(|e| e.to_string())?;
    let ring = hv.enable_paging().map_err(|e| e.to_string())?;
    drop(ring);
    println!(
        "PAGING_ENABLED domain {domid}: xc_mem_paging_enable ok, ring bound, {max} gfns, {:.3} s",
        t.elapsed().as_secs_f64()
    );
    let mut ctl = XenControl::open().map_err(|e| e.to_string())?;
    let (mut evicted, mut refused, mut reloaded) = (0u64, 0u64, 0u64);
    // Low RAM above the first MiB: ordinary guest pages.
    for gfn in 0x200..0x200 + pages {
        let before = ctl.read_page(domid, gfn).map_err(|e| e.to_string())?;
        match hv.evict(gfn).map_err(|e| e.to_string())? {
            EvictOutcome::NotPageable => {
                refused += 1;
                continue;
            }
            EvictOutcome::Evicted => evicted += 1,
        }
        let mut buf = PageBuf::new(before.len()).map_err(|e| e.to_string())?;
        buf.as_mut_slice().copy_from_slice(&before);
        hv.load(gfn, &mut buf).map_err(|e| e.to_string())?;
        let after = ctl.read_page(domid, gfn).map_err(|e| e.to_string())?;
        if after == before {
            reloaded += 1;
        }
    }
    hv.disable_paging().map_err(|e| e.to_string())?;
    println!(
        "PAGING_ROUNDTRIP domain {domid}: {evicted} evicted, {refused} refused, {reloaded} reloaded intact, paging disabled"
    );
    if evicted == 0 || reloaded != evicted {
        return Err(format!(
            "domain {domid}: {evicted} evicted but {reloaded} reloaded intact"
        ));
    }
    Ok(())
}
