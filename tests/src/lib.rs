//! Test harness: real components started the way users start them.
//!
//! - [`llamagen`]: the real `llamagen` binary, rebuilt if stale on first use.
//! - [`S3Server`]: an S3-compatible server (moto) on 127.0.0.1, from the project's `.venv`
//!   (`make setup` installs it). A missing server fails the test with what to run; nothing skips.
//! - [`python`]: the venv's Python, for reading our Parquet back with pyarrow.
//! - [`http::FaultServer`]: an HTTP server on 127.0.0.1 with the faults of the web.

pub mod http;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use llamagen_catalog::StorageOptions;
use llamagen_catalog::storage::S3Config;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// Directory of the binaries of the profile the tests were built with.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    // target/<profile>/deps/<test>-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// Path of the `llamagen` binary, brought up to date once per test process.
pub fn llamagen() -> PathBuf {
    let bin = target_dir().join("llamagen");
    static BUILD: std::sync::Once = std::sync::Once::new();
    BUILD.call_once(|| {
        // Always (re)build: cheap when up to date, and a stale binary would test old code.
        {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "-p", "llamagen-pipelines", "--bin", "llamagen"])
                .current_dir(workspace());
            // Without the variables cargo sets for this test crate: build scripts that watch
            // them (ring's watches CARGO_MANIFEST_DIR) would otherwise rerun and rebuild half
            // the tree, once here and once more in the next plain `cargo build`.
            for (k, _) in std::env::vars_os() {
                let k = k.to_string_lossy().into_owned();
                if k.starts_with("CARGO_PKG_")
                    || k.starts_with("CARGO_MANIFEST_")
                    || k.starts_with("CARGO_CRATE_")
                    || k.starts_with("CARGO_BIN_")
                    || matches!(
                        k.as_str(),
                        "CARGO_PRIMARY_PACKAGE"
                            | "CARGO_TARGET_TMPDIR"
                            | "CARGO_RUSTC_CURRENT_DIR"
                            | "OUT_DIR"
                    )
                {
                    cmd.env_remove(&k);
                }
            }
            let status = cmd.status().expect("running cargo build");
            assert!(status.success(), "building llamagen failed");
        }
    });
    assert!(bin.exists(), "{} missing", bin.display());
    bin
}

/// The project venv's Python (`LLAMAGEN_PYTHON`, default `.venv/bin/python`).
pub fn python() -> PathBuf {
    let p = std::env::var("LLAMAGEN_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace().join(".venv/bin/python"));
    assert!(
        p.exists(),
        "{} not found: run `make setup` (or `make test`), which creates the venv with the test servers and pyarrow",
        p.display()
    );
    p
}

/// The Python with PyPI torch (`LLAMAGEN_TORCH_PYTHON`, default `.venv-torch/bin/python`), for
/// the checkpoint interop tests.
pub fn torch_python() -> PathBuf {
    let p = std::env::var("LLAMAGEN_TORCH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace().join(".venv-torch/bin/python"));
    assert!(
        p.exists(),
        "{} not found: run `make setup-torch` (or `make test`), which creates the venv with PyPI torch",
        p.display()
    );
    p
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An S3-compatible server (moto) on 127.0.0.1, stopped on drop.
pub struct S3Server {
    pub port: u16,
    child: Option<Child>,
    log: PathBuf,
}

pub const S3_KEY_ID: &str = "llamagen-test";
pub const S3_SECRET: &str = "llamagen-test-secret";

impl S3Server {
    /// Starts a server on a free port and waits until it answers.
    pub fn start() -> S3Server {
        Self::start_on(free_port())
    }

    /// Starts a server on `port` (used to restart one at the same address).
    pub fn start_on(port: u16) -> S3Server {
        let bin = python().parent().unwrap().join("moto_server");
        assert!(
            bin.exists(),
            "{} not found: run `make setup`",
            bin.display()
        );
        let log = std::env::temp_dir().join(format!("moto-{port}.log"));
        let logf = std::fs::File::create(&log).unwrap();
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::from(logf.try_clone().unwrap()))
            .stderr(Stdio::from(logf))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let mut s = S3Server {
            port,
            child: Some(child),
            log,
        };
        s.wait_ready();
        s
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "S3 server exited with {st}: {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("S3 server did not start within 60 s");
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Storage options that reach this server with the test credentials.
    pub fn storage_options(&self) -> StorageOptions {
        StorageOptions {
            s3: S3Config {
                endpoint: Some(self.endpoint()),
                region: Some("us-east-1".into()),
                path_style: Some(true),
                static_credentials: Some((S3_KEY_ID.into(), S3_SECRET.into())),
                max_attempts: 3,
                ..Default::default()
            },
        }
    }

    /// Environment for a `llamagen` child process talking to this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", S3_KEY_ID.into()),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET.into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }

    /// Creates a bucket.
    pub async fn create_bucket(&self, bucket: &str) {
        let st = llamagen_catalog::storage::S3Storage::connect(S3Config {
            bucket: bucket.into(),
            ..self.storage_options().s3
        })
        .await
        .unwrap();
        st.ensure_bucket().await.unwrap();
    }

    /// Stops the server (kill), keeping the port number for a restart.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `llamagen` with arguments and extra environment; returns (exit code, stdout, stderr).
pub fn run_llamagen(args: &[&str], env: &[(&str, String)]) -> (i32, String, String) {
    let out = Command::new(llamagen())
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("running llamagen");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
