//! Load and scale: fio with 16 jobs over a cold then a warm mount, and an image of 100,000
//! files. Figures (mount time, peak RSS) are printed for the record; the assertions are bounds
//! that hold on a loaded 2-core CI machine. `INCFS_LOAD_SECS` (default 20) sets each fio phase.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// (current, peak) resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn fio(dir: &Path, name: &str, secs: u64) -> serde_json::Value {
    // 16 jobs: 8 sequential readers and 8 random readers over the same four 32 MiB files.
    let out = Command::new("fio")
        .args([
            "--output-format=json",
            &format!("--directory={}", dir.display()),
            "--filename=d0.bin:d1.bin:d2.bin:d3.bin",
            "--readonly",
            "--ioengine=psync",
            "--size=128M",
            "--time_based",
            &format!("--runtime={secs}"),
            "--group_reporting",
            "--name=seq",
            "--rw=read",
            "--bs=256k",
            "--numjobs=8",
            "--name=rand",
            "--new_group",
            "--rw=randread",
            "--bs=4k",
            "--numjobs=8",
        ])
        .output()
        .expect("fio is installed by scripts/deps.sh");
    assert!(out.status.success(), "fio ({name}) failed:\n{}{}", text(&out.stdout), text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let errors: u64 = v["jobs"].as_array().unwrap().iter().map(|j| j["error"].as_u64().unwrap_or(0)).sum();
    assert_eq!(errors, 0, "fio ({name}) reported errors");
    v
}

#[test]
fn sixteen_fio_jobs_over_a_cold_then_warm_mount() {
    let secs: u64 = std::env::var("INCFS_LOAD_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let p = Published::new(
        |src| {
            for i in 0..4 {
                fs::write(src.join(format!("d{i}.bin")), random_bytes(900 + i, 32 << 20)).unwrap();
            }
        },
        &["--compression", "lz4"],
    );
    let serve = IncfsServer::start(&p.repo);
    let m = p.mount(&serve.url, "load", &["--background", "on", "--passthrough", "off"]);
    let mut report = Vec::new();
    for phase in ["cold", "warm"] {
        let t = Instant::now();
        let v = fio(&m.dir, phase, secs);
        let job = &v["jobs"].as_array().unwrap();
        let (seq, rand) = (&job[0]["read"], &job[1]["read"]);
        let (_, peak) = rss_kib(m.daemon_pid);
        report.push(format!(
            "{phase}: {:.1}s, sequential {} MiB/s, random {} IOPS, daemon peak RSS {} MiB",
            t.elapsed().as_secs_f64(),
            seq["bw"].as_u64().unwrap_or(0) / 1024,
            rand["iops"].as_f64().unwrap_or(0.0) as u64,
            peak / 1024
        ));
        if phase == "cold" {
            m.wait_complete(Duration::from_secs(120));
        }
    }
    let s = m.status();
    for k in ["reads_failed_timeout", "reads_failed_verification", "reads_failed_source", "reads_failed_other"] {
        assert_eq!(s[k], 0, "{k}: {s}");
    }
    for i in 0..4 {
        let rel = format!("d{i}.bin");
        assert_eq!(fs::read(m.path(&rel)).unwrap(), fs::read(p.src.join(&rel)).unwrap(), "{rel} after the load");
    }
    let (_, peak) = rss_kib(m.daemon_pid);
    println!("fio 16 jobs ({secs}s a phase): {}", report.join("; "));
    assert!(peak < 512 << 10, "daemon memory stays bounded: peak RSS {} MiB", peak / 1024);
}

#[test]
fn an_image_of_100_000_files_mounts_at_once() {
    let p = Published::new(
        |src| {
            for d in 0..100 {
                let dir = src.join(format!("d{d:02}"));
                fs::create_dir(&dir).unwrap();
                for f in 0..1000 {
                    fs::write(dir.join(format!("f{f:03}")), format!("file {d}/{f}\n")).unwrap();
                }
            }
        },
        &[],
    );
    let serve = IncfsServer::start(&p.repo);
    let t = Instant::now();
    let m = p.mount(&serve.url, "many", &[]);
    let mount_time = t.elapsed();
    let (rss, _) = rss_kib(m.daemon_pid);
    let t = Instant::now();
    let out = run("find", &[m.dir.to_str().unwrap(), "-type", "f"]);
    let find_time = t.elapsed();
    assert_eq!(out.lines().count(), 100_000);
    assert_eq!(fs::read_to_string(m.path("d42/f123")).unwrap(), "file 42/123\n");
    let (_, peak) = rss_kib(m.daemon_pid);
    println!(
        "100,000 files: mount {:.2}s, daemon RSS {} MiB after mount, find {:.2}s, peak RSS {} MiB",
        mount_time.as_secs_f64(),
        rss / 1024,
        find_time.as_secs_f64(),
        peak / 1024
    );
    assert!(mount_time < Duration::from_secs(10), "mount took {mount_time:?}");
    assert!(peak < 512 << 10, "peak RSS {} MiB", peak / 1024);
}
