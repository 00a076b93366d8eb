//! `incfs serve` speaks enough HTTP for any client: single ranges, 416, HEAD, ETag/304,
//! keep-alive, and nothing outside the repository. Checked with curl, a client we did not write.

mod common;

use std::fs;

use common::*;

fn curl(args: &[&str]) -> (String, String) {
    let out = std::process::Command::new("curl").args(["-sS", "--max-time", "10"]).args(args).output().expect("curl");
    (text(&out.stdout), text(&out.stderr))
}

fn status_and_headers(url: &str, extra: &[&str]) -> String {
    let mut args = vec!["-o", "/dev/null", "-D", "-"];
    args.extend_from_slice(extra);
    args.push(url);
    curl(&args).0.to_ascii_lowercase()
}

#[test]
fn ranges_head_etag_keepalive_and_confinement() {
    let dir = tempdir();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), random_bytes(3, 10_000)).unwrap();
    let (private, _) = ed25519_key(dir.path());
    let repo = dir.path().join("repo");
    pack(&src, &repo, &private, &[]);
    let manifest = fs::read(repo.join("manifest")).unwrap();
    let len = manifest.len();
    let server = IncfsServer::start(&repo);
    let url = format!("{}/manifest", server.url);

    let h = status_and_headers(&url, &[]);
    assert!(h.starts_with("http/1.1 200"), "{h}");
    assert!(h.contains(&format!("content-length: {len}")), "{h}");
    assert!(h.contains("accept-ranges: bytes"), "{h}");

    let body = std::process::Command::new("curl").args(["-sS", "-r", "10-19", &url]).output().unwrap().stdout;
    assert_eq!(body, manifest[10..20]);
    let h = status_and_headers(&url, &["-r", "10-19"]);
    assert!(h.starts_with("http/1.1 206"), "{h}");
    assert!(h.contains(&format!("content-range: bytes 10-19/{len}")), "{h}");
    let h = status_and_headers(&url, &["-r", "-5"]);
    assert!(h.contains(&format!("content-range: bytes {}-{}/{len}", len - 5, len - 1)), "{h}");

    let h = status_and_headers(&url, &["-r", &format!("{len}-")]);
    assert!(h.starts_with("http/1.1 416"), "{h}");
    assert!(h.contains(&format!("content-range: bytes */{len}")), "{h}");

    let (out, _) = curl(&["-I", &url]);
    assert!(
        out.starts_with("HTTP/1.1 200") && out.to_ascii_lowercase().contains(&format!("content-length: {len}")),
        "{out}"
    );

    let etag = h.lines().find_map(|l| l.strip_prefix("etag: ")).expect("an ETag header").trim().to_string();
    let h = status_and_headers(&url, &["-H", &format!("If-None-Match: {etag}")]);
    assert!(h.starts_with("http/1.1 304"), "{h}");

    // Two requests in one curl run share one connection.
    let (_, err) = curl(&["-v", "-o", "/dev/null", "-o", "/dev/null", &url, &url]);
    assert!(err.contains("Re-using existing connection"), "{err}");

    for bad in ["/.lock", "/../../etc/passwd", "/objects/..", "/nothing-here", "/objects"] {
        let h = status_and_headers(&format!("{}{bad}", server.url), &["--path-as-is"]);
        assert!(h.starts_with("http/1.1 404"), "{bad}: {h}");
    }
    let h = status_and_headers(&url, &["-X", "PUT"]);
    assert!(h.starts_with("http/1.1 405"), "{h}");
}

#[test]
fn demo_runs_end_to_end() {
    let dir = tempdir();
    let work = dir.path().join("demo");
    let out = incfs_ok(&["demo", "--dir", work.to_str().unwrap()]);
    assert!(out.contains("demo OK"), "{out}");
    assert!(out.contains("entries identical to the original"), "{out}");
    // The repository it published verifies with the CLI too.
    let v = incfs_ok(&[
        "verify",
        work.join("repo").to_str().unwrap(),
        "--trust",
        work.join("publisher.pub.pem").to_str().unwrap(),
        "-q",
    ]);
    assert!(v.starts_with("OK:"), "{v}");
}
