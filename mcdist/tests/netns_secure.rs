//! Keyed `mcdist serve` and `mcdist fetch` processes in separate network
//! namespaces on a bridge, over real UDP multicast: receivers with the key get
//! the exact image (encrypted and authenticated-only), a receiver without it
//! gets nothing, and a group-readable key file draws a warning.

mod common;

use common::{Bridge, BIN};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

fn output(mut c: std::process::Child) -> (bool, String, String) {
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = c.stdout.take() {
        o.read_to_string(&mut out).unwrap();
    }
    if let Some(mut e) = c.stderr.take() {
        e.read_to_string(&mut err).unwrap();
    }
    (c.wait().unwrap().success(), out, err)
}

#[test]
fn keyed_serve_and_fetch_over_a_bridge() {
    let Some(b) = Bridge::new("mcsec", 4, 53, 24, Some(4), 777) else {
        return;
    };
    let key = b.path("key");
    let st = Command::new(BIN)
        .args(["keygen", "--out"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(st.success());
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "keygen writes a private key file");
    // The same key in a file others can read.
    let loose_key = b.path("loose-key");
    std::fs::copy(&key, &loose_key).unwrap();
    std::fs::set_permissions(&loose_key, std::fs::Permissions::from_mode(0o644)).unwrap();

    let group = &b.group(1);
    let server = b
        .serve(group)
        .args(["--clients", "2", "--exit-when-done", "--timeout", "120"])
        .arg("--key")
        .arg(&key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // A receiver without the key: it must never see the session.
    let keyless_out = b.path("keyless");
    let keyless = b
        .fetch(3, group, "3", &keyless_out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut fetchers = Vec::new();
    for (i, (k, auth_only)) in [(&key, false), (&loose_key, true)].into_iter().enumerate() {
        let host = i + 1;
        let out = b.path(&format!("out{host}"));
        let mut cmd = b.fetch(host, group, "120", &out);
        cmd.arg("--key").arg(k);
        if auth_only {
            cmd.arg("--auth-only");
        }
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        fetchers.push((out, auth_only, child));
    }
    let want = std::fs::read(&b.img).unwrap();
    for (out, auth_only, child) in fetchers {
        let (ok, text, err) = output(child);
        println!("{}", text.trim());
        assert!(ok, "keyed fetch failed: {text} {err}");
        assert!(text.contains("digest ok"), "{text}");
        assert!(text.contains("security:"), "{text}");
        assert!(
            std::fs::read(&out).unwrap() == want,
            "{} differs",
            out.display()
        );
        assert_eq!(
            err.contains("chmod 600"),
            auth_only,
            "the warning is given for the loose key file only: {err}"
        );
    }
    let (ok, text, err) = output(server);
    println!("{}", text.trim());
    assert!(ok, "server failed: {text} {err}");
    assert!(text.contains("security encrypted"), "{text}");
    assert!(text.contains("done: 2 receivers"), "{text}");
    let unauth: u64 = text
        .split("unauthenticated ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .expect("security counters in the server summary");
    assert!(
        unauth > 0,
        "the keyless receiver's joins were counted: {text}"
    );
    let (ok, text, err) = output(keyless);
    println!("keyless: {} {}", text.trim(), err.trim());
    assert!(!ok, "a receiver without the key must not get the image");
    assert!(err.contains("unauthenticated"), "it says once: {err}");
    assert!(err.contains("no announce"), "{err}");
    assert!(!keyless_out.exists());
}

/// A fetch with the key requires encryption: against a server run with `--auth-only` it
/// takes none of its (authentic, clear) datagrams and fails at once with one line naming
/// the mismatch; with `--require-encryption off` the same fetch succeeds.
#[test]
fn an_encrypting_fetch_refuses_an_auth_only_server() {
    let Some(b) = Bridge::new("mcclr", 3, 57, 1, None, 0) else {
        return;
    };
    let key = b.path("key");
    assert!(Command::new(BIN)
        .args(["keygen", "--out"])
        .arg(&key)
        .status()
        .unwrap()
        .success());
    let group = &b.group(1);
    let server = b
        .serve(group)
        .args(["--clients", "1", "--exit-when-done", "--timeout", "120"])
        .arg("--key")
        .arg(&key)
        .arg("--auth-only")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let strict_out = b.path("strict");
    let strict = b
        .fetch(1, group, "120", &strict_out)
        .arg("--key")
        .arg(&key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (ok, text, err) = output(strict);
    assert!(
        !ok,
        "an encrypting fetch took pages sent in the clear: {text}"
    );
    let line = err
        .lines()
        .find(|l| l.starts_with("mcdist: error:"))
        .unwrap_or("");
    assert!(line.contains("in the clear (--auth-only)"), "{err}");
    assert!(line.contains("requires encryption"), "{err}");
    assert_eq!(err.matches("mcdist: error:").count(), 1, "{err}");
    assert!(!strict_out.exists());
    let loose_out = b.path("loose");
    let loose = b
        .fetch(2, group, "120", &loose_out)
        .arg("--key")
        .arg(&key)
        .args(["--require-encryption", "off"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (ok, text, err) = output(loose);
    assert!(ok, "fetch without the requirement failed: {text} {err}");
    assert!(std::fs::read(&loose_out).unwrap() == std::fs::read(&b.img).unwrap());
    let (ok, text, err) = output(server);
    assert!(ok, "server failed: {text} {err}");
}

/// A key file that never ends (`/dev/zero`) or is far too long is refused with one line.
#[test]
fn oversized_key_files_are_refused_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big-key");
    std::fs::write(&big, vec![b'a'; 1 << 20]).unwrap();
    for key in [std::path::Path::new("/dev/zero"), &big] {
        if !key.exists() {
            continue;
        }
        let out = Command::new(BIN)
            .args(["fetch", "--group", "239.255.57.9:7000", "--iface", "lo"])
            .args(["--server", "127.0.0.1:7001", "--out"])
            .arg(dir.path().join("out"))
            .arg("--key")
            .arg(key)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("is larger than 4096 bytes"), "{err}");
    }
}
