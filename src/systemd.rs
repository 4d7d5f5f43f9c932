//! systemd integration: `sd_notify` states. Every call is a no-op when the
//! daemon was not started by systemd (`NOTIFY_SOCKET` unset). The watchdog is
//! fed from the inference worker's loop (see `engine`), socket activation is
//! in `listener`.
//!
//! Order over a daemon's life: `EXTEND_TIMEOUT_USEC` while the first model
//! loads, `READY=1` + `STATUS=` once it has answered its warm-up prompts,
//! `RELOADING=1` … `READY=1` around each swap, `STOPPING=1` at shutdown.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// `READY=1` and `STATUS=<status>`: serving.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `RELOADING=1` with `MONOTONIC_USEC`, as `Type=notify-reload` requires.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[
            NotifyState::Reloading,
            now,
            NotifyState::Status("loading a new model"),
        ]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// `STOPPING=1`: draining.
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("draining in-flight requests"),
    ]);
}

/// `EXTEND_TIMEOUT_USEC`: the start (or stop) takes up to `by` longer.
pub fn extend_timeout(by: Duration) {
    let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
    send(&[
        NotifyState::ExtendTimeoutUsec(usec),
        NotifyState::Status("loading model"),
    ]);
}
