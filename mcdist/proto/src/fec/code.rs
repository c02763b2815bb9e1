//! The erasure code: a sparse binary code whose decoding cost follows the losses.
//!
//! A block has `K` source symbols of `T` bytes. Its first burst has `R` repair symbols
//! (a whole number of 256ths of `K`, the share the Repair header carries), and every
//! source symbol lies in exactly `C` of them (5 to 10 by the burst's share of the block,
//! at most half the rows), at rows drawn for it from a generator seeded with its index:
//! repair symbol `j` is the XOR of the source symbols whose rows include `j`. Repair
//! symbols past the first burst (NACK rounds) come from up to 4 further layers of
//! `max(R, 16)` rows built the same way from other seeds, and a receiver rebuilds the
//! rows of any repair symbol from `K`, the share and its index alone.
//!
//! A receiver missing `m` source symbols first picks, on the rows alone (bits over the
//! lost symbols), `m` repair symbols that determine them, so a block that cannot decode
//! yet costs no symbol XORs however often it is tried; then it XORs the symbols it holds
//! out of those `m` (about `C × K / R` XORs each) and solves for the unknowns by
//! Gauss–Jordan elimination over GF(2). A lost source symbol is missing from every
//! repair symbol only if all `C` of its own are lost too. Against RaptorQ on the blocks
//! mcdist sends (`K = 384` symbols of 1366 bytes; `benches/README.md`, "Decoding from
//! the rows first"): encoding about 5× and decoding 23–39× faster, with no block in 400
//! failing to decode at the server's repair counts for 5 and 10 % loss (2 at 1 %).
//! What it gives up is RaptorQ's decoding from almost any `K` symbols: a block with few
//! repair symbols needs a few more than it lost, which the server sends (see
//! `ServerConfig::fec_repair_fraction`).

/// Repair symbols beyond the lost source symbols that a block is sent so that it
/// decodes but rarely short of symbols: a binary code's rows are dependent more
/// often than RaptorQ's, whose decoding needs about none.
pub const DECODE_SPARE: usize = 8;

/// Rows in each layer past the first: at least this many, so that a block whose first
/// burst was a symbol or two still gets rows that differ (one row per layer of a
/// one-symbol burst would be the XOR of every source symbol, again and again).
const MIN_LATER_LAYER: usize = 2 * DECODE_SPARE;

/// How many repair symbols of a layer each source symbol lies in, for a block of `k`
/// source symbols whose first burst has `r`. A lost source symbol is missing from every
/// repair symbol when all of its own are lost too (probability `p^C` at loss `p`), so
/// the weight grows with the loss the burst was sized for (the server sends about
/// `2p` of `K`): 5 up to 20 % of `K` (`p` about 10 %), up to 10 past 60 %. Integers
/// only: server and receivers must draw the same rows.
fn column_weight(k: usize, r: usize) -> usize {
    match r * 100 / k.max(1) {
        0..20 => 5,
        20..30 => 6,
        30..40 => 7,
        40..60 => 8,
        _ => 10,
    }
}

/// SplitMix64.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// XOR `src` into the start of `dst`.
pub(crate) fn xor_into(dst: &mut [u8], src: &[u8]) {
    for (a, b) in dst.iter_mut().zip(src) {
        *a ^= *b;
    }
}

/// The rows of one layer: for each of its `r` repair symbols, the source symbols it is
/// the XOR of.
pub(crate) fn layer_rows(k: usize, r: usize, c: usize, layer: u32) -> Vec<Vec<u32>> {
    let r = r.max(1);
    let c = c.clamp(1, r);
    let mut rows = vec![Vec::with_capacity(k * c / r + 1); r];
    let mut picked = Vec::with_capacity(c);
    for i in 0..k {
        let mut state = (u64::from(layer) << 32) ^ i as u64 ^ 0x6d63_6469_7374_5eed;
        picked.clear();
        while picked.len() < c {
            let j = (splitmix(&mut state) % r as u64) as usize;
            if !picked.contains(&j) {
                picked.push(j);
                rows[j].push(i as u32);
            }
        }
    }
    rows
}

/// Which source symbols each repair symbol of a block is the XOR of, by repair index:
/// the layout of a code. [`decode`] works over any.
pub trait Rows {
    /// The source symbols repair symbol `index` is the XOR of.
    fn row(&mut self, index: u32) -> &[u32];
}

/// mcdist's layout for blocks of one size and first burst: the first burst's layer and
/// the later ones, each built once, when a repair index in it is first asked for. A
/// receiver keeps one for the blocks of the same shape (building a layer draws `C`
/// rows for every source symbol).
#[derive(Debug, Clone)]
pub struct Layers {
    k: usize,
    share: u8,
    r: usize,
    /// Column weight, from the first burst, for every layer.
    c: usize,
    built: Vec<(u32, Vec<Vec<u32>>)>,
}

impl Layers {
    /// The rows of blocks of `k` source symbols whose first burst is `share` 256ths
    /// of the block.
    pub fn new(k: usize, share: u8) -> Layers {
        let r = burst_len(k, share);
        Layers {
            k,
            share,
            r,
            c: column_weight(k, r),
            built: Vec::new(),
        }
    }

    /// Whether these are the rows of blocks of `k` whose first burst is `share`.
    pub fn fits(&self, k: usize, share: u8) -> bool {
        self.k == k && self.share == share
    }

    /// The rows for blocks of `k` whose first burst is `share` from `kept` (the shapes
    /// used last, most recent last), added if missing; at most [`LAYOUTS_KEPT`] kept.
    pub fn kept(kept: &mut Vec<Layers>, k: usize, share: u8) -> &mut Layers {
        let at = match kept.iter().position(|l| l.fits(k, share)) {
            Some(at) => at,
            None => {
                if kept.len() >= LAYOUTS_KEPT {
                    kept.remove(0);
                }
                kept.push(Layers::new(k, share));
                kept.len() - 1
            }
        };
        &mut kept[at]
    }
}

/// Block shapes (source symbols, first burst) whose rows a receiver keeps built.
pub const LAYOUTS_KEPT: usize = 4;

impl Rows for Layers {
    /// The first `r` indices are layer 0 (the first burst), then layers of
    /// `max(r, 16)` rows.
    fn row(&mut self, index: u32) -> &[u32] {
        let r = self.r as u32;
        let later = self.r.max(MIN_LATER_LAYER) as u32;
        let (layer, pos, size) = if index < r {
            (0, index, self.r)
        } else {
            let j = index - r;
            (j / later + 1, j % later, later as usize)
        };
        let at = match self.built.iter().position(|(l, _)| *l == layer) {
            Some(at) => at,
            None => {
                // At most half the layer's rows, so that rows differ.
                let c = self.c.min((size / 2).max(1));
                self.built.push((layer, layer_rows(self.k, size, c, layer)));
                self.built.len() - 1
            }
        };
        self.built[at]
            .1
            .get(pos as usize)
            .map_or(&[], Vec::as_slice)
    }
}

/// The first burst's share of a block of `k` source symbols, in 256ths, for at least
/// `r` repair symbols (at most 255/256 of the block).
pub fn burst_share(k: usize, r: usize) -> u8 {
    u8::try_from((r.max(1) * 256).div_ceil(k.max(1)).clamp(1, 255)).unwrap_or(u8::MAX)
}

/// Repair symbols in the first burst of a block of `k` whose share is `share`.
pub fn burst_len(k: usize, share: u8) -> usize {
    (k * usize::from(share)).div_ceil(256).max(1)
}

/// Layers after the first a block's repair symbols may come from.
const MAX_LATER_LAYERS: usize = 4;

/// Repair indices a block of `k` whose first burst is `share` of it may use: the first
/// burst and [`MAX_LATER_LAYERS`] layers after it. A receiver refuses any other, so
/// that what a decode builds (a layer's rows) and spends stays bounded whatever
/// repair symbols arrive.
pub fn max_repairs(k: usize, share: u8) -> u32 {
    let r = burst_len(k, share);
    u32::try_from(r + MAX_LATER_LAYERS * r.max(MIN_LATER_LAYER)).unwrap_or(u32::MAX)
}

/// A closed block's source symbols, kept to make repair symbols of it: the first burst
/// when it closes, more for NACK rounds.
#[derive(Debug, Clone)]
pub struct BlockEncoder {
    k: usize,
    t: usize,
    share: u8,
    /// `k × t` bytes, symbol `i` at `i × t`.
    data: Vec<u8>,
}

impl BlockEncoder {
    /// An encoder of `data` (`k` symbols of `t` bytes) whose first burst is `share`
    /// 256ths of it ([`burst_len`]).
    pub fn new(data: Vec<u8>, t: usize, share: u8) -> BlockEncoder {
        BlockEncoder {
            k: data.len() / t.max(1),
            t: t.max(1),
            share: share.max(1),
            data,
        }
    }

    /// The first burst's share of the block.
    pub fn share(&self) -> u8 {
        self.share
    }

    /// Repair symbols in the first burst (the layer size).
    pub fn burst(&self) -> usize {
        burst_len(self.k, self.share)
    }

    /// Source symbols in the block (`K`).
    pub fn source_symbols(&self) -> usize {
        self.k
    }

    /// Repair symbols with repair indices `start .. start + count`, as `(index, symbol)`.
    pub fn repairs(&self, start: u32, count: u32) -> Vec<(u32, Vec<u8>)> {
        let mut layers = Layers::new(self.k, self.share);
        (start..start.saturating_add(count))
            .map(|j| {
                let mut s = vec![0u8; self.t];
                for &i in layers.row(j) {
                    let off = i as usize * self.t;
                    xor_into(&mut s, &self.data[off..off + self.t]);
                }
                (j, s)
            })
            .collect()
    }
}

/// The repair symbols in hand do not determine every lost source symbol (yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooFew;

/// Recover the lost source symbols of a block of `k` symbols of `t` bytes whose repair
/// symbols are laid out as `rows` says. `held(i)`: source symbol `i` if held (its data,
/// at most `t` bytes; the rest is zero padding), `None` if lost. `repairs`: repair
/// symbols in hand, `(repair index, symbol of t bytes)`. Returns the lost symbols, in
/// index order, as `(index, t bytes)`.
///
/// Which repair symbols to use is settled on their rows alone (bits over the lost
/// symbols, reduced against the ones taken before): a block that cannot decode yet
/// costs no symbol XORs, and one that can costs those of the `m` repair symbols it
/// needs for `m` lost, however many more arrived.
pub fn decode<'a>(
    k: usize,
    t: usize,
    rows: &mut impl Rows,
    held: impl Fn(usize) -> Option<&'a [u8]>,
    repairs: &[(u32, &[u8])],
) -> Result<Vec<(usize, Vec<u8>)>, TooFew> {
    let lost: Vec<usize> = (0..k).filter(|&i| held(i).is_none()).collect();
    let m = lost.len();
    if m == 0 {
        return Ok(Vec::new());
    }
    if repairs.len() < m {
        return Err(TooFew);
    }
    let mut col = vec![usize::MAX; k];
    for (c, &i) in lost.iter().enumerate() {
        col[i] = c;
    }
    let words = m.div_ceil(64);
    // The lost symbols a repair symbol's row names, as bits over `lost`.
    let named = |row: &[u32], b: &mut [u64]| {
        b.fill(0);
        for &i in row {
            if let Some(&c) = col.get(i as usize).filter(|&&c| c != usize::MAX) {
                b[c / 64] ^= 1 << (c % 64);
            }
        }
    };
    // 1. Rows only: take a repair symbol when its row, reduced against the rows taken
    // before (each with its own lowest bit, which no later one has), names a lost
    // symbol they do not determine yet.
    let mut basis: Vec<(usize, Vec<u64>)> = Vec::with_capacity(m);
    let mut taken: Vec<usize> = Vec::with_capacity(m);
    let mut b = vec![0u64; words];
    for (n, &(j, _)) in repairs.iter().enumerate() {
        named(rows.row(j), &mut b);
        for (p, base) in &basis {
            if b[p / 64] & (1 << (p % 64)) != 0 {
                xor_words(&mut b, base);
            }
        }
        if let Some(p) = lowest_bit(&b) {
            basis.push((p, b.clone()));
            taken.push(n);
            if taken.len() == m {
                break;
            }
        }
    }
    if taken.len() < m {
        return Err(TooFew);
    }
    // 2. The taken repair symbols with the held symbols XORed out.
    let mut bits: Vec<Vec<u64>> = Vec::with_capacity(m);
    let mut syms: Vec<Vec<u8>> = Vec::with_capacity(m);
    for &n in &taken {
        let (j, bytes) = repairs[n];
        let mut sym = Vec::with_capacity(t);
        sym.extend_from_slice(&bytes[..bytes.len().min(t)]);
        sym.resize(t, 0);
        let row = rows.row(j);
        for &i in row {
            if let (Some(&usize::MAX), Some(s)) = (col.get(i as usize), held(i as usize)) {
                xor_into(&mut sym, s);
            }
        }
        named(row, &mut b);
        bits.push(b.clone());
        syms.push(sym);
    }
    // 3. Gauss–Jordan over GF(2): row `c` ends up naming lost symbol `c` alone.
    for c in 0..m {
        let (w, bit) = (c / 64, 1u64 << (c % 64));
        let p = (c..m).find(|&r| bits[r][w] & bit != 0).ok_or(TooFew)?;
        bits.swap(c, p);
        syms.swap(c, p);
        for r in (0..m).filter(|&r| r != c) {
            if bits[r][w] & bit != 0 {
                let (dst, src) = pair(&mut bits, r, c);
                xor_words(dst, src);
                let (dst, src) = pair(&mut syms, r, c);
                xor_into(dst, src);
            }
        }
    }
    Ok(lost.into_iter().zip(syms).collect())
}

/// XOR `src` into `dst`, word by word.
fn xor_words(dst: &mut [u64], src: &[u64]) {
    for (a, b) in dst.iter_mut().zip(src) {
        *a ^= *b;
    }
}

/// The lowest set bit of `b`, if any.
fn lowest_bit(b: &[u64]) -> Option<usize> {
    b.iter()
        .position(|&w| w != 0)
        .map(|w| w * 64 + b[w].trailing_zeros() as usize)
}

/// `v[a]` to write and `v[b]` to read (`a != b`).
fn pair<T>(v: &mut [T], a: usize, b: usize) -> (&mut T, &T) {
    if a < b {
        let (lo, hi) = v.split_at_mut(b);
        (&mut lo[a], &hi[0])
    } else {
        let (lo, hi) = v.split_at_mut(a);
        (&mut hi[0], &lo[b])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(k: usize, t: usize) -> Vec<u8> {
        (0..k * t).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// Repair symbols as [`decode`] takes them.
    fn in_hand(reps: &[(u32, Vec<u8>)]) -> Vec<(u32, &[u8])> {
        reps.iter().map(|(j, s)| (*j, s.as_slice())).collect()
    }

    /// `got` is exactly the symbols of `data` (`t` bytes each) that `lost` says were lost.
    fn assert_restored(
        got: Vec<(usize, Vec<u8>)>,
        lost: impl Fn(usize) -> bool,
        data: &[u8],
        t: usize,
    ) {
        assert_eq!(got.len(), (0..data.len() / t).filter(|&i| lost(i)).count());
        for (i, s) in got {
            assert!(lost(i));
            assert_eq!(s, &data[i * t..(i + 1) * t]);
        }
    }

    #[test]
    fn restores_what_was_lost_from_any_layer() {
        let (k, t) = (96, 32);
        let data = block(k, t);
        let share = burst_share(k, 16);
        let enc = BlockEncoder::new(data.clone(), t, share);
        // A whole share of the block: 43/256 of 96 symbols.
        assert_eq!(enc.burst(), 17);
        // The first burst and a later layer (a NACK round) alike.
        let reps: Vec<(u32, Vec<u8>)> = enc
            .repairs(0, 17)
            .into_iter()
            .chain(enc.repairs(30, 8))
            .collect();
        let lost = |i: usize| i % 10 == 4;
        let held = |i: usize| (!lost(i)).then(|| &data[i * t..(i + 1) * t]);
        let got = decode(k, t, &mut Layers::new(k, share), held, &in_hand(&reps))
            .expect("enough repair symbols");
        assert_restored(got, lost, &data, t);
    }

    #[test]
    fn restores_random_losses_exactly_or_says_it_cannot() {
        let (k, t) = (200, 24);
        let data = block(k, t);
        let share = burst_share(k, 30);
        let enc = BlockEncoder::new(data.clone(), t, share);
        let reps = enc.repairs(0, 60);
        let (mut state, mut decoded) = (7u64, 0);
        for _ in 0..50 {
            // About 6 % of the source symbols and of the repair symbols lost.
            let lost: Vec<bool> = (0..k).map(|_| splitmix(&mut state) % 100 < 6).collect();
            let inhand: Vec<(u32, &[u8])> = reps
                .iter()
                .filter(|_| splitmix(&mut state) % 100 >= 6)
                .map(|(j, s)| (*j, s.as_slice()))
                .collect();
            let held = |i: usize| (!lost[i]).then(|| &data[i * t..(i + 1) * t]);
            if let Ok(got) = decode(k, t, &mut Layers::new(k, share), held, &inhand) {
                decoded += 1;
                assert_restored(got, |i| lost[i], &data, t);
            }
        }
        // About 12 lost of 200 against about 56 repair symbols: nearly every block.
        assert!(decoded >= 48, "{decoded} of 50 decoded");
    }

    #[test]
    fn says_when_it_cannot_yet() {
        let (k, t) = (64, 16);
        let data = block(k, t);
        let share = burst_share(k, 8);
        let enc = BlockEncoder::new(data.clone(), t, share);
        let reps = enc.repairs(0, 8);
        let held = |i: usize| (i >= 10).then(|| &data[i * t..(i + 1) * t]);
        // Ten lost, eight repair symbols.
        assert_eq!(
            decode(k, t, &mut Layers::new(k, share), held, &in_hand(&reps)),
            Err(TooFew)
        );
    }

    #[test]
    fn every_source_lies_in_as_many_rows_of_a_layer() {
        for (k, r) in [(384usize, 47usize), (128, 6), (10, 1), (5, 300)] {
            let c = column_weight(k, r).min((r / 2).max(1));
            let rows = layer_rows(k, r, c, 3);
            let mut count = vec![0usize; k];
            for row in &rows {
                for &i in row {
                    count[i as usize] += 1;
                }
            }
            assert!(count.iter().all(|&n| n == c.min(r)), "{k} {r}");
        }
    }
}
