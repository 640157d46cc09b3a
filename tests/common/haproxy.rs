//! haproxy on loopback, configured from docker/haproxy.cfg with the server
//! lines pointed at herald processes of the test.

use std::process::{Child, Command, Stdio};

use super::nats::free_low_port;
use super::{eventually, repo_path, WAIT};

pub struct Haproxy {
    child: Child,
    pub port: u16,
    stats_port: u16,
    _dir: tempfile::TempDir,
}

/// The shipped config `template` with its `herald` servers replaced by
/// `backends` (public port, admin port) and each line `rewrite` answers
/// replaced by its answer.
fn configure(
    template: &str,
    backends: &[(u16, u16)],
    rewrite: impl Fn(&str) -> Option<String>,
) -> String {
    let text = std::fs::read_to_string(repo_path(template)).expect(template);
    let mut cfg = String::new();
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("server herald") {
            continue;
        }
        match rewrite(t) {
            Some(r) => cfg.push_str(&r),
            None => {
                cfg.push_str(line);
                cfg.push('\n');
            }
        }
        if t.starts_with("default-server") {
            for (i, (public, admin)) in backends.iter().enumerate() {
                cfg.push_str(&format!(
                    "    server herald{} 127.0.0.1:{public} port {admin}\n",
                    i + 1
                ));
            }
        }
    }
    cfg
}

impl Haproxy {
    /// Starts haproxy in front of `backends` (public port, admin port) and
    /// waits until every backend is up in its health checks.
    pub async fn start(backends: &[(u16, u16)]) -> Haproxy {
        Self::start_with(backends, 4096).await
    }

    /// [`start`](Self::start), taking up to `maxconn` connections.
    pub async fn start_with(backends: &[(u16, u16)], maxconn: usize) -> Haproxy {
        let port = free_low_port();
        let stats = free_low_port();
        let cfg = configure("docker/haproxy.cfg", backends, |t| match t {
            // The production maxconn needs a raised file limit; tests need few.
            _ if t.starts_with("maxconn") => Some(format!("    maxconn {maxconn}\n")),
            "bind :8080" => Some(format!("    bind 127.0.0.1:{port}\n")),
            "bind :8404" => Some(format!("    bind 127.0.0.1:{stats}\n")),
            _ => None,
        });
        Self::launch(cfg, port, backends.len()).await
    }

    /// haproxy from docker/infisical-proxy.cfg: Infisical's event path to
    /// `backends` (Infisical-listener port, admin port), the rest to the
    /// server on `infisical`.
    pub async fn start_infisical(backends: &[(u16, u16)], infisical: u16) -> Haproxy {
        let port = free_low_port();
        let cfg = configure("docker/infisical-proxy.cfg", backends, |t| match t {
            _ if t.starts_with("maxconn") => Some(String::new()),
            "bind :80" => Some(format!("    bind 127.0.0.1:{port}\n")),
            _ if t.starts_with("server infisical") => {
                Some(format!("    server infisical 127.0.0.1:{infisical}\n"))
            }
            _ => None,
        });
        Self::launch(cfg, port, backends.len()).await
    }

    async fn launch(mut cfg: String, port: u16, backends: usize) -> Haproxy {
        // The stats page, to wait for healthy backends.
        let stats_port = free_low_port();
        cfg.push_str(&format!(
            "\nfrontend stats\n    bind 127.0.0.1:{stats_port}\n    stats enable\n    stats uri /stats\n"
        ));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, &cfg).unwrap();
        let bin = [
            "/usr/sbin/haproxy",
            "/usr/local/sbin/haproxy",
            "/usr/bin/haproxy",
        ]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .expect("haproxy is required (apt-get install haproxy); scripts/test installs it");
        let child = Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("haproxy.log")).unwrap())
            .spawn()
            .expect("start haproxy");
        let h = Haproxy {
            child,
            port,
            stats_port,
            _dir: dir,
        };
        for i in 0..backends {
            h.wait_server(&format!("herald{}", i + 1), "UP").await;
        }
        h.wait_routing().await;
        h
    }

    /// Waits until the frontend routes to a backend (every backend was
    /// seen UP in the health checks already).
    async fn wait_routing(&self) {
        eventually(WAIT, "haproxy never routed to a backend", || async {
            let r = reqwest::Client::new()
                .get(format!("http://127.0.0.1:{}/nope", self.port))
                .send()
                .await
                .ok()?;
            (r.status() == 404).then_some(())
        })
        .await
    }

    /// Waits until haproxy's health checks report `server` as `status` (UP, DOWN).
    pub async fn wait_server(&self, server: &str, status: &str) {
        let stats = format!("http://127.0.0.1:{}/stats;csv", self.stats_port);
        eventually(
            WAIT,
            format!("haproxy never saw {server} {status}"),
            || async {
                let text = reqwest::get(&stats).await.ok()?.text().await.ok()?;
                // CSV columns: pxname, svname, ..., status is the 18th.
                text.lines()
                    .any(|l| {
                        let f: Vec<&str> = l.split(',').collect();
                        f.len() > 17
                            && f[0] == "herald"
                            && f[1] == server
                            && f[17].starts_with(status)
                    })
                    .then_some(())
            },
        )
        .await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
