//! The systemd side without systemd: a fake `NOTIFY_SOCKET` receives the
//! daemon's states in order, a listening socket passed by `LISTEN_FDS` is
//! served, and the unit files pass `systemd-analyze verify`.

mod common;

use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, smollm2, Client, Daemon};

fn copy_model(dir: &Path, name: &str) {
    std::fs::copy(smollm2(), dir.join(name)).unwrap();
}

/// Receives datagrams until `pred` holds for one of them or `timeout` passes.
fn recv_until(
    sock: &UnixDatagram,
    got: &mut Vec<String>,
    timeout: Duration,
    pred: impl Fn(&str) -> bool,
) {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = pred(&msg);
            got.push(msg);
            if done {
                return;
            }
        }
    }
    panic!("no matching notification within {timeout:?}; got {got:#?}");
}

#[test]
fn notify_socket_gets_ready_reloading_watchdog_stopping_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir(&models).unwrap();
    copy_model(&models, "a.gguf");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let socket = dir.path().join("pg.sock");
    let child = Command::new(bin())
        .args([
            "serve",
            "--threads",
            "2",
            "--log",
            "warn",
            "--debounce-ms",
            "100",
        ])
        .arg("--socket")
        .arg(&socket)
        .arg("--models-dir")
        .arg(&models)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut daemon = Daemon {
        child,
        socket: socket.clone(),
        dir,
    };
    let mut got = Vec::new();
    recv_until(&notify, &mut got, Duration::from_secs(120), |m| {
        m.contains("READY=1")
    });
    assert!(
        got[0].contains("EXTEND_TIMEOUT_USEC="),
        "a long load extends the start timeout first: {got:?}"
    );
    let ready = got.last().unwrap().clone();
    assert!(ready.contains("STATUS=serving a.gguf"), "{ready}");
    assert!(socket.exists(), "READY=1 only once the socket listens");
    // The watchdog is fed at half of WATCHDOG_USEC while idle.
    recv_until(&notify, &mut got, Duration::from_secs(5), |m| {
        m.contains("WATCHDOG=1")
    });
    // A newer model: RELOADING=1, then READY=1 naming it.
    copy_model(&models, "b.gguf");
    recv_until(&notify, &mut got, Duration::from_secs(60), |m| {
        m.contains("RELOADING=1")
    });
    let reloading = got.last().unwrap().clone();
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    // Then READY=1 naming b.gguf. (A READY=1 naming a.gguf in between would
    // be a refused attempt on an unfinished copy, which the registry now
    // avoids by waiting for the file to settle; it is not this test's subject.)
    recv_until(&notify, &mut got, Duration::from_secs(120), |m| {
        m.contains("READY=1") && m.contains("STATUS=serving b.gguf")
    });
    let mut c = Client::connect(&socket);
    assert_eq!(c.ask(r#"{"cmd":"health"}"#)["model"]["name"], "b.gguf");
    daemon.terminate();
    recv_until(&notify, &mut got, Duration::from_secs(30), |m| {
        m.contains("STOPPING=1")
    });
    assert_eq!(daemon.wait(Duration::from_secs(30)), Some(0));
}

#[test]
fn socket_passed_by_systemd_is_served_and_not_removed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("activated.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let fd = listener.as_raw_fd();
    let model = smollm2();
    let mut cmd = Command::new("/bin/sh");
    // LISTEN_PID must be the daemon's pid: the shell's, which exec keeps.
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" serve --threads 2 --log warn --socket /nonexistent/ignored.sock --models-dir \"$1\" --model \"$2\"")
        .arg(bin())
        .arg(model.parent().unwrap())
        .arg(&model)
        .stdin(Stdio::null());
    // SAFETY: dup2 is async-signal-safe; it runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself keeps FD_CLOEXEC, so clear it explicitly.
            if fd == 3 {
                let flags = libc::fcntl(3, libc::F_GETFD);
                if flags < 0 || libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(listener);
    let mut daemon = Daemon {
        child,
        socket: path.clone(),
        dir,
    };
    // The kernel queues the connection until the daemon accepts it.
    let mut c = Client::connect(&path);
    let h = c.ask(r#"{"cmd":"health","id":"sa"}"#);
    assert_eq!(h["id"], "sa");
    assert_eq!(h["status"], "ok");
    let v = c.ask("What is the capital of France?");
    common::assert_verdict(&v);
    daemon.terminate();
    assert_eq!(daemon.wait(Duration::from_secs(30)), Some(0));
    assert!(
        path.exists(),
        "a socket owned by systemd is left for systemd to remove"
    );
}

#[test]
fn unit_files_pass_systemd_analyze_verify() {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze is not installed: unit files not verified");
        return;
    };
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    for unit in ["promptgate.service", "promptgate.socket"] {
        let text = std::fs::read_to_string(src.join(unit)).unwrap();
        // Verify against the binary actually built, since /usr/local/bin may not hold one.
        std::fs::write(
            dir.path().join(unit),
            text.replace("/usr/local/bin/promptgate", bin()),
        )
        .unwrap();
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("promptgate.service"))
        .arg(dir.path().join("promptgate.socket"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}
