//! Fleets behind the caches they already run: `incfs serve`'s headers let an HTTP cache keep
//! objects for good and the manifest briefly, and many clients behind one nginx caching proxy
//! (`proxy_cache` with the `slice` module, as `docs/deploy.md` shows) cost the origin about one
//! copy of the repository.

mod common;

use std::fs;
use std::time::Duration;

use common::*;

/// nginx as a caching reverse proxy in front of `origin`: ranges cut into 1 MiB slices, each
/// cached on its own, concurrent misses of one slice collapsed into one origin request. The
/// access log records what each request cost the origin (`$upstream_response_length`).
struct CachingProxy {
    url: String,
    dir: tempfile::TempDir,
    _child: ChildGuard,
}

impl CachingProxy {
    fn start(origin: &str) -> CachingProxy {
        let dir = tempdir();
        let port = free_port();
        let d = dir.path().display();
        let conf = dir.path().join("nginx.conf");
        fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{\n\
                   log_format origin '$request_uri $status $upstream_response_length $upstream_cache_status';\n\
                   access_log {d}/access.log origin;\n\
                   log_subrequest on;\n\
                   client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};\n\
                   uwsgi_temp_path {d}; scgi_temp_path {d};\n\
                   proxy_cache_path {d}/cache levels=1:2 keys_zone=incfs:10m max_size=1g inactive=1h use_temp_path=off;\n\
                   server {{\n\
                     listen 127.0.0.1:{port};\n\
                     location / {{\n\
                       slice 1m;\n\
                       proxy_cache incfs;\n\
                       proxy_cache_key $uri$slice_range;\n\
                       proxy_set_header Range $slice_range;\n\
                       proxy_cache_valid 200 206 1h;\n\
                       proxy_cache_lock on;\n\
                       proxy_cache_lock_timeout 30s;\n\
                       proxy_http_version 1.1;\n\
                       proxy_set_header Connection \"\";\n\
                       proxy_pass {origin};\n\
                     }}\n\
                   }}\n\
                 }}\n"
            ),
        )
        .unwrap();
        let child = spawn_nginx(&conf, dir.path(), port);
        CachingProxy { url: format!("http://127.0.0.1:{port}"), dir, _child: child }
    }

    /// (bytes the origin sent, requests, requests answered from the cache) so far.
    fn origin_bytes(&self) -> (u64, usize, usize) {
        let log = fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default();
        let (mut bytes, mut hits) = (0, 0);
        for line in log.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            // Several upstream responses (one per slice) are listed with ", ".
            bytes += f[2..f.len() - 1]
                .iter()
                .flat_map(|v| v.split(','))
                .filter_map(|v| v.trim().parse::<u64>().ok())
                .sum::<u64>();
            hits += usize::from(f.last() == Some(&"HIT"));
        }
        (bytes, log.lines().count(), hits)
    }
}

#[test]
fn serve_tells_caches_what_they_may_keep() {
    let p = Published::new(|src| fs::write(src.join("f"), "x\n").unwrap(), &[]);
    let serve = IncfsServer::start(&p.repo);
    let object = fs::read_dir(p.repo.join("objects")).unwrap().next().unwrap().unwrap().file_name();
    let object = object.to_str().unwrap();
    let headers = |path: &str| run("curl", &["-sSI", &format!("{}/{path}", serve.url)]).to_ascii_lowercase();
    let h = headers(&format!("objects/{object}"));
    assert!(h.contains("cache-control: public, max-age=31536000, immutable"), "{h}");
    assert!(h.contains(&format!("etag: \"{object}\"")), "the object's digest is its ETag: {h}");
    assert!(headers("versions/1.manifest").contains("immutable"));
    let h = headers("manifest");
    assert!(h.contains("cache-control: public, max-age=5") && h.contains("etag:"), "{h}");
}

#[test]
fn five_clients_behind_one_caching_proxy_cost_the_origin_one_copy() {
    let p = Published::new(
        |src| {
            fs::write(src.join("big.bin"), random_bytes(61, 6 << 20)).unwrap();
            fs::create_dir(src.join("lib")).unwrap();
            for i in 0..40 {
                fs::write(src.join(format!("lib/m{i}.py")), format!("# module {i}\n").repeat(50 + i)).unwrap();
            }
        },
        &[],
    );
    let origin = IncfsServer::start(&p.repo);
    let proxy = CachingProxy::start(&origin.url);
    let repo_bytes: u64 = read_tree(&p.repo).iter().map(|(_, bytes)| bytes.len() as u64).sum();
    // Five clients, each its own cache, all completing the whole image at once through the proxy.
    let mounts: Vec<Mount> = std::thread::scope(|s| {
        let started: Vec<_> = (0..5)
            .map(|i| {
                let (p, url) = (&p, &proxy.url);
                s.spawn(move || p.mount(url, &format!("client{i}"), &["--background", "on"]))
            })
            .collect();
        started.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for m in &mounts {
        m.wait_complete(Duration::from_secs(60));
    }
    for m in &mounts {
        diff_r(&m.dir, &p.src);
    }
    let (origin_bytes, requests, hits) = proxy.origin_bytes();
    let ratio = origin_bytes as f64 / repo_bytes as f64;
    eprintln!(
        "5 clients: {requests} requests and slice fetches at the proxy ({hits} answered from its cache); origin sent {origin_bytes} bytes for a \
         {repo_bytes}-byte repository ({ratio:.2}x)"
    );
    assert!(hits > 0, "the proxy answered nothing from its cache");
    assert!(ratio <= 1.2, "the origin sent {ratio:.2}x the repository ({origin_bytes} of {repo_bytes} bytes)");
}
