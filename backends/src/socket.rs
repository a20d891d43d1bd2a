//! Unix socket paths that appear only when they accept.

use std::io;
use std::os::unix::net::UnixListener;
use std::path::Path;

/// Binds and listens on a private name next to `path`, then renames it onto
/// `path` (replacing a stale socket).
///
/// Frontends wait for the socket path to appear and connect at once; with a
/// plain bind the path exists a moment before `listen`, and a connect in
/// that window is refused. The rename makes the path appear only when it
/// already accepts.
pub fn listen_atomically(path: &Path) -> io::Result<UnixListener> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: not a socket path", path.display()),
        )
    })?;
    let mut private = std::ffi::OsString::from(".");
    private.push(name);
    private.push(format!(".{}.binding", std::process::id()));
    let private = path.with_file_name(private);
    let _ = std::fs::remove_file(&private);
    let listener = UnixListener::bind(&private)
        .map_err(|e| io::Error::new(e.kind(), format!("bind {}: {e}", private.display())))?;
    if let Err(e) = std::fs::rename(&private, path) {
        let _ = std::fs::remove_file(&private);
        return Err(io::Error::new(
            e.kind(),
            format!("rename {} to {}: {e}", private.display(), path.display()),
        ));
    }
    Ok(listener)
}
