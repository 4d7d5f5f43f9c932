//! Getting the listening socket: from systemd (`LISTEN_FDS`) or by binding a path.
//!
//! Binding follows what peers got wrong: a stale socket file left by a crash is
//! replaced, a socket that a live daemon still answers on is never stolen, a
//! path that is not a socket is never deleted, and the file gets an explicit
//! mode. The file is removed again when the [`BoundSocket`] is dropped.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Errors while getting the listener.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Another process accepts connections on the path.
    #[error("{0} is in use by a running daemon; stop it or choose another --socket")]
    InUse(PathBuf),
    /// The path exists and is not a socket.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// An I/O error, with what was being done.
    #[error("{what} {path}")]
    Io {
        /// The operation.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// A listener and, when the daemon bound it itself, the path to remove on drop.
pub struct BoundSocket {
    /// The listener, non-blocking, ready for tokio. Take it (`Option::take`) to
    /// hand it to the server, which closes it when shutdown starts, so later
    /// connections are refused instead of waiting in the backlog.
    pub listener: Option<std::os::unix::net::UnixListener>,
    /// The path bound; `None` for a socket passed in by systemd.
    pub path: Option<PathBuf>,
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Takes the first socket passed by systemd socket activation, if any.
///
/// # Errors
/// When `LISTEN_FDS` names an fd that is not a Unix stream listener.
pub fn from_systemd() -> Result<Option<BoundSocket>, ListenError> {
    let mut fds = listenfd::ListenFd::from_env();
    let io = |source| ListenError::Io {
        what: "take socket from LISTEN_FDS",
        path: PathBuf::from("fd 3"),
        source,
    };
    match fds.take_unix_listener(0).map_err(io)? {
        None => Ok(None),
        Some(listener) => {
            // tokio's from_std needs non-blocking, or accept() blocks the runtime (tokio#5595).
            listener.set_nonblocking(true).map_err(io)?;
            Ok(Some(BoundSocket {
                listener: Some(listener),
                path: None,
            }))
        }
    }
}

/// Binds `path` with file mode `mode` (e.g. `0o660`) and, when given, group
/// `gid` (so that the clients' group may connect, as systemd's `SocketGroup=`).
///
/// # Errors
/// [`ListenError::InUse`] when a live daemon answers there,
/// [`ListenError::NotASocket`] when the path is another kind of file, or I/O errors.
pub fn bind(path: &Path, mode: u32, gid: Option<u32>) -> Result<BoundSocket, ListenError> {
    let io = |what, source| ListenError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ListenError::NotASocket(path.to_path_buf()))
        }
        Ok(_) => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ListenError::InUse(path.to_path_buf()));
            }
            tracing::info!(path = %path.display(), "removing stale socket file");
            std::fs::remove_file(path).map_err(|e| io("remove stale socket", e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("inspect", e)),
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(|e| io("bind", e))?;
    let mut bound = BoundSocket {
        listener: None,
        path: Some(path.to_path_buf()),
    };
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(|e| io("set group of", e))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io("set mode of", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| io("set non-blocking", e))?;
    bound.listener = Some(listener);
    Ok(bound)
}

/// Resolves a group name or a numeric gid.
///
/// # Errors
/// When no such group exists.
pub fn resolve_group(group: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let name =
        std::ffi::CString::new(group).map_err(|_| "group name has a NUL byte".to_string())?;
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: getgrnam_r writes into `grp` and `buf`, both valid for their sizes.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return Err(format!("no group named {group:?}"));
    }
    Ok(grp.gr_gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_with_mode_and_removes_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sock");
        let gid = unsafe { libc::getegid() };
        let b = bind(&p, 0o640, Some(gid)).unwrap();
        assert_eq!(
            std::os::unix::fs::MetadataExt::gid(&std::fs::metadata(&p).unwrap()),
            gid
        );
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        drop(b);
        assert!(!p.exists());
    }

    #[test]
    fn stale_socket_is_replaced_but_live_one_is_not_stolen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sock");
        let live = std::os::unix::net::UnixListener::bind(&p).unwrap();
        assert!(matches!(bind(&p, 0o660, None), Err(ListenError::InUse(_))));
        // A crashed daemon: its listener is gone, the file stays behind.
        drop(live);
        assert!(p.exists());
        let again = bind(&p, 0o660, None).unwrap();
        assert!(std::os::unix::net::UnixStream::connect(&p).is_ok());
        drop(again);
        assert!(!p.exists());
    }

    #[test]
    fn regular_file_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("not-a-socket");
        std::fs::write(&p, b"data").unwrap();
        assert!(matches!(
            bind(&p, 0o660, None),
            Err(ListenError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&p).unwrap(), b"data");
    }
}
