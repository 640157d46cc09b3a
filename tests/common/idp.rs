//! A small identity provider on loopback, over real HTTP: a JWKS endpoint,
//! OpenID discovery, RFC 7662 introspection and a bearer check, whose
//! answers a test changes while herald runs, and which counts what it was
//! asked. Keys are real: RSA, P-256 and Ed25519 from `tests/fixtures`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde_json::{json, Value};

use super::repo_path;

/// A signing key with its public JWK.
#[derive(Clone)]
pub struct TestKey {
    pub kid: String,
    pub alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
}

impl TestKey {
    /// `which` is `rsa`, `rsa2`, `ec` or `ed` (the fixture files' names).
    pub fn new(which: &str, kid: &str) -> TestKey {
        let read = |f: String| std::fs::read(repo_path(&format!("tests/fixtures/{f}"))).unwrap();
        let (private, public) = (
            read(format!("{which}_private.pem")),
            read(format!("{which}_public.pem")),
        );
        let (alg, encoding, decoding) = match which {
            "rsa" | "rsa2" => (
                Algorithm::RS256,
                EncodingKey::from_rsa_pem(&private).unwrap(),
                DecodingKey::from_rsa_pem(&public).unwrap(),
            ),
            "ec" => (
                Algorithm::ES256,
                EncodingKey::from_ec_pem(&private).unwrap(),
                DecodingKey::from_ec_pem(&public).unwrap(),
            ),
            "ed" => (
                Algorithm::EdDSA,
                EncodingKey::from_ed_pem(&private).unwrap(),
                DecodingKey::from_ed_pem(&public).unwrap(),
            ),
            other => panic!("no fixture key {other}"),
        };
        let mut jwk =
            serde_json::to_value(Jwk::from_decoding_key(&decoding, None).unwrap()).unwrap();
        jwk["kid"] = kid.into();
        jwk["use"] = "sig".into();
        TestKey {
            kid: kid.to_owned(),
            alg,
            encoding,
            jwk,
        }
    }

    /// The same key under another `kid`.
    pub fn as_kid(&self, kid: &str) -> TestKey {
        let mut k = self.clone();
        k.kid = kid.to_owned();
        k.jwk["kid"] = kid.into();
        k
    }

    /// The public JWK.
    pub fn jwk(&self) -> Value {
        self.jwk.clone()
    }

    /// Signs `claims`, naming `kid` in the header (this key's unless given).
    pub fn sign_as(&self, kid: Option<&str>, claims: &Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = Some(kid.unwrap_or(&self.kid).to_owned());
        jsonwebtoken::encode(&h, claims, &self.encoding).unwrap()
    }

    /// Signs `claims` with this key's `kid`.
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_as(None, claims)
    }
}

/// Claims for `sub` from `iss` (when given), valid for a minute.
pub fn claims(iss: Option<&str>, sub: &str) -> Value {
    let now = herald::auth::unix_now();
    let mut c = json!({"sub": sub, "iat": now, "exp": now + 60});
    if let Some(i) = iss {
        c["iss"] = i.into();
    }
    c
}

/// A JWKS document of `keys`.
pub fn jwks(keys: &[&TestKey]) -> Value {
    json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()})
}

#[derive(Default)]
struct State {
    jwks: Value,
    jwks_failing: bool,
    jwks_delay: std::time::Duration,
    jwks_hits: usize,
    discovery_hits: usize,
    discovery_issuer: Option<String>,
    revoked: HashSet<String>,
    introspection_down: bool,
    introspection_garbage: bool,
    introspect_hits: usize,
    check_hits: usize,
    client: Option<(String, String)>,
}

/// The running provider; stops when dropped.
pub struct Idp {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
    tls: bool,
}

/// A certificate authority made for one test, and a server certificate for
/// 127.0.0.1 and localhost it signed.
pub struct TestCa {
    /// The CA certificate, PEM (what `auth.ca_file` holds).
    pub pem: String,
    server_cert: Vec<u8>,
    server_key: Vec<u8>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, name);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut server = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        server
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        let cert = server.signed_by(&key, &ca_cert, &ca_key).unwrap();
        TestCa {
            pem: ca_cert.pem(),
            server_cert: cert.der().to_vec(),
            server_key: key.serialize_der(),
        }
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        use tokio_rustls::rustls;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![self.server_cert.clone().into()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(self.server_key.clone().into()),
            )
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Idp {
    /// Starts serving `jwks` on an ephemeral loopback port, over plain HTTP.
    pub async fn start(jwks: Value) -> Idp {
        Self::serve(jwks, None).await
    }

    /// Starts serving `jwks` over HTTPS, with a certificate for 127.0.0.1
    /// and localhost that `ca` signed.
    pub async fn start_tls(jwks: Value, ca: &TestCa) -> Idp {
        Self::serve(jwks, Some(ca.acceptor())).await
    }

    async fn serve(jwks: Value, tls: Option<tokio_rustls::TlsAcceptor>) -> Idp {
        let tls_on = tls.is_some();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            jwks,
            ..State::default()
        }));
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let st = st.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(&st, req).await) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http
                                .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                                .await;
                        }
                        Some(tls) => {
                            // A client that refuses the certificate ends here.
                            if let Ok(sock) = tls.accept(sock).await {
                                let _ = http
                                    .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                                    .await;
                            }
                        }
                    }
                });
            }
        });
        Idp {
            addr,
            state,
            task,
            tls: tls_on,
        }
    }

    /// The base URL (what discovery calls the issuer).
    pub fn base(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base())
    }

    /// Serves `jwks` from now on.
    pub fn set_jwks(&self, jwks: Value) {
        self.state.lock().unwrap().jwks = jwks;
    }

    /// Answers 500 to JWKS requests while `failing`.
    pub fn fail_jwks(&self, failing: bool) {
        self.state.lock().unwrap().jwks_failing = failing;
    }

    /// JWKS answers take this long from now on.
    pub fn delay_jwks(&self, by: std::time::Duration) {
        self.state.lock().unwrap().jwks_delay = by;
    }

    /// OpenID configuration requests so far.
    pub fn discovery_hits(&self) -> usize {
        self.state.lock().unwrap().discovery_hits
    }

    /// JWKS requests so far.
    pub fn jwks_hits(&self) -> usize {
        self.state.lock().unwrap().jwks_hits
    }

    /// Serves an OpenID configuration naming `issuer` and this JWKS.
    pub fn discovery(&self, issuer: &str) {
        self.state.lock().unwrap().discovery_issuer = Some(issuer.to_owned());
    }

    /// Introspection says `token` is inactive.
    pub fn revoke(&self, token: &str) {
        self.state.lock().unwrap().revoked.insert(token.to_owned());
    }

    /// Introspection answers 503 while `down`.
    pub fn introspection_down(&self, down: bool) {
        self.state.lock().unwrap().introspection_down = down;
    }

    /// Introspection answers `{"active": "yes"}` (not a boolean) while `on`.
    pub fn introspection_garbage(&self, on: bool) {
        self.state.lock().unwrap().introspection_garbage = on;
    }

    /// RFC 7662 introspection requests so far.
    pub fn introspect_hits(&self) -> usize {
        self.state.lock().unwrap().introspect_hits
    }

    /// Bearer-check requests so far.
    pub fn check_hits(&self) -> usize {
        self.state.lock().unwrap().check_hits
    }

    /// RFC 7662 requests must carry these client credentials.
    pub fn require_client(&self, id: &str, secret: &str) {
        self.state.lock().unwrap().client = Some((id.to_owned(), secret.to_owned()));
    }
}

fn reply(status: u16, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

async fn answer(
    st: &Arc<Mutex<State>>,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let delay = {
        let mut s = st.lock().unwrap();
        if path == "/jwks" {
            s.jwks_hits += 1;
        }
        s.jwks_delay
    };
    if path == "/jwks" && !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut s = st.lock().unwrap();
    if path == "/.well-known/openid-configuration" {
        s.discovery_hits += 1;
    }
    match path.as_str() {
        "/jwks" => {
            if s.jwks_failing {
                return reply(500, json!({"error": "down"}));
            }
            reply(200, s.jwks.clone())
        }
        "/.well-known/openid-configuration" => match &s.discovery_issuer {
            Some(iss) => {
                let base = iss.trim_end_matches('/');
                reply(
                    200,
                    json!({"issuer": iss, "jwks_uri": format!("{base}/jwks")}),
                )
            }
            None => reply(404, json!({})),
        },
        "/introspect" => {
            s.introspect_hits += 1;
            if s.introspection_down {
                return reply(503, json!({}));
            }
            if let Some((id, secret)) = &s.client {
                let want = format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
                );
                if auth.as_deref() != Some(want.as_str()) {
                    return reply(401, json!({"error": "invalid_client"}));
                }
            }
            let token = url::form_urlencoded::parse(&body)
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            let active = !token.is_empty() && !s.revoked.contains(&token);
            if s.introspection_garbage {
                return reply(200, json!({"active": "yes"}));
            }
            reply(200, json!({"active": active}))
        }
        "/check" => {
            s.check_hits += 1;
            if s.introspection_down {
                return reply(503, json!({}));
            }
            let token = auth
                .as_deref()
                .and_then(|a| a.strip_prefix("Bearer "))
                .unwrap_or_default();
            if token.is_empty() || s.revoked.contains(token) {
                reply(401, json!({}))
            } else {
                reply(200, json!({}))
            }
        }
        _ => reply(404, json!({})),
    }
}
