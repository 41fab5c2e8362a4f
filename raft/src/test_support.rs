//! Helpers for tests that need a real fault of the machine (not a mock): a small file system
//! that fills up for real. Used by this crate's and the node's tests; not part of the API.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs of a given size mounted at `<parent>/disk` until dropped. Mounting needs root (CI
/// runs as root); without it [`SmallDisk::mount`] says so.
#[derive(Debug)]
pub struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    /// Mounts a `bytes`-byte tmpfs at `<parent>/disk`.
    pub fn mount(parent: &Path, bytes: u64) -> io::Result<SmallDisk> {
        let path = parent.join("disk");
        std::fs::create_dir_all(&path)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "nearby-test"])
            .arg(&path)
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "cannot mount a {bytes}-byte tmpfs at {} (it needs root): {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(SmallDisk { path })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// Writes `path` until its disk is full: `Ok` once a write fails for want of space, any other
/// error as it is.
pub fn fill(path: &Path) -> io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    let page = [7u8; 4096];
    loop {
        match f.write_all(&page).and_then(|()| f.sync_all()) {
            Ok(()) => {}
            Err(e) if crate::error::is_no_space(&e) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}
