//! What the drop folder writes for one caller (an adapter in `outbox/`, a processed request in
//! `done/`, a failure report) is readable by that caller and the service, and by no other member
//! of the group: mode 0700/0600 plus one POSIX access-ACL entry for the caller's uid. The
//! service owns these files, so it needs no privilege to set the entry.
//!
//! On a file system without ACLs the files fall back to the group-readable modes (0750/0640)
//! with one warning, since the caller must be able to read its output.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::service::Caller;

const ACL_USER_OBJ: u16 = 0x01;
const ACL_USER: u16 = 0x02;
const ACL_GROUP_OBJ: u16 = 0x04;
const ACL_MASK: u16 = 0x10;
const ACL_OTHER: u16 = 0x20;
const ACL_UNDEFINED_ID: u32 = u32::MAX;

/// The kernel's `system.posix_acl_access` value (version 2, entries sorted by tag then id):
/// the owner `owner_perm`, user `uid` `user_perm`, the owning group and others nothing.
fn acl_xattr(owner_perm: u16, uid: u32, user_perm: u16) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (ACL_USER_OBJ, owner_perm, ACL_UNDEFINED_ID),
        (ACL_USER, user_perm, uid),
        (ACL_GROUP_OBJ, 0, ACL_UNDEFINED_ID),
        (ACL_MASK, user_perm, ACL_UNDEFINED_ID),
        (ACL_OTHER, 0, ACL_UNDEFINED_ID),
    ] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// The extended attribute that holds a file's access ACL.
const ACL_XATTR: &std::ffi::CStr = c"system.posix_acl_access";

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
}

fn set_acl(path: &Path, value: &[u8]) -> io::Result<()> {
    let p = c_path(path)?;
    // SAFETY: both strings are NUL-terminated and live across the call; `value` is a valid
    // buffer of its length. lsetxattr does not follow a link at `path`.
    let r = unsafe {
        nix::libc::lsetxattr(
            p.as_ptr(),
            ACL_XATTR.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The uid that [`private_to`] granted `path` to, if any (read back from its ACL).
pub(crate) fn reader(path: &Path) -> Option<u32> {
    let p = c_path(path).ok()?;
    let mut buf = [0u8; 4 + 8 * 16];
    // SAFETY: NUL-terminated strings and a buffer of the length passed; no link followed.
    let n = unsafe {
        nix::libc::lgetxattr(
            p.as_ptr(),
            ACL_XATTR.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let n = usize::try_from(n).ok()?;
    buf[..n.min(buf.len())]
        .get(4..)?
        .chunks_exact(8)
        .find(|e| u16::from_le_bytes([e[0], e[1]]) == ACL_USER)
        .map(|e| u32::from_le_bytes([e[4], e[5], e[6], e[7]]))
}

static NO_ACLS_WARNED: AtomicBool = AtomicBool::new(false);

/// Make the service's own file or directory `path` (and, for a directory, the files in it)
/// readable by `caller` alone besides the service. Root and the service user need no entry.
pub(crate) fn private_to(path: &Path, caller: Caller) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "is a symbolic link",
        ));
    }
    if meta.is_dir() {
        for e in fs::read_dir(path)? {
            let p = e?.path();
            if fs::symlink_metadata(&p)?.is_file() {
                private_to(&p, caller)?;
            }
        }
    }
    let (mode, shared, owner_perm, user_perm) = if meta.is_dir() {
        (0o700, 0o750, 7, 5)
    } else {
        (0o600, 0o640, 6, 4)
    };
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    if caller.is_admin() {
        return Ok(());
    }
    match set_acl(path, &acl_xattr(owner_perm, caller.uid, user_perm)) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(nix::libc::EOPNOTSUPP) => {
            if !NO_ACLS_WARNED.swap(true, Ordering::Relaxed) {
                crate::log::warn(&format!(
                    "dropbox: the file system of {} has no POSIX ACLs: outputs are readable by \
                     every member of the group, not only by the member who asked",
                    path.display()
                ));
            }
            fs::set_permissions(path, fs::Permissions::from_mode(shared))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_acl_value_is_what_setfacl_writes() {
        // `setfacl -m u:1234:r f` on a 0600 file, read back with getfattr -e hex.
        let want = "02000000\
                    01000600ffffffff\
                    02000400d2040000\
                    04000000ffffffff\
                    10000400ffffffff\
                    20000000ffffffff";
        let got: String = acl_xattr(6, 1234, 4)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_file_becomes_private_to_its_caller() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("out");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("f"), b"x").unwrap();
        private_to(&dir, Caller::uid(4242)).unwrap();
        assert_eq!(reader(&dir), Some(4242));
        assert_eq!(reader(&dir.join("f")), Some(4242));
        assert_eq!(reader(d.path()), None);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        // With an ACL the group bits show the mask (r-x / r--); the owning group has none.
        assert!(matches!(mode(&dir), 0o750 | 0o700), "{:o}", mode(&dir));
        assert!(matches!(mode(&dir.join("f")), 0o640 | 0o600));
        assert_eq!(mode(&dir.join("f")) & 0o007, 0);
    }
}
