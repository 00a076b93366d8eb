//! Helpers shared by the integration tests: the `incfs` binary, temporary trees, and servers
//! (`incfs serve`, nginx) that are stopped by PID when their guard drops, even if a test fails.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};

pub fn incfs_bin() -> &'static str {
    env!("CARGO_BIN_EXE_incfs")
}

/// Run `incfs ARGS...` and return its output (never panics on a non-zero exit).
pub fn incfs(args: &[&str]) -> Output {
    Command::new(incfs_bin())
        .args(args)
        .output()
        .expect("running incfs")
}

/// Run `incfs ARGS...`, which must succeed; returns stdout.
pub fn incfs_ok(args: &[&str]) -> String {
    let out = incfs(args);
    assert!(
        out.status.success(),
        "incfs {args:?} failed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
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
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("incfs-test-")
        .tempdir()
        .unwrap()
}

/// Make an Ed25519 key pair with openssl; returns (private, public) paths.
pub fn openssl_key(dir: &Path, name: &str, genpkey_args: &[&str]) -> (PathBuf, PathBuf) {
    let private = dir.join(format!("{name}.pem"));
    let public = dir.join(format!("{name}.pub.pem"));
    let mut args = vec!["genpkey"];
    args.extend_from_slice(genpkey_args);
    args.extend_from_slice(&["-out", private.to_str().unwrap()]);
    run("openssl", &args);
    run(
        "openssl",
        &[
            "pkey",
            "-in",
            private.to_str().unwrap(),
            "-pubout",
            "-out",
            public.to_str().unwrap(),
        ],
    );
    (private, public)
}

pub fn ed25519_key(dir: &Path) -> (PathBuf, PathBuf) {
    openssl_key(dir, "ed25519", &["-algorithm", "ed25519"])
}

/// Pack `src` into `repo` with `key`, quietly; extra args appended.
pub fn pack(src: &Path, repo: &Path, key: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "pack",
        src.to_str().unwrap(),
        repo.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "-q",
    ];
    args.extend_from_slice(extra);
    incfs_ok(&args)
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
                out.push((
                    e.path().strip_prefix(root).unwrap().to_path_buf(),
                    std::fs::read(e.path()).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

/// A free TCP port on 127.0.0.1 (released for the caller to bind).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
        let mut child = Command::new(incfs_bin())
            .args(["serve", repo.to_str().unwrap(), "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting incfs serve");
        let stdout = child.stdout.take().unwrap();
        let guard = ChildGuard(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let url = line
            .split(" at ")
            .nth(1)
            .expect("incfs serve prints its URL")
            .trim()
            .trim_end_matches('/')
            .to_string();
        IncfsServer { url, child: guard }
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
        let child = Command::new("nginx")
            .args([
                "-c",
                conf.to_str().unwrap(),
                "-p",
                dir.path().to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nginx is needed by this test; .ci/run installs it");
        let guard = ChildGuard(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not start: {}",
                std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx {
            url: format!("http://127.0.0.1:{port}"),
            dir,
            child: guard,
        }
    }
}
