//! What a data directory remembers about the cluster it belongs to, in `DATA/cluster/`:
//!
//! ```text
//! DATA/cluster/node     this directory's node id, written once
//! DATA/cluster/id       the cluster's identity, written once the node is part of it
//! DATA/cluster/map      the last cluster map this node saw (to find its peers after a restart)
//! ```
//!
//! A directory that belongs to another node or cluster is refused at start, with a message that
//! says which, rather than mixed into the wrong one.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use nearby_raft::{ClusterMap, NodeId};

/// Why the data directory cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The directory belongs to another node.
    #[error(
        "{path} belongs to node {found}, but this is node {expected}: use the node's own data directory"
    )]
    OtherNode {
        /// The file.
        path: PathBuf,
        /// The node the directory belongs to.
        found: NodeId,
        /// This node.
        expected: NodeId,
    },
    /// A file holds something unreadable.
    #[error("{path} is damaged: {reason}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

fn io(path: &Path, source: std::io::Error) -> IdentityError {
    IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The `DATA/cluster` directory of one node.
pub struct Identity {
    dir: PathBuf,
}

impl Identity {
    /// Opens `DATA/cluster` for node `node`, claiming the directory for it on first use.
    pub fn open(data: &Path, node: NodeId) -> Result<Identity, IdentityError> {
        let dir = data.join("cluster");
        fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let id = Identity { dir };
        let path = id.dir.join("node");
        match read_text(&path)? {
            Some(text) => {
                let found: NodeId = text.trim().parse().map_err(|_| IdentityError::Damaged {
                    path: path.clone(),
                    reason: format!("not a node id: {text:?}"),
                })?;
                if found != node {
                    return Err(IdentityError::OtherNode {
                        path,
                        found,
                        expected: node,
                    });
                }
            }
            None => write_atomic(&path, format!("{node}\n").as_bytes())?,
        }
        Ok(id)
    }

    /// The cluster this node belongs to, if it has joined or initialised one.
    pub fn cluster(&self) -> Result<Option<String>, IdentityError> {
        Ok(read_text(&self.dir.join("id"))?.map(|t| t.trim().to_string()))
    }

    /// Records that this node belongs to `cluster`.
    pub fn set_cluster(&self, cluster: &str) -> Result<(), IdentityError> {
        write_atomic(&self.dir.join("id"), format!("{cluster}\n").as_bytes())
    }

    /// The last map saved, if any.
    pub fn map(&self) -> Result<Option<ClusterMap>, IdentityError> {
        let path = self.dir.join("map");
        match fs::read(&path) {
            Ok(bytes) => ClusterMap::decode_versioned(&bytes)
                .map(Some)
                .map_err(|e| IdentityError::Damaged {
                    path,
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path, e)),
        }
    }

    /// Whether this node cordoned itself to stop (see `cluster::leave`): it undrains itself
    /// once it is back.
    pub fn cordoned_for_restart(&self) -> bool {
        self.dir.join(RESTART_MARK).exists()
    }

    /// Records (or, with `false`, forgets) that this node cordoned itself to stop.
    pub fn set_cordoned_for_restart(&self, on: bool) -> Result<(), IdentityError> {
        let path = self.dir.join(RESTART_MARK);
        if on {
            write_atomic(&path, b"cordoned by this node to stop; undone when it is back\n")
        } else {
            match fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io(&path, e)),
            }
        }
    }

    /// Saves `map` as the last one seen.
    pub fn save_map(&self, map: &ClusterMap) -> Result<(), IdentityError> {
        let path = self.dir.join("map");
        let bytes = map.encode_versioned().map_err(|e| IdentityError::Damaged {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomic(&path, &bytes)
    }
}

/// The file that says this node cordoned itself to stop.
const RESTART_MARK: &str = "cordoned-for-restart";

/// Whether the data directory `data` already belongs to a cluster.
pub fn is_member(data: &Path) -> Result<bool, IdentityError> {
    Ok(read_text(&data.join("cluster").join("id"))?.is_some())
}

fn read_text(path: &Path) -> Result<Option<String>, IdentityError> {
    match fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path, e)),
    }
}

/// Writes `bytes` to `path` through a synced temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_directory_belongs_to_one_node() {
        let dir = tempfile::TempDir::new().expect("tmp");
        let id = Identity::open(dir.path(), 3).expect("claim");
        assert_eq!(id.cluster().expect("read"), None);
        id.set_cluster("abc").expect("write");
        assert_eq!(
            Identity::open(dir.path(), 3)
                .expect("again")
                .cluster()
                .expect("read")
                .as_deref(),
            Some("abc")
        );
        let other = Identity::open(dir.path(), 4);
        assert!(matches!(
            other,
            Err(IdentityError::OtherNode {
                found: 3,
                expected: 4,
                ..
            })
        ));
    }
}
