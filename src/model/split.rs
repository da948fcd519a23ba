//! Deterministic hold-out split by customer (spec §7).

/// True iff the customer belongs to the test split: the first 8 bytes of
/// `blake3(tenant + "|" + decimal customer_id)`, read as a little-endian u64,
/// are divisible by 5 (≈ 20 % of customers). Independent of row order.
pub fn is_test(tenant: &str, customer_id: i64) -> bool {
    // The key is built on the stack (no allocation: this runs once per row).
    let mut buf = [0u8; 128];
    let t = tenant.as_bytes();
    let hash = if t.len() + 22 <= buf.len() {
        use std::io::Write;
        buf[..t.len()].copy_from_slice(t);
        buf[t.len()] = b'|';
        let mut rest = &mut buf[t.len() + 1..];
        let before = rest.len();
        let _ = write!(rest, "{customer_id}");
        let len = t.len() + 1 + (before - rest.len());
        blake3::hash(&buf[..len])
    } else {
        blake3::hash(format!("{tenant}|{customer_id}").as_bytes())
    };
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(first) % 5 == 0
}

/// [`is_test`] for many customers, on the cores [`crate::util::par`] allows.
pub fn test_mask(tenant: &str, customer_ids: &[i64]) -> Vec<bool> {
    crate::util::par::map_chunks(customer_ids.len(), crate::util::par::threads(), 16_384, |r| {
        let ids = &customer_ids[r];
        let mut mask = Vec::with_capacity(ids.len());
        if let Some(batch) = one_block::Batch::new(tenant) {
            let mut chunks = ids.chunks_exact(one_block::LANES);
            for c in &mut chunks {
                let words = batch.first_words(c.try_into().expect("chunks_exact gives LANES ids"));
                mask.extend(words.iter().map(|&w| w % 5 == 0));
            }
            mask.extend(chunks.remainder().iter().map(|&id| is_test(tenant, id)));
        } else {
            mask.extend(ids.iter().map(|&id| is_test(tenant, id)));
        }
        mask
    })
    .concat()
}

/// BLAKE3 of messages that fit one 64-byte block, [`one_block::LANES`] at a
/// time, computing only what the split needs (the hash's first 8 bytes).
///
/// Rules: this is the BLAKE3 compression function (BLAKE3 spec §2.2) for a
/// single block with flags CHUNK_START | CHUNK_END | ROOT, counter 0 and the
/// message's length as block length, which is exactly `blake3::hash` of a
/// message of at most 64 bytes; longer messages are refused (`Batch::new`
/// returns `None` and callers use the blake3 crate). Three copies of the
/// compression: AVX-512 (16 lanes in one register per state word) and AVX2
/// (two halves of 8), chosen at run time where the CPU has them, and the
/// scalar reference, one lane at a time. The two vector copies differ in
/// their intrinsics (AVX2 has no 32-bit rotate), not in their rounds. Tests
/// compare every result with the blake3 crate.
mod one_block {
    pub const LANES: usize = 16;
    type Lanes = [u32; LANES];

    const IV: [u32; 8] = [0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19];
    const PERMUTATION: [usize; 16] = [2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8];
    const CHUNK_START: u32 = 1;
    const CHUNK_END: u32 = 2;
    const ROOT: u32 = 8;
    /// "-9223372036854775808" is the longest decimal of an i64.
    const MAX_DECIMAL: usize = 20;

    /// Messages `tenant + "|" + decimal(customer_id)` for one tenant.
    pub struct Batch {
        /// A block holding the prefix `tenant + "|"`, zero after it.
        template: [u8; 64],
        prefix: usize,
    }

    impl Batch {
        /// `None` when some customer's message could exceed one block.
        pub fn new(tenant: &str) -> Option<Batch> {
            let prefix = tenant.len() + 1;
            if prefix + MAX_DECIMAL > 64 {
                return None;
            }
            let mut template = [0u8; 64];
            template[..tenant.len()].copy_from_slice(tenant.as_bytes());
            template[tenant.len()] = b'|';
            Some(Batch { template, prefix })
        }

        /// The first 8 bytes (little-endian) of each customer's hash.
        pub fn first_words(&self, ids: &[i64; LANES]) -> [u64; LANES] {
            #[cfg(target_arch = "x86_64")]
            {
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked just above), the only
                    // requirement of a `target_feature(enable = "avx512f")` function.
                    return self.first_words_with(ids, |m, len| unsafe { compress_avx512(m, len) });
                }
                if std::is_x86_feature_detected!("avx2") {
                    // SAFETY: as above, for AVX2.
                    return self.first_words_with(ids, |m, len| unsafe { compress_avx2(m, len) });
                }
            }
            self.first_words_with(ids, compress)
        }

        fn first_words_with(&self, ids: &[i64; LANES], compress: impl Fn(&[Lanes; 16], &Lanes) -> [u64; LANES]) -> [u64; LANES] {
            let mut blocks = [self.template; LANES];
            let mut len = [0u32; LANES];
            for ((block, len), &id) in blocks.iter_mut().zip(&mut len).zip(ids) {
                *len = (self.prefix + decimal(id, &mut block[self.prefix..])) as u32;
            }
            // Word w of every lane's block, side by side.
            let m: [Lanes; 16] = std::array::from_fn(|w| std::array::from_fn(|l| u32::from_le_bytes(blocks[l][4 * w..4 * w + 4].try_into().expect("4 bytes"))));
            compress(&m, &len)
        }
    }

    /// Writes the decimal digits of `id` (with a leading '-' if negative) to
    /// the start of `out` (at least [`MAX_DECIMAL`] bytes); returns how many.
    fn decimal(id: i64, out: &mut [u8]) -> usize {
        let mut v = id.unsigned_abs();
        let sign = usize::from(id < 0);
        let n = sign + v.checked_ilog10().map_or(1, |d| d as usize + 1);
        out[0] = b'-';
        for i in (sign..n).rev() {
            out[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
        n
    }

    /// Message word order of each of the 7 rounds (the spec's permutation
    /// applied 0..6 times).
    const SCHEDULE: [[usize; 16]; 7] = {
        let mut s = [[0usize; 16]; 7];
        let mut i = 0;
        while i < 16 {
            s[0][i] = i;
            i += 1;
        }
        let mut r = 1;
        while r < 7 {
            let mut i = 0;
            while i < 16 {
                s[r][i] = s[r - 1][PERMUTATION[i]];
                i += 1;
            }
            r += 1;
        }
        s
    };

    /// One lane at a time: the reference the vector version is tested against
    /// and the path of CPUs without AVX2.
    fn compress(m: &[Lanes; 16], len: &Lanes) -> [u64; LANES] {
        std::array::from_fn(|l| {
            let mut v = [0u32; 16];
            v[..8].copy_from_slice(&IV);
            v[8..12].copy_from_slice(&IV[..4]);
            // v[12], v[13]: the counter (0); v[14]: block length; v[15]: flags.
            v[14] = len[l];
            v[15] = CHUNK_START | CHUNK_END | ROOT;
            for s in &SCHEDULE {
                let w = |i: usize| m[s[i]][l];
                for (k, [a, b, c, d]) in QUARTERS.iter().enumerate() {
                    let (x, y) = (w(2 * k), w(2 * k + 1));
                    v[*a] = v[*a].wrapping_add(v[*b]).wrapping_add(x);
                    v[*d] = (v[*d] ^ v[*a]).rotate_right(16);
                    v[*c] = v[*c].wrapping_add(v[*d]);
                    v[*b] = (v[*b] ^ v[*c]).rotate_right(12);
                    v[*a] = v[*a].wrapping_add(v[*b]).wrapping_add(y);
                    v[*d] = (v[*d] ^ v[*a]).rotate_right(8);
                    v[*c] = v[*c].wrapping_add(v[*d]);
                    v[*b] = (v[*b] ^ v[*c]).rotate_right(7);
                }
            }
            // Output words 0 and 1 are v[0] ^ v[8] and v[1] ^ v[9].
            u64::from(v[0] ^ v[8]) | u64::from(v[1] ^ v[9]) << 32
        })
    }

    /// The seven rounds of [`compress`] on vector registers `$v` (state) and
    /// `$m` (message words), with the lane-wise operations of one register
    /// type given as macros at the call site: `add!` and `xor!` (32-bit) and
    /// `ror!(x, 16 | 12 | 8 | 7)` (right rotation). Expanded inside each
    /// `target_feature` function, so every operation is that function's own
    /// instruction (closures would be calls to code built without it).
    #[cfg(target_arch = "x86_64")]
    macro_rules! rounds {
        ($v:ident, $m:ident) => {
            for s in &SCHEDULE {
                for (k, &[a, b, c, d]) in QUARTERS.iter().enumerate() {
                    let (x, y) = ($m[s[2 * k]], $m[s[2 * k + 1]]);
                    $v[a] = add!(add!($v[a], $v[b]), x);
                    $v[d] = ror!(xor!($v[d], $v[a]), 16);
                    $v[c] = add!($v[c], $v[d]);
                    $v[b] = ror!(xor!($v[b], $v[c]), 12);
                    $v[a] = add!(add!($v[a], $v[b]), y);
                    $v[d] = ror!(xor!($v[d], $v[a]), 8);
                    $v[c] = add!($v[c], $v[d]);
                    $v[b] = ror!(xor!($v[b], $v[c]), 7);
                }
            }
        };
    }

    /// State words each quarter-round mixes: columns, then diagonals.
    const QUARTERS: [[usize; 4]; 8] =
        [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15], [0, 5, 10, 15], [1, 6, 11, 12], [2, 7, 8, 13], [3, 4, 9, 14]];

    /// [`compress`] with one 512-bit register per state word (16 lanes).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn compress_avx512(m: &[Lanes; 16], len: &Lanes) -> [u64; LANES] {
        use std::arch::x86_64::*;
        // SAFETY: reads 64 bytes from a [u32; 16] (64 bytes); unaligned loads
        // have no alignment requirement.
        let load = |a: &Lanes| unsafe { _mm512_loadu_si512(a.as_ptr().cast()) };
        let m: [__m512i; 16] = std::array::from_fn(|i| load(&m[i]));
        let mut v = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            v[i] = _mm512_set1_epi32(IV[i] as i32);
        }
        for i in 0..4 {
            v[8 + i] = _mm512_set1_epi32(IV[i] as i32);
        }
        v[14] = load(len);
        v[15] = _mm512_set1_epi32((CHUNK_START | CHUNK_END | ROOT) as i32);
        macro_rules! add {
            ($a:expr, $b:expr) => {
                _mm512_add_epi32($a, $b)
            };
        }
        macro_rules! xor {
            ($a:expr, $b:expr) => {
                _mm512_xor_si512($a, $b)
            };
        }
        macro_rules! ror {
            ($x:expr, $n:literal) => {
                _mm512_ror_epi32::<$n>($x)
            };
        }
        rounds!(v, m);
        let (mut lo, mut hi) = ([0u32; LANES], [0u32; LANES]);
        // SAFETY: each store writes 64 bytes to a local [u32; 16] (64 bytes);
        // the unaligned store has no alignment requirement.
        unsafe {
            _mm512_storeu_si512(lo.as_mut_ptr().cast(), _mm512_xor_si512(v[0], v[8]));
            _mm512_storeu_si512(hi.as_mut_ptr().cast(), _mm512_xor_si512(v[1], v[9]));
        }
        std::array::from_fn(|l| u64::from(lo[l]) | u64::from(hi[l]) << 32)
    }

    /// [`compress`] with one 256-bit register per state word, 8 lanes at a
    /// time.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn compress_avx2(m: &[Lanes; 16], len: &Lanes) -> [u64; LANES] {
        use std::arch::x86_64::*;
        let mut out = [0u64; LANES];
        for half in 0..LANES / 8 {
            let lanes = half * 8..half * 8 + 8;
            // SAFETY: reads 32 bytes from 8 consecutive u32 inside a [u32; 16];
            // unaligned loads have no alignment requirement.
            let load = |a: &Lanes| unsafe { _mm256_loadu_si256(a[lanes.clone()].as_ptr().cast()) };
            let m: [__m256i; 16] = std::array::from_fn(|i| load(&m[i]));
            let mut v = [_mm256_setzero_si256(); 16];
            for i in 0..8 {
                v[i] = _mm256_set1_epi32(IV[i] as i32);
            }
            for i in 0..4 {
                v[8 + i] = _mm256_set1_epi32(IV[i] as i32);
            }
            v[14] = load(len);
            v[15] = _mm256_set1_epi32((CHUNK_START | CHUNK_END | ROOT) as i32);
            // Byte shuffles rotating each 32-bit lane right by 16 and by 8 bits.
            let r16 = _mm256_setr_epi8(2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
            let r8 = _mm256_setr_epi8(1, 2, 3, 0, 5, 6, 7, 4, 9, 10, 11, 8, 13, 14, 15, 12, 1, 2, 3, 0, 5, 6, 7, 4, 9, 10, 11, 8, 13, 14, 15, 12);
            macro_rules! add {
                ($a:expr, $b:expr) => {
                    _mm256_add_epi32($a, $b)
                };
            }
            macro_rules! xor {
                ($a:expr, $b:expr) => {
                    _mm256_xor_si256($a, $b)
                };
            }
            macro_rules! ror {
                ($x:expr, 16) => {
                    _mm256_shuffle_epi8($x, r16)
                };
                ($x:expr, 8) => {
                    _mm256_shuffle_epi8($x, r8)
                };
                ($x:expr, 12) => {{
                    let t = $x;
                    _mm256_or_si256(_mm256_srli_epi32(t, 12), _mm256_slli_epi32(t, 20))
                }};
                ($x:expr, 7) => {{
                    let t = $x;
                    _mm256_or_si256(_mm256_srli_epi32(t, 7), _mm256_slli_epi32(t, 25))
                }};
            }
            rounds!(v, m);
            let (mut lo, mut hi) = ([0u32; 8], [0u32; 8]);
            // SAFETY: each store writes 32 bytes to a local [u32; 8] (32 bytes);
            // the unaligned store has no alignment requirement.
            unsafe {
                _mm256_storeu_si256(lo.as_mut_ptr().cast(), _mm256_xor_si256(v[0], v[8]));
                _mm256_storeu_si256(hi.as_mut_ptr().cast(), _mm256_xor_si256(v[1], v[9]));
            }
            for l in 0..8 {
                out[half * 8 + l] = u64::from(lo[l]) | u64::from(hi[l]) << 32;
            }
        }
        out
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn reference(batch: &Batch, id: i64) -> u64 {
            let mut msg = batch.template[..batch.prefix].to_vec();
            msg.extend_from_slice(id.to_string().as_bytes());
            u64::from_le_bytes(blake3::hash(&msg).as_bytes()[..8].try_into().unwrap())
        }

        #[test]
        fn equals_the_blake3_crate_for_every_length_and_sign() {
            let mut ids: Vec<i64> = (-2_000..2_000).collect();
            ids.extend([i64::MIN, i64::MIN + 1, i64::MAX, i64::MAX - 1, 10, 100, 1_000_000_007, -999_999_999_999]);
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            for _ in 0..5_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ids.push((x as i64) >> (x % 63));
            }
            ids.truncate(ids.len() / LANES * LANES);
            // Prefixes of every length a batch accepts, including the longest.
            for tenant in ["", "T", "Tenant_A", "tenant-with-a-rather-long-name-0123456789ab"] {
                let Some(batch) = Batch::new(tenant) else { panic!("{tenant} fits") };
                for c in ids.chunks_exact(LANES) {
                    let got = batch.first_words(c.try_into().unwrap());
                    let ids: &[i64; LANES] = c.try_into().unwrap();
                    let mut each = vec![batch.first_words_with(ids, compress)];
                    #[cfg(target_arch = "x86_64")]
                    {
                        if std::is_x86_feature_detected!("avx2") {
                            // SAFETY: the CPU has AVX2 (checked just above).
                            each.push(batch.first_words_with(ids, |m, len| unsafe { compress_avx2(m, len) }));
                        }
                        if std::is_x86_feature_detected!("avx512f") {
                            // SAFETY: the CPU has AVX-512F (checked just above).
                            each.push(batch.first_words_with(ids, |m, len| unsafe { compress_avx512(m, len) }));
                        }
                    }
                    for (lane, &id) in c.iter().enumerate() {
                        assert_eq!(got[lane], reference(&batch, id), "{tenant}|{id}");
                        for e in &each {
                            assert_eq!(e[lane], got[lane], "{tenant}|{id}");
                        }
                    }
                }
            }
            assert!(Batch::new("tenant-with-a-rather-long-name-0123456789abc").is_none());
            let mut d = [0u8; 20];
            let n = decimal(i64::MIN, &mut d);
            assert_eq!(&d[..n], i64::MIN.to_string().as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values computed once with an independent pure-Python BLAKE3
    /// implementation written from the BLAKE3 spec (checked against the
    /// published test vectors for "" and "abc"), not with the blake3 crate.
    #[test]
    fn pinned_values() {
        // blake3("Tenant_A|12")[..8] -> test; ids 0..=11 of Tenant_A are all train.
        assert!(is_test("Tenant_A", 12));
        assert!(is_test("Tenant_A", 14));
        assert!(is_test("Tenant_B", 7));
        assert!(!is_test("Tenant_A", 0)); // 45cfc2cfb35b3be8 LE % 5 != 0
        assert!(!is_test("Tenant_B", 12345));
        assert!(!is_test("Tenant_A", -7));
        let ids: Vec<i64> = (-50_000..50_003).collect();
        let mask = test_mask("Tenant_A", &ids);
        assert!(ids.iter().zip(&mask).all(|(&id, &m)| m == is_test("Tenant_A", id)));
        // A tenant too long for one block takes the blake3 crate's path.
        let long = "a-tenant-name-far-too-long-for-a-single-blake3-block";
        let mask = test_mask(long, &ids[..100]);
        assert!(ids[..100].iter().zip(&mask).all(|(&id, &m)| m == is_test(long, id)));
        let a: Vec<i64> = (0..40).filter(|&i| is_test("Tenant_A", i)).collect();
        assert_eq!(a, vec![12, 14, 17, 21, 33, 35, 37]);
        let b: Vec<i64> = (0..40).filter(|&i| is_test("Tenant_B", i)).collect();
        assert_eq!(b, vec![7, 10, 11, 20, 22, 23, 26, 32, 35]);
    }

    #[test]
    fn fraction_deterministic_and_order_independent() {
        // Python reference: Tenant_A 1955 of 10,000, T3 2015 of 10,000.
        let count = |t: &str| (0..10_000i64).filter(|&i| is_test(t, i)).count();
        assert_eq!(count("Tenant_A"), 1955);
        assert_eq!(count("T3"), 2015);
        for t in ["Tenant_A", "T3", "x"] {
            let c = count(t);
            assert!((1800..=2200).contains(&c), "{t}: {c}");
        }
        // order independence: evaluating in reverse gives the same set
        let fwd: Vec<bool> = (0..1000i64).map(|i| is_test("Tenant_B", i)).collect();
        let mut rev: Vec<bool> = (0..1000i64).rev().map(|i| is_test("Tenant_B", i)).collect();
        rev.reverse();
        assert_eq!(fwd, rev);
        // the tenant is part of the key
        let diff = (0..1000i64).filter(|&i| is_test("Tenant_A", i) != is_test("Tenant_B", i)).count();
        assert!(diff > 100);
    }
}
