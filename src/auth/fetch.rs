//! Bounded HTTP(S) and file reads for key sets, discovery and introspection.
//!
//! HTTPS uses rustls with the system's roots, or only the configured CA.
//! Plain HTTP is accepted for loopback addresses alone. Every request has a
//! time-out covering connect, headers and body; bodies are read up to a
//! limit and refused beyond it; redirects are not followed (a provider's
//! URL is configured, never discovered from where it sends herald).

use std::path::{Path, PathBuf};
use std::time::Duration;

use url::Url;

use super::keys::SetError;

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("request failed: {0}")]
    Http(String),
    #[error("answered {0}")]
    Status(u16),
    #[error("the answer is larger than {0} bytes")]
    TooLarge(usize),
    #[error("cannot read {0}: {1}")]
    File(PathBuf, std::io::Error),
    #[error("the key set {0}")]
    Set(#[source] SetError),
    #[error("the OpenID configuration {0}")]
    Discovery(String),
}

/// Whether `url` may be fetched: HTTPS, or HTTP to a loopback address.
pub fn check_url(url: &Url) -> Result<(), &'static str> {
    match url.scheme() {
        "https" => Ok(()),
        "http" => {
            let loopback = match url.host() {
                Some(url::Host::Ipv4(a)) => a.is_loopback(),
                Some(url::Host::Ipv6(a)) => a.is_loopback(),
                Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
                None => false,
            };
            if loopback {
                Ok(())
            } else {
                Err("must be https (plain http only to a loopback address)")
            }
        }
        _ => Err("must be an https URL"),
    }
}

/// Makes bounded requests.
#[derive(Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    max_bytes: usize,
}

impl Fetcher {
    /// A fetcher trusting the system's roots, or only `ca_pem` when given.
    pub fn new(timeout: Duration, max_bytes: usize, ca_pem: Option<&[u8]>) -> Result<Self, String> {
        let mut b = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("herald/", env!("CARGO_PKG_VERSION")))
            .https_only(false);
        if let Some(pem) = ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| format!("not a PEM certificate bundle: {e}"))?;
            if certs.is_empty() {
                return Err("holds no PEM certificate".into());
            }
            b = b.tls_built_in_root_certs(false);
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        let client = b.build().map_err(|e| e.to_string())?;
        Ok(Self { client, max_bytes })
    }

    /// The body of a 2xx answer to `req`, within the size limit.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> Result<Vec<u8>, FetchError> {
        let mut resp = req
            .send()
            .await
            .map_err(|e| FetchError::Http(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(FetchError::Status(resp.status().as_u16()));
        }
        if resp
            .content_length()
            .is_some_and(|n| n > self.max_bytes as u64)
        {
            return Err(FetchError::TooLarge(self.max_bytes));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| FetchError::Http(e.to_string()))?
        {
            if body.len() + chunk.len() > self.max_bytes {
                return Err(FetchError::TooLarge(self.max_bytes));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// The client, to build requests with.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// GETs `url`.
    pub async fn get(&self, url: &Url) -> Result<Vec<u8>, FetchError> {
        self.send(
            self.client
                .get(url.clone())
                .header("accept", "application/json"),
        )
        .await
    }

    /// Reads a file, within the size limit.
    pub async fn file(&self, path: &Path) -> Result<Vec<u8>, FetchError> {
        use tokio::io::AsyncReadExt as _;
        let err = |e| FetchError::File(path.to_owned(), e);
        let file = tokio::fs::File::open(path).await.map_err(err)?;
        // Bounded whatever the file is (one that grows, a FIFO).
        let mut body = Vec::new();
        file.take(self.max_bytes as u64 + 1)
            .read_to_end(&mut body)
            .await
            .map_err(err)?;
        if body.len() > self.max_bytes {
            return Err(FetchError::TooLarge(self.max_bytes));
        }
        Ok(body)
    }

    /// The `jwks_uri` of `issuer`'s OpenID configuration, whose `issuer`
    /// must be `issuer` exactly and whose `jwks_uri` must be fetchable.
    pub async fn discover(&self, issuer: &str) -> Result<Url, FetchError> {
        let bad = |m: &str| FetchError::Discovery(m.to_owned());
        let at = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let at = Url::parse(&at).map_err(|_| bad("URL cannot be built from the issuer"))?;
        let doc: serde_json::Value =
            serde_json::from_slice(&self.get(&at).await?).map_err(|_| bad("is not JSON"))?;
        match doc.get("issuer").and_then(|v| v.as_str()) {
            Some(i) if i == issuer => {}
            Some(_) => return Err(bad("names another issuer")),
            None => return Err(bad("names no issuer")),
        }
        let uri = doc
            .get("jwks_uri")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad("has no jwks_uri"))?;
        let uri = Url::parse(uri).map_err(|_| bad("jwks_uri is not a URL"))?;
        check_url(&uri).map_err(|why| FetchError::Discovery(format!("jwks_uri {why}")))?;
        // A remote issuer cannot send herald to plain http (a loopback service).
        if at.scheme() == "https" && uri.scheme() != "https" {
            return Err(bad("jwks_uri of an https issuer must be https"));
        }
        Ok(uri)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_or_loopback_http() {
        for ok in [
            "https://idp.example.com/jwks",
            "http://127.0.0.1:8080/jwks",
            "http://[::1]/x",
            "http://localhost:9/x",
        ] {
            assert!(check_url(&Url::parse(ok).unwrap()).is_ok(), "{ok}");
        }
        for bad in [
            "http://idp.example.com/jwks",
            "http://10.0.0.1/jwks",
            "file:///etc/passwd",
            "ftp://x/y",
            "http://localhost.evil.com/x",
        ] {
            assert!(check_url(&Url::parse(bad).unwrap()).is_err(), "{bad}");
        }
    }
}
