//! Property tests of the wire framing and line codec (`src/protocol.rs`).
//!
//! * `LineCodec`: for any byte stream cut into any chunks and any limit
//!   `max` in `1..64`, the frames are exactly the stream's lines of at most
//!   `max` bytes, in order, with one `TooLong` in place of each longer line; the
//!   frames do not depend on the chunking; `partial_since()` is set exactly
//!   while a line is incomplete.
//! * `decode_line`: never panics; every error has a non-empty message and one
//!   of the stable `error_type` strings; successes satisfy the request
//!   invariants; well-formed requests round-trip.
//! * `encode_line`: any `Verdict` / `ErrorResponse` (NaN scores, newlines and
//!   U+2028 in strings, deep ids) is one line of valid JSON ending in `\n`.
//!
//! The same paths are fuzzed by `fuzz/fuzz_targets/decode_request.rs`.

use bytes::BytesMut;
use promptgate::normalize::Change;
use promptgate::protocol::{
    decode_line, encode_line, ErrorResponse, ErrorType, Frame, Label, LatencyMs, LineCodec,
    ModelRef, Request, RequestError, Verdict,
};
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::Value;
use tokio_util::codec::Decoder;

// ---------------------------------------------------------------- framing

/// What the codec must produce: split on `\n`; a final segment without a
/// newline counts only when non-empty; each segment is a `Line` when it fits
/// in `max` bytes, else one `TooLong`.
fn reference_frames(stream: &[u8], max: usize) -> Vec<Frame> {
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

/// Feeds `chunks` the way `FramedRead` does: after each read, `decode` until
/// it yields nothing; at end of stream, `decode_eof` until it yields nothing.
/// Checks `partial_since()` after each read and bounds the frame count so a
/// codec that loops fails instead of hanging.
fn codec_frames(max: usize, chunks: &[&[u8]]) -> Vec<Frame> {
    let total: usize = chunks.iter().map(|c| c.len()).sum();
    let bound = total + 2;
    let mut codec = LineCodec::new(max);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut fed: Vec<u8> = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        fed.extend_from_slice(chunk);
        while let Some(frame) = codec.decode(&mut buf).expect("decode never errs") {
            out.push(frame);
            assert!(out.len() <= bound, "codec produced more frames than bytes");
        }
        let mid_line = fed.last().is_some_and(|&b| b != b'\n');
        assert_eq!(
            codec.partial_since().is_some(),
            mid_line,
            "partial_since() after {} bytes ending {:?}",
            fed.len(),
            fed.last()
        );
        if !mid_line {
            assert!(buf.is_empty(), "bytes left over after a complete line");
        }
    }
    while let Some(frame) = codec.decode_eof(&mut buf).expect("decode_eof never errs") {
        out.push(frame);
        assert!(out.len() <= bound, "codec produced more frames than bytes");
    }
    assert!(buf.is_empty(), "bytes left over at end of stream");
    out
}

/// Cuts `stream` at the positions picked by `cuts` (sorted; repeats give empty chunks).
fn split_at<'a>(stream: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
    points.sort_unstable();
    let mut chunks = Vec::with_capacity(points.len() + 1);
    let mut start = 0;
    for p in points {
        chunks.push(&stream[start..p]);
        start = p;
    }
    chunks.push(&stream[start..]);
    chunks
}

/// Streams made of short lines around the limit, mixed with `\r`, NUL,
/// invalid UTF-8 and empty lines; or plain arbitrary bytes.
fn stream_strategy() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        8 => b'a'..=b'z',
        2 => Just(b'\n'),
        1 => Just(b'\r'),
        1 => any::<u8>(),
    ];
    let lines = (
        prop::collection::vec(prop::collection::vec(byte.clone(), 0..80), 0..12),
        any::<bool>(),
    )
        .prop_map(|(lines, trailing_newline)| {
            let mut s = lines.join(&b'\n');
            if trailing_newline {
                s.push(b'\n');
            }
            s
        });
    prop_oneof![
        3 => lines,
        1 => prop::collection::vec(byte, 0..400),
        1 => prop::collection::vec(any::<u8>(), 0..400),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn codec_yields_exactly_the_lines_that_fit(
        stream in stream_strategy(),
        max in 1usize..64,
        cuts in prop::collection::vec(any::<Index>(), 0..24),
    ) {
        let expected = reference_frames(&stream, max);
        let whole = codec_frames(max, &[&stream]);
        prop_assert_eq!(&whole, &expected);

        let chunked = codec_frames(max, &split_at(&stream, &cuts));
        prop_assert_eq!(&chunked, &expected);

        let bytewise: Vec<&[u8]> = stream.chunks(1).collect();
        prop_assert_eq!(&codec_frames(max, &bytewise), &expected);
    }
}

// ---------------------------------------------------------------- decoding

/// JSON values for ids. No fractional numbers, so equality survives a round trip.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<String>().prop_map(Value::from),
        "[a-z\\n\"\\\\\u{2028}]{0,8}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z\\n\"]{0,6}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Request-shaped JSON: the known keys (and a stray one) with values of any
/// type, possibly truncated, possibly with a duplicate key.
fn request_like_line() -> impl Strategy<Value = Vec<u8>> {
    let key = prop_oneof![
        Just("id"),
        Just("text"),
        Just("threshold"),
        Just("cmd"),
        Just("bogus"),
    ];
    let value = prop_oneof![
        json_value(),
        (-2.0f64..3.0).prop_map(Value::from),
        prop_oneof![
            Just("health"),
            Just("stats"),
            Just("reload"),
            Just("models"),
            Just("reboot"),
            Just(" "),
            Just("a\u{0}b"),
        ]
        .prop_map(Value::from),
    ];
    (
        prop::collection::vec((key, value), 0..5),
        any::<Index>(),
        any::<bool>(),
        "[ \\t\\r]{0,2}",
    )
        .prop_map(|(pairs, cut, truncate, pad)| {
            let body: Vec<String> = pairs
                .iter()
                .map(|(k, v)| format!("{}:{}", Value::from(*k), v))
                .collect();
            let mut line = format!("{pad}{{{}}}{pad}", body.join(",")).into_bytes();
            if truncate {
                line.truncate(cut.index(line.len() + 1));
            }
            line
        })
}

const DECODE_ERRORS: [ErrorType; 6] = [
    ErrorType::InvalidJson,
    ErrorType::InvalidRequest,
    ErrorType::InvalidUtf8,
    ErrorType::MissingText,
    ErrorType::EmptyText,
    ErrorType::UnknownCommand,
];

/// Everything `decode_line` promises, for any input.
fn check_decode(line: &[u8]) -> Result<(), TestCaseError> {
    match decode_line(line) {
        Ok(Request::Classify(c)) => {
            prop_assert!(!c.text.trim().is_empty(), "blank text accepted");
            prop_assert!(!c.text.contains('\0'), "NUL accepted");
            if let Some(t) = c.threshold {
                prop_assert!((0.0..=1.0).contains(&t), "threshold {} accepted", t);
            }
            check_single_json_line(&encode_line(&c.id))?;
        }
        Ok(Request::Command(id, _)) => {
            check_single_json_line(&encode_line(&id))?;
        }
        Err((id, err)) => {
            prop_assert!(
                !err.message.trim().is_empty(),
                "empty message for {:?}",
                err.kind
            );
            prop_assert!(
                DECODE_ERRORS.contains(&err.kind),
                "decode_line answered {:?}",
                err.kind
            );
            let kind = err.kind;
            let message = err.message.clone();
            let wire = encode_line(&ErrorResponse::new(id.clone(), err));
            let v = check_single_json_line(&wire)?;
            let ty = v["error"]["type"].as_str().unwrap_or_default().to_string();
            prop_assert!(
                ErrorType::ALL.iter().any(|t| t.as_str() == ty),
                "error_type {:?} is not one of ErrorType::ALL",
                ty
            );
            prop_assert_eq!(ty.as_str(), kind.as_str());
            prop_assert_eq!(v["error"]["message"].as_str(), Some(message.as_str()));
            prop_assert!(
                v.get("label").is_none(),
                "an error carries a label by default"
            );
        }
    }
    Ok(())
}

/// `bytes` is one line of JSON: ends in `\n`, no other newline, UTF-8, parses.
fn check_single_json_line(bytes: &[u8]) -> Result<Value, TestCaseError> {
    prop_assert_eq!(bytes.last(), Some(&b'\n'));
    let body = &bytes[..bytes.len() - 1];
    prop_assert!(
        !body.contains(&b'\n'),
        "interior newline in {:?}",
        String::from_utf8_lossy(bytes)
    );
    prop_assert!(
        !body.contains(&b'\r'),
        "carriage return in {:?}",
        String::from_utf8_lossy(bytes)
    );
    let text = std::str::from_utf8(body);
    prop_assert!(text.is_ok(), "not UTF-8");
    let parsed = serde_json::from_slice::<Value>(body);
    prop_assert!(parsed.is_ok(), "not JSON: {:?}: {:?}", parsed.err(), text);
    Ok(parsed.unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn decode_line_total_on_arbitrary_bytes(line in prop::collection::vec(any::<u8>(), 0..256)) {
        check_decode(&line)?;
    }

    #[test]
    fn decode_line_total_on_arbitrary_text(line in any::<String>()) {
        check_decode(line.as_bytes())?;
    }

    #[test]
    fn decode_line_total_on_request_like_json(line in request_like_line()) {
        check_decode(&line)?;
    }

    #[test]
    fn decode_line_total_on_nesting(depth in 0usize..400, open in prop_oneof![Just("["), Just("{\"a\":")]) {
        let close = if open == "[" { "]" } else { "}" };
        let line = format!("{{\"id\":{}1{},\"text\":\"x\"}}", open.repeat(depth), close.repeat(depth));
        check_decode(line.as_bytes())?;
    }

    #[test]
    fn well_formed_requests_round_trip(
        id in json_value(),
        text in "[^\\x00]{1,40}",
        threshold in prop::option::of((0u32..=1024).prop_map(|k| f64::from(k) / 1024.0)),
    ) {
        prop_assume!(!text.trim().is_empty());
        let mut req = serde_json::json!({ "id": id, "text": text });
        if let Some(t) = threshold {
            req["threshold"] = Value::from(t);
        }
        let line = serde_json::to_vec(&req).unwrap();
        match decode_line(&line) {
            Ok(Request::Classify(c)) => {
                prop_assert_eq!(c.id, id);
                prop_assert_eq!(c.text, text);
                prop_assert_eq!(c.threshold, threshold);
            }
            other => prop_assert!(false, "{:?} decoded as {:?}", req, other),
        }
    }

    #[test]
    fn plain_text_lines_are_prompts(text in "[^{\\s\\x00][^\\x00\\r]{0,40}", lead in "[ \\t]{0,3}", cr in any::<bool>()) {
        prop_assume!(!text.trim().is_empty());
        let line = format!("{lead}{text}{}", if cr { "\r" } else { "" });
        match decode_line(line.as_bytes()) {
            Ok(Request::Classify(c)) => {
                prop_assert_eq!(c.text, format!("{lead}{text}"));
                prop_assert_eq!(c.id, Value::Null);
                prop_assert_eq!(c.threshold, None);
            }
            other => prop_assert!(false, "{:?} decoded as {:?}", line, other),
        }
    }
}

// ---------------------------------------------------------------- encoding

fn any_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>(),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(-0.0),
        0.0f64..=1.0,
    ]
}

fn any_label() -> impl Strategy<Value = Label> {
    prop_oneof![Just(Label::Malicious), Just(Label::Benign)]
}

/// Strings with the characters that break line protocols.
fn nasty_string() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z\\n\\r\"\\\\\u{0}\u{7f}\u{85}\u{2028}\u{2029}\u{feff}]{0,16}",
    ]
}

fn verdict() -> impl Strategy<Value = Verdict> {
    (
        json_value(),
        any_label(),
        any_f64(),
        any_f64(),
        (nasty_string(), nasty_string()),
        any::<usize>(),
        any::<usize>(),
        prop::sample::subsequence(Change::ALL.to_vec(), 0..=Change::ALL.len()),
        (any_f64(), any_f64(), any_f64()),
    )
        .prop_map(
            |(id, label, score, threshold, (name, sha256), tokens, windows, normalized, lat)| {
                Verdict {
                    id,
                    label,
                    score,
                    threshold,
                    model: ModelRef { name, sha256 },
                    tokens,
                    windows,
                    // Zero (left out of the line) and non-zero both round-trip.
                    early_exit_windows: windows / 2,
                    normalized,
                    latency_ms: LatencyMs {
                        queue: lat.0,
                        infer: lat.1,
                        total: lat.2,
                    },
                    explained: Default::default(),
                }
            },
        )
}

fn error_response() -> impl Strategy<Value = ErrorResponse> {
    (
        json_value(),
        prop::sample::select(ErrorType::ALL.to_vec()),
        nasty_string(),
        prop::option::of(any_label()),
        prop::option::of(any_f64()),
    )
        .prop_map(|(id, kind, message, label, score)| {
            let mut r = ErrorResponse::new(id, RequestError::new(kind, message));
            r.label = label;
            r.score = score;
            r
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn verdict_encodes_to_one_json_line(v in verdict()) {
        let parsed = check_single_json_line(&encode_line(&v))?;
        prop_assert_eq!(&parsed["id"], &v.id);
        prop_assert_eq!(&parsed["model"]["name"], &Value::from(v.model.name.clone()));
        prop_assert_eq!(&parsed["model"]["sha256"], &Value::from(v.model.sha256.clone()));
        prop_assert_eq!(&parsed["tokens"], &Value::from(v.tokens));
        let label = match v.label {
            Label::Malicious => "malicious",
            Label::Benign => "benign",
        };
        prop_assert_eq!(parsed["label"].as_str(), Some(label));
        prop_assert_eq!(parsed.get("normalized").is_some(), !v.normalized.is_empty());
    }

    #[test]
    fn error_response_encodes_to_one_json_line(r in error_response()) {
        let parsed = check_single_json_line(&encode_line(&r))?;
        prop_assert_eq!(&parsed["id"], &r.id);
        prop_assert_eq!(parsed["error"]["type"].as_str(), Some(r.error.kind.as_str()));
        prop_assert_eq!(parsed["error"]["message"].as_str(), Some(r.error.message.as_str()));
        prop_assert_eq!(parsed.get("label").is_some(), r.label.is_some());
        prop_assert_eq!(parsed.get("score").is_some(), r.score.is_some());
    }
}
