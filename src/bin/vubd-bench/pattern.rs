//! Verifiable block contents: every byte depends on the block number and its write
//! generation, so stale data, data from another block or a lost write never matches.

/// Fills `buf` with the contents of `block` at generation `gen`.
pub fn fill(buf: &mut [u8], block: u64, gen: u32) {
    let mut x = block.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ u64::from(gen).wrapping_mul(0xD1B5_4A32_D192_ED03)
        | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// The first offset where `buf` differs from `fill(block, gen)`, if any.
pub fn mismatch(buf: &[u8], block: u64, gen: u32, scratch: &mut Vec<u8>) -> Option<usize> {
    scratch.resize(buf.len(), 0);
    fill(scratch, block, gen);
    buf.iter().zip(scratch.iter()).position(|(a, b)| a != b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_differ_by_block_and_generation_and_mismatches_are_found() {
        let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 4096]);
        fill(&mut a, 7, 1);
        fill(&mut b, 7, 2);
        assert_ne!(a, b);
        fill(&mut b, 8, 1);
        assert_ne!(a, b);
        let mut scratch = Vec::new();
        assert_eq!(mismatch(&a, 7, 1, &mut scratch), None);
        a[1000] ^= 1;
        assert_eq!(mismatch(&a, 7, 1, &mut scratch), Some(1000));
    }
}
