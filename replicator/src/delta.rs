//! Block deltas for large files, the way rsync's fixed-block half works: the standby
//! tells the active the hash of each block of its copy, the active sends only the
//! blocks whose hash differs (and those past the end of the standby's copy), and the
//! standby builds the new file from its old copy plus those blocks, checking the
//! result against the active's content hash before it counts as applied.
//!
//! A file's content hash is built from its blocks ([`content_hash`]): the xxh3-128
//! of each block, and for a file of more than one block the xxh3-128 of that list.
//! So a side that knows a file's block list and which blocks changed gets the new
//! hash by reading those blocks only, not the whole file.
//!
//! Both messages travel on unidirectional QUIC streams of the connection, each headed
//! by the op's sequence number (8 bytes, big endian):
//!
//! - standby → active, the *block list*: `seq`, `block_size: u32`, `count: u32`, then
//!   `count` hashes, each the low 64 bits of the block's xxh3-128 ([`short`]; half
//!   the bytes of the whole hashes, which only the content hash needs), all big
//!   endian;
//! - active → standby, the *blocks*: `seq`, then records `offset: u64`, `len: u32`,
//!   `len` bytes, until the stream finishes.
//!
//! Blocks do not slide (no rolling hash): an insertion near the start of a file resends
//! everything after it. The files twinfs is for (images, databases, logs) change in
//! place or grow at the end, where fixed blocks find the unchanged parts.

/// The smallest block, and the size for files up to 1 GiB: a 1 MiB change anywhere
/// costs at most 1 MiB + 2 blocks on the wire.
pub const MIN_BLOCK: u32 = 64 << 10;

/// The largest block a peer may announce.
pub const MAX_BLOCK: u32 = 64 << 20;

/// Most hashes in a block list (blocks grow with the file to stay under this).
pub const MAX_BLOCKS: u32 = 16 << 10;

/// Bytes of one record header on the blocks stream.
pub const RECORD_HEADER: usize = 12;

/// The block size for a file of `len` bytes: [`MIN_BLOCK`], doubled until the file
/// has at most [`MAX_BLOCKS`] blocks.
pub fn block_size(len: u64) -> u32 {
    let mut block = MIN_BLOCK;
    while len.div_ceil(u64::from(block)) > u64::from(MAX_BLOCKS) && block < MAX_BLOCK {
        block *= 2;
    }
    block
}

/// The hash of one block, as both sides compute it: its xxh3-128.
pub fn block_hash(data: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(data)
}

/// What a block list on the wire carries of a block's hash: its low 64 bits.
pub fn short(hash: u128) -> u64 {
    hash as u64
}

/// The content hash of a file of `len` bytes whose block list is `list` (of
/// [`block_size`]`(len)` blocks): for a file of one block or none, the xxh3-128 of
/// its bytes (which is that block's hash); otherwise the xxh3-128 of a tag, the
/// length, the block size and the blocks' hashes, all little endian.
pub fn content_hash(list: &BlockList, len: u64) -> u128 {
    match list.hashes.as_slice() {
        [] => xxhash_rust::xxh3::xxh3_128(b""),
        [one] => *one,
        many => {
            let mut hasher = xxhash_rust::xxh3::Xxh3Default::new();
            hasher.update(CONTENT_TAG);
            hasher.update(&len.to_le_bytes());
            hasher.update(&list.block_size.to_le_bytes());
            for h in many {
                hasher.update(&h.to_le_bytes());
            }
            hasher.digest128()
        }
    }
}

/// Heads what [`content_hash`] hashes for a file of several blocks.
const CONTENT_TAG: &[u8] = b"twinfs blocks v1";

/// The content hash of `data`, a whole file's bytes ([`content_hash`]).
pub fn content_hash_of(data: &[u8]) -> u128 {
    let mut hasher = BlockHasher::new(block_size(data.len() as u64));
    hasher.update(data);
    content_hash(&hasher.finish(), data.len() as u64)
}

/// Works out the block list of bytes fed in order, in pieces of any size.
pub struct BlockHasher {
    block: usize,
    /// Bytes of the current block hashed so far.
    filled: usize,
    hasher: xxhash_rust::xxh3::Xxh3Default,
    hashes: Vec<u128>,
}

impl BlockHasher {
    /// For blocks of `block_size` bytes.
    pub fn new(block_size: u32) -> BlockHasher {
        BlockHasher {
            block: block_size as usize,
            filled: 0,
            hasher: xxhash_rust::xxh3::Xxh3Default::new(),
            hashes: Vec::new(),
        }
    }

    /// Feeds the next bytes.
    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.filled == 0 && data.len() >= self.block {
                // A whole block at once, the common case.
                self.hashes.push(block_hash(&data[..self.block]));
                data = &data[self.block..];
                continue;
            }
            let take = data.len().min(self.block - self.filled);
            self.hasher.update(&data[..take]);
            self.filled += take;
            data = &data[take..];
            if self.filled == self.block {
                self.hashes.push(self.hasher.digest128());
                self.hasher.reset();
                self.filled = 0;
            }
        }
    }

    /// The list of everything fed.
    pub fn finish(mut self) -> BlockList {
        if self.filled > 0 {
            self.hashes.push(self.hasher.digest128());
        }
        BlockList {
            block_size: self.block as u32,
            hashes: self.hashes,
        }
    }
}

/// A file's block list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockList {
    /// Bytes per block (the last block may be short).
    pub block_size: u32,
    /// The hash of each block ([`block_hash`]); empty for an empty file or none. A
    /// list received from a peer holds only the low 64 bits of each ([`short`]).
    pub hashes: Vec<u128>,
}

/// Errors reading a peer's block list or blocks.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeltaError {
    /// A block size that is not a power of two between 4 KiB and [`MAX_BLOCK`].
    #[error("block size {0} is not a power of two between 4 KiB and {MAX_BLOCK}")]
    BlockSize(u32),
    /// More hashes than [`MAX_BLOCKS`].
    #[error("{0} blocks, more than the limit of {MAX_BLOCKS}")]
    TooManyBlocks(u32),
    /// A record longer than [`MAX_BLOCK`].
    #[error("a block of {0} bytes is over the limit of {MAX_BLOCK}")]
    RecordTooLong(u32),
}

impl BlockList {
    /// No blocks: the receiver has no copy.
    pub fn empty() -> BlockList {
        BlockList {
            block_size: MIN_BLOCK,
            hashes: Vec::new(),
        }
    }

    /// The header of the encoded list: `block_size` and `count`, after the op number.
    pub const HEADER: usize = 8;

    /// Bytes of one hash on the wire.
    pub const HASH: usize = 8;

    /// Encodes the list (without the op number that heads the stream); each hash as
    /// its [`short`] form.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::HEADER + Self::HASH * self.hashes.len());
        out.extend_from_slice(&self.block_size.to_be_bytes());
        out.extend_from_slice(&(self.hashes.len() as u32).to_be_bytes());
        for h in &self.hashes {
            out.extend_from_slice(&short(*h).to_be_bytes());
        }
        out
    }

    /// Checks a received header: `(block_size, count)`.
    pub fn check_header(header: [u8; Self::HEADER]) -> Result<(u32, u32), DeltaError> {
        let block = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let count = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        if !block.is_power_of_two() || !(4096..=MAX_BLOCK).contains(&block) {
            return Err(DeltaError::BlockSize(block));
        }
        if count > MAX_BLOCKS {
            return Err(DeltaError::TooManyBlocks(count));
        }
        Ok((block, count))
    }

    /// Decodes hashes from their bytes (their [`short`] forms).
    pub fn hashes_from(bytes: &[u8]) -> Vec<u128> {
        bytes
            .chunks_exact(Self::HASH)
            .map(|c| {
                u128::from(u64::from_be_bytes([
                    c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
                ]))
            })
            .collect()
    }

    /// Whether this list's block `index` is the block whose hash is `hash`, compared
    /// as [`short`] forms (this list may have come from the wire).
    fn has(&self, index: usize, hash: u128) -> bool {
        self.hashes.get(index).map(|h| short(*h)) == Some(short(hash))
    }

    /// The byte ranges of the active's file (of `len` bytes, whose block list is
    /// `active`) to send to the standby this list is of: whole blocks, consecutive
    /// ones merged. `None` if the two lists do not use the same block size (then the
    /// active compares block by block as it reads: [`BlockList::runs_for`]).
    pub fn runs_against(&self, active: &BlockList, len: u64) -> Option<Vec<std::ops::Range<u64>>> {
        if self.block_size != active.block_size
            || active.hashes.len() as u64 != len.div_ceil(u64::from(active.block_size))
        {
            return None;
        }
        let block = u64::from(self.block_size);
        let mut runs: Vec<std::ops::Range<u64>> = Vec::new();
        for (i, hash) in active.hashes.iter().enumerate() {
            if self.has(i, *hash) {
                continue;
            }
            let start = i as u64 * block;
            push_run(&mut runs, start..(start + block).min(len));
        }
        Some(runs)
    }

    /// Whether block `index`, whose bytes are `data`, must be sent: the standby has no
    /// such block or a different one.
    pub fn must_send(&self, index: usize, data: &[u8]) -> bool {
        !self.has(index, block_hash(data))
    }

    /// The byte ranges to send of a piece of `len` bytes that starts at block `first`
    /// and holds whole blocks but for a short last one, whose blocks' hashes are
    /// `hashes`: the blocks the standby has not, or has otherwise, consecutive ones
    /// merged.
    pub fn runs_for(
        &self,
        first: usize,
        hashes: &[u128],
        len: usize,
    ) -> Vec<std::ops::Range<usize>> {
        let block = self.block_size as usize;
        let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
        for (i, hash) in hashes.iter().enumerate() {
            if self.has(first + i, *hash) {
                continue;
            }
            let start = i * block;
            push_run(&mut runs, start..(start + block).min(len));
        }
        runs
    }
}

/// Appends `range` to `runs`, merged into the last run if it starts where that ends.
pub fn push_run<T: PartialEq + Copy>(
    runs: &mut Vec<std::ops::Range<T>>,
    range: std::ops::Range<T>,
) {
    match runs.last_mut() {
        Some(last) if last.end == range.start => last.end = range.end,
        _ => runs.push(range),
    }
}

/// Encodes the header of one record of the blocks stream.
pub fn record_header(offset: u64, len: u32) -> [u8; RECORD_HEADER] {
    let mut out = [0u8; RECORD_HEADER];
    out[..8].copy_from_slice(&offset.to_be_bytes());
    out[8..].copy_from_slice(&len.to_be_bytes());
    out
}

/// The record that ends a blocks stream unfinished: the active gave up on this version
/// of the file (it changed while being sent, or could not be read), and the standby
/// refuses the op before writing anything. (Not a stream reset: a reset can overtake
/// the stream's header, and the standby would not know which op it ended.)
pub fn abort_record() -> [u8; RECORD_HEADER] {
    record_header(ABORT_OFFSET, 0)
}

/// Whether a parsed record header is [`abort_record`].
pub fn is_abort(offset: u64, len: u32) -> bool {
    offset == ABORT_OFFSET && len == 0
}

const ABORT_OFFSET: u64 = u64::MAX;

/// A record that carries nothing: the active sends one now and then while it reads a
/// long stretch of a file that the standby already has, so that neither side takes
/// the quiet stream for a dead one (the standby ends an apply whose stream stays
/// silent, the active starts a full sync when nothing moves).
pub fn keep_alive_record() -> [u8; RECORD_HEADER] {
    record_header(KEEP_ALIVE_OFFSET, 0)
}

const KEEP_ALIVE_OFFSET: u64 = u64::MAX - 1;

/// Decodes and checks a record header: `(offset, len)`.
pub fn parse_record_header(header: [u8; RECORD_HEADER]) -> Result<(u64, u32), DeltaError> {
    let mut offset = [0u8; 8];
    offset.copy_from_slice(&header[..8]);
    let len = u32::from_be_bytes([header[8], header[9], header[10], header[11]]);
    if len > MAX_BLOCK {
        return Err(DeltaError::RecordTooLong(len));
    }
    Ok((u64::from_be_bytes(offset), len))
}

#[cfg(test)]
mod tests {
    use super::*;

    impl BlockList {
        /// [`BlockList::runs_for`] of `data`, starting at block `first`.
        fn runs_to_send(&self, first: usize, data: &[u8]) -> Vec<std::ops::Range<usize>> {
            let hashes: Vec<u128> = data
                .chunks(self.block_size as usize)
                .map(block_hash)
                .collect();
            self.runs_for(first, &hashes, data.len())
        }
    }

    #[test]
    fn block_size_grows_to_keep_the_list_short() {
        assert_eq!(block_size(0), MIN_BLOCK);
        assert_eq!(block_size(512 << 20), MIN_BLOCK);
        assert_eq!(block_size(1 << 30), MIN_BLOCK);
        assert_eq!(block_size((1 << 30) + 1), 2 * MIN_BLOCK);
        assert_eq!(block_size(u64::MAX), MAX_BLOCK);
        for len in [1u64, 4 << 30, 100 << 30] {
            let b = u64::from(block_size(len));
            assert!(len.div_ceil(b) <= u64::from(MAX_BLOCKS), "{len}");
        }
    }

    #[test]
    fn runs_merge_consecutive_changed_blocks_and_skip_the_rest() {
        let block = MIN_BLOCK as usize;
        let data: Vec<u8> = (0..5 * block + 100).map(|i| (i / block) as u8).collect();
        let hash = |b: usize| block_hash(&data[b * block..((b + 1) * block).min(data.len())]);
        // The standby has blocks 0, 3 and 4 (of 6), and nothing past them: 1-2 and 5
        // (the short last one) travel.
        let list = BlockList {
            block_size: MIN_BLOCK,
            hashes: vec![hash(0), 9, 9, hash(3), hash(4)],
        };
        assert_eq!(
            list.runs_to_send(0, &data),
            vec![block..3 * block, 5 * block..data.len()]
        );
        // The same bytes as blocks 2.. of a file: other hashes apply.
        let later = BlockList {
            block_size: MIN_BLOCK,
            hashes: vec![9, 9, hash(0), hash(1)],
        };
        assert_eq!(later.runs_to_send(2, &data), vec![2 * block..data.len()]);
        assert_eq!(
            list.runs_to_send(0, &[]),
            Vec::<std::ops::Range<usize>>::new()
        );
    }

    #[test]
    fn block_list_round_trips_and_checks_its_header() {
        let list = BlockList {
            block_size: MIN_BLOCK,
            hashes: vec![1, u128::from(u64::MAX), 7 | (5 << 64)],
        };
        let bytes = list.encode();
        assert_eq!(bytes.len(), BlockList::HEADER + 3 * BlockList::HASH);
        let mut header = [0u8; BlockList::HEADER];
        header.copy_from_slice(&bytes[..BlockList::HEADER]);
        assert_eq!(BlockList::check_header(header), Ok((MIN_BLOCK, 3)));
        // Only the low 64 bits travel, and they are what lists are compared by.
        let received = BlockList {
            block_size: MIN_BLOCK,
            hashes: BlockList::hashes_from(&bytes[BlockList::HEADER..]),
        };
        assert_eq!(received.hashes, vec![1, u128::from(u64::MAX), 7]);
        assert_eq!(
            received.runs_against(&list, 3 * u64::from(MIN_BLOCK)),
            Some(vec![])
        );

        let bad = |block: u32, count: u32| {
            let mut h = [0u8; BlockList::HEADER];
            h[..4].copy_from_slice(&block.to_be_bytes());
            h[4..].copy_from_slice(&count.to_be_bytes());
            BlockList::check_header(h)
        };
        assert_eq!(bad(3000, 1), Err(DeltaError::BlockSize(3000)));
        assert_eq!(bad(0, 1), Err(DeltaError::BlockSize(0)));
        assert_eq!(
            bad(MAX_BLOCK * 2, 1),
            Err(DeltaError::BlockSize(MAX_BLOCK * 2))
        );
        assert_eq!(
            bad(MIN_BLOCK, MAX_BLOCKS + 1),
            Err(DeltaError::TooManyBlocks(MAX_BLOCKS + 1))
        );
    }

    #[test]
    fn the_block_hasher_agrees_with_hashing_each_block() {
        let block = MIN_BLOCK as usize;
        let data: Vec<u8> = (0..3 * block + 500).map(|i| (i % 251) as u8).collect();
        let want: Vec<u128> = data.chunks(block).map(block_hash).collect();
        for piece in [1000, block, block + 1, 4 * block] {
            let mut h = BlockHasher::new(MIN_BLOCK);
            for part in data.chunks(piece) {
                h.update(part);
            }
            assert_eq!(h.finish().hashes, want, "pieces of {piece}");
        }
        assert!(BlockHasher::new(MIN_BLOCK).finish().hashes.is_empty());
    }

    #[test]
    fn runs_against_the_actives_list_are_its_differing_blocks() {
        let block = u64::from(MIN_BLOCK);
        let len = 5 * block + 100;
        let active = BlockList {
            block_size: MIN_BLOCK,
            hashes: vec![1, 2, 3, 4, 5, 6],
        };
        let standby = BlockList {
            block_size: MIN_BLOCK,
            hashes: vec![1, 9, 9, 4],
        };
        assert_eq!(
            standby.runs_against(&active, len),
            Some(vec![block..3 * block, 4 * block..len])
        );
        assert_eq!(active.runs_against(&active, len), Some(vec![]));
        let other = BlockList {
            block_size: 2 * MIN_BLOCK,
            hashes: vec![1],
        };
        assert_eq!(other.runs_against(&active, len), None);
        assert_eq!(
            standby.runs_against(&active, len + block),
            None,
            "list does not fit the length"
        );
    }

    #[test]
    fn the_content_hash_is_built_from_the_blocks() {
        use xxhash_rust::xxh3::xxh3_128;
        let block = MIN_BLOCK as usize;
        // One block or none: the plain xxh3-128 of the bytes.
        assert_eq!(content_hash_of(b""), xxh3_128(b""));
        assert_eq!(content_hash_of(b"hello"), xxh3_128(b"hello"));
        let one = vec![7u8; block];
        assert_eq!(content_hash_of(&one), xxh3_128(&one));
        // More: from the list, so a list and its length are enough to get it.
        let data: Vec<u8> = (0..3 * block + 10).map(|i| (i % 253) as u8).collect();
        let mut h = BlockHasher::new(MIN_BLOCK);
        h.update(&data);
        let list = h.finish();
        let hash = content_hash_of(&data);
        assert_eq!(content_hash(&list, data.len() as u64), hash);
        assert_ne!(hash, xxh3_128(&data));
        // Every byte counts, wherever it is.
        for at in [0, block, 2 * block + 1, data.len() - 1] {
            let mut other = data.clone();
            other[at] ^= 1;
            assert_ne!(content_hash_of(&other), hash, "byte {at}");
        }
        assert_ne!(content_hash_of(&data[..data.len() - 1]), hash);
    }

    #[test]
    fn only_differing_or_missing_blocks_are_sent() {
        let list = BlockList {
            block_size: 4096,
            hashes: vec![block_hash(b"a"), block_hash(b"b")],
        };
        assert!(!list.must_send(0, b"a"));
        assert!(list.must_send(1, b"c"));
        assert!(list.must_send(2, b"b"), "past the standby's end");
    }

    #[test]
    fn record_headers_round_trip_and_long_ones_are_refused() {
        let h = record_header(1 << 40, 4096);
        assert_eq!(parse_record_header(h), Ok((1 << 40, 4096)));
        assert_eq!(
            parse_record_header(record_header(0, MAX_BLOCK + 1)),
            Err(DeltaError::RecordTooLong(MAX_BLOCK + 1))
        );
    }

    #[test]
    fn the_abort_record_parses_and_is_told_from_data() {
        let (offset, len) = parse_record_header(abort_record()).expect("parses");
        assert!(is_abort(offset, len));
        assert!(!is_abort(0, 0), "an empty record at 0 is data");
        assert!(!is_abort(u64::MAX - 4096, 4096));
    }
}
