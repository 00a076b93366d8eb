//! Helpers shared by the integration tests: the `incfs` binary, temporary trees, and servers
//! (`incfs serve`, nginx) that are stopped by PID when their guard drops, even if a test fails.

#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};

pub mod faults;
pub mod hostile;
pub mod proxy;
pub mod runner;

pub fn incfs_bin() -> &'static str {
    env!("CARGO_BIN_EXE_incfs")
}

/// Run `incfs ARGS...` and return its output (never panics on a non-zero exit).
pub fn incfs(args: &[&str]) -> Output {
    Command::new(incfs_bin()).args(args).output().expect("running incfs")
}

/// Run `incfs ARGS...`, which must succeed; returns stdout.
pub fn incfs_ok(args: &[&str]) -> String {
    let out = incfs(args);
    assert!(out.status.success(), "incfs {args:?} failed:\n{}\n{}", text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Run a system tool, which must exist and succeed.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} is needed by this test ({e}); .ci/run installs it"));
    assert!(out.status.success(), "{program} {args:?} failed:\n{}", text(&out.stderr));
    text(&out.stdout)
}

pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("incfs-test-").tempdir().unwrap()
}

/// Make an Ed25519 key pair with openssl; returns (private, public) paths.
pub fn openssl_key(dir: &Path, name: &str, genpkey_args: &[&str]) -> (PathBuf, PathBuf) {
    let private = dir.join(format!("{name}.pem"));
    let public = dir.join(format!("{name}.pub.pem"));
    let mut args = vec!["genpkey"];
    args.extend_from_slice(genpkey_args);
    args.extend_from_slice(&["-out", private.to_str().unwrap()]);
    run("openssl", &args);
    run("openssl", &["pkey", "-in", private.to_str().unwrap(), "-pubout", "-out", public.to_str().unwrap()]);
    (private, public)
}

pub fn ed25519_key(dir: &Path) -> (PathBuf, PathBuf) {
    openssl_key(dir, "ed25519", &["-algorithm", "ed25519"])
}

/// Pack `src` into `repo` with `key`, quietly; extra args appended.
pub fn pack(src: &Path, repo: &Path, key: &Path, extra: &[&str]) -> String {
    let mut args = vec!["pack", src.to_str().unwrap(), repo.to_str().unwrap(), "--key", key.to_str().unwrap(), "-q"];
    args.extend_from_slice(extra);
    incfs_ok(&args)
}

/// Bytes of the files directly in `dir`.
#[allow(dead_code)]
pub fn dir_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
}

/// `diff -r A B` through the kernel, which must find no difference.
pub fn diff_r(a: &Path, b: &Path) {
    let out = Command::new("diff").arg("-r").arg(a).arg(b).output().unwrap();
    assert!(out.status.success(), "diff -r differs:\n{}{}", text(&out.stdout), text(&out.stderr));
}

/// Every file under `root`, relative path -> bytes, for byte-exact comparisons.
pub fn read_tree(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.push((e.path().strip_prefix(root).unwrap().to_path_buf(), std::fs::read(e.path()).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// A free TCP port on 127.0.0.1 (released for the caller to bind).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process killed (by its PID) and reaped when dropped.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `incfs serve` on an ephemeral loopback port.
pub struct IncfsServer {
    pub url: String,
    child: ChildGuard,
}

impl IncfsServer {
    pub fn start(repo: &Path) -> Self {
        Self::spawn(repo, "127.0.0.1:0").expect("incfs serve prints its URL")
    }

    /// `incfs serve` on a given port (to stop and restart a server at the same address).
    pub fn start_on(repo: &Path, port: u16) -> Self {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = Self::spawn(repo, &format!("127.0.0.1:{port}")) {
                return s;
            }
            assert!(Instant::now() < deadline, "cannot listen on port {port} again");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn spawn(repo: &Path, listen: &str) -> Option<Self> {
        let mut child = Command::new(incfs_bin())
            .args(["serve", repo.to_str().unwrap(), "--listen", listen])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting incfs serve");
        let stdout = child.stdout.take().unwrap();
        let child = ChildGuard(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let url = line.split(" at ").nth(1)?.trim().trim_end_matches('/').to_string();
        Some(IncfsServer { url, child })
    }
}

/// nginx from Debian serving `root` on a loopback port, with its own config, pid file and logs.
pub struct Nginx {
    pub url: String,
    pub dir: tempfile::TempDir,
    child: ChildGuard,
}

impl Nginx {
    pub fn start(root: &Path) -> Self {
        let dir = tempdir();
        let port = free_port();
        let conf = dir.path().join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
                 events {{ worker_connections 64; }}\n\
                 http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n  \
                 fastcgi_temp_path {d};\n  uwsgi_temp_path {d};\n  scgi_temp_path {d};\n  tcp_nodelay on;\n  \
                 server {{\n    listen 127.0.0.1:{port};\n    root {root};\n  }}\n}}\n",
                d = dir.path().display(),
                root = root.display()
            ),
        )
        .unwrap();
        let guard = spawn_nginx(&conf, dir.path(), port);
        Nginx { url: format!("http://127.0.0.1:{port}"), dir, child: guard }
    }
}

/// Run nginx with config `conf` and prefix `dir` (its `error.log` there) until it listens on
/// `port` of 127.0.0.1; stopped by PID when the guard drops.
pub fn spawn_nginx(conf: &Path, dir: &Path, port: u16) -> ChildGuard {
    let child = Command::new("nginx")
        .args(["-c", conf.to_str().unwrap(), "-p", dir.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx is needed by this test; .ci/run installs it");
    let guard = ChildGuard(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
        assert!(Instant::now() < deadline, "nginx did not start: {log}");
        std::thread::sleep(Duration::from_millis(20));
    }
    guard
}

/// Every entry under `root` (not following symlinks) with what must survive a round trip.
pub fn describe(root: &Path) -> Vec<String> {
    describe_with(root, true)
}

/// [`describe`], optionally without reading file contents (metadata only).
pub fn describe_with(root: &Path, content: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut first_by_ino = std::collections::HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let p = root.join(&rel);
        let md = fs::symlink_metadata(&p).unwrap();
        let ft = md.file_type();
        let mut line = format!(
            "{:?} mode={:o} uid={} gid={} mtime={}.{:09}",
            rel,
            md.mode(),
            md.uid(),
            md.gid(),
            md.mtime(),
            md.mtime_nsec()
        );
        if ft.is_file() {
            line += &format!(" size={}", md.len());
            if content {
                let bytes = fs::read(&p).unwrap();
                let sum = bytes.iter().fold(0u64, |a, &b| a.wrapping_mul(31).wrapping_add(b as u64));
                line += &format!(" sum={sum:x}");
            }
            let first = first_by_ino.entry(md.ino()).or_insert_with(|| rel.clone());
            line += &format!(" links={} same-as={:?}", md.nlink(), first);
        } else if ft.is_symlink() {
            line += &format!(" -> {:?}", fs::read_link(&p).unwrap());
        } else if ft.is_dir() {
            // Sockets are not published; everything else must be there.
            let mut names: Vec<_> = fs::read_dir(&p)
                .unwrap()
                .map(|e| e.unwrap())
                .filter(|e| !std::os::unix::fs::FileTypeExt::is_socket(&e.file_type().unwrap()))
                .map(|e| e.file_name())
                .collect();
            names.sort();
            stack.extend(names.into_iter().rev().map(|n| rel.join(n)));
        } else {
            line += &format!(" rdev={}", md.rdev());
        }
        if !ft.is_symlink() {
            for name in xattr::list(&p).unwrap() {
                line += &format!(" xattr {:?}={:?}", name, xattr::get(&p, &name).unwrap());
            }
        }
        out.push(line);
    }
    out
}

/// An incfs mount, unmounted (and its daemon gone) when dropped, even if the test failed.
pub struct Mount {
    pub dir: PathBuf,
    /// The supervisor: the process `incfs mount` left running, which holds the mount; killing it
    /// ends everything (its daemon dies with it).
    pub pid: u32,
    /// The daemon serving the mount when it was mounted (replaced if it dies).
    pub daemon_pid: u32,
    pub cache: PathBuf,
}

impl Mount {
    /// `incfs mount SOURCE DIR --trust TRUST --cache CACHE EXTRA...`, which must succeed.
    /// Background completion is off unless EXTRA says `--background on`: most tests watch
    /// exactly what reads fetch.
    pub fn start(source: &str, dir: &Path, trust: &Path, cache: &Path, extra: &[&str]) -> Mount {
        Self::start_with_env(source, dir, trust, cache, extra, &[])
    }

    pub fn start_with_env(
        source: &str,
        dir: &Path,
        trust: &Path,
        cache: &Path,
        extra: &[&str],
        env: &[(String, String)],
    ) -> Mount {
        Self::start_warned(source, dir, trust, cache, extra, env).0
    }

    /// As [`Mount::start_with_env`], also returning what `incfs mount` printed on stderr (its
    /// warnings).
    pub fn start_warned(
        source: &str,
        dir: &Path,
        trust: &Path,
        cache: &Path,
        extra: &[&str],
        env: &[(String, String)],
    ) -> (Mount, String) {
        fs::create_dir_all(dir).unwrap();
        let mut args = vec!["mount", source, dir.to_str().unwrap(), "--trust", trust.to_str().unwrap()];
        args.extend(["--cache", cache.to_str().unwrap()]);
        args.extend_from_slice(extra);
        if !extra.contains(&"--background") {
            args.extend(["--background", "off"]);
        }
        let res = Command::new(incfs_bin()).args(&args).envs(env.iter().cloned()).output().expect("running incfs");
        assert!(res.status.success(), "incfs {args:?} failed:\n{}\n{}", text(&res.stdout), text(&res.stderr));
        let out = text(&res.stdout);
        let pid_after = |label: &str| -> u32 {
            out.split(label)
                .nth(1)
                .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("incfs mount did not print the {label}: {out}"))
        };
        let (pid, daemon_pid) = (pid_after("supervisor pid "), pid_after("daemon pid "));
        (Mount { dir: fs::canonicalize(dir).unwrap(), pid, daemon_pid, cache: cache.to_path_buf() }, text(&res.stderr))
    }

    /// The daemon's log, for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.cache.join("daemon.log")).unwrap_or_default()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// `incfs status --json`.
    pub fn status(&self) -> serde_json::Value {
        let out = incfs_ok(&["status", self.dir.to_str().unwrap(), "--json"]);
        serde_json::from_str(&out).unwrap()
    }

    pub fn stat(&self, key: &str) -> u64 {
        self.status()[key].as_u64().unwrap_or_else(|| panic!("status has no {key}"))
    }

    /// Wait (bounded) until every block of the image is present.
    pub fn wait_complete(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let s = self.status();
            if s["complete"].as_bool() == Some(true) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not complete within {within:?}: {}/{} blocks\n{}",
                s["blocks_present"],
                s["blocks_total"],
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait (bounded) until every plain copy asked for is made: a complete file's copy is made
    /// in the background after its first open, and only later opens pass through.
    pub fn wait_plain_copies(&self, within: Duration) {
        let ok = wait_for(within, || self.status()["plain_queued"].as_u64() == Some(0));
        assert!(ok, "plain copies still being made after {within:?}: {}\n{}", self.status(), self.log());
    }

    /// Present block ranges of one file.
    pub fn present(&self, rel: &str) -> Vec<(u64, u64)> {
        let out = incfs_ok(&["status", self.dir.to_str().unwrap(), rel, "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        serde_json::from_value(v["present"].clone()).unwrap()
    }

    pub fn daemon_alive(&self) -> bool {
        Path::new(&format!("/proc/{}", self.pid)).exists()
            && !fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default().contains(") Z ")
    }

    /// After a `kill -9` of the daemon: wait (bounded) for it to exit, then give fusermount3's
    /// auto-unmount a while to remove the dead mount, and remove it here if that did not happen.
    /// fusermount3's watchdog was seen, rarely and only under load, to vanish without
    /// unmounting (no process left holding /dev/fuse); what the kill tests check is what
    /// survives in the cache, so they do not hang on that (a supervisor that keeps the mount
    /// alive is issue 13's).
    pub fn wait_killed(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.daemon_alive() {
            assert!(Instant::now() < deadline, "the killed daemon {} did not exit", self.pid);
            std::thread::sleep(Duration::from_millis(20));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while is_mounted(&self.dir) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if is_mounted(&self.dir) {
            eprintln!(
                "note: {} outlived its killed daemon (fusermount3 watchdog gone; /dev/fuse holders: {}); \
                 unmounting it here",
                self.dir.display(),
                fuse_holders()
            );
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
            assert!(!is_mounted(&self.dir), "{}: umount -l did not remove the dead mount", self.dir.display());
        }
    }

    /// Wait (bounded) until the mount is gone and the daemon has exited. The bound is generous:
    /// after a kill -9 the unmount is fusermount3's, which a loaded 2-core machine may delay.
    pub fn wait_gone(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while is_mounted(&self.dir) || self.daemon_alive() {
            assert!(
                Instant::now() < deadline,
                "mount {} did not go away (mounted: {}, daemon alive: {}); daemon state: {}; holders of \
                 /dev/fuse: {}; daemon log:\n{}",
                self.dir.display(),
                is_mounted(&self.dir),
                self.daemon_alive(),
                fs::read_to_string(format!("/proc/{}/status", self.pid))
                    .map(|s| s.lines().filter(|l| l.starts_with("State") || l.starts_with("Threads")).collect())
                    .unwrap_or_else(|_| "gone".to_string()),
                fuse_holders(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Processes holding a /dev/fuse descriptor, with their state and command line (diagnostics
/// for a mount that outlives its daemon).
fn fuse_holders() -> String {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let p = e.path();
        let holds = fs::read_dir(p.join("fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| fs::read_link(fd.path()).is_ok_and(|t| t == Path::new("/dev/fuse")));
        let cmd = fs::read(p.join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains("fusermount") {
            let fds: Vec<String> = fs::read_dir(p.join("fd"))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|fd| fs::read_link(fd.path()).ok().map(|t| t.display().to_string()))
                .collect();
            let stat = fs::read_to_string(p.join("stat")).unwrap_or_default();
            out.push(format!(
                "fusermount {} [{}] ppid {} fds {fds:?} {}",
                e.file_name().to_string_lossy(),
                stat.split(' ').nth(2).unwrap_or("?"),
                stat.split(' ').nth(3).unwrap_or("?"),
                String::from_utf8_lossy(&cmd).replace('\0', " ")
            ));
        }
        if holds {
            let stat = fs::read_to_string(p.join("stat")).unwrap_or_default();
            out.push(format!(
                "{} [{}] {}",
                e.file_name().to_string_lossy(),
                stat.split(' ').nth(2).unwrap_or("?"),
                String::from_utf8_lossy(&cmd).replace('\0', " ")
            ));
        }
    }
    out.join("; ")
}

impl Drop for Mount {
    fn drop(&mut self) {
        if is_mounted(&self.dir) {
            let _ = Command::new(incfs_bin()).args(["unmount", self.dir.to_str().unwrap()]).output();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.daemon_alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.daemon_alive() {
            // SAFETY: kill(2) on the daemon this test started; no memory is involved.
            unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        }
        if is_mounted(&self.dir) {
            let _ = Command::new("umount").args(["-l", self.dir.to_str().unwrap()]).output();
        }
    }
}

/// Unmounts `dir` (umount(8)) on drop if something is mounted there: a test expecting a mount
/// to be refused leaves nothing behind even when the mount came up and the test fails.
pub struct Unmount(pub PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new("umount").arg(&self.0).output();
        }
    }
}

pub fn is_mounted(dir: &Path) -> bool {
    let dir = dir.to_string_lossy().replace(' ', "\\040").replace('\n', "\\012");
    fs::read_to_string("/proc/self/mounts").unwrap_or_default().lines().any(|l| l.split(' ').nth(1) == Some(&dir))
}

/// A single-node Garage (S3-compatible object store) on loopback ports, with one bucket and
/// one key, stopped by PID when dropped. Needs the `garage` binary (`cargo install garage`;
/// scripts/test.sh installs it when missing).
pub struct Garage {
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub key_id: String,
    pub secret: String,
    _dir: tempfile::TempDir,
    _child: ChildGuard,
}

fn garage_bin() -> PathBuf {
    let home = PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo/bin/garage");
    if home.exists() {
        home
    } else {
        PathBuf::from("garage")
    }
}

impl Garage {
    pub fn start() -> Self {
        let dir = tempdir();
        let (rpc, s3) = (free_port(), free_port());
        let secret = random_bytes(std::process::id() as u64, 32).iter().map(|b| format!("{b:02x}")).collect::<String>();
        let conf = dir.path().join("garage.toml");
        fs::write(
            &conf,
            format!(
                "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\nreplication_factor = 1\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
                 [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\nroot_domain = \".s3.garage.localhost\"\n",
                d = dir.path().display()
            ),
        )
        .unwrap();
        let child = Command::new(garage_bin())
            .args(["-c", conf.to_str().unwrap(), "server"])
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.path().join("server.log")).unwrap())
            .spawn()
            .expect("garage is needed by this test (cargo install garage --locked; scripts/test.sh does it)");
        let child = ChildGuard(child);
        let g = |args: &[&str]| -> String {
            let out = Command::new(garage_bin()).args(["-c", conf.to_str().unwrap()]).args(args).output().unwrap();
            assert!(out.status.success(), "garage {args:?}: {}", text(&out.stderr));
            text(&out.stdout)
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let node = loop {
            let out =
                Command::new(garage_bin()).args(["-c", conf.to_str().unwrap(), "node", "id", "-q"]).output().unwrap();
            if out.status.success() {
                break text(&out.stdout).trim().split('@').next().unwrap().to_string();
            }
            assert!(Instant::now() < deadline, "garage did not start: {}", text(&out.stderr));
            std::thread::sleep(Duration::from_millis(100));
        };
        // `node id` reads local files only: wait for the RPC listener before the first RPC.
        while std::net::TcpStream::connect(("127.0.0.1", rpc)).is_err() {
            assert!(Instant::now() < deadline, "garage RPC did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        g(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        g(&["layout", "apply", "--version", "1"]);
        g(&["bucket", "create", "incfs"]);
        let key = g(&["key", "create", "incfs-key"]);
        let field = |name: &str| {
            key.lines()
                .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim_start_matches(':').trim().to_string()))
                .unwrap_or_else(|| panic!("no {name} in: {key}"))
        };
        let (key_id, secret_key) = (field("Key ID"), field("Secret key"));
        g(&["bucket", "allow", "--read", "--write", "--owner", "incfs", "--key", "incfs-key"]);
        let endpoint = format!("http://127.0.0.1:{s3}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", s3)).is_err() {
            assert!(Instant::now() < deadline, "garage S3 API did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        Garage {
            endpoint,
            bucket: "incfs".into(),
            region: "garage".into(),
            key_id,
            secret: secret_key,
            _dir: dir,
            _child: child,
        }
    }

    /// Upload every file under `local` to `prefix/` in the bucket (signed PUTs with curl).
    pub fn upload(&self, local: &Path, prefix: &str) {
        let mut stack = vec![local.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                let rel = p.strip_prefix(local).unwrap().to_str().unwrap().to_string();
                if rel.starts_with('.') {
                    continue;
                }
                self.put(&p, &format!("{prefix}/{rel}"));
            }
        }
    }

    pub fn put(&self, file: &Path, key: &str) {
        run(
            "curl",
            &[
                "-sSf",
                "--aws-sigv4",
                &format!("aws:amz:{}:s3", self.region),
                "--user",
                &format!("{}:{}", self.key_id, self.secret),
                "-H",
                "x-amz-content-sha256: UNSIGNED-PAYLOAD",
                "-T",
                file.to_str().unwrap(),
                &format!("{}/{}/{key}", self.endpoint, self.bucket),
            ],
        );
    }

    /// The environment `incfs` reads S3 settings from.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT_URL".into(), self.endpoint.clone()),
            ("AWS_REGION".into(), self.region.clone()),
            ("AWS_ACCESS_KEY_ID".into(), self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret.clone()),
        ]
    }

    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }
}

/// A packed repository with its key, in a temporary directory.
pub struct Published {
    pub dir: tempfile::TempDir,
    pub src: PathBuf,
    pub repo: PathBuf,
    pub public: PathBuf,
    pub private: PathBuf,
}

impl Published {
    pub fn new(fill: impl FnOnce(&Path), extra: &[&str]) -> Self {
        let dir = tempdir();
        let src = dir.path().join("src");
        fs::create_dir(&src).unwrap();
        fill(&src);
        let (private, public) = ed25519_key(dir.path());
        let repo = dir.path().join("repo");
        pack(&src, &repo, &private, extra);
        Published { src, repo, public, private, dir }
    }

    pub fn mount(&self, source: &str, name: &str, extra: &[&str]) -> Mount {
        self.mount_env(source, name, extra, &[])
    }

    pub fn mount_env(&self, source: &str, name: &str, extra: &[&str], env: &[(String, String)]) -> Mount {
        let cache = self.dir.path().join(format!("cache-{name}"));
        Mount::start_with_env(source, &self.dir.path().join(format!("mnt-{name}")), &self.public, &cache, extra, env)
    }
}

/// A copy of this machine's Python standard library (without tests and site-packages).
pub fn python_stdlib_copy(dest: &Path) {
    fs::create_dir_all(dest).unwrap();
    let stdlib = run("python3", &["-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"]);
    let tar = format!(
        "tar -C '{}' --exclude=./site-packages --exclude=./test -cf - . | tar -C '{}' -xf -",
        stdlib.trim(),
        dest.display()
    );
    run("sh", &["-c", &tar]);
}

/// Poll `cond` every 50 ms until it holds (true) or `within` has passed (false).
pub fn wait_for(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if t.elapsed() > within {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
