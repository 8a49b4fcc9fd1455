//! Stable hashes of our own (not std's or rand's), so that data orders, hold-out splits,
//! per-tensor seeds and file ids never change with a toolchain or dependency upgrade.

/// FNV-1a's offset basis and prime (64-bit).
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x100_0000_01b3;
/// 2^64 / golden ratio, the usual odd constant for spreading a seed.
pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// FNV-1a over `bytes`, starting from `start` (FNV_OFFSET, or FNV_OFFSET mixed with a seed).
pub fn fnv1a(start: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(start, |h, &b| (h ^ b as u64).wrapping_mul(FNV_PRIME))
}

/// SplitMix64 finaliser: a well-mixed 64-bit hash of a 64-bit value.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a over the bytes of a string, then mixed.
pub fn str_hash(s: &str) -> u64 {
    mix64(fnv1a(FNV_OFFSET, s.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values_never_change() {
        // FNV-1a test vectors (the empty string is the offset basis; "a" from the FNV page).
        assert_eq!(fnv1a(FNV_OFFSET, b""), FNV_OFFSET);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        // SplitMix64 of 0 is the first output of the reference generator seeded with 0.
        assert_eq!(mix64(0), 0xe220_a839_7b1d_cdaf);
    }
}
