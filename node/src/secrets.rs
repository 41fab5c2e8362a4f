//! Key files: written with mode 0600, never overwritten without being told to, and refused when
//! anyone but their owner can read them.
//!
//! Every private key nearby writes or reads — the cluster CA's key, node keys, the token signing
//! key, the client service's TLS key — goes through here, so the rules hold everywhere.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A key file that cannot be written or read safely.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// The file exists and overwriting was not asked for.
    #[error("{path} already exists; refusing to overwrite it (pass --force to replace it)")]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// The key file can be read by other users.
    #[error("{path} can be read by other users (mode {mode:o}); run `chmod 600 {path}`", path = path.display())]
    Readable {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The operating system refused.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The system's random number generator failed.
    #[error("the system's random number generator failed")]
    Random,
}

fn io(path: &Path, source: std::io::Error) -> SecretError {
    SecretError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_mode(path: &Path, bytes: &[u8], mode: u32, force: bool) -> Result<(), SecretError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    if path.exists() && !force {
        return Err(SecretError::Exists {
            path: path.to_path_buf(),
        });
    }
    // Written next to the target and renamed: a reader never sees half a key, and a file that is
    // replaced gets the new mode rather than keeping the old one.
    let tmp = path.with_extension("tmp-write");
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| io(&tmp, e))?;
    f.sync_all().map_err(|e| io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io(path, e))
}

/// Writes a private key: mode 0600, and an existing file only with `force`.
pub fn write_secret(path: &Path, bytes: &[u8], force: bool) -> Result<(), SecretError> {
    write_mode(path, bytes, 0o600, force)
}

/// Writes a public file (a certificate, a public key): mode 0644, and an existing file only
/// with `force`.
pub fn write_public(path: &Path, bytes: &[u8], force: bool) -> Result<(), SecretError> {
    write_mode(path, bytes, 0o644, force)
}

/// Reads a private key, refusing one that users other than its owner can read.
pub fn read_secret(path: &Path) -> Result<Vec<u8>, SecretError> {
    let meta = fs::metadata(path).map_err(|e| io(path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretError::Readable {
            path: path.to_path_buf(),
            mode,
        });
    }
    fs::read(path).map_err(|e| io(path, e))
}

/// [`read_secret`], as text.
pub fn read_secret_text(path: &Path) -> Result<String, SecretError> {
    let bytes = read_secret(path)?;
    String::from_utf8(bytes).map_err(|e| io(path, std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

/// Writes a new admin API token to `path`: 32 random bytes as base64url, one line, 0600.
pub fn write_admin_token(path: &Path, force: bool) -> Result<(), SecretError> {
    write_secret(path, format!("{}\n", new_admin_token()?).as_bytes(), force)
}

/// A new admin API token: 32 random bytes as base64url.
pub fn new_admin_token() -> Result<String, SecretError> {
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| SecretError::Random)?;
    Ok(nearby_index::codec::base64url_encode(&bytes))
}

/// The cluster's pseudonym key (what strangers' per-viewer pseudonyms are derived from, the
/// same on every node): an HMAC-SHA256 of a fixed label under the cluster CA's private key.
/// Deriving it from the CA key means `nearby-node ca issue` can give every node the same key
/// without a second secret to generate and distribute; the key reveals nothing about the CA key.
pub fn derive_pseudonym_key(ca_key_pem: &str) -> Vec<u8> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, ca_key_pem.trim().as_bytes());
    ring::hmac::sign(&key, b"nearby pseudonym key v1")
        .as_ref()
        .to_vec()
}

/// Writes the pseudonym key derived from `ca_key_pem` to `path` (one base64url line, 0600).
pub fn write_pseudonym_key(path: &Path, ca_key_pem: &str, force: bool) -> Result<(), SecretError> {
    let line = format!(
        "{}\n",
        nearby_index::codec::base64url_encode(&derive_pseudonym_key(ca_key_pem))
    );
    write_secret(path, line.as_bytes(), force)
}

/// Reads a pseudonym key file written by [`write_pseudonym_key`].
pub fn read_pseudonym_key(path: &Path) -> Result<Vec<u8>, SecretError> {
    let text = read_secret_text(path)?;
    nearby_index::codec::base64url_decode(text.trim())
        .filter(|k| k.len() >= 16)
        .ok_or_else(|| {
            io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "not a base64url key of 16 bytes or more",
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_private_and_never_silently_replaced() {
        let dir = tempfile::TempDir::new().expect("tmp");
        let key = dir.path().join("k.pem");
        write_secret(&key, b"one", false).expect("write");
        let mode = fs::metadata(&key).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            write_secret(&key, b"two", false),
            Err(SecretError::Exists { .. })
        ));
        assert_eq!(read_secret(&key).expect("read"), b"one");
        write_secret(&key, b"two", true).expect("forced");
        assert_eq!(read_secret(&key).expect("read"), b"two");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = read_secret(&key).expect_err("readable by others");
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn the_pseudonym_key_is_the_same_for_every_node_of_a_ca_and_kept_private() {
        let dir = tempfile::TempDir::new().expect("tmp");
        let (a, b) = (
            dir.path().join("n1/pseudonym.key"),
            dir.path().join("n2/pseudonym.key"),
        );
        write_pseudonym_key(&a, "ca key", false).expect("write");
        write_pseudonym_key(&b, "ca key", false).expect("write");
        assert_eq!(
            read_pseudonym_key(&a).expect("read"),
            read_pseudonym_key(&b).expect("read")
        );
        assert_eq!(
            read_pseudonym_key(&a).expect("read"),
            derive_pseudonym_key("ca key")
        );
        assert_ne!(
            derive_pseudonym_key("ca key"),
            derive_pseudonym_key("another ca key")
        );
        assert!(matches!(
            write_pseudonym_key(&a, "ca key", false),
            Err(SecretError::Exists { .. })
        ));
        assert_eq!(
            fs::metadata(&a).expect("meta").permissions().mode() & 0o777,
            0o600
        );
    }
}
