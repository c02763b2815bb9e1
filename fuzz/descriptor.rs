//! The clone descriptor parser ([`XenDescriptor::decode`], the one of mcdist-xen: the
//! fuzz crate reaches it without KVM-only dependencies): arbitrary bytes never panic nor
//! allocate more than the input describes (the zero map must be present in full), and a
//! descriptor that parses re-encodes to one that parses to the same descriptor.

use mcdist::source::MemSource;
use mcdist_xen::descriptor::XenDescriptor;

/// Input: descriptor bytes.
pub fn descriptor(data: &[u8]) {
    let Ok(d) = XenDescriptor::decode(data) else {
        return;
    };
    assert!(d.page_size.is_power_of_two());
    assert!(
        d.page_count.div_ceil(8) <= data.len() as u64,
        "zero map larger than the input"
    );
    assert_eq!(d.zero_map.len(), d.page_count);
    let enc = d.encode();
    assert!(enc.len() <= data.len(), "re-encoded larger than the input");
    let again = XenDescriptor::decode(&enc).expect("an encoded descriptor parses");
    assert_eq!(again, d);
}

/// Seed inputs: real descriptors of small images, and one cut short.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for pages in [1usize, 10, 77] {
        let mut img = vec![0u8; pages * 4096];
        for p in (0..pages).filter(|p| p % 3 != 0) {
            img[p * 4096 + p % 4096] = p as u8 | 1;
        }
        let Ok(d) = XenDescriptor::from_source(&MemSource::new(img, 4096)) else {
            continue;
        };
        out.push((format!("pages-{pages}"), d.encode()));
    }
    if let Some((_, d)) = out.last() {
        let cut = d[..d.len().min(50)].to_vec();
        out.push(("truncated".into(), cut));
    }
    out
}
