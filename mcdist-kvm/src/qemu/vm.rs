//! One QEMU process: serial console on a pipe (read line by line on a thread, written for
//! input), QMP on a unix socket, killed on drop.

use super::qmp::{Qmp, QmpError};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A console line and when it arrived.
pub type Line = (Instant, String);

/// A running QEMU.
#[derive(Debug)]
pub struct QemuVm {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<Line>,
    stderr: Arc<Mutex<String>>,
    /// QMP connection.
    pub qmp: Qmp,
    /// When the process was started.
    pub started: Instant,
    /// Every console line seen so far.
    pub console: Vec<String>,
}

impl QemuVm {
    /// Starts `qemu` with `args` plus console and QMP wiring; `launcher` installs the
    /// `MADV_HUGEPAGE` filter before exec.
    pub fn spawn(
        qemu: &Path,
        args: &[String],
        qmp_path: &Path,
        launcher: bool,
    ) -> Result<Self, QmpError> {
        let _ = std::fs::remove_file(qmp_path);
        let mut cmd = Command::new(qemu);
        cmd.args(args)
            .args(["-display", "none", "-chardev", "stdio,id=s0,signal=off"])
            .args(["-serial", "chardev:s0", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if launcher {
            super::sys::neutralise_madvise_hugepage(&mut cmd);
        }
        let started = Instant::now();
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take();
        let (tx, lines) = std::sync::mpsc::channel();
        if let Some(out) = stdout {
            std::thread::spawn(move || {
                let mut r = BufReader::new(out);
                let mut buf = Vec::new();
                while r.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
                    let s = String::from_utf8_lossy(&buf).trim_end().to_string();
                    buf.clear();
                    if tx.send((Instant::now(), s)).is_err() {
                        break;
                    }
                }
            });
        }
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(mut err) = child.stderr.take() {
            let sink = stderr.clone();
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = err.read_to_string(&mut s);
                sink.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push_str(&s);
            });
        }
        let stdin = child.stdin.take();
        let qmp = match Qmp::connect(qmp_path, Duration::from_secs(30)) {
            Ok(q) => q,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        Ok(Self {
            child,
            stdin,
            lines,
            stderr,
            qmp,
            started,
            console: Vec::new(),
        })
    }

    /// Writes `text` to the serial console.
    pub fn send(&mut self, text: &str) -> std::io::Result<()> {
        match &mut self.stdin {
            Some(s) => s.write_all(text.as_bytes()).and_then(|()| s.flush()),
            None => Err(std::io::ErrorKind::BrokenPipe.into()),
        }
    }

    /// Waits for a console line starting with `prefix`; `None` when QEMU closed the console
    /// (exited) or `timeout` passed.
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> Option<Line> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((t, l)) => {
                    self.console.push(l.clone());
                    if let Some(pos) = l.find(prefix) {
                        return Some((t, l[pos..].to_string()));
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// What QEMU wrote to stderr so far (last lines).
    pub fn stderr_tail(&self) -> String {
        let s = self.stderr.lock().unwrap_or_else(PoisonError::into_inner);
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(3)..].join(" | ")
    }

    /// Waits up to `timeout` for QEMU to exit; kills it after that. Returns whether it
    /// exited by itself, with its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> (bool, Option<std::process::ExitStatus>) {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) => return (true, Some(s)),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    let _ = self.child.kill();
                    return (false, self.child.wait().ok());
                }
            }
        }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
