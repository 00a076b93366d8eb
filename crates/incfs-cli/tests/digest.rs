//! `incfs digest` must print exactly what `fsverity digest` prints, for every size class.

mod common;

use common::*;
use rand::{Rng, SeedableRng};

#[test]
fn digests_match_fsverity_for_220_files() {
    let dir = tempdir();
    let mut sizes: Vec<usize> = vec![
        0,
        1,
        4095,
        4096,
        4097,
        128 * 4096,
        128 * 4096 + 1,
        129 * 4096,
        16384 * 4096,
        16384 * 4096 + 1,
        (64 << 20) + 12345,
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(2024);
    while sizes.len() < 220 {
        // Mostly small files, some spanning one or two hash blocks.
        let size = match rng.gen_range(0..10) {
            0..=5 => rng.gen_range(0..20_000),
            6..=8 => rng.gen_range(20_000..1_200_000),
            _ => rng.gen_range(1_200_000..5_000_000),
        };
        sizes.push(size);
    }
    let mut paths = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let p = dir.path().join(format!("f{i:03}-{size}"));
        let mut data = random_bytes(i as u64, size);
        // Some files have zero runs and trailing zeros, which fs-verity pads the same way.
        if i % 3 == 0 && size > 10_000 {
            data[size / 3..size / 2].fill(0);
            let n = data.len();
            data[n - 5000..].fill(0);
        }
        std::fs::write(&p, &data).unwrap();
        paths.push(p.to_str().unwrap().to_string());
    }
    let args: Vec<&str> = paths.iter().map(|s| s.as_str()).collect();
    let mut ours = vec!["digest"];
    ours.extend(&args);
    let ours = incfs_ok(&ours);
    let mut theirs = vec!["digest", "--hash-alg=sha256", "--block-size=4096"];
    theirs.extend(&args);
    let theirs = run("fsverity", &theirs);
    assert_eq!(ours.lines().count(), 220);
    for (a, b) in ours.lines().zip(theirs.lines()) {
        assert_eq!(a, b);
    }
}

#[test]
fn digest_of_missing_file_is_a_clear_error() {
    let out = incfs(&["digest", "/nonexistent/incfs-file"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("cannot open /nonexistent/incfs-file"), "{}", text(&out.stderr));
}
