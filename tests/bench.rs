//! `promptgate bench` end to end: it starts the real daemon on the shipped
//! detector, drives it over its socket, starts a peer the way it starts
//! llama-server, and writes a report whose figures add up.
//!
//! The peer here is a stand-in (a small Python HTTP server answering
//! `/completion` like llama-server, after a fixed delay), so the test needs
//! no llama.cpp build of its own. The real side-by-side is
//! docs/performance.md's command.

mod common;

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// Answers POST /completion like llama-server (`completion_probabilities`,
/// `timings.prompt_n`) after `delay` seconds; takes llama-server's arguments
/// and uses only `--port`. Counts the requests it answered in `count_file`.
const FAKE_PEER: &str = r#"#!/usr/bin/env python3
import json, sys, time, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
delay = float(sys.argv[0].rsplit("-", 1)[1].removesuffix(".py"))
lock = threading.Lock()
count = [0]
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/completion"
        assert body["n_predict"] == 1 and body["cache_prompt"] is True and body["n_probs"] > 0
        assert all(isinstance(t, int) for t in body["prompt"])
        time.sleep(delay)
        out = json.dumps({"content": "No", "completion_probabilities": [],
                          "timings": {"prompt_n": len(body["prompt"])}}).encode()
        with lock:
            count[0] += 1
            open(sys.argv[0] + ".count", "w").write(str(count[0]))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"#;

fn run_bench(dir: &Path, peer: Option<&Path>) -> Value {
    let json = dir.join("report.json");
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    common::smollm2();
    let mut cmd = Command::new(common::bin());
    cmd.args(["--log", "warn", "bench", "--models-dir"])
        .arg(&models)
        .args([
            "--model",
            "smollm2-135m-head.detector.json",
            "--sizes",
            "short",
            "--concurrency",
            "1,3",
            "--requests",
            "6",
            "--rounds",
            "2",
            "--no-pp",
            "--threads",
            &common::threads(),
            "--json",
        ])
        .arg(&json);
    if let Some(p) = peer {
        cmd.arg("--llama-server").arg(p);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("smollm2-135m-head.detector.json"),
        "{stdout}"
    );
    serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap()
}

fn f(v: &Value, ptr: &str) -> f64 {
    v.pointer(ptr)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{ptr} missing in {v}"))
}

#[test]
fn bench_drives_the_daemon_and_a_peer_and_reports_ratios_from_one_run() {
    let dir = tempfile::tempdir().unwrap();
    // A peer 2 s per answer: far slower than the detector on any machine.
    let peer = dir.path().join("fake-peer-2.py");
    std::fs::write(&peer, FAKE_PEER).unwrap();
    Command::new("chmod").arg("+x").arg(&peer).status().unwrap();

    let report = run_bench(dir.path(), Some(&peer));
    let run = &report["runs"][0];
    assert_eq!(run["model"], "smollm2-135m-head.detector.json");
    assert!(run["gguf"]
        .as_str()
        .unwrap()
        .ends_with("SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(f(run, "/startup_ms/promptgate") > 0.0);
    assert!(f(run, "/startup_ms/llama_server") > 0.0);
    // The daemon holds a 135M model: tens of MiB at least.
    assert!(f(run, "/peak_rss_mib/promptgate") > 50.0);
    let cells = run["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 2);
    for (cell, clients) in cells.iter().zip([1u64, 3]) {
        assert_eq!(cell["size"], "short");
        assert_eq!(cell["clients"], clients);
        let tokens = cell["prompt_tokens_p50"].as_u64().unwrap();
        assert!(
            (14..=32).contains(&tokens),
            "short prompt of {tokens} tokens"
        );
        for side in ["promptgate", "llama_server"] {
            // 6 requests in 2 rounds of 3 (at least one per client).
            assert_eq!(cell[side]["requests"], 6, "{side}: {cell}");
            assert_eq!(cell[side]["errors"], 0, "{side}: {cell}");
            let p50 = f(&cell[side], "/p50_ms");
            assert!(p50 > 0.0 && p50 <= f(&cell[side], "/p99_ms"));
            assert!(f(&cell[side], "/rps") > 0.0);
        }
        // The stand-in sleeps 2 s per answer; its latency shows it.
        assert!(f(cell, "/llama_server/p50_ms") >= 2000.0, "{cell}");
        // The peer was sent whole classification prompts as token ids:
        // template and text, more tokens than the text alone.
        assert!(f(cell, "/llama_server/evaluated_tokens_p50") > tokens as f64 + 20.0);
        let ratio = f(cell, "/p50_ratio");
        let expect = f(cell, "/promptgate/p50_ms") / f(cell, "/llama_server/p50_ms");
        assert!((ratio - expect).abs() < 1e-9);
        let rps = f(cell, "/promptgate/rps") / f(cell, "/llama_server/rps");
        assert!((f(cell, "/rps_ratio") - rps).abs() < 1e-9);
    }
    // Warm-up requests (uncounted) plus 2 cells x 6: the peer answered them all.
    let answered: usize = std::fs::read_to_string(dir.path().join("fake-peer-2.py.count"))
        .unwrap()
        .parse()
        .unwrap();
    assert!(answered >= 12, "{answered}");
}
