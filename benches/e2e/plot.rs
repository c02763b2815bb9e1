//! The SVG plot: time and server bytes versus receivers and versus loss.

use super::{RunResult, Tool};
use std::fmt::Write as _;

const COLORS: [&str; 8] = [
    "#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#1f77b4", "#2ca02c", "#17becf",
];

struct Panel<'a> {
    title: String,
    x_label: &'a str,
    y_label: &'a str,
    /// (tool index, points)
    series: Vec<(usize, Vec<(f64, f64)>)>,
    log2_x: bool,
}

fn panel_svg(out: &mut String, p: &Panel<'_>, ox: f64, oy: f64, w: f64, h: f64) {
    let (l, r, t, b) = (60.0, 10.0, 28.0, 40.0);
    let pts: Vec<(f64, f64)> = p
        .series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .collect();
    let tx = |x: f64| if p.log2_x { x.max(1.0).log2() } else { x };
    let (mut x0, mut x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), (x, _)| {
        (a.min(tx(*x)), b.max(tx(*x)))
    });
    if pts.is_empty() || x1 <= x0 {
        x0 = 0.0;
        x1 = x1.max(1.0);
    }
    let y1 = pts.iter().fold(0.0f64, |a, (_, y)| a.max(*y)).max(1e-9) * 1.1;
    let px = |x: f64| ox + l + (tx(x) - x0) / (x1 - x0) * (w - l - r);
    let py = |y: f64| oy + h - b - y / y1 * (h - t - b);
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="13" font-weight="bold">{}</text>"#,
        ox + l,
        oy + 16.0,
        p.title
    );
    let _ = writeln!(
        out,
        r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="none" stroke="#888"/>"##,
        ox + l,
        oy + t,
        w - l - r,
        h - t - b
    );
    for k in 0..=4 {
        let y = y1 * f64::from(k) / 4.0;
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end">{}</text><line x1="{:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#ddd"/>"##,
            ox + l - 4.0,
            py(y) + 3.0,
            fmt_num(y),
            ox + l,
            ox + w - r,
            py(y),
            py(y)
        );
    }
    let mut xs: Vec<f64> = pts.iter().map(|(x, _)| *x).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    for x in xs {
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{}</text>"#,
            px(x),
            oy + h - b + 14.0,
            fmt_num(x)
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"#,
        ox + l + (w - l - r) / 2.0,
        oy + h - 8.0,
        p.x_label
    );
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle" transform="rotate(-90 {:.1} {:.1})">{}</text>"#,
        ox + 14.0,
        oy + h / 2.0,
        ox + 14.0,
        oy + h / 2.0,
        p.y_label
    );
    for (ti, v) in &p.series {
        let c = COLORS[*ti % COLORS.len()];
        let path: Vec<String> = v
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"#,
            path.join(" ")
        );
        for (x, y) in v {
            let _ = writeln!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{c}"/>"#,
                px(*x),
                py(*y)
            );
        }
    }
}

fn fmt_num(v: f64) -> String {
    if v >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// An SVG with four panels: time and server bytes versus receivers (no loss),
/// and versus loss at `loss_n` receivers.
pub fn to_svg(rs: &[RunResult], size_mib: u64, loss_n: usize) -> String {
    let series = |by_n: bool, f: &dyn Fn(&RunResult) -> f64| -> Vec<(usize, Vec<(f64, f64)>)> {
        Tool::ALL
            .iter()
            .enumerate()
            .filter_map(|(ti, t)| {
                let mut v: Vec<(f64, f64)> = rs
                    .iter()
                    .filter(|r| r.ok && r.tool == *t)
                    .filter(|r| {
                        if by_n {
                            r.loss_percent == 0.0
                        } else {
                            r.receivers == loss_n
                        }
                    })
                    .map(|r| {
                        (
                            if by_n {
                                r.receivers as f64
                            } else {
                                r.loss_percent
                            },
                            f(r),
                        )
                    })
                    .collect();
                v.sort_by(|a, b| a.0.total_cmp(&b.0));
                (!v.is_empty()).then_some((ti, v))
            })
            .collect()
    };
    let panels = [
        Panel {
            title: format!("{size_mib} MiB to N receivers, no loss: time"),
            x_label: "receivers",
            y_label: "seconds",
            series: series(true, &|r| r.secs),
            log2_x: true,
        },
        Panel {
            title: "no loss: server bytes / image bytes".into(),
            x_label: "receivers",
            y_label: "bytes / image",
            series: series(true, &|r| r.ratio()),
            log2_x: true,
        },
        Panel {
            title: format!("{loss_n} receivers: time vs loss"),
            x_label: "receive loss %",
            y_label: "seconds",
            series: series(false, &|r| r.secs),
            log2_x: false,
        },
        Panel {
            title: format!("{loss_n} receivers: server bytes / image vs loss"),
            x_label: "receive loss %",
            y_label: "bytes / image",
            series: series(false, &|r| r.ratio()),
            log2_x: false,
        },
    ];
    let (w, h) = (440.0, 300.0);
    // The legend under the panels: as many entries to a row as the width holds.
    let per_row = ((2.0 * w - 20.0) / 140.0_f64).floor().max(1.0) as usize;
    let legend_rows = Tool::ALL.len().div_ceil(per_row);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif">"#,
        2.0 * w,
        2.0 * h + 14.0 + 16.0 * legend_rows as f64
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (i, p) in panels.iter().enumerate() {
        let ox = (i % 2) as f64 * w;
        let oy = (i / 2) as f64 * h;
        panel_svg(&mut out, p, ox, oy, w, h);
    }
    for (ti, t) in Tool::ALL.iter().enumerate() {
        let x = 20.0 + (ti % per_row) as f64 * 140.0;
        let y = 2.0 * h + 16.0 + (ti / per_row) as f64 * 16.0;
        let _ = writeln!(
            out,
            r#"<rect x="{x:.1}" y="{:.1}" width="14" height="4" fill="{}"/><text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
            y - 4.0,
            COLORS[ti],
            x + 18.0,
            y,
            t.name()
        );
    }
    out.push_str("</svg>\n");
    out
}
