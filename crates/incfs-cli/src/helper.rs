//! `mount -t fuse.incfs SOURCE MNT -o OPTIONS` and `/etc/fstab`: the mount-helper calling
//! conventions, turned into an `incfs mount` command line.
//!
//! Two ways in, both handled here: mount(8) runs `/sbin/mount.fuse.incfs SOURCE MNT -o OPTS`
//! when that helper exists (a link to this binary, made by `scripts/install.sh`), and otherwise
//! fuse3's `mount.fuse3` runs `incfs SOURCE MNT -o OPTS` (the type's name, found in `PATH`).
//! Each `-o` option `name=value` becomes `--name value` and `name` becomes `--name` (so every
//! `incfs mount` flag has an `-o` form: `trust=/etc/incfs/pub.pem,trust=/etc/incfs/old.pem`,
//! `cache=/var/cache/incfs`, `read_timeout=10s`, `source=https://mirror/app`, `offline`);
//! options that belong to mount(8) or the kernel (`defaults`, `_netdev`, `nofail`, `noauto`,
//! `rw`, `nosuid`, `x-systemd.*`, ...) are dropped: the mount is always read-only, `nodev`.

use std::ffi::{OsStr, OsString};

/// Options meant for mount(8), systemd or the kernel, not for incfs.
const IGNORED: &[&str] = &[
    "defaults",
    "auto",
    "noauto",
    "nofail",
    "_netdev",
    "user",
    "users",
    "nouser",
    "owner",
    "group",
    "rw",
    "ro",
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "exec",
    "noexec",
    "sync",
    "async",
    "atime",
    "noatime",
    "relatime",
    "strictatime",
    "lazytime",
    "diratime",
    "nodiratime",
    "silent",
    "loud",
];

/// The `incfs mount` arguments (without the program name) a mount-helper invocation means, or
/// `None` when `args` (with the program name first) is an ordinary command line. `is_command`
/// tells whether a word is one of incfs's subcommands.
pub fn mount_command(args: &[OsString], is_command: impl Fn(&str) -> bool) -> Option<Result<Vec<OsString>, String>> {
    let program = args.first().map(std::path::Path::new)?.file_name()?.to_str()?;
    let helper_name = program.starts_with("mount.fuse.incfs") || program.starts_with("mount.incfs");
    let first = args.get(1)?.to_str().unwrap_or("");
    // mount.fuse3 style: `incfs SOURCE MNT ...`, the first word not a subcommand or a flag.
    if !helper_name && (first.starts_with('-') || is_command(first) || args.len() < 3) {
        return None;
    }
    Some(translate(&args[1..]))
}

fn translate(args: &[OsString]) -> Result<Vec<OsString>, String> {
    let mut positional: Vec<&OsStr> = Vec::new();
    let mut flags: Vec<OsString> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("-o") => {
                let opts = it.next().ok_or("-o needs a list of options")?;
                let opts = opts.to_str().ok_or("-o: options must be UTF-8")?;
                flags.extend(options(opts)?);
            }
            Some(o) if o.starts_with("-o") => flags.extend(options(&o[2..])?),
            // mount(8)'s own: no mtab (-n), sloppy (-s), verbose (-v).
            Some("-n" | "-s" | "-v") => {}
            Some("-f") => return Err("fake mount (-f): nothing done".into()),
            Some(o) if o.starts_with('-') => return Err(format!("unknown mount helper flag {o}")),
            _ => positional.push(a),
        }
    }
    let [source, mountpoint] = positional[..] else {
        return Err("usage: mount.fuse.incfs SOURCE MOUNTPOINT [-o trust=PUB.pem,cache=DIR,...]".into());
    };
    let mut out: Vec<OsString> = vec!["mount".into(), source.into(), mountpoint.into()];
    out.extend(flags);
    Ok(out)
}

/// `-o a=b,c` as incfs flags.
fn options(list: &str) -> Result<Vec<OsString>, String> {
    let mut out = Vec::new();
    for o in list.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        let (name, value) = match o.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (o, None),
        };
        if IGNORED.contains(&name) || name.starts_with("x-") || name == "comment" {
            continue;
        }
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(format!("-o {o}: not an incfs mount option"));
        }
        out.push(format!("--{}", name.replace('_', "-")).into());
        if let Some(v) = value {
            out.push(v.into());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn cmd(v: &[&str]) -> Option<Result<Vec<String>, String>> {
        let is_command = |w: &str| ["mount", "status", "pack"].contains(&w);
        mount_command(&args(v), is_command)
            .map(|r| r.map(|v| v.into_iter().map(|s| s.into_string().unwrap()).collect()))
    }

    #[test]
    fn helper_calls_become_incfs_mount() {
        let want = |v: &[&str]| Some(Ok(v.iter().map(|s| s.to_string()).collect::<Vec<_>>()));
        assert_eq!(
            cmd(&[
                "/sbin/mount.fuse.incfs",
                "http://h/app",
                "/mnt/app",
                "-o",
                "rw,nosuid,nodev,trust=/etc/a.pem,trust=/etc/b.pem,cache=/var/cache/incfs,read_timeout=10s,_netdev,x-systemd.automount,offline",
            ]),
            want(&[
                "mount",
                "http://h/app",
                "/mnt/app",
                "--trust",
                "/etc/a.pem",
                "--trust",
                "/etc/b.pem",
                "--cache",
                "/var/cache/incfs",
                "--read-timeout",
                "10s",
                "--offline"
            ])
        );
        // mount.fuse3 runs the type's name with the same arguments.
        assert_eq!(
            cmd(&["incfs", "/srv/repo", "/mnt", "-o", "trust=k.pem"]),
            want(&["mount", "/srv/repo", "/mnt", "--trust", "k.pem"])
        );
        assert_eq!(cmd(&["mount.fuse.incfs", "s", "m", "-n", "-otrust=k"]), want(&["mount", "s", "m", "--trust", "k"]));
        // Ordinary command lines are left alone.
        assert_eq!(cmd(&["incfs", "mount", "s", "m"]), None);
        assert_eq!(cmd(&["incfs", "--help"]), None);
        assert_eq!(cmd(&["incfs", "status"]), None);
        // Errors say what is wrong.
        assert!(cmd(&["mount.fuse.incfs", "s"]).unwrap().unwrap_err().contains("usage"));
        assert!(cmd(&["mount.fuse.incfs", "s", "m", "-o", "a b"]).unwrap().unwrap_err().contains("not an incfs"));
        assert!(cmd(&["mount.fuse.incfs", "s", "m", "-f"]).unwrap().is_err());
    }
}
