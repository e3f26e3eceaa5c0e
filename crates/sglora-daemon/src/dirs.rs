//! The service's own directories (state, cache, adapters, the drop folder's four): created when
//! missing, and refused when what is there is a symbolic link or not a directory, so nothing the
//! service chmods, writes or deletes can be redirected outside its directories by a planted link.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::log;

/// Make sure `dir` is a real directory (creating it and its parents if missing) with `mode`.
pub(crate) fn real_dir(dir: &Path, mode: u32) -> io::Result<()> {
    if let Err(e) = fs::symlink_metadata(dir) {
        if e.kind() != io::ErrorKind::NotFound {
            return Err(e);
        }
        fs::create_dir_all(dir)?;
    }
    let meta = fs::symlink_metadata(dir)?;
    if meta.file_type().is_symlink() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "is a symbolic link; the service's directories must be real directories (remove the \
             link and restart)",
        ));
    }
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "is not a directory (remove it and restart)",
        ));
    }
    if let Err(e) = fs::set_permissions(dir, fs::Permissions::from_mode(mode)) {
        log::warn(&format!(
            "cannot set mode {mode:o} on {}: {e}",
            dir.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_and_files_are_refused_and_missing_dirs_created() {
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::set_permissions(&outside, fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(&outside, d.path().join("link")).unwrap();
        let e = real_dir(&d.path().join("link"), 0o750).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert_eq!(
            fs::metadata(&outside).unwrap().permissions().mode() & 0o7777,
            0o755,
            "the link's target was chmodded"
        );
        fs::write(d.path().join("file"), b"x").unwrap();
        assert!(real_dir(&d.path().join("file"), 0o750).is_err());
        real_dir(&d.path().join("new/nested"), 0o750).unwrap();
        assert!(d.path().join("new/nested").is_dir());
    }
}
