//! Group membership from `/etc/passwd` and `/etc/group`, read directly.
//!
//! The drop folder asks one question of the system's accounts: is a file's owner a member of the
//! inbox's group? glibc answers it through NSS, and in a statically linked glibc binary (the armv7
//! board build, `cross/README.md`) a source other than `files` in `/etc/nsswitch.conf` makes it
//! `dlopen` NSS modules built for whatever glibc the board has. musl (the other board builds)
//! reads the two files itself. Reading them here gives every build the same answer and loads
//! nothing; accounts a board serves through LDAP or `systemd-homed` are not members (the drop
//! folder then refuses their files with a message; on the bus, dbus-daemon decides by NSS).

use std::path::Path;

/// The account files of this system.
const PASSWD: &str = "/etc/passwd";
/// See [`PASSWD`].
const GROUP: &str = "/etc/group";

/// Whether `uid` is a member of group `gid`: its primary group (`/etc/passwd`) or listed as a
/// member (`/etc/group`). An unknown user, an unreadable file or a malformed line is "no".
pub(crate) fn is_member(uid: u32, gid: u32) -> bool {
    is_member_in(Path::new(PASSWD), Path::new(GROUP), uid, gid)
}

fn is_member_in(passwd: &Path, group: &Path, uid: u32, gid: u32) -> bool {
    let Ok(users) = std::fs::read(passwd) else {
        return false;
    };
    member_of(&users, || std::fs::read(group).ok(), uid, gid)
}

/// The decision on the files' contents; `group` is read only when the primary group does not
/// answer it (`None`: unreadable).
fn member_of(passwd: &[u8], group: impl FnOnce() -> Option<Vec<u8>>, uid: u32, gid: u32) -> bool {
    let Some((name, primary)) = user(passwd, uid) else {
        return false;
    };
    primary == gid || group().is_some_and(|groups| members(&groups, gid).any(|m| m == name))
}

/// Colon-separated fields of the lines of an account file, as glibc's `files` source splits them:
/// leading blanks skipped; comments, NIS `+`/`-` entries, blank lines and lines of fewer than
/// four fields dropped.
fn entries(file: &[u8]) -> impl Iterator<Item = Vec<&[u8]>> {
    file.split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line).trim_ascii_start())
        .filter(|line| !line.is_empty() && !matches!(line[0], b'#' | b'+' | b'-'))
        .map(|line| line.split(|&b| b == b':').collect::<Vec<_>>())
        .filter(|fields| fields.len() >= 4)
}

fn number(field: &[u8]) -> Option<u32> {
    std::str::from_utf8(field.trim_ascii_start())
        .ok()?
        .parse()
        .ok()
}

/// The first well-formed `/etc/passwd` entry of `uid` (as `getpwuid` returns the first): name
/// and primary group.
fn user(passwd: &[u8], uid: u32) -> Option<(&[u8], u32)> {
    entries(passwd).find_map(|f| match (number(f[2]), number(f[3])) {
        (Some(u), Some(g)) if u == uid => Some((f[0], g)),
        _ => None,
    })
}

/// The member names of the first `/etc/group` entry of `gid` (blanks before a name skipped).
fn members(group: &[u8], gid: u32) -> impl Iterator<Item = &[u8]> {
    entries(group)
        .find(|f| number(f[2]) == Some(gid))
        .map(|f| f[3])
        .into_iter()
        .flat_map(|list| list.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii_start)
        .filter(|m| !m.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD_FILE: &[u8] = b"root:x:0:0:root:/root:/bin/bash\n\
        # a comment\n\
        +nisuser::::::\n\
        alice:x:1000:1000:Alice:/home/alice:/bin/sh\r\n\
        \x20\tbob:x:1001:1001::/home/bob:/bin/sh\n\
        broken:x:notanumber:5::/:/bin/sh\n\
        erin:x:1004:notagid::/:/bin/sh\n\
        erin:x:1004:2000:the first well-formed entry of uid 1004:/:/bin/sh\n\
        carol:x:1002:2000::/home/carol:/bin/sh\n\
        alice2:x:1000:9:second entry of uid 1000:/:/bin/sh\n\
        short:x:1003\n";
    const GROUP_FILE: &[u8] = b"root:x:0:\n\
        inbox:x:2000:bob, , dave\n\
        inbox:x:2000:alice\n\
        empty:x:3000:\n";

    fn member(uid: u32, gid: u32) -> bool {
        member_of(PASSWD_FILE, || Some(GROUP_FILE.to_vec()), uid, gid)
    }

    #[test]
    fn primary_group_and_listed_members_are_members() {
        assert!(member(1002, 2000), "carol's primary group");
        assert!(member(1001, 2000), "bob is listed");
        assert!(member(0, 0));
        assert!(member(1004, 2000), "erin's first well-formed entry");
    }

    #[test]
    fn others_are_not() {
        // alice is listed only in the second `inbox` entry; the first one counts, as in glibc.
        assert!(!member(1000, 2000));
        assert!(!member(1001, 3000), "an empty member list");
        assert!(!member(4242, 2000), "an unknown uid");
        assert!(!member(1003, 2000), "a line with too few fields");
        assert!(!member(1001, 7777), "an unknown group");
    }

    #[test]
    fn the_first_entry_of_a_uid_wins_and_blanks_and_crlf_are_trimmed() {
        assert_eq!(user(PASSWD_FILE, 1000), Some((&b"alice"[..], 1000)));
        assert_eq!(user(PASSWD_FILE, 1001), Some((&b"bob"[..], 1001)));
        assert_eq!(user(PASSWD_FILE, 1004), Some((&b"erin"[..], 2000)));
        assert_eq!(
            members(GROUP_FILE, 2000).collect::<Vec<_>>(),
            [&b"bob"[..], &b"dave"[..]]
        );
    }

    #[test]
    fn reads_the_files_and_an_unreadable_one_is_no() {
        let dir = tempfile::tempdir().unwrap();
        let (p, g) = (dir.path().join("passwd"), dir.path().join("group"));
        std::fs::write(&p, PASSWD_FILE).unwrap();
        std::fs::write(&g, GROUP_FILE).unwrap();
        assert!(is_member_in(&p, &g, 1001, 2000));
        assert!(is_member_in(&p, &dir.path().join("none"), 1002, 2000));
        assert!(!is_member_in(&p, &dir.path().join("none"), 1001, 2000));
        assert!(!is_member_in(&dir.path().join("none"), &g, 1001, 2000));
    }

    #[test]
    fn this_systems_root_is_in_its_own_group() {
        assert!(is_member(0, 0));
    }
}
