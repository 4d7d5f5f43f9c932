//! Helpers for tests that run the real `promptgate` binary on a real GGUF.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The SmolLM2 GGUF the tests run on: `$PROMPTGATE_TEST_MODEL`, or the one
/// `scripts/fetch-models.sh` puts in `models/`.
pub fn smollm2() -> PathBuf {
    model_or_panic("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The Gemma 3 270M GGUF from `models/`.
pub fn gemma() -> PathBuf {
    model_or_panic("gemma-3-270m-q4_k_m.gguf")
}

fn model_or_panic(file: &str) -> PathBuf {
    if file.starts_with("SmolLM2") {
        if let Ok(p) = std::env::var("PROMPTGATE_TEST_MODEL") {
            return PathBuf::from(p);
        }
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(file);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-models.sh first",
        p.display()
    );
    p
}

/// The built binary.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_promptgate")
}

/// Inference threads of the daemons and `classify` runs the tests start:
/// `$PROMPTGATE_TEST_THREADS`, else 1.
///
/// One, because the test harness runs several daemons at once: llama.cpp's
/// OpenMP threads spin at barriers, and on a machine with fewer free cores
/// than threads a short prompt goes from ~0.2 s to several seconds.
pub fn threads() -> String {
    std::env::var("PROMPTGATE_TEST_THREADS").unwrap_or_else(|_| "1".into())
}

/// The `promptgate serve` command the tests run: SmolLM2, [`threads`], warnings only.
pub fn serve_command(socket: &Path, extra: &[&str]) -> Command {
    let model = smollm2();
    let mut cmd = Command::new(bin());
    cmd.args(["serve", "--socket"])
        .arg(socket)
        .arg("--models-dir")
        .arg(model.parent().unwrap())
        .arg("--model")
        .arg(&model)
        .arg("--threads")
        .arg(threads())
        .args(["--log", "warn"])
        .args(extra)
        .stdin(Stdio::null());
    cmd
}

/// A running daemon on a temporary socket.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts `promptgate serve` on SmolLM2 with `extra` flags and waits until it accepts.
    pub fn start(extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("pg.sock");
        Daemon::start_at(dir, socket, extra)
    }

    /// Like [`Daemon::start`], on a chosen `socket` path (usually inside `dir`,
    /// which the daemon keeps alive).
    pub fn start_at(dir: tempfile::TempDir, socket: PathBuf, extra: &[&str]) -> Daemon {
        let child = serve_command(&socket, extra)
            .spawn()
            .expect("start promptgate serve");
        let mut d = Daemon { child, socket, dir };
        let deadline = Instant::now() + Duration::from_secs(120);
        while UnixStream::connect(&d.socket).is_err() {
            if let Some(status) = d.child.try_wait().unwrap() {
                panic!("daemon exited during start-up: {status}");
            }
            assert!(Instant::now() < deadline, "daemon did not start in 120 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    pub fn connect(&self) -> Client {
        Client::connect(&self.socket)
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let pid = i32::try_from(self.child.id()).unwrap();
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    }

    /// Waits for exit, at most `timeout`, and returns the exit code.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("daemon did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A blocking NDJSON client.
pub struct Client {
    pub reader: BufReader<UnixStream>,
    pub writer: UnixStream,
}

impl Client {
    pub fn connect(path: &Path) -> Client {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        Client {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        }
    }

    pub fn send(&mut self, line: &str) {
        self.writer.write_all(line.as_bytes()).unwrap();
        self.writer.write_all(b"\n").unwrap();
    }

    pub fn recv(&mut self) -> Value {
        let mut s = String::new();
        let n = self.reader.read_line(&mut s).unwrap();
        assert!(n > 0, "connection closed before an answer");
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("bad JSON {s:?}: {e}"))
    }

    pub fn ask(&mut self, line: &str) -> Value {
        self.send(line);
        self.recv()
    }
}

/// Asserts a classification answer has the documented shape.
pub fn assert_verdict(v: &Value) {
    let score = v["score"]
        .as_f64()
        .unwrap_or_else(|| panic!("no score: {v}"));
    assert!((0.0..=1.0).contains(&score), "{v}");
    let label = v["label"].as_str().unwrap();
    let threshold = v["threshold"].as_f64().unwrap();
    assert_eq!(label == "malicious", score >= threshold, "{v}");
    assert_eq!(v["model"]["name"], "SmolLM2-135M-Instruct.Q4_1.gguf");
    assert_eq!(v["model"]["sha256"].as_str().unwrap().len(), 64);
    assert!(v["tokens"].as_u64().unwrap() > 0);
    assert!(v["windows"].as_u64().unwrap() >= 1);
    for k in ["queue", "infer", "total"] {
        assert!(v["latency_ms"][k].as_f64().unwrap() >= 0.0, "{v}");
    }
}
