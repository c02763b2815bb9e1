//! CSV round trip, medians, the summary, and parsing the pressure options.

use super::*;
use std::io::Write as _;
use std::time::Duration;

fn run(tool: Tool, rep: usize, secs: f64, ok: bool) -> RunResult {
    RunResult {
        tool,
        rep,
        receivers: 8,
        loss_percent: 5.0,
        secs,
        server_bytes: (secs * 1000.0) as u64,
        cpu_secs: secs * 2.0,
        image_bytes: 1 << 20,
        ok,
        note: if ok {
            String::new()
        } else {
            "timed out, twice".into()
        },
    }
}

#[test]
fn csv_round_trips_and_medians_take_the_middle_of_good_runs() {
    let rs = vec![
        run(Tool::Mcdist, 1, 3.0, true),
        run(Tool::Uftp, 1, 9.0, true),
        run(Tool::Mcdist, 2, 1.0, true),
        run(Tool::Uftp, 2, 0.0, false),
        run(Tool::Mcdist, 3, 2.0, true),
        run(Tool::Uftp, 3, 7.0, true),
    ];
    let back = from_csv(&to_csv(&rs)).expect("parse");
    assert_eq!(back.len(), rs.len());
    for (a, b) in rs.iter().zip(&back) {
        assert_eq!(
            (a.tool, a.rep, a.receivers, a.ok),
            (b.tool, b.rep, b.receivers, b.ok)
        );
        assert_eq!(
            (a.server_bytes, a.image_bytes),
            (b.server_bytes, b.image_bytes)
        );
        assert!((a.secs - b.secs).abs() < 1e-3 && (a.cpu_secs - b.cpu_secs).abs() < 1e-2);
        assert_eq!(a.note, b.note.replace('\'', "\""));
    }
    let m = medians(&back);
    assert_eq!(m.len(), 2);
    assert_eq!((m[0].tool, m[0].rep, m[0].ok), (Tool::Mcdist, 3, true));
    assert!((m[0].secs - 2.0).abs() < 1e-9 && (m[0].cpu_secs - 4.0).abs() < 1e-9);
    // A failed repetition marks the configuration; the median is of the good runs.
    assert_eq!((m[1].tool, m[1].ok), (Tool::Uftp, false));
    assert!((m[1].secs - 8.0).abs() < 1e-9, "{}", m[1].secs);
    assert!(m[1].note.starts_with("1 of 3 runs failed"), "{}", m[1].note);
    assert!(from_csv("tool,receivers\nmcdist,1\n").is_err());
    assert!(from_csv("").is_err());
}

#[test]
fn every_named_tool_parses_back() {
    for t in Tool::NAMED {
        assert_eq!(Tool::from_name(t.name()), Some(t));
    }
    let mut names: Vec<&str> = Tool::NAMED.iter().map(|t| t.name()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), Tool::NAMED.len());
}

#[test]
fn summary_gives_cpu_ratio_to_each_peer() {
    let rs = vec![
        run(Tool::Mcdist, 1, 2.0, true),
        run(Tool::Uftp, 1, 8.0, true),
        run(Tool::Udpcast, 1, 4.0, true),
        run(Tool::UdpcastFec, 1, 0.0, false),
    ];
    let s = summary(&rs);
    // `run` gives CPU seconds of twice the wall time.
    assert!(
        s.contains("N=8 loss 5%: mcdist vs uftp: 0.25x time (2.00 s / 8.00 s), 0.25x CPU (4.00 / 16.00 CPU s)"),
        "{s}"
    );
    assert!(s.contains("mcdist vs udpcast: 0.50x time"), "{s}");
    assert!(
        !s.contains("vs udpcast-fec"),
        "failed runs are left out: {s}"
    );
}

#[test]
fn isolations_are_counted_by_reason_from_a_plain_or_coloured_log() {
    // mcdist writes plain text to a log file; builds before it (as `--baseline`) coloured it.
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("tx.log");
    let warn = |reason: &str, colour: bool| {
        let line = format!(
            "\u{1b}[2m2026-12-05T02:39:56Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m receiver cannot keep up; \
             left out of pacing, repaired by unicast \u{1b}[3mpeer\u{1b}[0m\u{1b}[2m=\u{1b}[0m198.18.60.9:1 \
             \u{1b}[3mreason\u{1b}[0m\u{1b}[2m=\u{1b}[0m{reason} \u{1b}[3mloss_permille\u{1b}[0m\u{1b}[2m=\u{1b}[0m368\n"
        );
        if colour {
            line
        } else {
            line.split('\u{1b}')
                .enumerate()
                .map(|(i, part)| {
                    if i == 0 {
                        part
                    } else {
                        part.split_once('m').map_or("", |(_, t)| t)
                    }
                })
                .collect()
        }
    };
    let mut f = std::fs::File::create(&log).expect("log");
    f.write_all(b"receiver 198.18.60.2:1 complete (1/8)\n")
        .expect("write");
    assert_eq!(run::isolations(&log), None, "no isolation line");
    for (r, colour) in [
        ("overload", true),
        ("path loss", false),
        ("overload", false),
    ] {
        f.write_all(warn(r, colour).as_bytes()).expect("write");
    }
    assert_eq!(
        run::isolations(&log).as_deref(),
        Some("isolated: 2 overload, 1 path loss")
    );
}

#[test]
fn stall_specs_parse_and_bad_ones_say_what_is_expected() {
    let s: StallSpec = "20/200".parse().expect("20/200");
    assert_eq!(
        (s.stall, s.every),
        (Duration::from_millis(20), Duration::from_millis(200))
    );
    assert_eq!(s.receivers, None, "every receiver");
    let one: StallSpec = "500/600:1".parse().expect("500/600:1");
    assert_eq!((one.stall.as_millis(), one.receivers), (500, Some(1)));
    assert!(!s.together && !one.together, "in turn unless asked");
    let shared: StallSpec = "150/1000:8:together".parse().expect("150/1000:8:together");
    assert_eq!((shared.receivers, shared.together), (Some(8), true));
    let all: StallSpec = "150/1000:together".parse().expect("150/1000:together");
    assert_eq!((all.receivers, all.together), (None, true));
    for bad in [
        "20",
        "200/20",
        "0/100",
        "100/100",
        "a/b",
        "20/",
        "20/200:0",
        "20/200:x",
        "20/200:together:8",
        "20/200:1:2",
        "20/200:together:together",
    ] {
        let e = bad.parse::<StallSpec>().expect_err(bad);
        assert!(e.contains("STALL/EVERY"), "{bad}: {e}");
    }
}

#[test]
fn slow_link_specs_parse_and_bad_ones_say_what_is_expected() {
    let one: SlowLink = "200".parse().expect("200");
    assert_eq!((one.mbit, one.receivers), (200, 1));
    let two: SlowLink = "100:2".parse().expect("100:2");
    assert_eq!((two.mbit, two.receivers), (100, 2));
    for bad in ["", "0", "200:0", "x", "200:", "200:x", "-5"] {
        let e = bad.parse::<SlowLink>().expect_err(bad);
        assert!(e.contains("MBIT[:N]"), "{bad}: {e}");
    }
}
