//! The library's errors. Each names the file, and the line or key, and says what to do.

use std::io::Write;
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("{}: not found{hint}", path.display())]
    Missing { path: PathBuf, hint: String },
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: cannot write: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: invalid JSON: {message}", path.display())]
    Json {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{}: invalid TOML: {message}", path.display())]
    Toml { path: PathBuf, message: String },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("{0}")]
    Usage(String),
}

impl Error {
    pub fn invalid(path: &Path, message: impl Into<String>) -> Error {
        Error::Invalid {
            path: path.to_owned(),
            message: message.into(),
        }
    }

    pub fn json(path: &Path, error: &serde_json::Error) -> Error {
        Error::Json {
            path: path.to_owned(),
            line: error.line(),
            column: error.column(),
            message: error.to_string(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Reads a whole file, telling a missing file from an unreadable one.
pub fn read_text(path: &Path, hint: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => Error::Missing {
            path: path.to_owned(),
            hint: hint.to_owned(),
        },
        _ => Error::Read {
            path: path.to_owned(),
            source,
        },
    })
}

/// Writes a file whole or not at all: into a temporary beside it, then renamed over it.
pub fn write_atomically(path: &Path, contents: &[u8]) -> Result<()> {
    write_atomically_with(path, |out| out.write_all(contents))
}

/// [`write_atomically`] for output produced piece by piece, streamed rather than held whole.
pub fn write_atomically_with(
    path: &Path,
    produce: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let write_error = |source| Error::Write {
        path: path.to_owned(),
        source,
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("memgauge");
    let temporary = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(write_error)?;
    }
    let result = (|| {
        let mut out =
            std::io::BufWriter::with_capacity(1 << 16, std::fs::File::create(&temporary)?);
        produce(&mut out)?;
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    if let Err(source) = result {
        let _ = std::fs::remove_file(&temporary);
        return Err(write_error(source));
    }
    Ok(())
}
