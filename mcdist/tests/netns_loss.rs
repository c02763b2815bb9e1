//! `mcdist serve` and two `mcdist fetch` processes over a bridge that drops 10 % of the
//! UDP datagrams to each receiver (nftables `numgen random` on the receivers' ports):
//! pages that arrive in part are NACKed by their missing fragments, the server resends
//! those, and every copy still equals the image.

mod common;

use common::Bridge;
use std::process::{Command, Stdio};

/// Drop `permille` of the UDP frames the bridge forwards to ports `p1`, `p2`.
fn drop_to_receivers(b: &Bridge, permille: u32) {
    let br = b.topo.bridge_ns();
    let nft = |args: &[&str]| {
        let st = Command::new("ip")
            .args(["netns", "exec", br, "nft"])
            .args(args)
            .status()
            .expect("running nft");
        assert!(st.success(), "nft {args:?} failed");
    };
    nft(&["add", "table", "bridge", "mcloss"]);
    nft(&[
        "add",
        "chain",
        "bridge",
        "mcloss",
        "ports",
        "{ type filter hook forward priority 0; policy accept; }",
    ]);
    let below = permille.to_string();
    nft(&[
        "add",
        "rule",
        "bridge",
        "mcloss",
        "ports",
        "oifname",
        "{ p1, p2 }",
        "meta",
        "l4proto",
        "udp",
        "numgen",
        "random",
        "mod",
        "1000",
        "<",
        &below,
        "drop",
    ]);
}

/// The number after `key` in `text` (`key` ends where the number starts).
fn number_after(text: &str, key: &str) -> u64 {
    text.split(key)
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no '{key}<number>' in: {text}"))
}

#[test]
fn lossy_receivers_nack_missing_fragments_and_get_exact_copies() {
    let Some(b) = Bridge::new("mcl", 3, 73, 16, Some(8), 99) else {
        return;
    };
    drop_to_receivers(&b, 100);
    let group = &b.group(1);
    // Plain datagrams both ways: the loss rule drops single datagrams, not GSO buffers.
    let server = b
        .serve(group)
        .args(["--clients", "2", "--exit-when-done", "--timeout", "120"])
        .args(["--gso", "off", "--fec", "off"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut fetchers = Vec::new();
    for i in 1..3 {
        let out = b.path(&format!("out{i}"));
        let child = b
            .fetch(i, group, "120", &out)
            .args(["--gro", "off"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        fetchers.push((out, child));
    }
    let want = std::fs::read(&b.img).unwrap();
    let mut by_fragments = 0;
    for (out, child) in fetchers {
        let o = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        println!("{}", text.trim());
        assert!(o.status.success(), "fetch failed: {text}");
        assert!(text.contains("digest ok"), "{text}");
        by_fragments += number_after(&text, "pages, ");
        let got = std::fs::read(&out).unwrap();
        assert!(got == want, "{} differs from the image", out.display());
    }
    let o = server.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    println!("{}", text.trim());
    assert!(o.status.success(), "server failed: {text}");
    assert!(text.contains("done: 2 receivers"), "{text}");
    // At 10 % datagram loss a receiver misses a fragment of about a quarter of the
    // 3-fragment pages and holds the rest of each.
    assert!(by_fragments > 0, "no page was NACKed by its fragments");
    assert!(
        number_after(&text, "by fragment, ") > 0,
        "the server resent no single fragment: {text}"
    );
}
