//! Which model serves: the models directory, watched, validated, swapped.
//!
//! # The rule
//! - `--model NAME` pins one file: only it serves, reloaded when it changes.
//! - Otherwise the newest valid model in the directory serves. "Newest" is
//!   the file's arrival time: its ctime, which a copy, an in-place write and a
//!   rename into the directory all set to now (a rename keeps the mtime, so
//!   mtime would miss `mv old-download.gguf models/`). Ties go to the name
//!   that sorts last.
//! - The serving model changes only to a file newer than the one serving.
//!   A file that fails validation is remembered by (size, ctime, inode) and
//!   not tried again until it changes. If the serving file is deleted or
//!   overwritten with something invalid, the model already in memory (loaded
//!   without mmap) keeps serving.
//! - Candidates are `*.gguf` files and trained detectors (`*.detector.json`,
//!   a head on a base GGUF; see docs/detector.md). A detector ranks above any
//!   bare GGUF: a bare GGUF (zero-shot) serves only when no detector in the
//!   directory loads, and a newer bare GGUF never replaces a serving detector.
//!   Within a rank the newest serves. Dotfiles and `*.part`, `*.partial`,
//!   `*.tmp` are never looked at, so a download can be written under such a
//!   name and renamed into place.
//!
//! Validation before a swap: the GGUF header and size, a full load, and the
//! canary prompts ([`crate::engine::CANARIES`]) as warm-up.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};

use crate::engine::{Engine, EngineError, EngineInfo, Scorer};
use crate::systemd;

/// Builds a scorer for a model file. Runs on the new worker's thread.
pub type Loader = Arc<dyn Fn(&Path) -> Result<Box<dyn Scorer>, EngineError> + Send + Sync>;

/// How the directory is watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchMode {
    /// inotify through `notify`: reacts to close-after-write, renames and deletions.
    Notify,
    /// Re-list the directory every interval; a file must look the same on two
    /// consecutive polls before it is tried (for mounts where inotify misses events).
    Poll(Duration),
    /// Only SIGHUP and `{"cmd": "reload"}` re-scan.
    Off,
}

/// Settings of the registry.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// The models directory.
    pub dir: PathBuf,
    /// A pinned file name (or path), from `--model`.
    pub pinned: Option<String>,
    /// How to watch.
    pub watch: WatchMode,
    /// Quiet time after the last file event before re-scanning.
    pub debounce: Duration,
}

/// Identity of one version of a file: a change in any field is a new version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    len: u64,
    ctime_ns: i128,
    ino: u64,
}

impl Fingerprint {
    fn of(meta: &std::fs::Metadata) -> Fingerprint {
        Fingerprint {
            len: meta.len(),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
            ino: meta.ino(),
        }
    }
}

#[derive(Debug, Clone)]
enum Status {
    /// Not tried yet.
    Pending,
    /// Loaded and validated once, but a newer file serves.
    Valid,
    /// Refused, with the reason.
    Invalid(String),
}

#[derive(Debug, Clone)]
struct Active {
    name: String,
    path: PathBuf,
    fingerprint: Fingerprint,
    info: Arc<EngineInfo>,
    since: SystemTime,
}

#[derive(Debug, Default)]
struct State {
    active: Option<Active>,
    files: BTreeMap<String, (Fingerprint, Status)>,
    last_reload_error: Option<String>,
    reloads: u64,
    dir_error: Option<String>,
}

/// The outcome of one re-scan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing newer: the same model serves.
    Unchanged,
    /// A new model serves.
    Swapped {
        /// Its file name.
        name: String,
    },
    /// Something failed; the previous model (if any) serves. The reason.
    Failed(String),
}

/// The models directory and the model serving from it.
pub struct Registry {
    config: RegistryConfig,
    loader: Loader,
    engine: Mutex<Option<Engine>>,
    state: Mutex<State>,
    scan_lock: tokio::sync::Mutex<()>,
    /// Set by [`Registry::stop`]: scans that have not started are skipped.
    stopping: std::sync::atomic::AtomicBool,
    capacity: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether a directory entry named `name` may serve: a `.gguf` that is not a
/// dotfile (partial downloads end in `.part`, `.partial` or `.tmp` and so are
/// not `.gguf`).
pub fn is_candidate(name: &str) -> bool {
    !name.starts_with('.')
        && (name.ends_with(".gguf") || name.ends_with(crate::detector::file::SUFFIX))
}

/// 1 for a trained detector file, 0 for a bare GGUF: detectors serve first.
fn rank(name: &str) -> u8 {
    u8::from(name.ends_with(crate::detector::file::SUFFIX))
}

fn skip_name(name: &str) -> bool {
    !is_candidate(name)
}

/// Candidates in the order the rule tries them: the pinned file alone, or
/// every candidate newest first. `(name, path, fingerprint)`.
fn list(dir: &Path, pinned: Option<&str>) -> std::io::Result<Vec<(String, PathBuf, Fingerprint)>> {
    let mut out = Vec::new();
    if let Some(pinned) = pinned {
        let in_dir = dir.join(pinned);
        let path = if in_dir.is_file() || !Path::new(pinned).is_file() {
            in_dir
        } else {
            PathBuf::from(pinned)
        };
        let meta = std::fs::metadata(&path)?;
        let name = path
            .file_name()
            .map_or_else(|| pinned.to_string(), |n| n.to_string_lossy().into_owned());
        out.push((name, path, Fingerprint::of(&meta)));
        return Ok(out);
    }
    for entry in std::fs::read_dir(dir)? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name().to_string_lossy().into_owned();
        if skip_name(&name) {
            continue;
        }
        let path = entry.path();
        // Follow symlinks: the file behind is what gets loaded.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_file() {
            out.push((name, path, Fingerprint::of(&meta)));
        }
    }
    // A directory that holds a detector serves detectors only: were every
    // detector refused (a half-copied file, a base GGUF that changed), a bare
    // GGUF would answer zero-shot, near chance, and look healthy. Bare GGUFs
    // there are bases, not candidates; pin one with `--model` to serve it.
    if out.iter().any(|(name, _, _)| rank(name) == 1) {
        out.retain(|(name, _, _)| rank(name) == 1);
    }
    // Detectors first, then newest first by ctime, ties by name (last first).
    out.sort_by(|a, b| {
        rank(&b.0)
            .cmp(&rank(&a.0))
            .then_with(|| b.2.ctime_ns.cmp(&a.2.ctime_ns))
            .then_with(|| b.0.cmp(&a.0))
    });
    Ok(out)
}

/// Whether `path` still has fingerprint `fp` after a short pause (100 ms): a
/// file that grows or is replaced meanwhile is still being written.
fn settled(path: &Path, fp: Fingerprint) -> bool {
    std::thread::sleep(Duration::from_millis(100));
    std::fs::metadata(path).is_ok_and(|m| Fingerprint::of(&m) == fp)
}

/// The model files to try, in the rule's order, for one-shot use (`classify`).
///
/// # Errors
/// When the directory (or the pinned file) cannot be read, or holds no candidate.
pub fn candidates_by_rule(dir: &Path, pinned: Option<&str>) -> anyhow::Result<Vec<PathBuf>> {
    let listing = list(dir, pinned).map_err(|e| match pinned {
        Some(p) => anyhow::anyhow!("model {p} not found in {} or as a path: {e}", dir.display()),
        None => anyhow::anyhow!("cannot read models directory {}: {e}", dir.display()),
    })?;
    anyhow::ensure!(
        !listing.is_empty(),
        "no .gguf model in {}; fetch the defaults with scripts/fetch-models.sh",
        dir.display()
    );
    Ok(listing.into_iter().map(|(_, p, _)| p).collect())
}

impl Registry {
    /// Loads the first model by the rule and returns the registry with its engine.
    ///
    /// # Errors
    /// When no candidate loads: the reasons of each refused file.
    pub fn start(
        config: RegistryConfig,
        loader: Loader,
        queue_capacity: usize,
    ) -> anyhow::Result<(Arc<Registry>, Engine)> {
        let registry = Arc::new(Registry {
            config,
            loader,
            engine: Mutex::new(None),
            state: Mutex::new(State::default()),
            scan_lock: tokio::sync::Mutex::new(()),
            stopping: std::sync::atomic::AtomicBool::new(false),
            capacity: queue_capacity,
        });
        match registry.scan_blocking() {
            Outcome::Swapped { .. } => {}
            Outcome::Failed(reason) => anyhow::bail!("no model could be loaded: {reason}"),
            Outcome::Unchanged => anyhow::bail!(
                "no model in {} (fetch the defaults with scripts/fetch-models.sh)",
                registry.config.dir.display()
            ),
        }
        let engine = lock(&registry.engine)
            .clone()
            .expect("a swap sets the engine");
        Ok((registry, engine))
    }

    /// Re-scans the directory now and switches model if the rule says so.
    /// Scans are serialized; a scan waits for the one in progress.
    /// After [`Registry::stop`] it scans nothing and answers
    /// `Failed("the daemon is shutting down")`.
    pub async fn rescan(self: &Arc<Self>) -> Outcome {
        let _guard = self.scan_lock.lock().await;
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Outcome::Failed("the daemon is shutting down".into());
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.scan_blocking())
            .await
            .unwrap_or_else(|e| Outcome::Failed(format!("scan task failed: {e}")))
    }

    /// Stops scanning: waits for a scan in progress (a model load and its
    /// warm-up cannot be cut short) and skips every later one. The daemon
    /// calls it before it exits: a process that exited while llama.cpp was
    /// still loading a model on another thread could crash (SIGSEGV) in
    /// llama.cpp's teardown.
    pub async fn stop(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _wait = self.scan_lock.lock().await;
    }

    fn list(&self) -> std::io::Result<Vec<(String, PathBuf, Fingerprint)>> {
        list(&self.config.dir, self.config.pinned.as_deref())
    }

    fn scan_blocking(&self) -> Outcome {
        let listing = match self.list() {
            Ok(l) => l,
            Err(e) => {
                let msg = format!("cannot read models {}: {e}", self.config.dir.display());
                let mut st = lock(&self.state);
                if st.dir_error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!("{msg}; the loaded model keeps serving");
                }
                st.dir_error = Some(msg.clone());
                return if st.active.is_some() {
                    Outcome::Unchanged
                } else {
                    Outcome::Failed(msg)
                };
            }
        };
        let to_try: Vec<(String, PathBuf, Fingerprint)> = {
            let mut st = lock(&self.state);
            st.dir_error = None;
            // Forget files that are gone; mark changed files pending.
            st.files
                .retain(|name, _| listing.iter().any(|(n, _, _)| n == name));
            for (name, _, fp) in &listing {
                let changed = st.files.get(name).is_none_or(|(old, _)| old != fp);
                if changed {
                    st.files.insert(name.clone(), (*fp, Status::Pending));
                }
            }
            let active = st.active.clone();
            listing
                .iter()
                .filter(|(name, _, fp)| {
                    let known_bad = matches!(st.files.get(name), Some((_, Status::Invalid(_))));
                    let is_active = active
                        .as_ref()
                        .is_some_and(|a| &a.name == name && &a.fingerprint == fp);
                    let newer = active.as_ref().is_none_or(|a| {
                        self.config.pinned.is_some()
                            || (rank(name), fp.ctime_ns) > (rank(&a.name), a.fingerprint.ctime_ns)
                    });
                    !known_bad && !is_active && newer
                })
                .cloned()
                .collect()
        };
        let mut failures = Vec::new();
        for (name, path, fp) in to_try {
            // A file still being written changes under us: leave it pending;
            // its close-after-write (or the next poll) brings it back.
            if !settled(&path, fp) {
                tracing::debug!(model = %name, "still being written; not loaded yet");
                continue;
            }
            match self.try_swap(&name, &path, fp) {
                Ok(()) => {
                    if failures.is_empty() {
                        // A clean swap: the last error described a state that
                        // no longer holds (each refused file keeps its reason
                        // in `models`).
                        lock(&self.state).last_reload_error = None;
                    }
                    return Outcome::Swapped { name };
                }
                Err(reason) => failures.push(format!("{name}: {reason}")),
            }
        }
        if failures.is_empty() {
            Outcome::Unchanged
        } else {
            Outcome::Failed(failures.join("; "))
        }
    }

    fn try_swap(&self, name: &str, path: &Path, fp: Fingerprint) -> Result<(), String> {
        let first = lock(&self.engine).is_none();
        if first {
            systemd::extend_timeout(Duration::from_secs(120));
        } else {
            systemd::reloading();
        }
        tracing::info!(model = %name, "loading");
        let loader = self.loader.clone();
        let load_path = path.to_path_buf();
        let factory = move || loader(&load_path);
        let result = {
            let current = lock(&self.engine).clone();
            match current {
                Some(engine) => engine.swap(factory),
                None => Engine::spawn(self.capacity, factory).map(|engine| {
                    let info = engine.info();
                    *lock(&self.engine) = Some(engine);
                    info
                }),
            }
        };
        let mut st = lock(&self.state);
        let outcome = match result {
            Ok(info) => {
                if let Some(old) = st.active.take() {
                    if let Some((_, status)) = st.files.get_mut(&old.name) {
                        *status = Status::Valid;
                    }
                }
                st.files.insert(name.to_string(), (fp, Status::Valid));
                st.reloads += 1;
                tracing::info!(model = %name, sha256 = %info.model.sha256, "model serving");
                st.active = Some(Active {
                    name: name.to_string(),
                    path: path.to_path_buf(),
                    fingerprint: fp,
                    info,
                    since: SystemTime::now(),
                });
                Ok(())
            }
            Err(e) => {
                let reason = e.to_string();
                tracing::warn!(model = %name, reason = %reason, "model refused; the current model keeps serving");
                st.files
                    .insert(name.to_string(), (fp, Status::Invalid(reason.clone())));
                st.last_reload_error = Some(format!("{name}: {reason}"));
                Err(reason)
            }
        };
        // The first READY=1 is the caller's, once the socket is listening.
        if let (false, Some(active)) = (first, &st.active) {
            systemd::ready(&format!("serving {}", active.name));
        }
        outcome
    }

    /// `{"cmd": "models"}`: every candidate, the active one, and why each other is not.
    pub fn models_json(&self) -> Value {
        let st = lock(&self.state);
        let active_name = st.active.as_ref().map(|a| a.name.clone());
        let files: Vec<Value> = st
            .files
            .iter()
            .map(|(name, (fp, status))| {
                let is_active = active_name.as_deref() == Some(name.as_str())
                    && st.active.as_ref().is_some_and(|a| &a.fingerprint == fp);
                let older = st
                    .active
                    .as_ref()
                    .is_some_and(|a| fp.ctime_ns <= a.fingerprint.ctime_ns);
                let (state, reason) = match status {
                    _ if is_active => ("active", None),
                    Status::Valid => (
                        "standby",
                        Some("valid, but a newer model serves".to_string()),
                    ),
                    Status::Pending if self.config.pinned.is_none() && older => (
                        "older",
                        Some("not loaded: older than the serving model".to_string()),
                    ),
                    Status::Pending => ("pending", Some("not tried yet".to_string())),
                    Status::Invalid(r) => ("invalid", Some(r.clone())),
                };
                json!({"name": name, "bytes": fp.len, "state": state, "reason": reason})
            })
            .collect();
        json!({
            "dir": self.config.dir,
            "pinned": self.config.pinned,
            "active": st.active.as_ref().map(|a| json!({
                "name": a.name,
                "path": a.path,
                "sha256": a.info.model.sha256,
                "file_present": a.path.is_file(),
                "since_unix_s": a.since.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            })),
            "files": files,
            "last_reload_error": st.last_reload_error,
            "dir_error": st.dir_error,
        })
    }

    /// Fields added to `health` and `stats`.
    pub fn status_json(&self) -> Value {
        let st = lock(&self.state);
        json!({
            "last_reload_error": st.last_reload_error,
            "reloads": st.reloads,
            "dir_error": st.dir_error,
        })
    }

    /// Watches the directory as configured and re-scans on changes, until
    /// `stop` is cancelled. Runs as a task on the tokio runtime.
    pub async fn watch(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        match self.config.watch {
            WatchMode::Off => stop.cancelled().await,
            WatchMode::Poll(every) => self.poll_loop(every, stop).await,
            WatchMode::Notify => self.notify_loop(stop).await,
        }
    }

    async fn poll_loop(
        self: Arc<Self>,
        every: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        // A file is tried once it looked the same on two polls in a row.
        let mut previous: Option<Vec<(String, Fingerprint)>> = None;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            let now: Option<Vec<(String, Fingerprint)>> = self
                .list()
                .ok()
                .map(|l| l.into_iter().map(|(n, _, f)| (n, f)).collect());
            if now.is_some() && now == previous && self.has_news(now.as_deref().unwrap_or_default())
            {
                self.log_outcome(self.rescan().await);
            } else if now.is_none() {
                // The directory is gone: record it (the model keeps serving).
                self.rescan().await;
            }
            previous = now;
        }
    }

    /// Whether the listing has a version of a file not yet seen.
    fn has_news(&self, listing: &[(String, Fingerprint)]) -> bool {
        let st = lock(&self.state);
        listing
            .iter()
            .any(|(name, fp)| st.files.get(name).is_none_or(|(old, _)| old != fp))
            || st.files.len() != listing.len()
    }

    async fn notify_loop(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
        use notify::Watcher;
        // `true`: the directory itself went away or notify lost events, so
        // the watch must be set up again (an inode number can be reused by
        // `rm -r dir && mkdir dir`, so comparing inodes is not enough).
        let (tx, mut rx) = tokio::sync::mpsc::channel::<bool>(16);
        // Held only to keep the inotify watch alive.
        let mut watcher: Option<notify::RecommendedWatcher>;
        let mut watched_ino: Option<u64> = None;
        loop {
            // (Re-)establish the watch when the directory appears or is replaced.
            let ino = std::fs::metadata(&self.config.dir).ok().map(|m| m.ino());
            if ino != watched_ino {
                watcher = None;
                if ino.is_some() {
                    let tx = tx.clone();
                    let dir = self.config.dir.clone();
                    let made =
                        notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                            let Ok(event) = res else {
                                let _ = tx.try_send(true);
                                return;
                            };
                            let about_dir = event.paths.iter().any(|p| p == &dir);
                            if event.need_rescan()
                                || (about_dir
                                    && matches!(
                                        event.kind,
                                        EventKind::Remove(_)
                                            | EventKind::Modify(ModifyKind::Name(_))
                                    ))
                            {
                                let _ = tx.try_send(true);
                                return;
                            }
                            let relevant_kind = matches!(
                                event.kind,
                                EventKind::Access(AccessKind::Close(AccessMode::Write))
                                    | EventKind::Modify(ModifyKind::Name(_))
                                    | EventKind::Remove(_)
                            );
                            let relevant_name = event.paths.iter().any(|p| {
                                p.file_name()
                                    .is_some_and(|n| !skip_name(&n.to_string_lossy()))
                            });
                            if relevant_kind && relevant_name {
                                let _ = tx.try_send(false);
                            }
                        })
                        .and_then(|mut w| {
                            w.watch(&self.config.dir, notify::RecursiveMode::NonRecursive)
                                .map(|()| w)
                        });
                    match made {
                        Ok(w) => {
                            watcher = Some(w);
                            tracing::debug!(dir = %self.config.dir.display(), "watching");
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot watch the models directory"),
                    }
                }
                watched_ino = if watcher.is_some() { ino } else { None };
                // Whatever happened while unwatched: look now.
                self.log_outcome(self.rescan().await);
            }
            tokio::select! {
                () = stop.cancelled() => return,
                got = rx.recv() => {
                    let Some(mut rewatch) = got else { return };
                    // Debounce: wait until events stop for a while.
                    while let Ok(Some(more)) = tokio::time::timeout(self.config.debounce, rx.recv()).await {
                        rewatch |= more;
                    }
                    if rewatch {
                        tracing::debug!("the models directory went away: watching it anew");
                        watched_ino = None;
                        // Record what is there now (or that nothing is); the top of
                        // the loop re-watches and re-scans once the directory exists.
                        self.log_outcome(self.rescan().await);
                        continue;
                    }
                    self.log_outcome(self.rescan().await);
                }
                // Check every 2 s that the directory is still the one watched.
                () = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    }

    fn log_outcome(&self, outcome: Outcome) {
        match outcome {
            Outcome::Unchanged => tracing::debug!("re-scan: no change"),
            Outcome::Swapped { name } => tracing::info!(model = %name, "re-scan: swapped"),
            Outcome::Failed(reason) => {
                tracing::warn!(reason = %reason, "re-scan: nothing new could be loaded")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Score;
    use crate::protocol::ModelRef;

    /// Loads "models" whose content is `ok <name>`; anything else is refused.
    struct TextModel(ModelRef);
    impl Scorer for TextModel {
        fn model(&self) -> &ModelRef {
            &self.0
        }
        fn default_threshold(&self) -> f64 {
            0.5
        }
        fn score(&mut self, _: &str) -> Result<Score, EngineError> {
            Ok(Score {
                p_malicious: 0.1,
                tokens: 1,
                windows: 1,
                early_exit_windows: 0,
            })
        }
    }

    fn loader() -> Loader {
        Arc::new(|path: &Path| {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if !text.starts_with("ok") {
                return Err(EngineError::Load {
                    path: path.display().to_string(),
                    reason: "not ok".into(),
                });
            }
            Ok(Box::new(TextModel(ModelRef {
                name: path.file_name().unwrap().to_string_lossy().into_owned(),
                sha256: text.trim().to_string(),
            })) as Box<dyn Scorer>)
        })
    }

    fn config(dir: &Path, pinned: Option<&str>) -> RegistryConfig {
        RegistryConfig {
            dir: dir.to_path_buf(),
            pinned: pinned.map(str::to_string),
            watch: WatchMode::Off,
            debounce: Duration::from_millis(50),
        }
    }

    fn write(dir: &Path, name: &str, text: &str) {
        // Distinct ctimes: the rule orders by ctime, with nanosecond resolution.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[tokio::test]
    async fn newest_valid_model_wins_and_bad_files_are_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "a.gguf", "ok a");
        write(d, "b.gguf", "ok b");
        write(d, "c.gguf", "garbage");
        write(d, ".hidden.gguf", "ok hidden");
        write(d, "d.gguf.part", "ok partial");
        let (reg, engine) = Registry::start(config(d, None), loader(), 4).unwrap();
        assert_eq!(
            engine.info().model.name,
            "b.gguf",
            "newest valid, c refused"
        );
        let models = reg.models_json();
        let states: Vec<(String, String)> = models["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["name"].as_str().unwrap().into(),
                    f["state"].as_str().unwrap().into(),
                )
            })
            .collect();
        assert_eq!(
            states,
            [
                ("a.gguf".to_string(), "older".to_string()),
                ("b.gguf".into(), "active".into()),
                ("c.gguf".into(), "invalid".into())
            ],
            "a was never tried: b was newer"
        );
        assert!(reg.status_json()["last_reload_error"]
            .as_str()
            .unwrap()
            .contains("c.gguf"));
        // Nothing changed: no reload, and the bad file is not retried.
        assert_eq!(reg.rescan().await, Outcome::Unchanged);
        // A newer good file takes over.
        write(d, "e.gguf", "ok e");
        assert_eq!(
            reg.rescan().await,
            Outcome::Swapped {
                name: "e.gguf".into()
            }
        );
        assert_eq!(engine.info().model.name, "e.gguf");
        // The active file overwritten with garbage: refused, old model keeps serving.
        write(d, "e.gguf", "garbage now");
        assert!(matches!(reg.rescan().await, Outcome::Failed(_)));
        assert_eq!(engine.info().model.name, "e.gguf");
        assert_eq!(engine.info().model.sha256, "ok e");
        // The active file deleted: still serving from memory.
        std::fs::remove_file(d.join("e.gguf")).unwrap();
        reg.rescan().await;
        assert_eq!(engine.info().model.name, "e.gguf");
        assert_eq!(reg.models_json()["active"]["file_present"], false);
    }

    #[tokio::test]
    async fn a_detector_outranks_bare_ggufs_new_or_old() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "a.gguf", "ok a");
        write(d, "head.detector.json", "ok head");
        write(d, "b.gguf", "ok b");
        let (reg, engine) = Registry::start(config(d, None), loader(), 4).unwrap();
        assert_eq!(engine.info().model.name, "head.detector.json");
        // A newer bare GGUF does not replace a serving detector...
        write(d, "c.gguf", "ok c");
        assert_eq!(reg.rescan().await, Outcome::Unchanged);
        // ...a newer detector does.
        write(d, "next.detector.json", "ok next");
        assert_eq!(
            reg.rescan().await,
            Outcome::Swapped {
                name: "next.detector.json".into()
            }
        );
    }

    /// Reported by a fresh session: a detector refused at start-up (here, a
    /// half-copied one) let the bare GGUF beside it serve zero-shot, near
    /// chance, while health said `ok`.
    #[tokio::test]
    async fn regression_refused_detector_fell_back_to_a_zero_shot_gguf() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "a.gguf", "ok a");
        write(d, "bad.detector.json", "half written");
        let err = Registry::start(config(d, None), loader(), 4)
            .err()
            .expect("a refused detector must not hand over to a bare GGUF");
        let msg = err.to_string();
        assert!(
            msg.contains("no model could be loaded") && msg.contains("bad.detector.json"),
            "{msg}"
        );
        // Pinned, the bare GGUF still serves: the operator asked for it.
        let (_, engine) = Registry::start(config(d, Some("a.gguf")), loader(), 4).unwrap();
        assert_eq!(engine.info().model.name, "a.gguf");
        // A valid detector beside the bad one serves, and a bare GGUF is
        // never listed as a candidate while a detector is present.
        write(d, "good.detector.json", "ok good");
        let (reg, engine) = Registry::start(config(d, None), loader(), 4).unwrap();
        assert_eq!(engine.info().model.name, "good.detector.json");
        let names: Vec<String> = reg.models_json()["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap().to_string())
            .collect();
        assert!(!names.contains(&"a.gguf".to_string()), "{names:?}");
    }

    #[tokio::test]
    async fn pinned_model_serves_even_when_older() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "a.gguf", "ok a");
        write(d, "b.gguf", "ok b");
        let (reg, engine) = Registry::start(config(d, Some("a.gguf")), loader(), 4).unwrap();
        assert_eq!(engine.info().model.name, "a.gguf");
        write(d, "c.gguf", "ok c");
        assert_eq!(reg.rescan().await, Outcome::Unchanged);
        write(d, "a.gguf", "ok a2");
        assert_eq!(
            reg.rescan().await,
            Outcome::Swapped {
                name: "a.gguf".into()
            }
        );
        assert_eq!(engine.info().model.sha256, "ok a2");
    }

    #[tokio::test]
    async fn missing_directory_keeps_serving_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("models");
        std::fs::create_dir(&d).unwrap();
        write(&d, "a.gguf", "ok a");
        let (reg, engine) = Registry::start(config(&d, None), loader(), 4).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
        assert_eq!(reg.rescan().await, Outcome::Unchanged);
        assert!(reg.status_json()["dir_error"].is_string());
        assert_eq!(engine.info().model.name, "a.gguf");
        std::fs::create_dir(&d).unwrap();
        write(&d, "b.gguf", "ok b");
        assert_eq!(
            reg.rescan().await,
            Outcome::Swapped {
                name: "b.gguf".into()
            }
        );
        assert!(reg.status_json()["dir_error"].is_null());
    }

    #[test]
    fn partial_and_hidden_files_are_not_candidates() {
        assert!(is_candidate("model.gguf"));
        assert!(!is_candidate(".model.gguf"));
        assert!(!is_candidate("model.gguf.part"));
        assert!(!is_candidate("model.gguf.partial"));
        assert!(!is_candidate("model.gguf.tmp"));
        assert!(!is_candidate("README.md"));
        assert!(is_candidate("head.detector.json"));
        assert!(!is_candidate(".head.detector.json"));
        assert!(!is_candidate("head.detector.json.part"));
    }

    #[test]
    fn empty_directory_is_a_start_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = Registry::start(config(dir.path(), None), loader(), 4)
            .err()
            .unwrap();
        assert!(err.to_string().contains("no model"), "{err}");
    }
}
