//! `incfs`: publish file trees as signed, block-addressed images and read them back lazily.

mod cache;
mod demo;
mod digest;
mod helper;
mod introspect;
mod keys;
mod mount;
mod progress;
mod publish;
mod read;
mod serve;

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "incfs",
    version,
    about = "Incremental FS: publish a file tree as a signed, block-addressed image; mount it and fetch verified blocks on demand",
    long_about = "Incremental FS: publish a file tree once as a signed image of 4 KiB blocks on any static \
HTTP server, S3-compatible store or directory; read it back with every block checked against the \
file's fs-verity Merkle tree.\n\nTypical use:\n  incfs keygen --out publisher\n  incfs pack ./tree ./repo --key publisher.pem\n  \
incfs serve ./repo --listen 127.0.0.1:8080\n  incfs verify http://127.0.0.1:8080 --trust publisher.pub.pem\n  \
incfs mount http://127.0.0.1:8080 /mnt/app --trust publisher.pub.pem\n  incfs status /mnt/app\n  \
incfs pack ./tree ./repo --key publisher.pem   # version 2\n  incfs update /mnt/app\n  \
incfs unmount /mnt/app"
)]
struct Cli {
    /// More log output (-v: info, -vv: debug). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Algorithm {
    Ed25519,
    EcdsaP256,
    #[value(name = "rsa-3072")]
    Rsa3072,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AutoOff {
    Auto,
    Off,
}

/// A size or rate like 512K, 20M, 1.5G (binary units; a trailing B or /s is allowed).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().trim_end_matches("/s").trim_end_matches(['B', 'b']).trim_end_matches('i');
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 1 << 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 1 << 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    match num.trim().parse::<f64>() {
        Ok(n) if n.is_finite() && n >= 0.0 => Ok((n * mult as f64) as u64),
        _ => Err(format!("{s:?} is not a size: write it like 800K, 20M or 2G")),
    }
}

/// A cache size limit: a size of at least 8 MiB (smaller ones leave no room to work in).
fn parse_cache_size(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        n if n < 8 << 20 => Err(format!("{s:?} is too small for a cache: give at least 8M")),
        n => Ok(n),
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum CompressionArg {
    Lz4,
    Zstd,
    None,
}

#[derive(Subcommand)]
enum Command {
    /// Create a publisher key pair: NAME.pem (PKCS#8 private key, mode 0600) and NAME.pub.pem
    /// (SubjectPublicKeyInfo public key). Keys from `openssl genpkey` work just as well.
    Keygen {
        #[arg(long, value_enum, default_value = "ed25519")]
        algorithm: Algorithm,
        /// Output name: writes NAME.pem and NAME.pub.pem.
        #[arg(long)]
        out: PathBuf,
        /// Replace existing key files.
        #[arg(long)]
        force: bool,
    },
    /// Print each file's fs-verity digest (SHA-256, 4096-byte blocks), exactly as
    /// `fsverity digest --hash-alg=sha256 --block-size=4096 FILE` does.
    Digest {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Publish SRC_DIR as the next version of the repository REPO_DIR (created if missing).
    ///
    /// Blocks are deduplicated by content against everything already in the repository, so a
    /// new version stores only the blocks that changed. The same tree, options and key always
    /// give byte-identical output.
    Pack {
        src_dir: PathBuf,
        repo_dir: PathBuf,
        /// Private key (PEM) to sign the manifest with.
        #[arg(long)]
        key: PathBuf,
        /// Image name (default: the previous version's name, else SRC_DIR's name).
        #[arg(long)]
        name: Option<String>,
        /// Version number (default: the latest version + 1; must be larger).
        #[arg(long)]
        version: Option<u64>,
        /// Block compression; a block that does not shrink is stored raw either way.
        #[arg(long, value_enum, default_value = "zstd")]
        compression: CompressionArg,
        /// zstd level (1-19). Every 4 KiB block is compressed on its own, where higher levels
        /// gain little: 3 is 0.8% smaller than the default 2 on /usr/share, and 10% slower.
        #[arg(long, default_value_t = incfs_format::Compression::DEFAULT_ZSTD_LEVEL, value_parser = clap::value_parser!(i32).range(1..=19))]
        zstd_level: i32,
        /// Compress new blocks with a zstd dictionary: the repository's newest, or one trained
        /// on a sample of this tree (64 KiB, stored as an object and named in the signed
        /// manifest; a client fetches it once). Blocks of earlier versions keep theirs, so a new
        /// version fetches only what changed. On text-heavy trees blocks are ~1% smaller and
        /// decode ~7% faster; on machine code it gains nothing. Needs incfs 2026-12 or newer
        /// with dictionaries to read (manifest format 4).
        #[arg(long)]
        dictionary: bool,
        /// With --dictionary: train a new dictionary even if the repository has one (when the
        /// tree's content has changed in kind).
        #[arg(long, requires = "dictionary")]
        new_dictionary: bool,
        /// Start a new object after this many MiB.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
        object_mib: u64,
        /// Access profile (from `incfs mount --record-profile`): its files are laid out first,
        /// in its order, and it is published beside the manifest, so that a fresh mount fetches
        /// what the recorded program reads first, in a few large requests.
        #[arg(long, value_name = "FILE")]
        profile: Option<PathBuf>,
        /// Sign an expiry into the manifest: a time from now (like 30d, 12h) or a UTC date
        /// (like 2027-01-31T00:00:00Z). Mounts refuse the manifest from a source after it, so a
        /// server cannot keep clients on an old version unnoticed; publish again before then
        /// (packing an unchanged tree costs only a new manifest). Needs incfs 2026-12 or newer
        /// to read (manifest format 2).
        #[arg(long, value_name = "WHEN")]
        expires: Option<String>,
        /// No progress display.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Check a repository completely: signature, every object, every Merkle tree against the
    /// signed root, every block against its tree. Lists each problem with path and block number
    /// and exits with status 1 if there is any.
    Verify {
        /// Repository: a directory, http(s):// URL or s3://bucket/prefix.
        repo: String,
        /// Trusted publisher public key (PEM); repeat for several.
        #[arg(long, required = true)]
        trust: Vec<PathBuf>,
        /// Check this version instead of the latest.
        #[arg(long)]
        version: Option<u64>,
        /// Do not count an expired manifest as a problem.
        #[arg(long)]
        allow_expired: bool,
        /// Give up on a request to the source that has not completed in this time (like 30s).
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        #[arg(short, long)]
        quiet: bool,
    },
    /// Fetch a whole image into a new directory, every block verified before it is written.
    Extract {
        /// Repository: a directory, http(s):// URL or s3://bucket/prefix.
        repo: String,
        /// Destination directory (must not exist or be empty).
        dest: PathBuf,
        #[arg(long, required = true)]
        trust: Vec<PathBuf>,
        #[arg(long)]
        version: Option<u64>,
        /// Extract even if the manifest's signed expiry has passed.
        #[arg(long)]
        allow_expired: bool,
        /// Give up on a request to the source that has not completed in this time (like 30s).
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        #[arg(short, long)]
        quiet: bool,
    },
    /// Serve a repository directory over HTTP (GET/HEAD, single ranges, ETag, keep-alive).
    ///
    /// Prints the URL it serves on, then runs until SIGINT or SIGTERM.
    Serve {
        repo_dir: PathBuf,
        /// Address to listen on; port 0 picks a free port.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
    },
    /// Remove old versions from a repository directory, keeping the newest --keep, and every
    /// object that only removed versions read from. Clients still on a removed version can no
    /// longer fetch what they lack of it; `incfs update` moves them on.
    Prune {
        repo_dir: PathBuf,
        /// How many of the newest versions to keep (at least 1).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        keep: u64,
        /// Say what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Sign a push of FILE for `incfs add`: the signature binds its fs-verity digest to one
    /// image, one path and one mode (docs/loader.md section 3), so it cannot be replayed
    /// anywhere else. Written raw, in the key's scheme, to OUT.
    SignFile {
        file: PathBuf,
        /// Publisher private key (PEM), as for `incfs pack`.
        #[arg(long)]
        key: PathBuf,
        /// The image the file may be pushed into (its name in the manifest).
        #[arg(long, value_name = "NAME")]
        image: String,
        /// Where the file may appear inside the image.
        #[arg(long, value_name = "PATH")]
        path: String,
        /// Permission bits it may have, octal [default: FILE's].
        #[arg(long)]
        mode: Option<String>,
        /// Where to write the raw signature [default: FILE.sig].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Mount an image: every file is visible at once, blocks are fetched on first read, verified
    /// against the file's Merkle tree, kept in the local cache and never fetched again.
    ///
    /// Returns once the mount is ready (the daemon keeps running in the background) unless
    /// --foreground. Unmount with `incfs unmount MNT`, `umount MNT` or `fusermount3 -u MNT`.
    Mount {
        /// Repository: http(s):// URL, s3://bucket/prefix (settings from AWS_* variables) or a
        /// local directory.
        source: String,
        mountpoint: PathBuf,
        /// A mirror of the same repository, tried when the others fail (repeatable).
        #[arg(long = "source", value_name = "SOURCE")]
        mirrors: Vec<String>,
        /// Trusted publisher public key (PEM); repeat for several.
        #[arg(long, required = true)]
        trust: Vec<PathBuf>,
        /// The image expected (its name in the signed manifest): anything else is refused. A
        /// cache remembers the image each source served and refuses a source that starts
        /// serving another one; naming the new image here accepts the change.
        #[arg(long, value_name = "NAME")]
        image: Option<String>,
        /// Accept a manifest whose signed expiry has passed (`incfs pack --expires`), here and
        /// for every later update of this mount.
        #[arg(long)]
        allow_expired: bool,
        /// Cache directory [default: $XDG_CACHE_HOME/incfs, /var/cache/incfs as root,
        /// ~/.cache/incfs otherwise].
        #[arg(long)]
        cache: Option<PathBuf>,
        /// A read whose data cannot be fetched within this time fails with ETIME
        /// ("Timer expired"). Written like 500ms, 3s, 2m.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        read_timeout: std::time::Duration,
        /// Stay in the foreground (logs on stderr) instead of returning once mounted.
        #[arg(long)]
        foreground: bool,
        /// FUSE request threads.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64))]
        threads: u32,
        /// Ranged GETs in flight at once for readahead and background completion (each up to
        /// 2 MiB, so this also bounds the fetched bytes they buffer); a read's own requests
        /// come on top. Doubled while the source's round trip is 15 ms or more (a long link
        /// needs more bytes in flight to stay busy).
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64))]
        parallel: u32,
        /// When a read finds a small file cold, also fetch the small files packed within SIZE
        /// before and after it, in the same request (kept in memory, unverified, at most 1 MiB,
        /// until they are read, then verified like any fetched data). Files used together are
        /// usually packed together (a package's modules, a directory's icons): one round trip
        /// instead of one per file. 0 fetches only the file itself.
        #[arg(long, value_name = "SIZE", default_value = "64K", value_parser = parse_size)]
        nearby: u64,
        /// Fetch every missing block in the background, at low priority (reads that wait for
        /// data always go first), so that the mount ends up needing no network at all.
        #[arg(long, value_enum, default_value = "on")]
        background: OnOff,
        /// Cap on background fetching, bytes per second (like 2M); reads are not capped.
        #[arg(long, value_name = "RATE", value_parser = parse_size)]
        bandwidth: Option<u64>,
        /// Mount the image kept in the cache without contacting any source (fails if the cache
        /// has none). Without it, a mount still falls back to the cache when no source answers.
        #[arg(long)]
        offline: bool,
        /// Open complete files through FUSE passthrough: the kernel reads a verified plain copy
        /// directly and reads never reach the daemon. Needs CAP_SYS_ADMIN; without it, reads go
        /// through the daemon as with `off`.
        #[arg(long, value_enum, default_value = "auto")]
        passthrough: AutoOff,
        /// Space for passthrough's plain copies (least recently used dropped beyond it)
        /// [default: a quarter of the cache's filesystem].
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        plain_limit: Option<u64>,
        /// Keep the whole cache directory (blocks, metadata, plain copies, journals) within SIZE
        /// (like 10G): least recently used data is evicted to make room, background completion
        /// stops at the limit. Recorded in the cache, so every mount sharing it honours it; a
        /// smaller recorded limit stays (`incfs cache limit` sets it). At least 8M.
        #[arg(long, value_name = "SIZE", value_parser = parse_cache_size)]
        cache_size: Option<u64>,
        /// Fetch this path of the image (a file or a directory) once mounted and pin it: it is
        /// never evicted, so it reads offline whatever the cache limit (as `incfs pin`;
        /// repeatable).
        #[arg(long, value_name = "PATH")]
        pin: Vec<String>,
        /// Fetch in the order of this access profile first (instead of the profile published
        /// with the image, if any).
        #[arg(long, value_name = "FILE")]
        profile: Option<PathBuf>,
        /// Record which blocks are read first, in order, to FILE (updated every second and at
        /// unmount), for `incfs pack --profile`. Turns passthrough off for this mount.
        #[arg(long, value_name = "FILE")]
        record_profile: Option<PathBuf>,
        /// Serve Prometheus metrics at http://ADDR/metrics (like 127.0.0.1:9100).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
        /// Look for a newer version this often (like 30s, 5m) and switch to it live, as
        /// `incfs update` does.
        #[arg(long, value_name = "INTERVAL", value_parser = humantime::parse_duration)]
        follow: Option<std::time::Duration>,
        /// A data loader (run with `sh -c`, restarted when it exits): it is told of every read
        /// waiting for data on its stdin and answers with blocks on its stdout (docs/loader.md).
        /// Data blocks then come only from it; SOURCE still gives the manifest and Merkle trees.
        #[arg(long, value_name = "CMD")]
        loader: Option<String>,
        /// Let loaders (--loader, and loader sessions on the control socket) push new files
        /// into the mount, signed as for `incfs add`; without it they may only fill blocks.
        #[arg(long)]
        allow_loader_add: bool,
    },
    /// The reads of a mount waiting for data now: serial, age, file id, path, blocks.
    Pending {
        mountpoint: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Stream a mount's read log: one line per read the daemon answers (file id, path, first
    /// block, block count, whether it waited), until Ctrl-C. Reads served by passthrough or the
    /// page cache never reach the daemon and are not logged.
    Log {
        mountpoint: PathBuf,
        /// One JSON record per line.
        #[arg(long)]
        json: bool,
    },
    /// List a mount's regular files with their stable id and blocks present.
    Files {
        mountpoint: PathBuf,
        /// Only files not yet complete.
        #[arg(long)]
        incomplete: bool,
        #[arg(long)]
        json: bool,
    },
    /// Push a single new file into a live mount, without a new manifest: PATH appears at once
    /// (its directory must exist, the name must be free); its blocks come from fills (`incfs
    /// fill`, a loader, or --fill now) and are verified against FILE's Merkle tree, accepted only
    /// if a trusted key signed this push: FILE's digest at PATH with this mode in this image
    /// (`incfs sign-file FILE --key KEY --image NAME --path PATH`).
    Add {
        mountpoint: PathBuf,
        /// Where the file appears inside the image.
        path: PathBuf,
        /// The file's content (its size and Merkle tree are computed from it).
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// The push's signature, as written by `incfs sign-file` for this image, PATH and mode.
        #[arg(long, value_name = "SIG")]
        signature: PathBuf,
        /// Permission bits, octal, as signed [default: FILE's].
        #[arg(long)]
        mode: Option<String>,
        /// Fill every block from FILE right away.
        #[arg(long)]
        fill: bool,
    },
    /// Push a file's blocks into a mount from a local copy of it: each block is verified against
    /// the file's Merkle tree before it is kept, exactly like a fetched one; waiting reads wake.
    /// Exits 1 if any block was refused.
    Fill {
        mountpoint: PathBuf,
        /// The file inside the image (relative to the mountpoint, or under it).
        path: PathBuf,
        /// The local copy to take the blocks from.
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// Only these blocks (like 0-15 or 7) [default: every block].
        #[arg(long, value_name = "RANGE")]
        blocks: Option<String>,
    },
    /// Switch a live mount to another version of its image: added files appear, removed ones
    /// disappear, changed files show their new content from their next open (a file already open
    /// keeps reading the version it opened). Only blocks the cache lacks are fetched, when read.
    Update {
        mountpoint: PathBuf,
        /// The version to switch to [default: the newest published].
        #[arg(long, value_name = "VERSION")]
        to: Option<u64>,
        /// Allow switching to an older version than the newest this mount or cache accepted.
        #[arg(long)]
        allow_rollback: bool,
        /// Accept a manifest whose signed expiry has passed.
        #[arg(long)]
        allow_expired: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Fetch the named files or trees of a mount now, ahead of everything else, with a progress
    /// bar; returns when they are complete (exit 0) or when fetching makes no progress for
    /// --stall-timeout (exit 2).
    Prefetch {
        mountpoint: PathBuf,
        /// Paths inside the image (relative to the mountpoint, or under it); default: all.
        paths: Vec<PathBuf>,
        /// Give up when nothing arrives for this long.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        stall_timeout: std::time::Duration,
        #[arg(short, long)]
        quiet: bool,
    },
    /// Pin files of a mount: fetch them now (with a progress bar), then keep them in the cache
    /// whatever its limit, so that they read with the network gone. Pinned data must fit
    /// under the cache's limit.
    Pin {
        mountpoint: PathBuf,
        /// Paths inside the image (relative to the mountpoint, or under it); default: all.
        paths: Vec<PathBuf>,
        #[arg(short, long)]
        quiet: bool,
    },
    /// Unpin files of a mount: they may be evicted again.
    Unpin {
        mountpoint: PathBuf,
        /// Paths inside the image; default: all.
        paths: Vec<PathBuf>,
    },
    /// Unmount an incfs mount (the daemon then exits).
    Unmount { mountpoint: PathBuf },
    /// Replace a mount's daemon by a new process without unmounting (an upgrade): open files
    /// stay open, reads in progress complete, counters carry over. The mount's supervisor
    /// starts the new daemon and gives it the FUSE connection; if the new binary fails to
    /// start, the previous one is started again and the command fails.
    Restart {
        mountpoint: PathBuf,
        /// The incfs binary to run (default: the path the mount was started from, which now
        /// holds whatever was installed there since).
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
        /// How long to wait for the new daemon to serve.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Show a mount's state: image, sources, blocks present, bytes fetched and stored, read and
    /// fetch counters. With PATH, that file's present block ranges.
    Status {
        mountpoint: PathBuf,
        /// A path inside the image (relative to the mountpoint, or under it).
        path: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Live view: total progress, rate, ETA and the files being fetched, until Ctrl-C.
        #[arg(long, conflicts_with_all = ["json", "path"])]
        watch: bool,
    },
    /// Check a cache offline: every stored block against its hash, every cached Merkle tree
    /// against its signed root, every presence record against the blocks really stored. Damaged
    /// blocks and pieces are dropped (a mount fetches them again) and wrong presence bits cleared.
    /// Exits 1 if anything was damaged. Refuses a cache in use by a mount.
    Fsck {
        cache: PathBuf,
        /// Report only; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Look into a cache directory and clean it: `ls` (images), `du` (bytes by kind), `gc`
    /// (drop what no image references), `rm IMAGE`, `limit [SIZE|none]`.
    Cache {
        #[command(subcommand)]
        action: CacheAction,
    },
    /// Run the whole job end to end on a built-in sample tree: make a key, pack, serve on
    /// 127.0.0.1, verify and extract over HTTP, and compare with the original.
    Demo {
        /// Work directory to keep (default: a temporary one, removed afterwards).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct CacheArgs {
    /// Cache directory [default: as for mount].
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum CacheAction {
    /// The images the cache holds: version, files, bytes, present, pinned, last used, mounted.
    Ls {
        #[command(flatten)]
        args: CacheArgs,
    },
    /// Bytes by kind (blocks, metadata, unindexed, journals, plain copies, database, other),
    /// the limit, and how much eviction may take.
    Du {
        #[command(flatten)]
        args: CacheArgs,
    },
    /// Drop what no recorded image references (older versions' blocks after `update`, images
    /// removed), then compact. Safe beside mounts: a mount still reading a dropped block (a
    /// file kept open across an update) fetches it again.
    Gc {
        #[command(flatten)]
        args: CacheArgs,
    },
    /// Forget an image and drop its data (refused while it is mounted).
    Rm {
        image: String,
        #[command(flatten)]
        args: CacheArgs,
    },
    /// Show the cache's size limit, or set it exactly (like 10G; `none` removes it). Mounts
    /// sharing the cache follow it within a second.
    Limit {
        size: Option<String>,
        #[command(flatten)]
        args: CacheArgs,
    },
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .with_target(false)
        .init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn main() {
    // Called as a mount helper (mount -t fuse.incfs, /etc/fstab)? Then it means `incfs mount`.
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let args = match helper::mount_command(&raw, |w| Cli::command().find_subcommand(w).is_some()) {
        None => raw,
        Some(Ok(translated)) => std::iter::once(raw[0].clone()).chain(translated).collect(),
        Some(Err(e)) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    mount::set_command_line(args[1..].to_vec());
    let cli = Cli::parse_from(&args);
    // A mount daemon's log is read after the fact: keep what it did (info), not only warnings.
    let floor = if matches!(cli.command, Command::Mount { .. }) { 1 } else { 0 };
    init_logging(cli.verbose.max(floor));
    let result = match cli.command {
        Command::Keygen { algorithm, out, force } => keys::keygen(
            match algorithm {
                Algorithm::Ed25519 => incfs_sign::KeyAlgorithm::Ed25519,
                Algorithm::EcdsaP256 => incfs_sign::KeyAlgorithm::EcdsaP256,
                Algorithm::Rsa3072 => incfs_sign::KeyAlgorithm::Rsa3072,
            },
            &out,
            force,
        ),
        Command::Digest { files } => digest::run(&files),
        Command::Prune { repo_dir, keep, dry_run } => publish::prune(&repo_dir, keep as usize, dry_run),
        Command::SignFile { file, key, image, path, mode, out } => {
            introspect::sign_file(&file, &key, &image, &path, mode.as_deref(), out.as_deref())
        }
        Command::Pack {
            src_dir,
            repo_dir,
            key,
            name,
            version,
            compression,
            zstd_level,
            dictionary,
            new_dictionary,
            object_mib,
            profile,
            expires,
            quiet,
        } => {
            let compression = match compression {
                CompressionArg::Lz4 => incfs_format::Compression::Lz4,
                CompressionArg::Zstd => incfs_format::Compression::Zstd { level: zstd_level },
                CompressionArg::None => incfs_format::Compression::None,
            };
            let expires =
                expires.as_deref().map(|w| publish::parse_expiry(w, incfs_fetch::image::unix_now())).transpose();
            expires.and_then(|expires| {
                let profile = publish::load_profile(profile.as_deref())?;
                let object_size = object_mib << 20;
                let dictionary = match (dictionary, new_dictionary) {
                    (_, true) => incfs_pack::DictionaryMode::New,
                    (true, false) => incfs_pack::DictionaryMode::Use,
                    (false, false) => incfs_pack::DictionaryMode::Off,
                };
                let opts =
                    incfs_pack::PackOptions { name, version, compression, object_size, profile, expires, dictionary };
                publish::pack(&src_dir, &repo_dir, &key, &opts, quiet)
            })
        }
        Command::Verify { repo, trust, version, allow_expired, timeout, quiet } => {
            let how = read::ReadArgs { version, allow_expired, timeout, quiet };
            runtime().and_then(|rt| rt.block_on(read::verify(&repo, &trust, &how)))
        }
        Command::Extract { repo, dest, trust, version, allow_expired, timeout, quiet } => {
            let how = read::ReadArgs { version, allow_expired, timeout, quiet };
            runtime().and_then(|rt| rt.block_on(read::extract(&repo, &dest, &trust, &how)))
        }
        Command::Serve { repo_dir, listen } => runtime().and_then(|rt| rt.block_on(serve::run(&repo_dir, listen))),
        Command::Mount {
            source,
            mountpoint,
            mirrors,
            trust,
            image,
            allow_expired,
            cache,
            read_timeout,
            foreground,
            threads,
            parallel,
            nearby,
            background,
            bandwidth,
            offline,
            passthrough,
            plain_limit,
            cache_size,
            pin,
            profile,
            record_profile,
            metrics,
            follow,
            loader,
            allow_loader_add,
        } => {
            let mut sources = vec![source];
            sources.extend(mirrors);
            let settings = incfs_fs::MountSettings {
                read_timeout,
                threads: threads as usize,
                parallel: parallel as usize,
                nearby,
                background: background == OnOff::On,
                bandwidth,
                offline,
                passthrough: passthrough == AutoOff::Auto,
                plain_limit,
                cache_size,
                pin,
                profile,
                record_profile,
                metrics,
                follow,
                loader,
                image,
                allow_expired,
                loader_add: allow_loader_add,
            };
            let args = mount::MountArgs { sources, mountpoint, trust, cache, foreground, settings };
            mount::mount(args)
        }
        Command::Prefetch { mountpoint, paths, stall_timeout, quiet } => {
            mount::prefetch(&mountpoint, &paths, stall_timeout, quiet)
        }
        Command::Unmount { mountpoint } => mount::unmount(&mountpoint),
        Command::Restart { mountpoint, binary, timeout } => mount::restart(&mountpoint, binary.as_deref(), timeout),
        Command::Pin { mountpoint, paths, quiet } => mount::pin(&mountpoint, &paths, true, quiet),
        Command::Unpin { mountpoint, paths } => mount::pin(&mountpoint, &paths, false, true),
        Command::Update { mountpoint, to, allow_rollback, allow_expired, json } => {
            mount::update(&mountpoint, to, allow_rollback, allow_expired, json)
        }
        Command::Pending { mountpoint, json } => introspect::pending(&mountpoint, json),
        Command::Log { mountpoint, json } => introspect::log(&mountpoint, json),
        Command::Files { mountpoint, incomplete, json } => introspect::files(&mountpoint, incomplete, json),
        Command::Add { mountpoint, path, from, signature, mode, fill } => {
            introspect::add(&mountpoint, &path, &from, &signature, mode.as_deref(), fill)
        }
        Command::Fill { mountpoint, path, from, blocks } => {
            introspect::fill(&mountpoint, &path, &from, blocks.as_deref())
        }
        Command::Status { mountpoint, path, json, watch } if watch => {
            let _ = (path, json);
            mount::watch(&mountpoint)
        }
        Command::Status { mountpoint, path, json, .. } => mount::status(&mountpoint, path.as_deref(), json),
        Command::Fsck { cache, dry_run } => mount::fsck(&cache, dry_run),
        Command::Cache { action } => {
            let dir = |a: &CacheArgs| a.cache.clone().unwrap_or_else(mount::default_cache);
            match action {
                CacheAction::Ls { args } => cache::ls(&dir(&args), args.json),
                CacheAction::Du { args } => cache::du(&dir(&args), args.json),
                CacheAction::Gc { args } => cache::gc(&dir(&args), args.json),
                CacheAction::Rm { image, args } => cache::rm(&dir(&args), &image, args.json),
                CacheAction::Limit { size, args } => cache::limit(&dir(&args), size.as_deref(), args.json),
            }
        }
        Command::Demo { dir } => runtime().and_then(|rt| rt.block_on(demo::run(dir))),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    }
}
