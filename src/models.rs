//! Which model file serves, from `--models-dir` and `--model`.
//!
//! Rule (0.1): `--model NAME` names a file in the directory (or any path);
//! without it, a directory holding exactly one GGUF serves that one, and a
//! directory holding several is an error that names them. Dotfiles and
//! partial downloads (`*.part`, `*.partial`, `*.tmp`) are never candidates.

use std::path::{Path, PathBuf};

/// Errors choosing a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelChoiceError {
    /// The directory cannot be read.
    #[error("cannot read models directory {dir}: {source}")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// No GGUF in the directory.
    #[error("no .gguf model in {0}; fetch the defaults with scripts/fetch-models.sh")]
    Empty(PathBuf),
    /// Several GGUFs and no `--model`.
    #[error("{dir} holds several models ({names}); choose one with --model NAME")]
    Ambiguous {
        /// The directory.
        dir: PathBuf,
        /// The candidates, comma-separated.
        names: String,
    },
    /// `--model` names nothing that exists.
    #[error("model {0} not found")]
    NotFound(PathBuf),
}

/// Whether a directory entry named `name` may be served: a `.gguf` that is not
/// a dotfile and not a partial download.
pub fn is_candidate(name: &str) -> bool {
    !name.starts_with('.') && name.ends_with(".gguf")
}

/// GGUF candidates in `dir`, sorted by name.
///
/// # Errors
/// [`ModelChoiceError::Dir`] when the directory cannot be read.
pub fn candidates(dir: &Path) -> Result<Vec<PathBuf>, ModelChoiceError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ModelChoiceError::Dir {
        dir: dir.to_path_buf(),
        source,
    })?;
    let mut out: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file() || t.is_symlink()))
        .filter(|e| is_candidate(&e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect();
    out.sort();
    Ok(out)
}

/// Resolves the model file to load.
///
/// # Errors
/// See [`ModelChoiceError`].
pub fn resolve(dir: &Path, model: Option<&str>) -> Result<PathBuf, ModelChoiceError> {
    if let Some(name) = model {
        let in_dir = dir.join(name);
        if in_dir.is_file() {
            return Ok(in_dir);
        }
        let as_path = PathBuf::from(name);
        if as_path.is_file() {
            return Ok(as_path);
        }
        return Err(ModelChoiceError::NotFound(in_dir));
    }
    let found = candidates(dir)?;
    match found.as_slice() {
        [] => Err(ModelChoiceError::Empty(dir.to_path_buf())),
        [one] => Ok(one.clone()),
        many => Err(ModelChoiceError::Ambiguous {
            dir: dir.to_path_buf(),
            names: many
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_and_hidden_files_are_not_candidates() {
        assert!(is_candidate("model.gguf"));
        assert!(!is_candidate(".model.gguf"));
        assert!(!is_candidate("model.gguf.part"));
        assert!(!is_candidate("model.gguf.partial"));
        assert!(!is_candidate("model.gguf.tmp"));
        assert!(!is_candidate("README.md"));
    }

    #[test]
    fn resolution_rule() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(matches!(resolve(d, None), Err(ModelChoiceError::Empty(_))));
        std::fs::write(d.join("a.gguf"), b"x").unwrap();
        std::fs::write(d.join(".hidden.gguf"), b"x").unwrap();
        std::fs::write(d.join("b.gguf.part"), b"x").unwrap();
        assert_eq!(resolve(d, None).unwrap(), d.join("a.gguf"));
        std::fs::write(d.join("b.gguf"), b"x").unwrap();
        let err = resolve(d, None).unwrap_err().to_string();
        assert!(err.contains("a.gguf, b.gguf"), "{err}");
        assert_eq!(resolve(d, Some("b.gguf")).unwrap(), d.join("b.gguf"));
        assert!(matches!(
            resolve(d, Some("zzz.gguf")),
            Err(ModelChoiceError::NotFound(_))
        ));
    }
}
