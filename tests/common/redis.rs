//! A real `redis-server` on an ephemeral loopback port (no persistence),
//! and a client that publishes raw bytes (RESP over TCP).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::nats::free_low_port;
use super::{eventually, WAIT};

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    _dir: tempfile::TempDir,
}

fn binary() -> String {
    ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .expect("redis-server is required (apt-get install redis-server); scripts/test installs it")
        .to_owned()
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        let mut r = RedisServer {
            child: None,
            port: free_low_port(),
            _dir: tempfile::tempdir().unwrap(),
        };
        r.spawn().await;
        r
    }

    async fn spawn(&mut self) {
        let child = Command::new(binary())
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self._dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let port = self.port;
        eventually(WAIT, "redis-server never answered PING", || async move {
            let r = command(port, &[b"PING"]).await.ok()?;
            r.starts_with(b"+PONG").then_some(())
        })
        .await;
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops it (SIGKILL): subscribers lose their connection.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// PUBLISHes `payload` on `channel`; returns how many subscribers got it.
    pub async fn publish(&self, channel: &str, payload: &[u8]) -> usize {
        let r = command(self.port, &[b"PUBLISH", channel.as_bytes(), payload])
            .await
            .expect("PUBLISH");
        let text = String::from_utf8_lossy(&r);
        text.trim_start_matches(':')
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("PUBLISH answered {text:?}"))
    }

    /// Subscribers of `channel` (PUBSUB NUMSUB).
    pub async fn subscribers(&self, channel: &str) -> usize {
        let r = command(self.port, &[b"PUBSUB", b"NUMSUB", channel.as_bytes()])
            .await
            .unwrap_or_default();
        // *2 $len channel :n
        String::from_utf8_lossy(&r)
            .rsplit(':')
            .next()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// One RESP command and its first reply chunk.
async fn command(port: u16, args: &[&[u8]]) -> std::io::Result<Vec<u8>> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let mut req = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        req.extend_from_slice(a);
        req.extend_from_slice(b"\r\n");
    }
    s.write_all(&req).await?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("no reply"))??;
    buf.truncate(n);
    Ok(buf)
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
