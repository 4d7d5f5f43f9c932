//! Fuzzes the request path of the wire protocol: bytes from a client go
//! through `LineCodec` (the daemon's framing) and each line through
//! `decode_line`; every answer is encoded with `encode_line`.
//!
//! Beyond "no panic, no hang, no OOM", it checks:
//! * the frames equal the reference split of the stream (lines of at most
//!   `max` bytes, one `TooLong` per longer line) for every chunking tried;
//! * `partial_since()` is set exactly while the stream ends mid-line;
//! * every decode error has a non-empty message and a stable type;
//! * every encoded answer is one line of valid JSON ending in `\n`.
//!
//! The input is the raw byte stream (seeds are plain NDJSON). Its first byte
//! picks the chunk size of the second chunking, its last byte a small line
//! limit (`0..64`) for a second framing pass.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use promptgate::protocol::{
    decode_line, encode_line, ErrorResponse, ErrorType, Frame, Label, LatencyMs, LineCodec,
    ModelRef, Request, RequestError, Verdict, DEFAULT_MAX_LINE_BYTES,
};
use serde_json::Value;
use tokio_util::codec::Decoder;

/// The lines of `stream` as the codec must frame them.
fn reference(stream: &[u8], max: usize) -> Vec<Frame> {
    let mut segments: Vec<&[u8]> = stream.split(|&b| b == b'\n').collect();
    if segments.last().is_some_and(|s| s.is_empty()) {
        segments.pop();
    }
    segments
        .into_iter()
        .map(|s| {
            if s.len() <= max {
                Frame::Line(BytesMut::from(s))
            } else {
                Frame::TooLong { max }
            }
        })
        .collect()
}

/// Runs the codec over `stream` in chunks of `chunk` bytes, like `FramedRead`.
fn frames(stream: &[u8], max: usize, chunk: usize) -> Vec<Frame> {
    let mut codec = LineCodec::new(max);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let bound = stream.len() + 2;
    let mut fed = 0;
    for piece in stream.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        fed += piece.len();
        while let Some(f) = codec.decode(&mut buf).expect("decode never errs") {
            out.push(f);
            assert!(out.len() <= bound, "codec loops");
        }
        let mid_line = stream[fed - 1] != b'\n';
        assert_eq!(codec.partial_since().is_some(), mid_line, "partial_since");
    }
    while let Some(f) = codec.decode_eof(&mut buf).expect("decode_eof never errs") {
        out.push(f);
        assert!(out.len() <= bound, "codec loops at eof");
    }
    assert!(buf.is_empty(), "bytes left at eof");
    out
}

fn assert_one_json_line(bytes: &[u8]) {
    assert_eq!(bytes.last(), Some(&b'\n'), "no trailing newline");
    let body = &bytes[..bytes.len() - 1];
    assert!(!body.contains(&b'\n'), "interior newline");
    if let Err(e) = serde_json::from_slice::<Value>(body) {
        panic!(
            "encode_line wrote invalid JSON ({e}): {:?}",
            String::from_utf8_lossy(body)
        );
    }
}

fn answer_error(id: Value, err: RequestError) {
    assert!(
        !err.message.trim().is_empty(),
        "empty message for {:?}",
        err.kind
    );
    assert!(ErrorType::ALL.contains(&err.kind));
    assert_one_json_line(&encode_line(&ErrorResponse::new(id, err)));
}

fn answer(line: &[u8]) {
    match decode_line(line) {
        Ok(Request::Classify(c)) => {
            assert!(!c.text.trim().is_empty() && !c.text.contains('\0'));
            let threshold = c.threshold.unwrap_or(0.5);
            assert!((0.0..=1.0).contains(&threshold));
            let score = (c.text.len() % 101) as f64 / 100.0;
            assert_one_json_line(&encode_line(&Verdict {
                id: c.id,
                label: Label::from_score(score, threshold),
                score,
                threshold,
                model: ModelRef {
                    name: c.text.chars().take(32).collect(),
                    sha256: "0".repeat(64),
                },
                tokens: c.text.len(),
                windows: 1,
                normalized: Vec::new(),
                latency_ms: LatencyMs {
                    queue: 0.0,
                    infer: f64::NAN,
                    total: f64::INFINITY,
                },
                explained: Default::default(),
            }));
        }
        Ok(Request::Command(id, _)) => assert_one_json_line(&encode_line(&id)),
        Err((id, err)) => answer_error(id, err),
    }
}

fuzz_target!(|data: &[u8]| {
    let chunk = 1 + usize::from(data.first().copied().unwrap_or(0) % 7);
    let small_max = usize::from(data.last().copied().unwrap_or(0) % 64);

    // The daemon's framing, whole and in small chunks.
    let expected = reference(data, DEFAULT_MAX_LINE_BYTES);
    let whole = frames(data, DEFAULT_MAX_LINE_BYTES, data.len());
    assert_eq!(whole, expected, "framing (whole)");
    assert_eq!(
        frames(data, DEFAULT_MAX_LINE_BYTES, chunk),
        expected,
        "framing (chunked)"
    );

    // A tiny limit, so that oversize lines and discarding are exercised.
    let expected = reference(data, small_max);
    assert_eq!(
        frames(data, small_max, data.len()),
        expected,
        "small max (whole)"
    );
    assert_eq!(
        frames(data, small_max, chunk),
        expected,
        "small max (chunked)"
    );

    for frame in whole {
        match frame {
            Frame::Line(line) => answer(&line),
            Frame::TooLong { max } => answer_error(
                Value::Null,
                RequestError::new(ErrorType::LineTooLong, format!("line exceeds {max} bytes")),
            ),
        }
    }
    // The whole input as one line, newlines and all.
    answer(data);
});
