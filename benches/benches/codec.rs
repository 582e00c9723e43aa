//! Codec: encode and decode of the requests and replies on the hot path,
//! Cap'n Proto (the wire format, `quicproquo_proto`) side by side with
//! Protobuf (prost, `quicproquo_benches::pb`). Names are
//! `codec/operation/payload_bytes`; the Protobuf ones start with `pb_`.
//!
//! Both codecs go from and to the core's own values: encoding starts from a
//! `Request` or `Reply`, decoding ends with one, every fixed-size field
//! parsed (the work the server and client do). The Cap'n Proto encoders
//! borrow the value and copy its bytes into the message; the Protobuf
//! encoders take it by move, as a server owning its reply would, so each
//! `pb_encode_*` iteration gets a fresh clone made outside the timed region.

use std::hint::black_box;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use quicproquo_benches::codec::{enqueue_request, fetch_request, messages_reply};
use quicproquo_benches::{PAYLOAD_SIZES, pb};
use quicproquo_core::node::{Reply, Request};
use quicproquo_proto::{decode_reply, decode_request, encode_reply, encode_request};

fn requests(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1));
    for size in PAYLOAD_SIZES {
        let request = enqueue_request(size);
        let bytes = encode_request(&request);
        let pb_bytes = pb::encode_request(request.clone()).expect("hot path");
        g.bench_function(BenchmarkId::new("encode_enqueue", size), |b| {
            b.iter(|| encode_request(black_box(&request)))
        });
        g.bench_function(BenchmarkId::new("pb_encode_enqueue", size), |b| {
            pb_encode_request(b, &request, pb_bytes.len())
        });
        g.bench_function(BenchmarkId::new("decode_enqueue", size), |b| {
            b.iter(|| decode_request(black_box(&bytes)).expect("decodes"))
        });
        g.bench_function(BenchmarkId::new("pb_decode_enqueue", size), |b| {
            b.iter(|| pb::decode_request(black_box(&pb_bytes)).expect("decodes"))
        });
        for count in [1, 100] {
            let reply = messages_reply(size, count);
            let reply_bytes = encode_reply(&reply);
            let pb_reply_bytes = pb::encode_reply(reply.clone()).expect("hot path");
            g.bench_function(
                BenchmarkId::new(format!("encode_messages{count}"), size),
                |b| b.iter(|| encode_reply(black_box(&reply))),
            );
            g.bench_function(
                BenchmarkId::new(format!("pb_encode_messages{count}"), size),
                |b| pb_encode_reply(b, &reply, pb_reply_bytes.len()),
            );
            g.bench_function(
                BenchmarkId::new(format!("decode_messages{count}"), size),
                |b| b.iter(|| decode_reply(black_box(&reply_bytes)).expect("decodes")),
            );
            g.bench_function(
                BenchmarkId::new(format!("pb_decode_messages{count}"), size),
                |b| b.iter(|| pb::decode_reply(black_box(&pb_reply_bytes)).expect("decodes")),
            );
        }
    }
    let fetch = fetch_request();
    let fetch_bytes = encode_request(&fetch);
    let pb_fetch_bytes = pb::encode_request(fetch).expect("hot path");
    g.bench_function(BenchmarkId::new("decode_fetch", "no_payload"), |b| {
        b.iter(|| decode_request(black_box(&fetch_bytes)).expect("decodes"))
    });
    g.bench_function(BenchmarkId::new("pb_decode_fetch", "no_payload"), |b| {
        b.iter(|| pb::decode_request(black_box(&pb_fetch_bytes)).expect("decodes"))
    });
    g.finish();
}

/// Times `pb::encode_request` on fresh clones of `request`.
fn pb_encode_request(b: &mut criterion::Bencher<'_>, request: &Request, encoded_bytes: usize) {
    b.iter_batched(
        || request.clone(),
        |r| pb::encode_request(r).expect("hot path"),
        batch(encoded_bytes),
    )
}

/// Times `pb::encode_reply` on fresh clones of `reply`.
fn pb_encode_reply(b: &mut criterion::Bencher<'_>, reply: &Reply, encoded_bytes: usize) {
    b.iter_batched(
        || reply.clone(),
        |r| pb::encode_reply(r).expect("hot path"),
        batch(encoded_bytes),
    )
}

/// Clones per timed batch: enough that reading the timer costs nothing per
/// iteration, few enough that the batch (cloned just before, untimed) stays
/// in the cache like the one value the Cap'n Proto encoders read again and
/// again. A value larger than the budget is timed one at a time.
fn batch(value_bytes: usize) -> BatchSize {
    BatchSize::NumIterations((BATCH_BYTES / value_bytes.max(1)).max(1) as u64)
}

/// Bytes of cloned values per timed batch: well inside a core's L2 cache.
const BATCH_BYTES: usize = 64 * 1024;

criterion_group!(benches, requests);
criterion_main!(benches);
