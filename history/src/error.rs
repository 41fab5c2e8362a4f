//! The crate's typed errors: one enum, [`HistoryError`], for every fallible operation of the
//! store. Variants name the file and byte offset when stored data is at fault, and the record
//! index and field when the caller's input is.

use std::path::{Path, PathBuf};

/// An error of the history store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HistoryError {
    /// The operating system refused a file operation.
    #[error("i/o error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Stored bytes failed their checksum or do not follow the format. Recovery never turns this
    /// into silence: a damaged sealed segment is kept as it is and reported, and damage inside the
    /// active segment that is followed by valid batches (so it is not a torn write) makes
    /// [`HistoryStore::open`](crate::HistoryStore::open) fail.
    #[error("corrupt history file {path} at byte {offset}: {why}")]
    Corrupt {
        /// The damaged file.
        path: PathBuf,
        /// Where the damaged part starts.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// A record of a batch was refused (a coordinate that is not finite or is out of range);
    /// nothing of the batch was written.
    #[error("record {index} of the batch has an invalid {field}: {value}")]
    InvalidRecord {
        /// The record's position in the batch.
        index: usize,
        /// `"lat"` or `"lon"`.
        field: &'static str,
        /// The refused value.
        value: f64,
    },
    /// The batch has more records than one on-disk batch can hold; nothing was written.
    #[error("a batch of {len} records is larger than the limit of {max}")]
    BatchTooLarge {
        /// The batch's length.
        len: usize,
        /// The largest batch accepted.
        max: usize,
    },
    /// The [`StoreConfig`](crate::StoreConfig) given to `open` is unusable.
    #[error("invalid history store configuration: {why}")]
    InvalidConfig {
        /// What is wrong.
        why: String,
    },
    /// Another [`HistoryStore`](crate::HistoryStore), in this process or another, has the
    /// directory open.
    #[error("history directory {path} is already open (its LOCK file is held)")]
    Locked {
        /// The directory.
        path: PathBuf,
    },
    /// An earlier write, sync or rename failed at a point where the files and the in-memory state
    /// may disagree; the store refuses further changes until it is reopened, which recovers from
    /// the files.
    #[error("the history store is poisoned by an earlier failure and must be reopened: {why}")]
    Poisoned {
        /// The first failure.
        why: String,
    },
    /// A deletion removed the user's records from every readable segment, but some segments are
    /// corrupt and could not be rewritten; they may still hold the user's records. An operator
    /// must repair or remove those files.
    #[error("user {user}'s history was deleted except from {} corrupt segment(s): {paths:?}", paths.len())]
    DeletionIncomplete {
        /// The user.
        user: u64,
        /// The corrupt segment files that were left as they are.
        paths: Vec<PathBuf>,
    },
}

impl HistoryError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        HistoryError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn corrupt(path: &Path, offset: u64, why: impl Into<String>) -> Self {
        HistoryError::Corrupt {
            path: path.to_path_buf(),
            offset,
            why: why.into(),
        }
    }
}
