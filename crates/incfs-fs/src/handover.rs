//! The link between a mount's supervisor and its worker.
//!
//! A mount is two processes. The **supervisor** ([`crate::supervisor`]) mounts, holds the mount
//! and the `/dev/fuse` fd, and does nothing else; the **worker** (the daemon proper: manifest,
//! store, fetching, FUSE requests, control socket) is its child. A worker that dies (`kill -9`,
//! a panic, the OOM killer) is replaced by a new one that takes the same connection over, and
//! `incfs restart` replaces it on purpose (a new binary). The kernel keeps requests a dead
//! worker had read but not answered on the connection, and sends them again when told
//! (`FUSE_NOTIFY_RESEND`), so no read is lost; the worker threads must read the supervisor's
//! own fd, not clones of it, or the kernel would fail those requests when the clone closes.
//!
//! What a new worker must know to answer exactly as the old one did is kept by the supervisor,
//! told by the worker as it changes: the view served (signed manifest bytes and kernel inode
//! numbers, which after an update or a push are not those of a fresh view), how each inode is
//! opened (page cache, or passthrough over which backing id: the kernel refuses to mix them on
//! one inode), and, on a planned restart, the counters.
//!
//! Wire: a socketpair; each message a little-endian `u32` length then that much JSON. The fd
//! answering [`ToSupervisor::Mount`] travels as `SCM_RIGHTS` with one byte after
//! [`ToWorker::Mounted`].

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The worker's end of its link to the supervisor (an fd number).
pub const SUPERVISOR_FD_ENV: &str = "INCFS_SUPERVISOR_FD";

/// A larger frame is a broken peer, not a message (a manifest is at most 128 MiB; base64).
const MAX_FRAME: usize = 192 << 20;

/// What was negotiated at `FUSE_INIT`, which a worker taking over cannot see again.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct InitFacts {
    /// The kernel accepted FUSE passthrough.
    pub passthrough: bool,
}

/// The view served: enough to build it again with the same inode numbers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ViewState {
    /// The signed manifest (its bytes as published), without pushed files (those are restored
    /// from the cache).
    #[serde(with = "b64")]
    pub manifest: Vec<u8>,
    /// Kernel inode number of each inode of the served manifest (pushed files included);
    /// `None`: index + 1, as in a fresh view.
    pub inos: Option<Vec<u64>>,
    /// The largest inode number ever handed out (older views included).
    pub max_ino: u64,
    /// [`shape`] of the served manifest: `inos` applies only to a manifest of the same shape
    /// (pushed files restored in another order would not be).
    #[serde(with = "hex_bytes")]
    pub shape: [u8; 32],
}

/// A digest of which path is which inode index in `m`.
pub fn shape(m: &incfs_format::Manifest) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update((m.inodes.len() as u64).to_le_bytes());
    for (path, idx) in m.walk() {
        h.update((path.len() as u64).to_le_bytes());
        h.update(&path);
        h.update(idx.to_le_bytes());
    }
    h.finalize().into()
}

/// How the kernel has an inode open, as far as a new worker must honour it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OpenMode {
    /// Through the page cache (the daemon serves reads).
    Cached,
    /// Passthrough over this backing id (belongs to the connection, outlives the worker).
    Passthrough(u32),
}

/// What a worker taking over starts from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Takeover {
    /// The mountpoint, canonical (the new worker must not look it up: that is a request to
    /// itself).
    pub mountpoint: PathBuf,
    pub init: InitFacts,
    pub view: ViewState,
    /// Inodes opened by earlier workers; such an inode keeps its mode.
    pub modes: Vec<(u64, OpenMode)>,
    /// Counters of earlier workers (only a planned restart hands them over).
    pub counters: BTreeMap<String, u64>,
    /// Workers replaced so far, and why the last `incfs restart` fell back to the previous
    /// binary, if it did.
    pub restarts: u64,
    pub restart_error: Option<String>,
}

/// Worker to supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum ToSupervisor {
    /// Mount image `name` now (first worker, once it accepted a manifest).
    Mount {
        name: String,
    },
    /// `FUSE_INIT` answered.
    Initialized {
        init: InitFacts,
    },
    /// Serving requests.
    Ready,
    View(ViewState),
    /// `mode: None`: no longer open through this worker's knowledge (last release).
    Mode {
        ino: u64,
        mode: Option<OpenMode>,
    },
    /// `incfs restart`: replace this worker by one started from `binary` (default: the path the
    /// supervisor was started from, which may hold a newer build by now).
    Restart {
        binary: Option<PathBuf>,
    },
    /// The counters, asked for by [`ToWorker::Stop`]; the worker exits right after.
    Counters {
        counters: BTreeMap<String, u64>,
    },
}

/// Supervisor to worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum ToWorker {
    /// The first message: `None` for the first worker (it mounts), else what to take over.
    Hello {
        takeover: Option<Box<Takeover>>,
    },
    /// The fd follows.
    Mounted,
    MountFailed {
        error: String,
    },
    /// Send the counters and exit (a replacement is waiting).
    Stop,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("supervisor link: {0}")]
    Io(#[from] std::io::Error),
    #[error("supervisor link: bad message: {0}")]
    Bad(#[from] serde_json::Error),
    #[error("supervisor link: frame of {0} bytes")]
    TooLarge(usize),
    #[error("supervisor link: expected the /dev/fuse fd")]
    NoFd,
}

/// Encode one message as a frame.
pub fn frame(msg: &impl Serialize) -> Vec<u8> {
    let body = serde_json::to_vec(msg).expect("messages serialize");
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Read one frame from a blocking stream.
pub fn read_frame<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> Result<T, LinkError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(LinkError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(serde_json::from_slice(&body)?)
}

/// Send `fd` over a UNIX socket with one byte of data.
pub fn send_fd(sock: &impl AsRawFd, fd: RawFd) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let fds = [fd];
    let iov = [std::io::IoSlice::new(b"F")];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).map_err(std::io::Error::from)?;
    Ok(())
}

/// Receive an fd sent by [`send_fd`] (blocking).
pub fn recv_fd(sock: &impl AsRawFd) -> Result<OwnedFd, LinkError> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut byte = [0u8; 1];
    let mut iov = [std::io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(std::io::Error::from)?;
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&fd) = fds.first() {
                // SAFETY: the kernel just installed this fd in our table for us; nothing else owns it.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Err(LinkError::NoFd)
}

/// The worker's side of the link. Sends are serialized by a lock (FUSE threads report modes).
pub struct Link {
    write: parking_lot::Mutex<UnixStream>,
    read: parking_lot::Mutex<Option<UnixStream>>,
}

impl Link {
    /// The link this process was started with, if it is a supervised worker.
    pub fn from_env() -> Option<Result<Link, LinkError>> {
        let fd: RawFd = std::env::var(SUPERVISOR_FD_ENV).ok()?.parse().ok()?;
        // Not passed on to anything this worker starts (loaders, fusermount3).
        std::env::remove_var(SUPERVISOR_FD_ENV);
        // SAFETY: the supervisor passed this fd, open, for this process alone; it is taken once
        // (the variable is removed above).
        let stream = unsafe { UnixStream::from_raw_fd(fd) };
        Some((|| {
            nix::fcntl::fcntl(&stream, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
                .map_err(std::io::Error::from)?;
            let read = stream.try_clone()?;
            Ok(Link { write: parking_lot::Mutex::new(stream), read: parking_lot::Mutex::new(Some(read)) })
        })())
    }

    pub fn send(&self, msg: &ToSupervisor) -> Result<(), LinkError> {
        let bytes = frame(msg);
        self.write.lock().write_all(&bytes)?;
        Ok(())
    }

    /// Read the next message (startup only: afterwards the reading end belongs to
    /// [`Link::take_reader`]'s owner).
    pub fn recv(&self) -> Result<ToWorker, LinkError> {
        let mut r = self.read.lock();
        let s = r.as_mut().ok_or_else(|| std::io::Error::other("link reader taken"))?;
        read_frame(s)
    }

    pub fn recv_fd(&self) -> Result<OwnedFd, LinkError> {
        let r = self.read.lock();
        let s = r.as_ref().ok_or_else(|| std::io::Error::other("link reader taken"))?;
        recv_fd(s)
    }

    /// The reading end, for the thread that waits for [`ToWorker::Stop`].
    pub fn take_reader(&self) -> Option<UnixStream> {
        self.read.lock().take()
    }
}

/// A digest as hex in JSON.
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

/// Bytes as base64 in JSON.
mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_through_frames() {
        let msg = ToWorker::Hello {
            takeover: Some(Box::new(Takeover {
                mountpoint: "/mnt/x".into(),
                init: InitFacts { passthrough: true },
                view: ViewState { manifest: vec![0, 1, 2, 255], inos: Some(vec![1, 7, 3]), max_ino: 7, shape: [9; 32] },
                modes: vec![(7, OpenMode::Passthrough(3)), (3, OpenMode::Cached)],
                counters: [("reads_served".to_string(), 5)].into_iter().collect(),
                restarts: 2,
                restart_error: None,
            })),
        };
        let bytes = frame(&msg);
        let back: ToWorker = read_frame(&mut &bytes[..]).unwrap();
        let ToWorker::Hello { takeover: Some(t) } = back else { panic!("{back:?}") };
        assert_eq!(t.view.manifest, vec![0, 1, 2, 255]);
        assert_eq!(t.view.inos, Some(vec![1, 7, 3]));
        assert_eq!(t.view.shape, [9; 32]);
        assert_eq!(t.modes, vec![(7, OpenMode::Passthrough(3)), (3, OpenMode::Cached)]);
        assert_eq!(t.counters["reads_served"], 5);
    }

    #[test]
    fn a_broken_peer_is_an_error_not_an_allocation() {
        let mut bytes = u32::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        assert!(matches!(read_frame::<ToWorker>(&mut &bytes[..]), Err(LinkError::TooLarge(_))));
        let truncated = &frame(&ToWorker::Stop)[..5];
        assert!(matches!(read_frame::<ToWorker>(&mut &truncated[..]), Err(LinkError::Io(_))));
    }

    #[test]
    fn an_fd_crosses_a_socketpair() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut &file, b"hello").unwrap();
        send_fd(&a, file.as_raw_fd()).unwrap();
        let got = std::fs::File::from(recv_fd(&b).unwrap());
        let mut s = String::new();
        std::io::Seek::seek(&mut &got, std::io::SeekFrom::Start(0)).unwrap();
        std::io::Read::read_to_string(&mut &got, &mut s).unwrap();
        assert_eq!(s, "hello");
    }
}
