//! What the load benchmarks share: a herald binary started in a temporary
//! directory with a policy and a config, on ephemeral loopback ports.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// The HS256 secret every bench herald verifies tokens with.
pub const SECRET: &str = "herald-bench-secret-0123456789abcdef";

/// A running herald; killed when dropped.
pub struct Herald {
    pub child: Child,
    pub public: String,
    pub admin: String,
    dir: tempfile::TempDir,
}

impl Herald {
    /// Starts herald with `policy` as `policy.csv` and a config of the
    /// `[auth]` and `[policy]` sections plus `extra_toml`; `configure` may add
    /// environment variables. Returns once herald printed its addresses.
    pub fn start(policy: &str, extra_toml: &str, configure: impl FnOnce(&mut Command)) -> Herald {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("policy.csv"), policy).expect("write policy");
        let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/model.conf");
        std::fs::write(
            dir.path().join("herald.toml"),
            format!(
                "[auth]\nhs_secret = \"{SECRET}\"\n[policy]\nmodel = {:?}\npolicy = \"policy.csv\"\n{extra_toml}",
                model.display().to_string()
            ),
        )
        .expect("write config");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
        configure(&mut cmd);
        let mut child = cmd
            .current_dir(dir.path())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .env("HERALD_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start herald");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("ready line");
        let addr = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .expect("ready line")
                .to_owned()
        };
        Herald {
            public: addr("public="),
            admin: addr("admin="),
            child,
            dir,
        }
    }

    /// The policy file herald watches.
    #[allow(dead_code)] // not every bench edits it
    pub fn policy_path(&self) -> PathBuf {
        self.dir.path().join("policy.csv")
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
