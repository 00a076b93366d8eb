//! `mount -t fuse.incfs`, `/etc/fstab` lines (`mount -a`), the `mount.fuse.incfs` helper and
//! `umount`, through util-linux's mount(8), and the shipped systemd units checked by
//! `systemd-analyze verify`.

mod common;

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

/// mount(8) looks for the helper of type `fuse.incfs` only in /sbin (and runs helpers with a
/// PATH of its own, so fuse3's mount.fuse3 would not find an `incfs` outside the system's
/// directories). The test installs `/sbin/mount.fuse.incfs` as `scripts/install.sh` does, a
/// link to this build, and removes it when done; one already installed is used as it is.
struct Helper(Option<PathBuf>);

impl Helper {
    fn install(exe: &Path) -> Helper {
        let at = PathBuf::from("/sbin/mount.fuse.incfs");
        if fs::symlink_metadata(&at).is_ok() {
            eprintln!("using the installed {}", at.display());
            return Helper(None);
        }
        symlink(exe, &at).unwrap();
        Helper(Some(at))
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if let Some(at) = &self.0 {
            let _ = fs::remove_file(at);
        }
    }
}

/// A directory holding `incfs` (this build) and `mount.fuse.incfs`, both links to the binary.
fn bin_dir(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).unwrap();
    let exe = fs::canonicalize(incfs_bin()).unwrap();
    symlink(&exe, bin.join("incfs")).unwrap();
    symlink(&exe, bin.join("mount.fuse.incfs")).unwrap();
    bin
}

fn with_path(cmd: &str, args: &[&str], bin: &Path) -> Output {
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    Command::new(cmd).args(args).env("PATH", path).output().unwrap()
}

fn mounted_as_fuse_incfs(mnt: &Path) -> bool {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    mounts.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        f.get(1) == Some(&mnt.to_str().unwrap()) && f.get(2) == Some(&"fuse.incfs")
    })
}

fn gone(mnt: &Path) {
    assert!(wait_for(Duration::from_secs(10), || !is_mounted(mnt)), "{} is still mounted", mnt.display());
}

#[test]
fn mount_t_fuse_incfs_fstab_and_the_helper_mount_and_umount_ends_them() {
    let p = Published::new(|src| fs::write(src.join("hello.txt"), "hello from fstab\n").unwrap(), &[]);
    let serve = IncfsServer::start(&p.repo);
    let bin = bin_dir(p.dir.path());
    let _helper = Helper::install(&fs::canonicalize(incfs_bin()).unwrap());
    let public = p.public.to_str().unwrap();
    let mnt = |name: &str| {
        let m = p.dir.path().join(name);
        fs::create_dir_all(&m).unwrap();
        fs::canonicalize(m).unwrap()
    };
    let opts = |cache: &str| format!("trust={public},cache={},read_timeout=3s", p.dir.path().join(cache).display());

    // mount -t fuse.incfs (mount(8) -> /sbin/mount.fuse.incfs SOURCE MNT -o ...).
    let a = mnt("mnt-t");
    let _ua = Unmount(a.clone());
    let o = format!("{},_netdev,nosuid", opts("cache-t"));
    let out = with_path("mount", &["-t", "fuse.incfs", &serve.url, a.to_str().unwrap(), "-o", &o], &bin);
    assert!(out.status.success(), "mount -t fuse.incfs failed: {}{}", text(&out.stdout), text(&out.stderr));
    assert!(mounted_as_fuse_incfs(&a));
    assert_eq!(fs::read_to_string(a.join("hello.txt")).unwrap(), "hello from fstab\n");
    let out = Command::new("umount").arg(&a).output().unwrap();
    assert!(out.status.success(), "umount: {}", text(&out.stderr));
    gone(&a);

    // An fstab line, mounted by `mount -a` (here with -T: an fstab of the test's own).
    let b = mnt("mnt-fstab");
    let _ub = Unmount(b.clone());
    let fstab = p.dir.path().join("fstab");
    let line = format!(
        "{} {} fuse.incfs {},_netdev,nofail,x-systemd.requires=network-online.target 0 0\n",
        serve.url,
        b.display(),
        opts("cache-fstab")
    );
    fs::write(&fstab, format!("# incfs test\n{line}")).unwrap();
    let out = with_path("mount", &["-a", "-T", fstab.to_str().unwrap()], &bin);
    assert!(out.status.success(), "mount -a: {}{}", text(&out.stdout), text(&out.stderr));
    assert!(mounted_as_fuse_incfs(&b));
    assert_eq!(fs::read_to_string(b.join("hello.txt")).unwrap(), "hello from fstab\n");
    let out = Command::new("umount").arg(&b).output().unwrap();
    assert!(out.status.success(), "umount: {}", text(&out.stderr));
    gone(&b);

    // The helper itself, as mount(8) runs /sbin/mount.fuse.incfs once installed.
    let c = mnt("mnt-helper");
    let _uc = Unmount(c.clone());
    let helper = bin.join("mount.fuse.incfs");
    let out =
        Command::new(&helper).args([&serve.url, c.to_str().unwrap(), "-o", &opts("cache-helper")]).output().unwrap();
    assert!(out.status.success(), "mount.fuse.incfs: {}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(fs::read_to_string(c.join("hello.txt")).unwrap(), "hello from fstab\n");
    Command::new("umount").arg(&c).output().unwrap();
    gone(&c);

    // A wrong option is an error naming it; nothing is mounted.
    let d = mnt("mnt-bad");
    let _ud = Unmount(d.clone());
    let o = format!("{},no_such_option=1", opts("cache-bad"));
    let out = with_path("mount", &["-t", "fuse.incfs", &serve.url, d.to_str().unwrap(), "-o", &o], &bin);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("no-such-option"), "{}", text(&out.stderr));
    assert!(!is_mounted(&d));
}

#[test]
fn the_systemd_units_verify() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        eprintln!("systemd-analyze is not installed: skipped");
        return;
    }
    let dir = tempdir();
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib/systemd");
    let exe = fs::canonicalize(incfs_bin()).unwrap();
    for e in fs::read_dir(&units).unwrap() {
        let e = e.unwrap();
        // As installed: the binary where scripts/install.sh puts it, here this build.
        let text = fs::read_to_string(e.path()).unwrap().replace("/usr/local/bin/incfs", exe.to_str().unwrap());
        fs::write(dir.path().join(e.file_name()), text).unwrap();
    }
    let mut names: Vec<String> =
        fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path().display().to_string()).collect();
    names.sort();
    // The template is checked as an instance.
    let names: Vec<String> = names
        .into_iter()
        .map(|n| if n.ends_with("@.service") { n.replace("@.service", "@app.service") } else { n })
        .collect();
    for n in &names {
        if n.ends_with("@app.service") {
            fs::copy(n.replace("@app.service", "@.service"), n).unwrap();
        }
    }
    let out = Command::new("systemd-analyze").arg("verify").args(&names).output().unwrap();
    let err = text(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify {names:?}:\n{err}");
    // It only warns of some mistakes (an unknown key is "ignored"): none may appear.
    for bad in ["Unknown key", "Unknown section", "Failed to parse", "is not executable", "Invalid"] {
        assert!(!err.contains(bad), "systemd-analyze verify {names:?}:\n{err}");
    }
}

#[test]
fn install_sh_puts_the_binary_the_helper_and_the_units_in_place() {
    let dest = tempdir();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/install.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env("DESTDIR", dest.path())
        .env("PREFIX", "/opt/incfs")
        .env("INCFS_BIN", fs::canonicalize(incfs_bin()).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "install.sh: {}{}", text(&out.stdout), text(&out.stderr));
    let d = dest.path();
    let bin = d.join("opt/incfs/bin/incfs");
    assert!(Command::new(&bin).arg("--version").output().unwrap().status.success());
    assert_eq!(fs::read_link(d.join("sbin/mount.fuse.incfs")).unwrap(), Path::new("/opt/incfs/bin/incfs"));
    let unit = fs::read_to_string(d.join("etc/systemd/system/incfs@.service")).unwrap();
    assert!(unit.contains("ExecStart=/opt/incfs/bin/incfs mount --foreground"), "{unit}");
    assert!(d.join("etc/incfs/app.conf.example").is_file());
    assert_eq!(fs::metadata(d.join("var/cache/incfs")).unwrap().permissions().mode() & 0o777, 0o700);
}
