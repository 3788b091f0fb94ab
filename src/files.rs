//! Output files that are never lost: every output is written to a temporary file in the same
//! directory, flushed to disk and renamed over the target, so a full disk, a size limit, a signal
//! or a concurrent writer leaves either the old file or the new one, never a truncated or mixed
//! one. Targets that are not regular files (`/dev/null`, `/dev/stdout`, a FIFO) are written in
//! place, since renaming over them would replace the device.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// An output path that cannot be written, or a write that failed (the target is unchanged).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FileError {
    /// An empty path (`-o ''`).
    #[error("{what}: the path is empty")]
    Empty {
        /// The option that named it (`--out`).
        what: String,
    },
    /// The path cannot be written: no such directory, a directory, no permission.
    #[error("cannot write {what} `{path}`: {reason}")]
    NotWritable {
        /// The option that named it.
        what: String,
        /// The path.
        path: String,
        /// Why.
        reason: String,
    },
    /// Writing failed; the file at the path (if any) is unchanged.
    #[error("cannot write `{path}`: {reason} (any earlier `{path}` is unchanged)")]
    Write {
        /// The path.
        path: String,
        /// The OS error.
        reason: String,
    },
}

/// Checks, before any work, that `path` can be written: not empty, not a directory, its
/// directory exists and accepts a new file. `what` names the option in the error.
pub fn check_writable(what: &str, path: &Path) -> Result<(), FileError> {
    let bad = |reason: String| FileError::NotWritable {
        what: what.into(),
        path: path.display().to_string(),
        reason,
    };
    if path.as_os_str().is_empty() {
        return Err(FileError::Empty { what: what.into() });
    }
    // The write goes through a symlink to its target: check where it will land.
    let path = &resolve(path).map_err(|e| bad(os_reason(&e)))?;
    if let Ok(m) = std::fs::metadata(path) {
        if m.is_dir() {
            return Err(bad("is a directory".into()));
        }
        if !m.is_file() {
            // A device or FIFO is written in place. Opening it here would meet (and release) a
            // FIFO's reader before the real write, which would then wait for another one.
            return Ok(());
        }
    }
    let dir = parent(path);
    match std::fs::metadata(&dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(bad(format!(
                "the directory `{}` does not exist",
                dir.display()
            )))
        }
        Err(e) => return Err(bad(os_reason(&e))),
        Ok(m) if !m.is_dir() => return Err(bad(format!("`{}` is not a directory", dir.display()))),
        Ok(_) => {}
    }
    // The only reliable test of a directory (permissions, read-only mounts, ACLs): make a file.
    let (probe, f) = create_temp(path).map_err(|e| {
        bad(format!(
            "cannot create a file in `{}`: {}",
            dir.display(),
            os_reason(&e)
        ))
    })?;
    drop(f);
    let _ = std::fs::remove_file(probe);
    Ok(())
}

/// Writes `path` through `write`, atomically: the bytes go to a temporary file beside it, which
/// is synced and renamed over `path` only when everything succeeded.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), FileError> {
    let fail = |e: &io::Error| FileError::Write {
        path: path.display().to_string(),
        reason: os_reason(e),
    };
    if path.as_os_str().is_empty() {
        return Err(FileError::Empty {
            what: "output".into(),
        });
    }
    // A symlink is written through: its target is replaced, the link stays.
    let path = &resolve(path).map_err(|e| fail(&e))?;
    let meta = std::fs::metadata(path).ok();
    if meta.as_ref().is_some_and(|m| !m.is_file() && !m.is_dir()) {
        let mut f = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .map_err(|e| fail(&e))?;
        return write(&mut f).and_then(|_| f.flush()).map_err(|e| fail(&e));
    }
    let (tmp, mut f) = create_temp(path).map_err(|e| fail(&e))?;
    let result = (|| {
        if let Some(m) = &meta {
            f.set_permissions(m.permissions())?;
        }
        write(&mut f)?;
        f.flush()?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(fail(&e));
    }
    // The rename is durable once the directory is synced (best effort: not every system can).
    if let Ok(d) = File::open(parent(path)) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    write_atomic(path, |f| f.write_all(bytes))
}

/// `y.npz` -> `y.failed.npz`, `stats` -> `stats.failed`: where the outputs of a run whose check
/// failed go, so they do not replace the last good ones.
pub fn failed_path(path: &Path) -> PathBuf {
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let name = match path.extension() {
        Some(ext) => format!("{stem}.failed.{}", ext.to_string_lossy()),
        None => format!("{stem}.failed"),
    };
    path.with_file_name(name)
}

/// Where a write to `path` lands: the target of a symlink, else `path` itself.
fn resolve(path: &Path) -> io::Result<PathBuf> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => std::fs::canonicalize(path),
        _ => Ok(path.to_path_buf()),
    }
}

/// The directory a new file at `path` goes in.
fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Creates a new, uniquely named hidden file beside `path` (`.NAME.tpc-PID-N.tmp`).
fn create_temp(path: &Path) -> io::Result<(PathBuf, File)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let dir = parent(path);
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.tpc-{}-{n}.tmp", std::process::id()));
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// The OS error without Rust's ` (os error N)` suffix.
pub fn os_reason(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tpc-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_fifo_is_checked_without_opening_it() {
        // Opening a FIFO for writing waits for a reader: the check must not open it.
        let d = scratch("fifo");
        let fifo = d.join("out.fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if !made.is_ok_and(|s| s.success()) {
            return; // no mkfifo on this system
        }
        check_writable("--out", &fifo).unwrap();
        assert!(!std::fs::metadata(&fifo).unwrap().is_file());
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_leaves_no_temporary() {
        let d = scratch("fail");
        let p = d.join("y.txt");
        write_bytes(&p, b"good").unwrap();
        let e = write_atomic(&p, |f| {
            f.write_all(b"half")?;
            Err(io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(e.to_string().contains("disk full"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"good");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        write_bytes(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
    }

    #[test]
    fn writable_checks_name_the_problem() {
        let d = scratch("check");
        assert!(matches!(
            check_writable("-o", Path::new("")),
            Err(FileError::Empty { .. })
        ));
        let e = check_writable("-o", &d.join("nope/y.txt")).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        let e = check_writable("-o", &d).unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");
        check_writable("-o", &d.join("y.txt")).unwrap();
        check_writable("-o", Path::new("/dev/null")).unwrap();
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
    }

    #[test]
    fn devices_are_written_in_place() {
        write_bytes(Path::new("/dev/null"), b"x").unwrap();
        assert!(!std::fs::metadata("/dev/null").unwrap().is_file());
        if Path::new("/dev/full").exists() {
            let e = write_bytes(Path::new("/dev/full"), &[0; 1 << 16]).unwrap_err();
            assert!(e.to_string().contains("No space left"), "{e}");
        }
    }

    #[test]
    fn a_symlink_is_written_through() {
        let d = scratch("link");
        write_bytes(&d.join("real.txt"), b"old").unwrap();
        std::os::unix::fs::symlink("real.txt", d.join("link.txt")).unwrap();
        write_bytes(&d.join("link.txt"), b"new").unwrap();
        assert!(std::fs::symlink_metadata(d.join("link.txt"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(d.join("real.txt")).unwrap(), b"new");
    }

    #[test]
    fn failed_paths_go_beside() {
        assert_eq!(
            failed_path(Path::new("out/y.npz")),
            Path::new("out/y.failed.npz")
        );
        assert_eq!(failed_path(Path::new("stats")), Path::new("stats.failed"));
    }
}
