//! Codec: Cap'n Proto encode and decode of the requests and replies on the
//! hot path. Names are `codec/operation/payload_bytes`.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use quicproquo_benches::PAYLOAD_SIZES;
use quicproquo_core::limits::AUTH_VERSION;
use quicproquo_core::node::{QueuedMessage, Reply, Request, RequestBody, Response};
use quicproquo_core::types::{ChannelId, IdentityKey, MessageId};
use quicproquo_proto::{decode_reply, decode_request, encode_reply, encode_request};

fn enqueue_request(size: usize) -> Request {
    Request {
        auth_version: AUTH_VERSION,
        body: RequestBody::Enqueue {
            recipient_key: IdentityKey([7; 32]),
            channel_id: ChannelId::try_from_slice(&[1; 16]).expect("16 bytes"),
            payload: vec![0x42; size],
            message_id: MessageId([9; 16]),
        },
    }
}

fn messages_reply(size: usize, count: usize) -> Reply {
    Ok(Response::Messages {
        messages: (1..=count as u64)
            .map(|seq| QueuedMessage {
                seq,
                payload: vec![0x42; size],
            })
            .collect(),
        next_seq: count as u64 + 1,
        gap: None,
    })
}

fn requests(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1));
    for size in PAYLOAD_SIZES {
        let request = enqueue_request(size);
        let bytes = encode_request(&request);
        g.bench_function(BenchmarkId::new("encode_enqueue", size), |b| {
            b.iter(|| encode_request(black_box(&request)))
        });
        g.bench_function(BenchmarkId::new("decode_enqueue", size), |b| {
            b.iter(|| decode_request(black_box(&bytes)).expect("decodes"))
        });
        let reply = messages_reply(size, 1);
        let reply_bytes = encode_reply(&reply);
        g.bench_function(BenchmarkId::new("encode_messages1", size), |b| {
            b.iter(|| encode_reply(black_box(&reply)))
        });
        g.bench_function(BenchmarkId::new("decode_messages1", size), |b| {
            b.iter(|| decode_reply(black_box(&reply_bytes)).expect("decodes"))
        });
    }
    let fetch = Request {
        auth_version: AUTH_VERSION,
        body: RequestBody::Fetch {
            recipient_key: IdentityKey([7; 32]),
            channel_id: ChannelId::DEFAULT,
            after_seq: 41,
            limit: 100,
        },
    };
    let fetch_bytes = encode_request(&fetch);
    g.bench_function(BenchmarkId::new("decode_fetch", "no_payload"), |b| {
        b.iter(|| decode_request(black_box(&fetch_bytes)).expect("decodes"))
    });
    g.finish();
}

criterion_group!(benches, requests);
criterion_main!(benches);
