//! Files that hold secrets, and the directories that hold them, for every Lattice binary:
//!
//! - [`write_private`]: writes a file atomically (a new temp file in the same directory, made
//!   with mode 0600 and `O_EXCL`, synced, renamed over the target, the directory synced), so a
//!   crash leaves either the old contents or the new, never half a key, and no other user can
//!   read it at any moment.
//! - [`prepare_dir`]: makes a state directory ready: created with mode 0700 when missing; an
//!   existing one must be a directory of this user's, not shared with others (world-writable or
//!   sticky, like `/tmp`), and is tightened to 0700 only when it is empty (so a mistaken
//!   `--state-dir /tmp`, `/` or a home directory is refused instead of having its permissions
//!   changed under everyone else).
#![warn(missing_docs)]

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a directory cannot hold state.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// It is shared with other users.
    #[error(
        "{path} is shared with other users ({why}); refusing to keep keys there: use a \
         directory of its own, e.g. {suggestion}"
    )]
    Shared {
        /// The directory.
        path: PathBuf,
        /// What makes it shared.
        why: &'static str,
        /// A subdirectory to use instead.
        suggestion: PathBuf,
    },
    /// It belongs to another user.
    #[error("{path} belongs to uid {owner}, not to this user (uid {me}); refusing to use it")]
    Foreign {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Our effective uid.
        me: u32,
    },
    /// Others can read it and it already holds files this program did not put there.
    #[error(
        "{path} is readable by other users (mode {mode:o}) and already holds other files; \
         refusing to change its permissions: use a directory of its own, e.g. {suggestion}"
    )]
    Exposed {
        /// The directory.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
        /// A subdirectory to use instead.
        suggestion: PathBuf,
    },
    /// It exists and is not a directory.
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    /// The file system refused.
    #[error("{path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

/// Makes `path` ready to hold secrets (see the crate docs). `known` lists the files this
/// program keeps there: a directory readable by others is tightened to 0700 when it holds
/// nothing else.
pub fn prepare_dir(path: &Path, known: &[&str]) -> Result<(), DirError> {
    let io = |source| DirError::Io {
        path: path.to_owned(),
        source,
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(io)?;
            }
            return match std::fs::DirBuilder::new().mode(0o700).create(path) {
                Ok(()) => Ok(()),
                // Created by someone else meanwhile: check it like any existing one.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => prepare_dir(path, known),
                Err(e) => Err(io(e)),
            };
        }
        Err(e) => return Err(io(e)),
    };
    if !meta.is_dir() {
        return Err(DirError::NotADirectory(path.to_owned()));
    }
    let suggestion = path.join("lattice");
    let mode = meta.mode() & 0o7777;
    if mode & 0o1000 != 0 {
        return Err(DirError::Shared {
            path: path.to_owned(),
            why: "it has the sticky bit, like /tmp",
            suggestion,
        });
    }
    if mode & 0o002 != 0 {
        return Err(DirError::Shared {
            path: path.to_owned(),
            why: "anyone can write to it",
            suggestion,
        });
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(DirError::Foreign {
            path: path.to_owned(),
            owner: meta.uid(),
            me,
        });
    }
    if mode & 0o077 == 0 {
        return Ok(());
    }
    let foreign_entry = std::fs::read_dir(path).map_err(io)?.any(|e| {
        e.map_or(true, |e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            !known
                .iter()
                .any(|k| name == *k || name.starts_with(&format!(".{k}.")))
        })
    });
    if foreign_entry {
        return Err(DirError::Exposed {
            path: path.to_owned(),
            mode,
            suggestion,
        });
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io)
}

/// Why a secret file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// It exists but is not 64 hex digits.
    #[error("{0} is not a 64-hex-digit key (refusing to replace it)")]
    Malformed(PathBuf),
    /// Reading or writing it failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

/// A 32-byte secret kept as hex in `path`: read if it exists, else drawn from `generate`,
/// written (mode 0600, atomically) and returned with `true`. Every copy, the hex included, is
/// wiped when dropped. A file that exists but does not parse is an error, never replaced:
/// replacing a key silently would change the identity it belongs to.
pub fn load_or_create_secret(
    path: &Path,
    generate: impl FnOnce() -> [u8; 32],
) -> Result<(zeroize::Zeroizing<[u8; 32]>, bool), SecretError> {
    let io = |source| SecretError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::read_to_string(path).map(zeroize::Zeroizing::new) {
        Ok(text) => {
            let t = text.trim();
            let mut key = zeroize::Zeroizing::new([0u8; 32]);
            let ok = t.len() == 64
                && t.is_ascii()
                && (0..32).all(|i| {
                    u8::from_str_radix(&t[2 * i..2 * i + 2], 16).is_ok_and(|b| {
                        key[i] = b;
                        true
                    })
                });
            if !ok {
                return Err(SecretError::Malformed(path.to_owned()));
            }
            Ok((key, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = zeroize::Zeroizing::new(generate());
            let mut hex = zeroize::Zeroizing::new(String::with_capacity(65));
            for b in key.iter() {
                hex.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
                hex.push(char::from(b"0123456789abcdef"[usize::from(b & 0x0f)]));
            }
            hex.push('\n');
            write_private(path, hex.as_bytes()).map_err(io)?;
            Ok((key, true))
        }
        Err(e) => Err(io(e)),
    }
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `contents` to `path` atomically with mode 0600 (see the crate docs).
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{} names no file", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // The rename itself is durable once the directory is synced.
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| std::io::Error::new(e.kind(), format!("writing {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_missing_directory_is_created_private() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b/state");
        prepare_dir(&p, &[]).unwrap();
        assert_eq!(mode(&p), 0o700);
        prepare_dir(&p, &[]).unwrap();
    }

    #[test]
    fn shared_directories_are_refused_and_left_alone() {
        let d = tempfile::tempdir().unwrap();
        for (m, why) in [(0o1777, "sticky"), (0o777, "anyone can write")] {
            let p = d.path().join(format!("shared{m:o}"));
            std::fs::create_dir(&p).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
            let err = prepare_dir(&p, &[]).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
            assert!(err.contains("lattice"), "suggests a subdirectory: {err}");
            assert_eq!(mode(&p), m, "the permissions were changed");
        }
        // The real /tmp, as the issue found it.
        if mode(Path::new("/tmp")) & 0o1000 != 0 {
            assert!(prepare_dir(Path::new("/tmp"), &[]).is_err());
            assert_ne!(mode(Path::new("/tmp")) & 0o777, 0o700);
        }
    }

    #[test]
    fn an_open_directory_is_tightened_only_when_it_holds_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let empty = d.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(empty.join("keys.json"), b"{}").unwrap();
        prepare_dir(&empty, &["keys.json"]).unwrap();
        assert_eq!(mode(&empty), 0o700);
        let home = d.path().join("home");
        std::fs::create_dir(&home).unwrap();
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(home.join(".bashrc"), b"").unwrap();
        let err = prepare_dir(&home, &["keys.json"]).unwrap_err().to_string();
        assert!(err.contains("already holds other files"), "{err}");
        assert_eq!(mode(&home), 0o755);
        // The root of the file system is never taken over.
        assert!(prepare_dir(Path::new("/"), &["keys.json"]).is_err());
    }

    #[test]
    fn a_secret_is_made_once_kept_private_and_a_damaged_one_is_never_replaced() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.key");
        let (k, created) = load_or_create_secret(&p, || [0xab; 32]).unwrap();
        assert!(created && *k == [0xab; 32]);
        assert_eq!(mode(&p), 0o600);
        let (again, created) = load_or_create_secret(&p, || [1; 32]).unwrap();
        assert!(!created && *again == [0xab; 32]);
        std::fs::write(&p, "not hex\n").unwrap();
        let err = load_or_create_secret(&p, || [1; 32])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a 64-hex-digit key"), "{err}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "not hex\n");
    }

    #[test]
    fn private_files_are_0600_and_replaced_whole() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("secret.key");
        write_private(&p, b"one").unwrap();
        write_private(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(mode(&p), 0o600);
        // No temp file is left behind.
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        assert!(write_private(&d.path().join("missing/x"), b"x").is_err());
    }
}
