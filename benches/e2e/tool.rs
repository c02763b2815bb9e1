//! The tools the bench compares, their names, and whether each can run here.

use super::Bench;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Something that distributes a file to N receivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// mcdist over multicast without FEC (`serve --fec off` where the build takes it: FEC
    /// is `serve`'s default now, and this row keeps one meaning for every build).
    Mcdist,
    /// mcdist over multicast from another build (`--baseline PATH`), to compare two builds
    /// in the same run.
    McdistBase,
    /// The `--baseline` build with FEC (`--fec`), to compare two builds' FEC in the same run.
    McdistBaseFec,
    /// mcdist over multicast with FEC repair symbols (`--fec`, when the binary offers it;
    /// `serve`'s default configuration).
    McdistFec,
    /// mcdist with UDP GSO on the server and UDP GRO on the receivers (`--gso on`, `--gro on`).
    McdistGso,
    /// mcdist with UDP GSO and GRO off (`--gso off`, `--gro off`): one datagram per buffer.
    McdistNoGso,
    /// mcdist sending to each receiver by unicast.
    McdistUnicast,
    /// mcdist over multicast with a pre-shared key, authenticated only (`--key --auth-only`).
    McdistAuth,
    /// mcdist over multicast with a pre-shared key, encrypted (`--key`).
    McdistEnc,
    /// uftp / uftpd (Debian package `uftp`).
    Uftp,
    /// udp-sender / udp-receiver (Debian package `udpcast`).
    Udpcast,
    /// udpcast with its FEC (`--fec 8x8/128`).
    UdpcastFec,
}

impl Tool {
    /// Every tool, in table order.
    pub const ALL: [Tool; 8] = [
        Tool::Mcdist,
        Tool::McdistFec,
        Tool::McdistUnicast,
        Tool::McdistAuth,
        Tool::McdistEnc,
        Tool::Uftp,
        Tool::Udpcast,
        Tool::UdpcastFec,
    ];

    /// The variants that run only when asked for.
    pub const EXTRA: [Tool; 4] = [
        Tool::McdistBase,
        Tool::McdistBaseFec,
        Tool::McdistGso,
        Tool::McdistNoGso,
    ];

    /// Every tool that can be named on the command line: [`Tool::ALL`], then
    /// [`Tool::EXTRA`].
    pub const NAMED: [Tool; 12] = {
        let mut named = [Tool::Mcdist; 12];
        let mut i = 0;
        while i < named.len() {
            named[i] = if i < Tool::ALL.len() {
                Tool::ALL[i]
            } else {
                Tool::EXTRA[i - Tool::ALL.len()]
            };
            i += 1;
        }
        named
    };

    /// Name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Tool::Mcdist => "mcdist",
            Tool::McdistBase => "mcdist-base",
            Tool::McdistBaseFec => "mcdist-base-fec",
            Tool::McdistFec => "mcdist-fec",
            Tool::McdistGso => "mcdist-gso",
            Tool::McdistNoGso => "mcdist-nogso",
            Tool::McdistUnicast => "mcdist-unicast",
            Tool::McdistAuth => "mcdist-auth",
            Tool::McdistEnc => "mcdist-enc",
            Tool::Uftp => "uftp",
            Tool::Udpcast => "udpcast",
            Tool::UdpcastFec => "udpcast-fec",
        }
    }

    /// Parse a name.
    pub fn from_name(s: &str) -> Option<Tool> {
        Tool::NAMED.into_iter().find(|t| t.name() == s)
    }

    /// The tool that runs the `--baseline` build the way this one runs the build under
    /// test (`mcdist-base` for `mcdist`, `mcdist-base-fec` for `mcdist-fec`).
    pub fn baseline(self) -> Option<Tool> {
        match self {
            Tool::Mcdist => Some(Tool::McdistBase),
            Tool::McdistFec => Some(Tool::McdistBaseFec),
            _ => None,
        }
    }

    /// True for the tools that run the `--baseline` build.
    pub fn runs_baseline(self) -> bool {
        matches!(self, Tool::McdistBase | Tool::McdistBaseFec)
    }

    /// True for the FEC variants.
    pub fn fec(self) -> bool {
        matches!(
            self,
            Tool::McdistFec | Tool::McdistBaseFec | Tool::UdpcastFec
        )
    }

    /// Why this tool cannot run here, if it cannot.
    pub fn missing(self, bench: &Bench) -> Option<String> {
        match self {
            Tool::Mcdist | Tool::McdistUnicast | Tool::McdistAuth | Tool::McdistEnc => None,
            Tool::McdistBase | Tool::McdistBaseFec => match &bench.baseline {
                Some(p) if p.is_file() => None,
                Some(p) => Some(format!("baseline binary {} not found", p.display())),
                None => Some("needs --baseline PATH (another mcdist build)".into()),
            },
            Tool::McdistGso | Tool::McdistNoGso => lacks_serve_flag(bench, "--gso"),
            Tool::McdistFec => lacks_serve_flag(bench, "--fec"),
            Tool::Uftp => ["uftp", "uftpd"]
                .iter()
                .find(|p| !on_path(p))
                .map(|p| format!("`{p}` not installed (Debian package uftp)")),
            Tool::Udpcast | Tool::UdpcastFec => ["udp-sender", "udp-receiver"]
                .iter()
                .find(|p| !on_path(p))
                .map(|p| format!("`{p}` not installed (Debian package udpcast)")),
        }
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

/// The `mcdist` binary in the directory of the running program, if there is one.
pub fn mcdist_next_to_me() -> Option<PathBuf> {
    let me = std::env::current_exe().ok()?;
    let p = me.parent()?.join("mcdist");
    p.is_file().then_some(p)
}

/// `None` when `mcdist serve --help` offers `flag` (or cannot be asked), else why the tool cannot run.
fn lacks_serve_flag(bench: &Bench, flag: &str) -> Option<String> {
    match serve_help_has(&bench.mcdist, flag) {
        Some(false) => Some(format!("this mcdist binary has no `serve {flag}`")),
        _ => None,
    }
}

/// Whether `bin serve --help` contains `text` (`None` when it cannot be asked).
pub(super) fn serve_help_has(bin: &Path, text: &str) -> Option<bool> {
    let help = Command::new(bin).args(["serve", "--help"]).output().ok()?;
    Some(String::from_utf8_lossy(&help.stdout).contains(text))
}
