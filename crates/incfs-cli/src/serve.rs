//! `incfs serve`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use incfs_serve::ServeStats;

pub async fn run(repo: &Path, listen: SocketAddr) -> Result<i32> {
    if !repo.join(incfs_format::layout::LATEST_MANIFEST).is_file() {
        bail!("{} is not an incfs repository (no manifest); create one with incfs pack", repo.display());
    }
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    println!("serving {} at http://{addr}/", repo.display());
    std::io::stdout().flush()?;
    let stats = Arc::new(ServeStats::default());
    incfs_serve::serve(listener, repo.canonicalize()?, stats.clone(), shutdown_signal()).await?;
    eprintln!(
        "served {} requests, {} body bytes",
        stats.requests.load(Ordering::Relaxed),
        stats.body_bytes.load(Ordering::Relaxed)
    );
    Ok(0)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
