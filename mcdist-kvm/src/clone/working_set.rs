//! Working-set files: the pages a clone ended with, saved so that a later clone of the same
//! parent fetches them in bulk before its first instruction ([`super::CloneOptions::prefetch`];
//! `mcdist-clone --record-working-set FILE` writes one, `--prefetch FILE` reads it).
//!
//! The format is text, one header line and then one page range per line, ascending and
//! disjoint:
//!
//! ```text
//! mcdist-working-set 1 pages=16384
//! 12
//! 40-1063
//! ```
//!
//! `pages=` is the image's page count; a file recorded for an image of another size is
//! refused. The file only says which pages to ask for: every page still comes from the
//! memory server and is verified against the descriptor's root before it is installed.

use std::fmt::Write as _;
use std::path::Path;

/// The first word of a working-set file.
const MAGIC: &str = "mcdist-working-set";
/// The format version this code writes and reads.
const VERSION: u32 = 1;

/// Why a working-set file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    /// The file could not be read or written.
    #[error("working-set file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
    /// The file is not a working-set file this version reads.
    #[error("working-set file {path}, line {line}: {what}")]
    Format {
        /// The file.
        path: String,
        /// Line number (1-based).
        line: usize,
        /// What is wrong.
        what: String,
    },
    /// It was recorded for an image of another size.
    #[error("working-set file {path} is for an image of {recorded} pages, this one has {pages}")]
    OtherImage {
        /// The file.
        path: String,
        /// Pages of the image it was recorded for.
        recorded: u64,
        /// Pages of this image.
        pages: u64,
    },
}

/// The text of a working-set file for `pages` (ascending) of an image of `page_count` pages.
pub fn encode_working_set(page_count: u64, pages: &[u64]) -> String {
    let mut out = format!("{MAGIC} {VERSION} pages={page_count}\n");
    let mut i = 0;
    while i < pages.len() {
        let start = pages[i];
        let mut end = start;
        while i + 1 < pages.len() && pages[i + 1] == end + 1 {
            end += 1;
            i += 1;
        }
        i += 1;
        let _ = if start == end {
            writeln!(out, "{start}")
        } else {
            writeln!(out, "{start}-{end}")
        };
    }
    out
}

/// Parses a working-set file's text for an image of `page_count` pages (`path` names it in
/// errors). Returns the pages, ascending.
pub fn decode_working_set(
    text: &str,
    page_count: u64,
    path: &str,
) -> Result<Vec<u64>, WorkingSetError> {
    let bad = |line: usize, what: String| WorkingSetError::Format {
        path: path.to_string(),
        line,
        what,
    };
    let mut lines = text.lines().enumerate().map(|(n, l)| (n + 1, l.trim()));
    let (_, header) = lines.next().ok_or_else(|| bad(1, "empty file".into()))?;
    let mut words = header.split_whitespace();
    if words.next() != Some(MAGIC) {
        return Err(bad(
            1,
            format!("not a working-set file (no `{MAGIC}` header)"),
        ));
    }
    if words.next() != Some("1") {
        return Err(bad(
            1,
            format!("unknown version (this build reads {VERSION})"),
        ));
    }
    let recorded = words
        .next()
        .and_then(|w| w.strip_prefix("pages="))
        .and_then(|n| n.parse::<u64>().ok())
        .ok_or_else(|| bad(1, "no `pages=N` in the header".into()))?;
    if recorded != page_count {
        return Err(WorkingSetError::OtherImage {
            path: path.to_string(),
            recorded,
            pages: page_count,
        });
    }
    let mut pages = Vec::new();
    let mut next = 0u64;
    for (n, line) in lines {
        if line.is_empty() {
            continue;
        }
        let num = |s: &str| {
            s.parse::<u64>()
                .map_err(|_| bad(n, format!("`{line}` is not a page or a range a-b")))
        };
        let (start, end) = match line.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(line)?, num(line)?),
        };
        if start > end || end >= page_count {
            return Err(bad(
                n,
                format!("range {start}-{end} is empty or beyond the image's {page_count} pages"),
            ));
        }
        if start < next {
            return Err(bad(n, "ranges are not ascending and disjoint".into()));
        }
        pages.extend(start..=end);
        next = end + 1;
    }
    Ok(pages)
}

/// Writes the working-set file `path` for `pages` (ascending) of an image of `page_count`
/// pages.
pub fn save_working_set(
    path: &Path,
    page_count: u64,
    pages: &[u64],
) -> Result<(), WorkingSetError> {
    std::fs::write(path, encode_working_set(page_count, pages)).map_err(|source| {
        WorkingSetError::Io {
            path: path.display().to_string(),
            source,
        }
    })
}

/// Reads the working-set file `path` for an image of `page_count` pages.
pub fn load_working_set(path: &Path, page_count: u64) -> Result<Vec<u64>, WorkingSetError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| WorkingSetError::Io {
        path: shown.clone(),
        source,
    })?;
    decode_working_set(&text, page_count, &shown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_survive_the_file_as_ranges() {
        let pages = [0, 1, 2, 7, 9, 10, 15];
        let text = encode_working_set(16, &pages);
        assert_eq!(text, "mcdist-working-set 1 pages=16\n0-2\n7\n9-10\n15\n");
        assert_eq!(decode_working_set(&text, 16, "f").unwrap(), pages);
        assert_eq!(
            decode_working_set(&encode_working_set(16, &[]), 16, "f").unwrap(),
            Vec::<u64>::new()
        );
    }

    #[test]
    fn bad_files_are_refused_with_the_line_that_is_wrong() {
        let err = |t: &str| decode_working_set(t, 16, "ws").unwrap_err().to_string();
        assert!(err("").contains("empty file"));
        assert!(err("hello\n").contains("not a working-set file"));
        assert!(err("mcdist-working-set 2 pages=16\n").contains("unknown version"));
        assert!(err("mcdist-working-set 1\n").contains("pages=N"));
        assert!(err("mcdist-working-set 1 pages=8\n").contains("image of 8 pages, this one has 16"));
        assert!(err("mcdist-working-set 1 pages=16\n3\nx\n").contains("line 3"));
        assert!(err("mcdist-working-set 1 pages=16\n3-16\n").contains("beyond"));
        assert!(err("mcdist-working-set 1 pages=16\n5-3\n").contains("empty"));
        assert!(err("mcdist-working-set 1 pages=16\n5\n4\n").contains("ascending"));
        assert!(err("mcdist-working-set 1 pages=16\n2-5\n5\n").contains("ascending"));
    }
}
