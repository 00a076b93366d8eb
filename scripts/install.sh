#!/usr/bin/env bash
# Install incfs for system use: the binary, the mount helper that makes `mount -t fuse.incfs`
# and /etc/fstab lines work, the systemd template unit and an example configuration.
# Usage: scripts/install.sh            (as root; builds the release binary first)
# Settings: PREFIX (default /usr/local), DESTDIR (stage into another root), INCFS_BIN (install
# this binary instead of building one).
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=${PREFIX:-/usr/local}
dest=${DESTDIR:-}
if [ -z "${INCFS_BIN:-}" ]; then
  scripts/deps.sh >/dev/null   # fuse3 (fusermount3, mount.fuse3) among them
  cargo build --release --locked -p incfs-cli
  INCFS_BIN=target/release/incfs
fi
install -D -m 0755 "$INCFS_BIN" "$dest$prefix/bin/incfs"
# mount(8) runs /sbin/mount.fuse.incfs for type fuse.incfs; incfs knows the calling convention.
install -d "$dest/sbin"
ln -sfn "$prefix/bin/incfs" "$dest/sbin/mount.fuse.incfs"
install -d "$dest/etc/systemd/system"
sed "s|/usr/local/bin/incfs|$prefix/bin/incfs|g" contrib/systemd/incfs@.service > "$dest/etc/systemd/system/incfs@.service"
install -D -m 0644 contrib/systemd/mnt-app.mount "$dest$prefix/share/doc/incfs/mnt-app.mount.example"
install -D -m 0644 README.md "$dest$prefix/share/doc/incfs/README.md"
install -d -m 0755 "$dest/etc/incfs"
install -m 0644 contrib/incfs/app.conf.example "$dest/etc/incfs/app.conf.example"
install -d -m 0700 "$dest/var/cache/incfs"
cat <<DONE
installed $prefix/bin/incfs, /sbin/mount.fuse.incfs, /etc/systemd/system/incfs@.service
mount an image:
  mount -t fuse.incfs https://host/app /mnt/app -o trust=/etc/incfs/publisher.pub.pem
  # /etc/fstab:  https://host/app /mnt/app fuse.incfs trust=/etc/incfs/publisher.pub.pem,_netdev 0 0
  # or a service: /etc/incfs/app.conf (see app.conf.example), then systemctl enable --now incfs@app
DONE
