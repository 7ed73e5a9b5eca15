//! Chained block hashes: the identity of a full block's contents for prefix caching.

use crate::TokenId;

/// The identity of one full block of KV: a hash over the parent block's hash,
/// the block's token ids and an optional extra key (LoRA id, cache salt...).
///
/// Because the parent's hash is folded in, equal hashes mean equal *prefixes*,
/// not just equal blocks: two sequences share block `i` only if all of their
/// tokens up to the end of block `i` agree. 128 bits keep accidental collisions
/// out of reach for the life of a server (a 64-bit hash would be at birthday
/// risk after a few billion blocks). The function is not cryptographic: it
/// does not resist an adversary who crafts colliding prompts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u128);

// Odd 64-bit constants with well-spread bits (digits of pi, e and the golden ratio).
const K0: u64 = 0x243f_6a88_85a3_08d3;
const K1: u64 = 0x9e37_79b9_7f4a_7c15;
const K2: u64 = 0xb7e1_5162_8aed_2a6b;
const K3: u64 = 0x1319_8a2e_0370_7345;
/// Seeds for a chain's first block and for "no extra key", so that neither
/// coincides with any real parent hash or key by construction of the input.
const ROOT_TAG: u64 = 0x5a17_c0de_0000_0001;
const NO_KEY_TAG: u64 = 0x5a17_c0de_0000_0002;
const KEY_TAG: u64 = 0x5a17_c0de_0000_0003;

/// Multiplies to 128 bits and folds the halves: a cheap, strong 64-bit mixer.
#[inline]
fn fold_mul(a: u64, b: u64) -> u64 {
    let p = (a as u128).wrapping_mul(b as u128);
    (p as u64) ^ ((p >> 64) as u64)
}

/// Two independent 64-bit lanes; the data word is added back after mixing so
/// that no input can reset a lane to a constant.
struct Lanes {
    a: u64,
    b: u64,
}

impl Lanes {
    #[inline]
    fn absorb(&mut self, w: u64) {
        self.a = fold_mul(self.a ^ w, K0).wrapping_add(w);
        self.b = fold_mul(self.b ^ w.rotate_left(32) ^ K3, K1).wrapping_add(w.rotate_left(17));
    }

    #[inline]
    fn finish(self) -> u128 {
        let a = fold_mul(self.a ^ self.b.rotate_left(29), K2);
        let b = fold_mul(self.b ^ a, K0 ^ K1);
        ((a as u128) << 64) | b as u128
    }
}

impl BlockHash {
    /// Hash of a full block whose tokens are `tokens`, following the block
    /// whose hash is `parent` (`None` for the first block of a sequence).
    pub fn chain(parent: Option<BlockHash>, tokens: &[TokenId], extra_key: Option<u64>) -> BlockHash {
        let mut lanes = Lanes { a: K2, b: K3 };
        match parent {
            Some(BlockHash(h)) => {
                lanes.absorb(h as u64);
                lanes.absorb((h >> 64) as u64);
            }
            None => {
                lanes.absorb(ROOT_TAG);
                lanes.absorb(ROOT_TAG);
            }
        }
        match extra_key {
            Some(key) => {
                lanes.absorb(KEY_TAG);
                lanes.absorb(key);
            }
            None => lanes.absorb(NO_KEY_TAG),
        }
        lanes.absorb(tokens.len() as u64);
        let mut pairs = tokens.chunks_exact(2);
        for pair in &mut pairs {
            lanes.absorb(u64::from(pair[0]) | (u64::from(pair[1]) << 32));
        }
        if let [last] = pairs.remainder() {
            // Tag the odd token so that [x] and [x, 0] differ (lengths are absorbed too).
            lanes.absorb(u64::from(*last) | (0xffff_ffff << 32));
        }
        BlockHash(lanes.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn deterministic_and_sensitive_to_every_input() {
        let tokens: Vec<u32> = (0..16).collect();
        let h = BlockHash::chain(None, &tokens, None);
        assert_eq!(h, BlockHash::chain(None, &tokens, None));
        assert_ne!(h, BlockHash::chain(Some(h), &tokens, None), "parent must matter");
        assert_ne!(h, BlockHash::chain(None, &tokens, Some(0)), "extra key must matter, even 0");
        assert_ne!(
            BlockHash::chain(None, &tokens, Some(1)),
            BlockHash::chain(None, &tokens, Some(2)),
            "different extra keys must differ"
        );
        for i in 0..tokens.len() {
            let mut t = tokens.clone();
            t[i] += 1;
            assert_ne!(h, BlockHash::chain(None, &t, None), "token {i} must matter");
        }
        let mut swapped = tokens.clone();
        swapped.swap(0, 1);
        assert_ne!(h, BlockHash::chain(None, &swapped, None), "order must matter");
        assert_ne!(BlockHash::chain(None, &[7], None), BlockHash::chain(None, &[7, 0], None));
    }

    #[test]
    fn no_collisions_among_many_similar_blocks() {
        // Blocks differing in one token, across chains: all distinct.
        let mut seen = HashSet::new();
        let mut parent = None;
        for chain in 0..64u32 {
            for pos in 0..16usize {
                for v in 0..32u32 {
                    let mut t = vec![chain; 16];
                    t[pos] = v + 1000;
                    assert!(seen.insert(BlockHash::chain(parent, &t, None)));
                }
            }
            parent = Some(BlockHash::chain(parent, &[chain; 16], None));
        }
        assert_eq!(seen.len(), 64 * 16 * 32);
    }
}
