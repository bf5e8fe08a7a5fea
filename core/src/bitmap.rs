//! Dirty bitmaps: one bit per guest page or disk block.
//!
//! [`DirtyBitmap`] is the live log that writers (vCPUs, the block layer) set from many
//! threads at once; [`Bitmap`] is a plain snapshot taken from it with fetch-and-clear.
//! A fetched snapshot is *consumed*: if sending its pages fails, the caller merges it back
//! with [`DirtyBitmap::merge`] so no dirty bit is ever lost.

use std::sync::atomic::{AtomicU64, Ordering};

const WORD_BITS: u64 = 64;

fn words_for(bits: u64) -> usize {
    bits.div_ceil(WORD_BITS) as usize
}

/// Mask of the bits of the last word that lie inside a bitmap of `bits` bits.
fn tail_mask(bits: u64) -> u64 {
    match bits % WORD_BITS {
        0 => u64::MAX,
        r => (1u64 << r) - 1,
    }
}

/// A live dirty log that many threads set concurrently.
#[derive(Debug)]
pub struct DirtyBitmap {
    words: Box<[AtomicU64]>,
    bits: u64,
}

impl DirtyBitmap {
    /// An all-clear log of `bits` bits.
    pub fn new(bits: u64) -> Self {
        let words = (0..words_for(bits)).map(|_| AtomicU64::new(0)).collect();
        Self { words, bits }
    }

    /// Number of bits (pages or blocks) tracked.
    pub fn len(&self) -> u64 {
        self.bits
    }

    /// True when the log tracks nothing.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// Marks bit `i` dirty. Out-of-range bits are ignored (a writer outside the tracked
    /// range is a backend bug, not something to crash the VMM over).
    ///
    /// Release ordering: the write that made the page dirty happens-before a fetch that
    /// observes this bit, so a reader that clears the bit and then reads the page sees the
    /// new content or will see the bit again next round.
    #[inline]
    pub fn set(&self, i: u64) {
        if i >= self.bits {
            return;
        }
        let word = &self.words[(i / WORD_BITS) as usize];
        let bit = 1u64 << (i % WORD_BITS);
        // Always the read-modify-write: skipping it when the bit already reads as set
        // would let a write slip past a fetch under way (its data still in the store
        // buffer, the bit already taken). Writers at memory speed use
        // [`crate::bytemap::DirtyBytes`] instead, whose mark needs no locked instruction.
        word.fetch_or(bit, Ordering::Release);
    }

    /// Marks `[start, start + len)` dirty.
    pub fn set_range(&self, start: u64, len: u64) {
        let end = start.saturating_add(len).min(self.bits);
        let mut i = start;
        while i < end {
            let w = (i / WORD_BITS) as usize;
            let lo = i % WORD_BITS;
            let hi = ((w as u64 + 1) * WORD_BITS).min(end) - (w as u64) * WORD_BITS;
            let mask = if hi - lo == WORD_BITS {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            self.words[w].fetch_or(mask, Ordering::Release);
            i = (w as u64 + 1) * WORD_BITS;
        }
    }

    /// Marks every bit dirty.
    pub fn set_all(&self) {
        self.set_range(0, self.bits);
    }

    /// Whether bit `i` is currently dirty.
    pub fn is_set(&self, i: u64) -> bool {
        i < self.bits
            && self.words[(i / WORD_BITS) as usize].load(Ordering::Acquire) & (1 << (i % WORD_BITS))
                != 0
    }

    /// Clears bit `i`; whether it was set (one thread wins a bit others race for).
    pub fn take_bit(&self, i: u64) -> bool {
        if i >= self.bits {
            return false;
        }
        let bit = 1u64 << (i % WORD_BITS);
        self.words[(i / WORD_BITS) as usize].fetch_and(!bit, Ordering::AcqRel) & bit != 0
    }

    /// Number of dirty bits right now (a racy but consistent-per-word count).
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Fetch-and-clear: returns the dirty bits and clears them atomically word by word.
    pub fn take(&self) -> Bitmap {
        let words = self
            .words
            .iter()
            .map(|w| {
                // Cheap skip of clean words; swap only when something is set.
                if w.load(Ordering::Relaxed) == 0 {
                    0
                } else {
                    w.swap(0, Ordering::AcqRel)
                }
            })
            .collect();
        Bitmap {
            words,
            bits: self.bits,
        }
    }

    /// Clears every bit.
    pub fn clear(&self) {
        for w in self.words.iter() {
            w.store(0, Ordering::Release);
        }
    }

    /// Merges a previously fetched snapshot back (after a failed send).
    /// A snapshot of a different size is merged over the common range.
    pub fn merge(&self, other: &Bitmap) {
        for (w, o) in self.words.iter().zip(other.words.iter()) {
            if *o != 0 {
                w.fetch_or(*o, Ordering::AcqRel);
            }
        }
    }

    /// A snapshot without clearing (a peek).
    pub fn peek(&self) -> Bitmap {
        Bitmap {
            words: self
                .words
                .iter()
                .map(|w| w.load(Ordering::Acquire))
                .collect(),
            bits: self.bits,
        }
    }
}

/// A plain bitmap: a snapshot of a dirty log, a set of pages to send, a set of owed blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    bits: u64,
}

/// Error building a bitmap from external words.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BitmapError {
    /// The word count does not match the bit count.
    #[error("bitmap of {bits} bits needs {expected} words, got {got}")]
    WordCount {
        /// Bits claimed.
        bits: u64,
        /// Words needed for that many bits.
        expected: usize,
        /// Words supplied.
        got: usize,
    },
    /// Bits beyond the end are set.
    #[error("bitmap has bits set past its end ({bits} bits)")]
    TailBits {
        /// Bits claimed.
        bits: u64,
    },
}

impl Bitmap {
    /// An all-clear bitmap of `bits` bits.
    pub fn new(bits: u64) -> Self {
        Self {
            words: vec![0; words_for(bits)],
            bits,
        }
    }

    /// An all-set bitmap of `bits` bits.
    pub fn full(bits: u64) -> Self {
        let mut words = vec![u64::MAX; words_for(bits)];
        if let Some(last) = words.last_mut() {
            *last = tail_mask(bits);
        }
        Self { words, bits }
    }

    /// Builds a bitmap from words, rejecting a wrong word count or stray tail bits (the
    /// words may come from a file or a peer).
    pub fn from_words(words: Vec<u64>, bits: u64) -> Result<Self, BitmapError> {
        let expected = words_for(bits);
        if words.len() != expected {
            return Err(BitmapError::WordCount {
                bits,
                expected,
                got: words.len(),
            });
        }
        if let Some(last) = words.last() {
            if last & !tail_mask(bits) != 0 {
                return Err(BitmapError::TailBits { bits });
            }
        }
        Ok(Self { words, bits })
    }

    /// The underlying words (little-endian bit order within a word).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.bits
    }

    /// True when the bitmap has zero bits (not: no bit set; see [`Bitmap::none`]).
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// True when no bit is set.
    pub fn none(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// Sets bit `i` (ignored when out of range).
    pub fn set(&mut self, i: u64) {
        if i < self.bits {
            self.words[(i / WORD_BITS) as usize] |= 1 << (i % WORD_BITS);
        }
    }

    /// Clears bit `i`.
    pub fn clear(&mut self, i: u64) {
        if i < self.bits {
            self.words[(i / WORD_BITS) as usize] &= !(1 << (i % WORD_BITS));
        }
    }

    /// Whether bit `i` is set.
    pub fn get(&self, i: u64) -> bool {
        i < self.bits && self.words[(i / WORD_BITS) as usize] & (1 << (i % WORD_BITS)) != 0
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// ORs `other` in (over the common range).
    pub fn merge(&mut self, other: &Bitmap) {
        for (w, o) in self.words.iter_mut().zip(other.words.iter()) {
            *w |= *o;
        }
    }

    /// Clears every bit that is set in `other`.
    pub fn subtract(&mut self, other: &Bitmap) {
        for (w, o) in self.words.iter_mut().zip(other.words.iter()) {
            *w &= !*o;
        }
    }

    /// Iterates the indices of set bits in ascending order.
    pub fn iter_ones(&self) -> Ones<'_> {
        Ones {
            words: &self.words,
            word_index: 0,
            current: self.words.first().copied().unwrap_or(0),
        }
    }

    /// Iterates maximal runs of set bits as `(start, len)`.
    pub fn runs(&self) -> Runs<'_> {
        Runs {
            bitmap: self,
            pos: 0,
        }
    }

    /// Index of the first set bit at or after `from`.
    fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.bits {
            return None;
        }
        let mut w = (from / WORD_BITS) as usize;
        let mut word = self.words[w] & (u64::MAX << (from % WORD_BITS));
        loop {
            if word != 0 {
                let i = w as u64 * WORD_BITS + u64::from(word.trailing_zeros());
                return (i < self.bits).then_some(i);
            }
            w += 1;
            if w >= self.words.len() {
                return None;
            }
            word = self.words[w];
        }
    }

    /// Index of the first clear bit at or after `from` (or `len()`).
    fn next_clear(&self, from: u64) -> u64 {
        if from >= self.bits {
            return self.bits;
        }
        let mut w = (from / WORD_BITS) as usize;
        let mut word = !self.words[w] & (u64::MAX << (from % WORD_BITS));
        loop {
            if word != 0 {
                let i = w as u64 * WORD_BITS + u64::from(word.trailing_zeros());
                return i.min(self.bits);
            }
            w += 1;
            if w >= self.words.len() {
                return self.bits;
            }
            word = !self.words[w];
        }
    }
}

/// Iterator over set bits; see [`Bitmap::iter_ones`].
pub struct Ones<'a> {
    words: &'a [u64],
    word_index: usize,
    current: u64,
}

impl Iterator for Ones<'_> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        while self.current == 0 {
            self.word_index += 1;
            self.current = *self.words.get(self.word_index)?;
        }
        let bit = self.current.trailing_zeros();
        self.current &= self.current - 1;
        Some(self.word_index as u64 * WORD_BITS + u64::from(bit))
    }
}

/// Iterator over runs of set bits; see [`Bitmap::runs`].
pub struct Runs<'a> {
    bitmap: &'a Bitmap,
    pos: u64,
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        let start = self.bitmap.next_set(self.pos)?;
        let end = self.bitmap.next_clear(start);
        self.pos = end;
        Some((start, end - start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn model_runs(model: &[bool]) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        let mut i = 0;
        while i < model.len() {
            if model[i] {
                let s = i;
                while i < model.len() && model[i] {
                    i += 1;
                }
                runs.push((s as u64, (i - s) as u64));
            } else {
                i += 1;
            }
        }
        runs
    }

    proptest! {
        #[test]
        fn matches_naive_model(bits in 0u64..700, ops in proptest::collection::vec((0u8..4, 0u64..800, 0u64..200), 0..60)) {
            let live = DirtyBitmap::new(bits);
            let mut model = vec![false; bits as usize];
            let mut taken_model = vec![false; bits as usize];
            let mut taken = Bitmap::new(bits);
            for (op, a, b) in ops {
                match op {
                    0 => { live.set(a); if a < bits { model[a as usize] = true; } }
                    1 => { live.set_range(a, b); for i in a..(a + b).min(bits) { model[i as usize] = true; } }
                    2 => {
                        let t = live.take();
                        for i in 0..bits { prop_assert_eq!(t.get(i), model[i as usize]); }
                        taken.merge(&t);
                        for (tm, m) in taken_model.iter_mut().zip(model.iter_mut()) { *tm |= *m; *m = false; }
                    }
                    _ => {
                        // merge back what was taken, as after a failed send
                        live.merge(&taken);
                        for (m, tm) in model.iter_mut().zip(taken_model.iter_mut()) { *m |= *tm; *tm = false; }
                        taken = Bitmap::new(bits);
                    }
                }
                prop_assert_eq!(live.count(), model.iter().filter(|b| **b).count() as u64);
            }
            let snap = live.peek();
            let ones: Vec<u64> = snap.iter_ones().collect();
            let expect: Vec<u64> = (0..bits).filter(|i| model[*i as usize]).collect();
            prop_assert_eq!(ones, expect);
            prop_assert_eq!(snap.runs().collect::<Vec<_>>(), model_runs(&model));
        }

        #[test]
        fn from_words_roundtrip(bits in 0u64..500, seed in any::<u64>()) {
            let mut b = Bitmap::new(bits);
            let mut x = seed;
            for i in 0..bits { x = x.wrapping_mul(6364136223846793005).wrapping_add(1); if x >> 63 == 1 { b.set(i); } }
            let back = Bitmap::from_words(b.words().to_vec(), bits).unwrap();
            prop_assert_eq!(back, b);
        }
    }

    #[test]
    fn full_has_exact_count_and_rejects_tail() {
        for bits in [0, 1, 63, 64, 65, 130] {
            let f = Bitmap::full(bits);
            assert_eq!(f.count(), bits);
            assert_eq!(
                f.runs().collect::<Vec<_>>(),
                if bits == 0 { vec![] } else { vec![(0, bits)] }
            );
        }
        assert_eq!(
            Bitmap::from_words(vec![u64::MAX], 3),
            Err(BitmapError::TailBits { bits: 3 })
        );
        assert!(matches!(
            Bitmap::from_words(vec![0, 0], 3),
            Err(BitmapError::WordCount { .. })
        ));
    }

    #[test]
    fn concurrent_sets_are_never_lost() {
        let live = std::sync::Arc::new(DirtyBitmap::new(10_000));
        let mut seen = Bitmap::new(10_000);
        let writers: Vec<_> = (0..2)
            .map(|t| {
                let live = live.clone();
                std::thread::spawn(move || {
                    for i in (t..10_000).step_by(2) {
                        live.set(i);
                    }
                })
            })
            .collect();
        for _ in 0..50 {
            seen.merge(&live.take());
        }
        for w in writers {
            w.join().unwrap();
        }
        seen.merge(&live.take());
        assert_eq!(seen.count(), 10_000);
    }
}
