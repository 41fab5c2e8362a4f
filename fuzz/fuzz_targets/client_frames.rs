//! Client frames, both ways: what a node reads from a client (requests) and what the SDK reads
//! from a node (responses, events), fed in arbitrary pieces to the frame buffer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nearby_client::proto::{frame, Event, FrameBuffer, RequestFrame, ResponseFrame};

fuzz_target!(|data: &[u8]| {
    // The first byte chooses where the stream is cut, as reads from a socket would cut it.
    let (cut, bytes) = match data.split_first() {
        Some((c, rest)) => (usize::from(*c).max(1), rest),
        None => return,
    };
    let mut requests = FrameBuffer::new();
    let mut responses = FrameBuffer::new();
    let mut events = FrameBuffer::new();
    for piece in bytes.chunks(cut) {
        requests.extend(piece);
        responses.extend(piece);
        events.extend(piece);
        while let Ok(Some(_)) = requests.next_frame::<RequestFrame>() {}
        while let Ok(Some(_)) = responses.next_frame::<ResponseFrame>() {}
        while let Ok(Some(_)) = events.next_frame::<Event>() {}
    }
    let _ = frame::parse::<RequestFrame>(bytes);
});
