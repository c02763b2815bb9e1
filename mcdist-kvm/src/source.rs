//! Page sources and page maps used by the KVM backend: the core crate's
//! [`PageSource`] (a frozen image read page by page), its [`PageBitmap`] (zero-page
//! and installed-page maps) and its one-pass [`scan`] (digest and zero map).

pub use mcdist::bitmap::PageBitmap;
pub use mcdist::source::{image_digest, scan, zero_map, FileSource, MemSource, PageSource};
