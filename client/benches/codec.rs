//! Wire codec throughput: frames encoded and decoded per second for the messages that dominate
//! traffic — a client's `UpdateLocation` request, a pushed `FriendMoved` event, and a `Nearby`
//! page of 20 friends. Decoding goes through [`FrameBuffer`] the way a stream reader uses it
//! (the whole frame arrives in one read).
//!
//! Before measuring, the bench checks the byte-level examples printed in `docs/protocol.md`, so
//! the document cannot drift from the codec.
//!
//! `cargo bench -p nearby-client --bench codec -j2 -- --warm-up-time 1 --measurement-time 3`

#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
mod examples;

use examples::{check_documented_examples, friend_moved, nearby_page, update_location};
use nearby_client::proto::{frame, FrameBuffer};
use serde::de::DeserializeOwned;
use serde::Serialize;

fn bench_one<T>(c: &mut Criterion, name: &str, msg: &T)
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let bytes = frame::to_bytes(msg).expect("encode");
    let mut g = c.benchmark_group(format!("codec/{name}"));
    g.throughput(Throughput::ElementsAndBytes {
        elements: 1,
        bytes: bytes.len() as u64,
    });
    let mut out = Vec::with_capacity(bytes.len());
    g.bench_function("encode", |b| {
        b.iter(|| {
            out.clear();
            frame::encode(black_box(msg), &mut out).expect("encode");
            black_box(out.len())
        })
    });
    // A reader keeps one buffer for the life of its stream; once a frame is consumed, the next
    // read reuses the allocation.
    let mut fb = FrameBuffer::new();
    g.bench_function("decode", |b| {
        b.iter(|| {
            fb.extend(black_box(&bytes));
            let m: T = fb.next_frame().expect("decode").expect("whole frame");
            black_box(m)
        })
    });
    g.finish();
    let back: T = frame::parse(&bytes).expect("round trip").0;
    assert_eq!(&back, msg);
}

fn codec(c: &mut Criterion) {
    check_documented_examples();
    bench_one(c, "update_location", &update_location());
    bench_one(c, "friend_moved", &friend_moved());
    bench_one(c, "nearby_page_20", &nearby_page());
}

criterion_group!(benches, codec);
criterion_main!(benches);
