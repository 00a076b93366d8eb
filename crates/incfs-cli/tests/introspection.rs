//! Introspection of a live mount: the Prometheus endpoint (`--metrics`).

mod common;

use std::fs;

use common::*;

/// The value of an unlabelled (or exactly labelled) sample in an exposition text.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
        .parse()
        .unwrap()
}

#[test]
fn metrics_endpoint_shows_the_counters_moving() {
    let p = Published::new(
        |src| {
            fs::write(src.join("a.bin"), random_bytes(1, 1 << 20)).unwrap();
            fs::write(src.join("b.bin"), random_bytes(2, 1 << 20)).unwrap();
        },
        &[],
    );
    let serve = IncfsServer::start(&p.repo);
    let addr = format!("127.0.0.1:{}", free_port());
    let m = p.mount(&serve.url, "metrics", &["--metrics", &addr]);
    let url = format!("http://{addr}/metrics");
    let before = run("curl", &["-sf", &url]);
    assert!(before.contains("# TYPE incfs_fetched_bytes_total counter"), "{before}");
    assert!(before.contains("incfs_image_info{image=\"src\",version=\"1\"} 1"), "{before}");
    assert_eq!(sample(&before, "incfs_blocks_total"), 512.0);
    assert_eq!(sample(&before, "incfs_fetched_bytes_total"), 0.0);

    assert_eq!(fs::read(m.path("a.bin")).unwrap(), fs::read(p.src.join("a.bin")).unwrap());
    let after = run("curl", &["-sf", &url]);
    assert!(sample(&after, "incfs_fetched_bytes_total") >= (1 << 20) as f64, "{after}");
    assert!(sample(&after, "incfs_reads_served_total") > 0.0);
    assert!(sample(&after, "incfs_blocks_present") >= 256.0);
    assert_eq!(sample(&after, "incfs_reads_failed_total{cause=\"verification\"}"), 0.0);
    // The cache by kind, and what its limit did (no limit here: nothing evicted).
    assert!(sample(&after, "incfs_cache_bytes{kind=\"blocks\"}") >= (1 << 20) as f64, "{after}");
    assert!(sample(&after, "incfs_cache_bytes{kind=\"journal\"}") > 0.0, "{after}");
    assert_eq!(sample(&after, "incfs_evictions_total"), 0.0);
    assert_eq!(sample(&after, "incfs_cache_full"), 0.0);
    assert!(!after.contains("incfs_cache_limit_bytes"), "no limit, no limit metric");

    // A port already taken is a clear error at mount, and nothing is mounted.
    let mnt = p.dir.path().join("mnt-taken");
    fs::create_dir_all(&mnt).unwrap();
    let _unmount = Unmount(mnt.clone());
    let out = incfs(&[
        "mount",
        &serve.url,
        mnt.to_str().unwrap(),
        "--trust",
        p.public.to_str().unwrap(),
        "--cache",
        p.dir.path().join("cache-taken").to_str().unwrap(),
        "--metrics",
        &addr,
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains(&format!("metrics endpoint {addr}")), "{}", text(&out.stderr));
    assert!(!is_mounted(&mnt));
}
