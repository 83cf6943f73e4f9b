//! A private containerd for client tests: its own root, state and socket under a temp dir,
//! native snapshotter, CRI disabled. Needs root.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use super::require_binary;

/// A running containerd; killed on drop.
pub struct Containerd {
    child: tokio::process::Child,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

// === impl Containerd ===

impl Containerd {
    /// Starts containerd and waits until `ctr version` answers over its socket.
    pub async fn start() -> Containerd {
        let bin = require_binary("containerd");
        require_binary("ctr");
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\", \"io.containerd.internal.v1.opt\", \"io.containerd.snapshotter.v1.btrfs\", \"io.containerd.snapshotter.v1.zfs\", \"io.containerd.snapshotter.v1.devmapper\", \"io.containerd.snapshotter.v1.aufs\"]\n[grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n[debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n",
                root = dir.path().join("root").display(),
                state = dir.path().join("state").display(),
                sock = socket.display(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("containerd.log")).unwrap();
        let child = Command::new(bin)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("containerd starts (the test must run as root)");
        let c = Containerd { child, socket, dir };
        for _ in 0..200 {
            let ok = Command::new("ctr")
                .arg("--address")
                .arg(&c.socket)
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await
                .is_ok_and(|s| s.success());
            if ok {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("containerd did not become ready:\n{}", c.log());
    }

    /// `ctr` against this containerd, in namespace `berth-test`.
    pub fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "berth-test"]);
        c
    }

    /// What containerd logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
