//! `mcdist-qemu`: clone a real Linux guest under QEMU with its RAM served lazily by mcdist.
//!
//! - `fork --clones N --mem-mib M [--hosts H] [--key FILE] [--unicast] [--rate MBIT]`: boot a
//!   parent, freeze it at its fork marker, serve its RAM from a network namespace (sending at most
//!   `MBIT` Mbit/s, 1000 by default), run the clones on `H` clone hosts (namespaces on a bridge,
//!   one `mcdist-fuse` each) and check every result.
//! - `serve --descriptor D --image RAM`: the memory server for a frozen parent.
//! - `clone --descriptor D --ram FILE --id I --count N`: one clone from a descriptor.

#[path = "common/session_args.rs"]
mod session_args;

use clap::{Parser, Subcommand};
use mcdist_kvm::qemu::clone::{check_host, run_clone, CloneSpec};
use mcdist_kvm::qemu::descriptor::QemuDescriptor;
use mcdist_kvm::qemu::fork::{fork, print_table, serve, ForkOptions, MemoryMode};
use session_args::KeyArgs;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Clone a Linux guest under QEMU with lazy mcdist memory"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Boot, freeze and clone; exits 0 only if every clone's result is correct.
    Fork {
        /// Clones in all.
        #[arg(long, default_value_t = 4)]
        clones: u32,
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 256)]
        mem_mib: u32,
        /// Clone hosts (network namespaces on a bridge).
        #[arg(long, default_value_t = 2)]
        hosts: usize,
        /// MiB of table the parent fills in tmpfs before the fork.
        #[arg(long, default_value_t = 64)]
        table_mib: u32,
        #[command(flatten)]
        key: KeyArgs,
        /// Replies by unicast to each host instead of multicast.
        #[arg(long)]
        unicast: bool,
        /// The memory server's highest send rate in Mbit/s: the parent host's uplink,
        /// which unicast replies to every host share (the rate follows the hosts below it).
        #[arg(long, value_name = "MBIT", default_value_t = 1000,
              value_parser = clap::value_parser!(u64).range(1..=100_000))]
        rate: u64,
        /// Where clones get memory: lazy (mcdist-fuse), eager (whole image fetched to each
        /// host first), local (the parent's own RAM file; the ideal), fuse-local (a FUSE file
        /// answering READs from the parent's RAM file; the READ latency baseline).
        #[arg(long, value_enum, default_value = "lazy")]
        memory: MemoryMode,
        /// Work folder (default: a fresh temporary one).
        #[arg(long)]
        workdir: Option<PathBuf>,
        /// Kill the memory server when the first clone resumed (clones must fail closed).
        #[arg(long, hide = true)]
        kill_server_at_resume: bool,
        /// Seconds each clone may run.
        #[arg(long, default_value_t = 600)]
        clone_timeout: u64,
    },
    /// Serve a frozen parent's RAM file (run inside the server's namespace).
    Serve {
        /// The descriptor.
        #[arg(long)]
        descriptor: PathBuf,
        /// The frozen RAM file.
        #[arg(long)]
        image: PathBuf,
        /// Interface that carries the group.
        #[arg(long, default_value = "eth0")]
        iface: String,
        #[command(flatten)]
        key: KeyArgs,
        /// Unicast replies.
        #[arg(long)]
        unicast: bool,
        /// The memory server's highest send rate in Mbit/s: the parent host's uplink,
        /// which unicast replies to every host share (the rate follows the hosts below it).
        #[arg(long, value_name = "MBIT", default_value_t = 1000,
              value_parser = clap::value_parser!(u64).range(1..=100_000))]
        rate: u64,
        /// Also sweep the whole image, in order, after demand and push: what hosts
        /// that fetch the whole image before their clones start (the eager mode)
        /// are served with, as `mcdist serve` serves `mcdist fetch`.
        #[arg(long)]
        sweep: bool,
    },
    /// Run one clone from a descriptor with RAM from `--ram` (a host's lazy file).
    Clone {
        /// The descriptor.
        #[arg(long)]
        descriptor: PathBuf,
        /// The RAM file (mapped MAP_PRIVATE).
        #[arg(long)]
        ram: PathBuf,
        /// Clone id.
        #[arg(long, default_value_t = 0)]
        id: u32,
        /// Clones in all.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Scratch folder.
        #[arg(long)]
        workdir: Option<PathBuf>,
    },
}

fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn scratch(dir: Option<PathBuf>) -> Result<(PathBuf, Option<tempfile_dir::Dir>), String> {
    match dir {
        Some(d) => Ok((d, None)),
        None => {
            let d = tempfile_dir::Dir::new().map_err(|e| format!("creating a work folder: {e}"))?;
            Ok((d.path.clone(), Some(d)))
        }
    }
}

/// A temporary folder removed on drop (the RAM file can be large).
mod tempfile_dir {
    use std::path::PathBuf;
    pub struct Dir {
        pub path: PathBuf,
    }
    impl Dir {
        pub fn new() -> std::io::Result<Self> {
            let base = std::env::var_os("TMPDIR").unwrap_or_else(|| "/var/tmp".into());
            let path = PathBuf::from(base).join(format!(
                "mcdist-qemu-{}-{:x}",
                std::process::id(),
                rand::random::<u32>()
            ));
            std::fs::create_dir_all(&path)?;
            Ok(Self { path })
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn run(cli: Cli) -> Result<bool, String> {
    match cli.cmd {
        Cmd::Fork {
            clones,
            mem_mib,
            hosts,
            table_mib,
            key,
            unicast,
            rate,
            memory,
            workdir,
            kill_server_at_resume,
            clone_timeout,
        } => {
            if clones == 0 || hosts == 0 || hosts > 200 {
                return Err("--clones must be at least 1 and --hosts within 1..=200".into());
            }
            let (workdir, _keep) = scratch(workdir)?;
            let opts = ForkOptions {
                clones,
                hosts,
                mem_mib,
                table_mib,
                key: key.key,
                auth_only: key.auth_only,
                unicast,
                rate_mbit: rate,
                memory,
                workdir,
                fuse_bin: sibling("mcdist-fuse"),
                self_bin: std::env::current_exe().map_err(|e| e.to_string())?,
                kill_server_at_resume,
                clone_timeout: Duration::from_secs(clone_timeout.max(1)),
            };
            let report = fork(&opts).map_err(|e| e.to_string())?;
            print_table(&report);
            println!("{}", report.summary);
            Ok(report.all_ok())
        }
        Cmd::Serve {
            descriptor,
            image,
            iface,
            key,
            unicast,
            rate,
            sweep,
        } => {
            let desc = QemuDescriptor::load(&descriptor).map_err(|e| e.to_string())?;
            let security = key.checked(|sec| desc.check_keyed(sec).map_err(|e| e.to_string()))?;
            serve(&desc, &image, &iface, security, unicast, sweep, rate)
                .map_err(|e| e.to_string())?;
            Ok(true)
        }
        Cmd::Clone {
            descriptor,
            ram,
            id,
            count,
            workdir,
        } => {
            let desc = QemuDescriptor::load(&descriptor).map_err(|e| e.to_string())?;
            let qemu = mcdist_kvm::qemu::find_qemu().map_err(|e| e.to_string())?;
            check_host(&desc, &qemu).map_err(|e| e.to_string())?;
            let (workdir, _keep) = scratch(workdir)?;
            let spec = CloneSpec {
                id,
                count: count.max(1),
                host: 0,
                ram,
                workdir,
                timeout: Duration::from_secs(600),
            };
            let out = run_clone(&desc, &qemu, &spec, &|| {});
            println!(
                "clone {id}: resume {:.0} ms, result {}",
                out.resume_ms,
                if out.ok() {
                    "ok".to_string()
                } else {
                    out.error.clone().unwrap_or_else(|| "wrong digest".into())
                }
            );
            Ok(out.ok())
        }
    }
}

fn main() {
    match run(Cli::parse()) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("mcdist-qemu: {e}");
            std::process::exit(1);
        }
    }
}
