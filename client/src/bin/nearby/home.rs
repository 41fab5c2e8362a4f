//! NEARBY_HOME: the directory the CLI reads the node's address and certificate from, and keeps
//! tokens in.
//!
//! | file | written by | content |
//! |---|---|---|
//! | `endpoint` | `nearby-node dev` | one line, `host:port` |
//! | `ca.pem` | `nearby-node dev` | PEM certificates to trust |
//! | `server_name` | `nearby-node dev` (optional) | one line, the certificate's name; `localhost` if absent |
//! | `tokens/<user>` | `nearby login` | one line, the token (mode 0600, directory 0700) |

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use nearby_client::{UserId, DEFAULT_SERVER_NAME};

/// A failure the user fixes by setting something up (a missing file, flag or login); printed
/// with the code `setup`.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct SetupError(pub(crate) String);

/// The NEARBY_HOME directory.
#[derive(Debug, Clone)]
pub(crate) struct Home {
    dir: PathBuf,
}

impl Home {
    /// `dir`, or `~/.nearby` when `None`.
    pub(crate) fn new(dir: Option<PathBuf>) -> anyhow::Result<Home> {
        let dir = match dir {
            Some(dir) => dir,
            None => {
                let home = std::env::var_os("HOME").ok_or_else(|| {
                    SetupError("HOME is not set: pass --home DIR or set NEARBY_HOME".into())
                })?;
                PathBuf::from(home).join(".nearby")
            }
        };
        Ok(Home { dir })
    }

    /// The nodes' `host:port`s: `flag` if given, else the `endpoint` file (one per line).
    pub(crate) fn endpoints(&self, flag: Option<&str>) -> anyhow::Result<Vec<String>> {
        if let Some(endpoint) = flag {
            return Ok(vec![endpoint.to_string()]);
        }
        let path = self.dir.join("endpoint");
        let lines: Vec<String> = match fs::read_to_string(&path) {
            Ok(text) => text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(SetupError(format!("cannot read {}: {e}", path.display())).into()),
        };
        match lines.is_empty() {
            false => Ok(lines),
            true => Err(SetupError(format!(
                "no endpoint: {} is missing or empty (start `nearby-node dev`, or pass --endpoint HOST:PORT)",
                path.display()
            ))
            .into()),
        }
    }

    /// The certificates to trust, from `ca.pem`.
    pub(crate) fn ca_pem(&self) -> anyhow::Result<String> {
        let path = self.dir.join("ca.pem");
        match fs::read_to_string(&path) {
            Ok(pem) => Ok(pem),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(SetupError(format!(
                "no certificate to trust: {} is missing (start `nearby-node dev`)",
                path.display()
            ))
            .into()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// The name the node's certificate carries: the `server_name` file, else `localhost`.
    pub(crate) fn server_name(&self) -> anyhow::Result<String> {
        Ok(read_line(&self.dir.join("server_name"))?.unwrap_or_else(|| DEFAULT_SERVER_NAME.to_string()))
    }

    fn token_path(&self, user: UserId) -> PathBuf {
        self.dir.join("tokens").join(user.to_string())
    }

    /// The stored token of `user`.
    pub(crate) fn token(&self, user: UserId) -> anyhow::Result<String> {
        let path = self.token_path(user);
        read_line(&path)?.ok_or_else(|| {
            SetupError(format!(
                "no token for user {user} in {}: run `nearby login --user {user}`",
                path.display()
            ))
            .into()
        })
    }

    /// Stores `token` for `user`, readable by the owner only; replaces any previous one
    /// atomically (written beside, then renamed).
    pub(crate) fn save_token(&self, user: UserId, token: &str) -> anyhow::Result<PathBuf> {
        let dir = self.dir.join("tokens");
        create_private_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = self.token_path(user);
        let tmp = dir.join(format!(".{user}.tmp"));
        let _ = fs::remove_file(&tmp);
        let mut file = private_file(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        file.write_all(format!("{token}\n").as_bytes())
            .and_then(|()| file.sync_all())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }
}

/// The first line of `path`, trimmed; `None` if the file is missing or blank.
fn read_line(path: &Path) -> anyhow::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(text
            .lines()
            .next()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)
}

#[cfg(unix)]
fn private_file(path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn private_file(path: &Path) -> io::Result<fs::File> {
    fs::OpenOptions::new().write(true).create_new(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_files_written_by_the_dev_node() {
        let tmp = tempfile::tempdir().expect("tmp");
        let home = Home::new(Some(tmp.path().to_path_buf())).expect("home");
        assert!(home.endpoints(None).is_err());
        assert!(home.ca_pem().is_err());
        assert_eq!(home.server_name().expect("default"), "localhost");

        fs::write(tmp.path().join("endpoint"), "127.0.0.1:7300\n127.0.0.2:7300\n").expect("write");
        fs::write(tmp.path().join("ca.pem"), "PEM").expect("write");
        fs::write(tmp.path().join("server_name"), "  node.example \n").expect("write");
        assert_eq!(
            home.endpoints(None).expect("endpoint"),
            ["127.0.0.1:7300", "127.0.0.2:7300"]
        );
        assert_eq!(home.endpoints(Some("h:1")).expect("flag wins"), ["h:1"]);
        assert_eq!(home.ca_pem().expect("pem"), "PEM");
        assert_eq!(home.server_name().expect("name"), "node.example");
    }

    #[test]
    fn tokens_are_private_and_replaced() {
        let tmp = tempfile::tempdir().expect("tmp");
        let home = Home::new(Some(tmp.path().join("fresh"))).expect("home");
        let err = home.token(7).expect_err("none yet");
        assert!(err.downcast_ref::<SetupError>().is_some());
        assert!(err.to_string().contains("nearby login --user 7"), "{err}");
        let path = home.save_token(7, "one").expect("save");
        home.save_token(7, "two").expect("save again");
        assert_eq!(home.token(7).expect("token"), "two");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            let dir = fs::metadata(path.parent().expect("dir")).expect("meta");
            assert_eq!(dir.permissions().mode() & 0o777, 0o700);
        }
    }
}
