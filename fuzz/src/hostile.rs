//! Hand-built hostile Cap'n Proto messages, word by word: deep nesting,
//! pointer amplification, lists of zero-sized structs, far-pointer loops,
//! segment tables that lie about sizes. They seed the decoder fuzz targets
//! and are thrown at the real server by `io-shell/server/tests/attack.rs`.
//! (The builders mirror the helpers at the bottom of
//! `io-shell/proto/src/tests.rs`, which are private to that crate.)
//!
//! Layout facts used below, from `io-shell/proto/schema/node.capnp`: a
//! `Request` is a struct of 3 data words and 4 pointers; `authVersion` is
//! its first `u16` and the body's union tag the second; `enqueue` is union
//! member 7 with `recipientKey`, `channelId`, `payload`, `messageId` in
//! pointers 0 to 3. A `Response` is 3 data words and 2 pointers; tag 8 of
//! its `ok` union is `messages`, a list in pointer 0.

/// Serializes raw segments with their segment table.
pub fn message(segments: &[&[u64]]) -> Vec<u8> {
    let mut out = Vec::new();
    let count = u32::try_from(segments.len()).unwrap_or(u32::MAX);
    out.extend(count.saturating_sub(1).to_le_bytes());
    for s in segments {
        out.extend(u32::try_from(s.len()).unwrap_or(u32::MAX).to_le_bytes());
    }
    if out.len() % 8 != 0 {
        out.extend([0; 4]);
    }
    for s in segments {
        for w in *s {
            out.extend(w.to_le_bytes());
        }
    }
    out
}

/// A struct pointer `offset` words past its own end.
pub fn struct_ptr(offset: i32, data_words: u16, pointers: u16) -> u64 {
    u64::from((offset as u32) << 2) | u64::from(data_words) << 32 | u64::from(pointers) << 48
}

/// A list pointer `offset` words past its own end.
pub fn list_ptr(offset: i32, element_size: u8, count: u32) -> u64 {
    u64::from((offset as u32) << 2 | 1) | u64::from(element_size) << 32 | u64::from(count) << 35
}

/// A far pointer to word `offset` of segment `segment`.
pub fn far_ptr(segment: u32, offset: u32, double: bool) -> u64 {
    2 | u64::from(double) << 2 | u64::from(offset) << 3 | u64::from(segment) << 32
}

/// List element size code of bytes (`Data`).
pub const BYTE: u8 = 2;
/// List element size code of structs with a tag word.
pub const INLINE_COMPOSITE: u8 = 7;
/// Union tag of `enqueue` in `Request.body`.
pub const ENQUEUE_TAG: u64 = 7;
/// Union tag of `messages` in `Response.ok`.
pub const MESSAGES_TAG: u64 = 8;

/// A chain of `depth` structs, each holding one pointer to the next: a
/// generic walk of it recurses `depth` levels.
pub fn deep_chain(depth: usize) -> Vec<u8> {
    let mut words = vec![0u64; depth + 1];
    for w in words.iter_mut().take(depth) {
        *w = struct_ptr(0, 0, 1);
    }
    message(&[&words])
}

/// An enqueue request (authVersion 1) whose four pointers all aim at one
/// `blob_bytes` blob: a decoder that trusted pointers would read the blob
/// four times.
pub fn aliased_enqueue(blob_bytes: u32) -> Vec<u8> {
    let mut words = vec![0u64; 8];
    words[0] = struct_ptr(0, 3, 4);
    words[1] = 1 | ENQUEUE_TAG << 16;
    for (i, w) in words.iter_mut().enumerate().skip(4) {
        // Pointer at word i; the blob starts at word 8.
        *w = list_ptr((8 - i - 1) as i32, BYTE, blob_bytes);
    }
    words.resize(8 + (blob_bytes as usize).div_ceil(8), 0x0101_0101_0101_0101);
    message(&[&words])
}

/// An enqueue request whose payload pointer claims a list of 2^29 - 1
/// zero-sized structs: an attempt to make the decoder loop or allocate per
/// element from 80 bytes of input.
pub fn zero_sized_struct_list_enqueue() -> Vec<u8> {
    let words = [
        struct_ptr(0, 3, 4),
        1 | ENQUEUE_TAG << 16,
        0,
        0,
        0,
        0,
        list_ptr(1, INLINE_COMPOSITE, 0),
        0,
        struct_ptr((1 << 29) - 1, 0, 0),
    ];
    message(&[&words])
}

/// A fetch reply of `n` messages whose payload pointers all aim at one
/// blob of `blob_bytes` (a multiple of 8): `n` times the blob if copied
/// out naively.
pub fn aliased_messages_reply(n: u32, blob_bytes: u32) -> Vec<u8> {
    let mut words = vec![0u64; 7 + 2 * n as usize];
    words[0] = struct_ptr(0, 3, 2);
    words[1] = MESSAGES_TAG;
    words[4] = list_ptr(1, INLINE_COMPOSITE, 2 * n);
    words[6] = struct_ptr(n as i32, 1, 1);
    let blob = words.len();
    for i in 0..n as usize {
        words[7 + 2 * i] = i as u64;
        let at = 8 + 2 * i;
        words[at] = list_ptr((blob - at - 1) as i32, BYTE, blob_bytes);
    }
    words.resize(blob + blob_bytes as usize / 8, 0x0101_0101_0101_0101);
    message(&[&words])
}

/// Far pointers that lead nowhere: to a missing segment, to themselves, and
/// a landing pad that is itself a far pointer, spread over the most
/// segments the decoder accepts.
pub fn far_pointer_loops() -> Vec<Vec<u8>> {
    let hops: Vec<[u64; 1]> = (0..64u32)
        .map(|s| [far_ptr((s + 1) % 64, 0, false)])
        .collect();
    let hops: Vec<&[u64]> = hops.iter().map(|w| &w[..]).collect();
    vec![
        message(&[&[far_ptr(7, 0, false)]]),
        message(&[&[far_ptr(0, 0, false)]]),
        message(&[&[far_ptr(1, 0, false)], &[far_ptr(0, 0, false)]]),
        message(&[
            &[far_ptr(1, 0, true)],
            &[far_ptr(0, 0, false), far_ptr(0, 0, false)],
        ]),
        message(&hops),
    ]
}

/// A segment table declaring `words` words in one segment, followed by
/// `present_words` actual words: the "huge declared length" frame.
pub fn lying_segment_table(words: u32, present_words: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + present_words * 8);
    out.extend(0u32.to_le_bytes());
    out.extend(words.to_le_bytes());
    out.resize(8 + present_words * 8, 0);
    out
}

/// Every hostile request above, named, for seeds and the attack suite.
pub fn requests() -> Vec<(String, Vec<u8>)> {
    let mut out = vec![
        ("deep_chain_200".to_owned(), deep_chain(200)),
        ("deep_chain_1000".to_owned(), deep_chain(1_000)),
        ("aliased_enqueue_4k".to_owned(), aliased_enqueue(4096)),
        (
            "zero_sized_struct_list".to_owned(),
            zero_sized_struct_list_enqueue(),
        ),
        (
            "lying_segment_table".to_owned(),
            lying_segment_table(u32::MAX, 1),
        ),
        (
            "too_many_segments".to_owned(),
            [&u32::MAX.to_le_bytes()[..], &[0u8; 12]].concat(),
        ),
    ];
    for (i, m) in far_pointer_loops().into_iter().enumerate() {
        out.push((format!("far_pointer_loop_{i}"), m));
    }
    out
}
