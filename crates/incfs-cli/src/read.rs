//! `incfs verify` and `incfs extract`: reading an image from a source.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use incfs_fetch::image::ImageError;
use incfs_fetch::{Image, Source, SourceOptions};
use indicatif::HumanBytes;

use crate::keys::load_trusted;
use crate::progress::Reporter;

/// How `verify` and `extract` read an image.
pub struct ReadArgs {
    /// A version instead of the newest.
    pub version: Option<u64>,
    /// Accept (`extract`) or do not report (`verify`) a manifest past its signed expiry.
    pub allow_expired: bool,
    /// Bound on one request to the source.
    pub timeout: std::time::Duration,
    pub quiet: bool,
}

pub async fn open(repo: &str, trust: &[PathBuf], how: &ReadArgs) -> Result<Image> {
    let trust = load_trusted(trust)?;
    let opts = SourceOptions { request_timeout: how.timeout, ..SourceOptions::default() };
    let source = Source::parse(repo, &opts)?;
    let image = match how.version {
        Some(v) => Image::open_version(source, v, &trust).await?,
        None => Image::open(source, &trust).await?,
    };
    image.load_dictionaries().await?;
    Ok(image)
}

pub async fn verify(repo: &str, trust: &[PathBuf], how: &ReadArgs) -> Result<i32> {
    let started = Instant::now();
    let image = match open(repo, trust, how).await {
        Ok(i) => i,
        // The source could not give a manifest at all (unreachable, missing, a response refused
        // as too large...): an error (exit 2), not a finding about the image.
        Err(e) if matches!(e.downcast_ref::<ImageError>(), Some(ImageError::Source(_))) => return Err(e),
        Err(e) => {
            eprintln!("problem: manifest: {e:#}");
            println!("FAILED: the manifest of {repo} cannot be trusted; nothing else was checked");
            return Ok(1);
        }
    };
    let m = image.manifest().clone();
    let reporter = Reporter::new("verifying", how.quiet);
    let mut report = incfs_fetch::verify::verify_image(&image, &reporter).await;
    reporter.finish();
    if let Err(e) = image.check_fresh(how.allow_expired) {
        // Every byte may be right, but mounts will refuse the manifest: the publisher's problem.
        let message = format!("{e}");
        report.problems.insert(0, incfs_fetch::verify::Problem { subject: "manifest".into(), blocks: None, message });
    }
    for p in &report.problems {
        eprintln!("problem: {p}");
    }
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    let what = format!(
        "{} version {}: signature by {}, {} objects, {} files, {} blocks, {} in {:.1}s ({}/s)",
        m.name,
        m.version,
        image.signer().id_hex(),
        m.objects.len(),
        report.files,
        report.blocks,
        HumanBytes(report.bytes),
        secs,
        HumanBytes((report.bytes as f64 / secs) as u64)
    );
    if report.problems.is_empty() {
        println!("OK: {what}");
        Ok(0)
    } else {
        println!("FAILED: {} problems; {what}", report.problems.len());
        Ok(1)
    }
}

pub async fn extract(repo: &str, dest: &Path, trust: &[PathBuf], how: &ReadArgs) -> Result<i32> {
    let started = Instant::now();
    let image = open(repo, trust, how).await?;
    image.check_fresh(how.allow_expired)?;
    let reporter = Reporter::new("extracting", how.quiet);
    let result = incfs_fetch::extract::extract(&image, dest, &reporter).await;
    reporter.finish();
    let s = result.with_context(|| format!("extracting into {}", dest.display()))?;
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    println!(
        "extracted {} version {} into {}: {} entries, {} files, {} verified in {:.1}s ({}/s)",
        image.manifest().name,
        image.manifest().version,
        dest.display(),
        s.entries,
        s.files,
        HumanBytes(s.bytes),
        secs,
        HumanBytes((s.bytes as f64 / secs) as u64)
    );
    Ok(0)
}
