//! Other local users cannot read through the cache what the image's modes hide from them, and a
//! private key is always written owner-only.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::*;

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Every file below `dir` (not following links).
fn files_below(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let t = e.file_type().unwrap();
        if t.is_dir() {
            out.extend(files_below(&e.path()));
        } else if t.is_file() {
            out.push(e.path());
        }
    }
    out
}

/// `cat PATH` as user nobody: Ok(bytes) or Err(stderr).
fn cat_as_nobody(path: &Path) -> Result<Vec<u8>, String> {
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
        .arg(path)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(text(&out.stderr))
    }
}

#[test]
fn the_cache_is_owner_only_even_one_made_before() {
    let secret = b"only root may read this: 4e8f0c2a\n".repeat(300);
    let p = Published::new(
        |src| {
            fs::write(src.join("secret.txt"), &secret).unwrap();
            fs::set_permissions(src.join("secret.txt"), fs::Permissions::from_mode(0o600)).unwrap();
        },
        &["--compression", "none"],
    );
    // Other users may reach the test's folder (a fresh temporary folder is 0700, which alone
    // would keep them out and prove nothing about the cache).
    fs::set_permissions(p.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    // A cache left by an older release, world-readable.
    let cache = p.dir.path().join("cache-m");
    fs::create_dir_all(cache.join("data")).unwrap();
    fs::set_permissions(&cache, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(cache.join("data"), fs::Permissions::from_mode(0o755)).unwrap();
    let m = p.mount(p.repo.to_str().unwrap(), "m", &[]);
    assert_eq!(fs::read(m.path("secret.txt")).unwrap(), secret);
    assert_eq!(mode(&cache), 0o700, "the cache directory");
    assert_eq!(mode(&cache.join("data")), 0o700, "the segment directory");
    let files = files_below(&cache);
    assert!(files.iter().any(|f| f.ends_with("store.db")), "{files:?}");
    for f in files.iter().filter(|f| {
        let name = f.file_name().unwrap().to_string_lossy();
        name.starts_with("store.db") || name.ends_with(".seg") || name.ends_with(".jnl")
    }) {
        assert_eq!(mode(f) & 0o077, 0, "{} is readable by others: {:o}", f.display(), mode(f));
    }
    // The proof that matters: another user finds the secret in no cache file.
    let mut checked = 0;
    for f in &files {
        if let Ok(bytes) = cat_as_nobody(f) {
            let needle = b"only root may read this";
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "user nobody read the secret from {}",
                f.display()
            );
        }
        checked += 1;
    }
    assert!(checked > 0);
    // And the secret really is in the cache (stored raw): the check above could have failed.
    let found_as_root = files.iter().any(|f| {
        let b = fs::read(f).unwrap_or_default();
        b.windows(23).any(|w| w == b"only root may read this")
    });
    assert!(found_as_root, "the secret is not in the cache in clear: the test proves nothing");
}

#[test]
fn keygen_force_leaves_the_private_key_owner_only() {
    let dir = tempdir();
    let base = dir.path().join("k");
    let private = dir.path().join("k.pem");
    fs::write(&private, "old").unwrap();
    fs::set_permissions(&private, fs::Permissions::from_mode(0o644)).unwrap();
    incfs_ok(&["keygen", "--out", base.to_str().unwrap(), "--force"]);
    assert_eq!(mode(&private), 0o600);
    assert!(fs::read_to_string(&private).unwrap().contains("PRIVATE KEY"));
    assert_eq!(mode(&dir.path().join("k.pub.pem")), 0o644);
}

/// Send `request` (raw bytes) to the control socket at `sock` as user `uid` (Debian's python3,
/// which any user may run: `scripts/test.sh` installs python3-minimal); returns what the daemon
/// answered before closing.
fn ask_as(uid: u32, sock: &Path, request: &[u8]) -> String {
    let script = "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\ndata=sys.stdin.buffer.read()\ntry:\n  s.sendall(data)\nexcept OSError:\n  pass\ns.shutdown(socket.SHUT_WR)\nout=b''\nwhile True:\n  b=s.recv(65536)\n  if not b: break\n  out+=b\nsys.stdout.write(out.decode())\n";
    let mut child = Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            script,
        ])
        .arg(sock)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(request);
    }
    let out = child.wait_with_output().unwrap();
    text(&out.stdout) + &text(&out.stderr)
}

#[test]
fn the_control_socket_answers_only_its_owner_and_bounds_requests() {
    let p = Published::new(|src| fs::write(src.join("f"), "x\n").unwrap(), &[]);
    let m = p.mount(p.repo.to_str().unwrap(), "sock", &[]);
    let sock = incfs_fs::control::socket_path(&m.dir).unwrap();
    let dir = sock.parent().unwrap();
    assert_eq!(mode(dir), 0o700, "{}", dir.display());
    assert_eq!(mode(&sock), 0o600, "{}", sock.display());
    assert!(ask_as(0, &sock, b"{\"cmd\":\"status\"}\n").contains("\"ok\""));

    // Opened up by a careless admin: another user reaches the socket and is still refused.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&sock, fs::Permissions::from_mode(0o666)).unwrap();
    let stranger = ask_as(65534, &sock, b"{\"cmd\":\"status\"}\n");
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).unwrap();
    assert!(stranger.contains("permission denied") && !stranger.contains("\"ok\""), "{stranger}");

    // A request line without end: answered with an error, not buffered without bound.
    let endless = vec![b'x'; 17 << 20];
    let reply = ask_as(0, &sock, &endless);
    assert!(reply.contains("longer than"), "{}", &reply[..reply.len().min(300)]);
    assert!(m.daemon_alive(), "{}", m.log());
    assert!(m.status().is_object(), "status still answers");
}
