//! External data loaders (`docs/loader.md`): a process on stdin/stdout (`incfs mount --loader
//! CMD`, restarted when it exits) or a client of the control socket (`{"cmd":"loader"}`) is told
//! of every read waiting for data and answers with the blocks. Filled blocks are verified
//! exactly like fetched ones ([`Reader::fill`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use incfs_format::Codec;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::broadcast::error::RecvError;

use crate::live::Live;
use crate::pending::PendingRead;
use crate::reader::FileRef;

/// Longest line a loader may send (a block, base64, with its fields, many times over).
const MAX_LINE: usize = 1 << 20;
/// A loader that exits is started again after this long, doubling up to [`MAX_RESTART`].
const FIRST_RESTART: Duration = Duration::from_millis(500);
const MAX_RESTART: Duration = Duration::from_secs(30);

/// A message from a loader.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum FromLoader {
    Fill {
        /// The file: its id, or its path as printed.
        id: Option<String>,
        path: Option<String>,
        block: u64,
        /// `raw` (default), `lz4`, `zstd` or `zero`.
        #[serde(default)]
        codec: Option<String>,
        /// The stored bytes, base64 (empty for `zero`).
        #[serde(default)]
        data: String,
    },
    /// A file pushed in (as `incfs add`).
    Add { path: String, mode: u16, size: u64, root_hash: String, tree: String, signature: String },
}

/// A message to a loader.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ToLoader<'a> {
    Pending(&'a PendingRead),
    Filled {
        path: &'a str,
        block: u64,
    },
    Added {
        path: &'a str,
        digest: &'a str,
    },
    Rejected {
        path: Option<&'a str>,
        block: Option<u64>,
        reason: String,
    },
    /// The loader fell behind and missed this many pending reads; the reads still waiting follow.
    Lost {
        count: u64,
    },
}

pub fn codec_by_name(name: &str) -> Option<Codec> {
    match name {
        "raw" => Some(Codec::Raw),
        "lz4" => Some(Codec::Lz4),
        "zstd" => Some(Codec::Zstd),
        "zero" => Some(Codec::Zero),
        _ => None,
    }
}

/// The file named by `id` or `path` in the version being served.
pub fn resolve(live: &Live, id: Option<&str>, path: Option<&str>) -> Result<FileRef, String> {
    let view = live.views.current();
    let idx = match (id, path) {
        (_, Some(p)) => incfs_format::profile::unescape_path(p).and_then(|raw| view.manifest.resolve(&raw)),
        (Some(id), None) => view.index_by_id(id),
        (None, None) => return Err("a fill names its file by \"id\" or \"path\"".into()),
    };
    let what = path.or(id).unwrap_or_default();
    let idx = idx.ok_or_else(|| format!("{what}: not in the image"))?;
    view.file(idx).ok_or_else(|| format!("{what}: not a regular file"))
}

/// Push a file in (`incfs add`, a loader's `add`) from its encoded fields: the escaped path, the
/// root hash in hex, the compact tree and the signature in base64. Returns `{path, digest}`.
pub async fn add(
    live: &Live,
    path: &str,
    mode: u16,
    size: u64,
    root: &str,
    tree: &str,
    signature: &str,
) -> Result<serde_json::Value, String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let raw = incfs_format::profile::unescape_path(path).ok_or_else(|| format!("{path}: badly escaped path"))?;
    let root: incfs_format::Hash = hex::decode(root)
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| "root_hash: 64 hex digits expected".to_string())?;
    let tree = b64.decode(tree).map_err(|e| format!("tree is not base64: {e}"))?;
    let signature = b64.decode(signature).map_err(|e| format!("signature is not base64: {e}"))?;
    let digest = live.add(&raw, mode, size, root, &tree, &signature).await.map_err(|e| e.to_string())?;
    Ok(serde_json::json!({ "path": path, "digest": incfs_verity::format_digest(&digest) }))
}

/// Decode and apply one fill; `Ok` names what was filled.
pub async fn fill(live: &Live, f: &FileRef, block: u64, codec: Option<&str>, data: &str) -> Result<(), String> {
    let codec = match codec {
        None => Codec::Raw,
        Some(c) => codec_by_name(c).ok_or_else(|| format!("unknown codec {c:?}; use raw, lz4, zstd or zero"))?,
    };
    let bytes =
        base64::engine::general_purpose::STANDARD.decode(data).map_err(|e| format!("data is not base64: {e}"))?;
    live.reader.fill(f, block, codec, &bytes).await.map_err(|e| e.to_string())
}

async fn send(w: &mut (impl AsyncWrite + Unpin), msg: &ToLoader<'_>) -> std::io::Result<()> {
    let mut line = serde_json::to_string(msg).expect("messages serialize");
    line.push('\n');
    w.write_all(line.as_bytes()).await?;
    w.flush().await
}

/// Talk to one loader until it goes away: every read waiting now and from now on is sent to
/// it, and its fills are applied and answered.
pub async fn session(live: Arc<Live>, mut from: impl AsyncBufRead + Unpin, mut to: impl AsyncWrite + Unpin) {
    let pending = &live.reader.pending;
    // Subscribed before listing: a read beginning in between is sent twice, never missed.
    let mut began = pending.subscribe();
    for p in pending.list() {
        if send(&mut to, &ToLoader::Pending(&p)).await.is_err() {
            return;
        }
    }
    let mut line = Vec::new();
    loop {
        let mut limited = (&mut from).take((MAX_LINE + 1).saturating_sub(line.len()) as u64);
        tokio::select! {
            // Cancel-safe: bytes read before another branch won stay in `line`.
            r = limited.read_until(b'\n', &mut line) => {
                match r {
                    Ok(0) | Err(_) => return,
                    Ok(_) if line.len() > MAX_LINE && !line.ends_with(b"\n") => {
                        let reason = format!("line longer than {MAX_LINE} bytes; closing");
                        let _ = send(&mut to, &ToLoader::Rejected { path: None, block: None, reason }).await;
                        return;
                    }
                    Ok(_) => {}
                }
                let reply = answer(&live, &line).await;
                line.clear();
                let msg = match &reply {
                    Ok(Answered::Filled(path, block)) => ToLoader::Filled { path, block: *block },
                    Ok(Answered::Added(path, digest)) => ToLoader::Added { path, digest },
                    Err((path, block, reason)) => {
                        ToLoader::Rejected { path: path.as_deref(), block: *block, reason: reason.clone() }
                    }
                };
                if send(&mut to, &msg).await.is_err() {
                    return;
                }
            }
            p = began.recv() => {
                let sent = match p {
                    Ok(p) => send(&mut to, &ToLoader::Pending(&p)).await,
                    Err(RecvError::Lagged(count)) => {
                        let mut r = send(&mut to, &ToLoader::Lost { count }).await;
                        for p in pending.list() {
                            if r.is_ok() {
                                r = send(&mut to, &ToLoader::Pending(&p)).await;
                            }
                        }
                        r
                    }
                    Err(RecvError::Closed) => return,
                };
                if sent.is_err() {
                    return;
                }
            }
        }
    }
}

enum Answered {
    Filled(String, u64),
    Added(String, String),
}

type Answer = Result<Answered, (Option<String>, Option<u64>, String)>;

async fn answer(live: &Live, line: &[u8]) -> Answer {
    let msg: FromLoader = serde_json::from_slice(line).map_err(|e| (None, None, format!("bad message: {e}")))?;
    match msg {
        FromLoader::Fill { id, path, block, codec, data } => {
            let f = resolve(live, id.as_deref(), path.as_deref()).map_err(|e| (path.clone(), Some(block), e))?;
            let label = f.label.to_string();
            match fill(live, &f, block, codec.as_deref(), &data).await {
                Ok(()) => Ok(Answered::Filled(label, block)),
                Err(e) => Err((Some(label), Some(block), e)),
            }
        }
        FromLoader::Add { path, .. } if !live.policy.loader_add => {
            let why = "this mount takes no new files from loaders (mount with --allow-loader-add)";
            Err((Some(path), None, why.to_string()))
        }
        FromLoader::Add { path, mode, size, root_hash, tree, signature } => {
            match add(live, &path, mode, size, &root_hash, &tree, &signature).await {
                Ok(v) => Ok(Answered::Added(path, v["digest"].as_str().unwrap_or_default().to_string())),
                Err(e) => Err((Some(path), None, e)),
            }
        }
    }
}

/// `incfs mount --loader CMD`: run `sh -c CMD` with its stdin and stdout as a loader session,
/// and start it again when it exits (with backoff), for the mount's life.
pub async fn run_command(live: Arc<Live>, command: String) {
    let mut delay = FIRST_RESTART;
    loop {
        let started = Instant::now();
        let child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&command)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        match child {
            Ok(mut child) => {
                tracing::info!("loader started (pid {}): {command}", child.id().unwrap_or(0));
                let (stdin, stdout) = (child.stdin.take().unwrap(), child.stdout.take().unwrap());
                session(live.clone(), tokio::io::BufReader::new(stdout), stdin).await;
                let status = child.wait().await;
                tracing::warn!("loader exited ({status:?}); reads that need data wait for the next one");
            }
            Err(e) => tracing::error!("cannot start the loader {command:?}: {e}"),
        }
        if started.elapsed() > MAX_RESTART {
            delay = FIRST_RESTART;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_RESTART);
    }
}
