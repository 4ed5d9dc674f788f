//! The CLI's HTTPS client: one server, one bearer token, JSON in and out, and the server's
//! error messages passed on as they were written.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use reqwest::{Method, StatusCode};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::Serialize;
use serde::de::DeserializeOwned;
use shared::api::ApiError;

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

fn tls_config(ca: Option<&Path>) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path).with_context(|| format!("CA file {}", path.display()))?;
            for cert in certs {
                roots.add(cert.with_context(|| format!("CA file {}", path.display()))?)?;
            }
            if roots.is_empty() {
                bail!("CA file {} holds no certificate", path.display());
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    Ok(rustls::ClientConfig::builder().with_root_certificates(Arc::new(roots)).with_no_client_auth())
}

impl Client {
    pub fn new(server: &str, token: &str, ca: Option<&Path>) -> anyhow::Result<Self> {
        let base = server.trim_end_matches('/').to_owned();
        if !base.starts_with("https://") {
            bail!("server URL {server:?} must start with https://");
        }
        let http = reqwest::Client::builder()
            // Below the server's keep-alive timeout (75 s by default), so a connection the
            // server is closing is never reused.
            .pool_idle_timeout(Duration::from_secs(30))
            .use_preconfigured_tls(tls_config(ca)?)
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("muster/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTP client")?;
        Ok(Client { http, base, token: token.to_owned() })
    }

    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{}{path}", self.base, shared::api::PREFIX)).bearer_auth(&self.token)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.request(Method::GET, path)).await
    }

    pub async fn get_query<T: DeserializeOwned, Q: Serialize + ?Sized>(&self, path: &str, query: &Q) -> anyhow::Result<T> {
        self.send(self.request(Method::GET, path).query(query)).await
    }

    pub async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(&self, path: &str, body: &B) -> anyhow::Result<T> {
        self.send(self.request(Method::POST, path).json(body)).await
    }

    pub async fn patch<B: Serialize + ?Sized, T: DeserializeOwned>(&self, path: &str, body: &B) -> anyhow::Result<T> {
        self.send(self.request(Method::PATCH, path).json(body)).await
    }

    pub async fn delete(&self, path: &str) -> anyhow::Result<()> {
        let resp = self.execute(self.request(Method::DELETE, path)).await?;
        check(resp).await.map(|_| ())
    }

    pub async fn execute(&self, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        req.send().await.map_err(|e| anyhow!("cannot reach {}: {}", self.base, describe(&e)))
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> anyhow::Result<T> {
        let resp = check(self.execute(req).await?).await?;
        let bytes = resp.bytes().await.context("reading the response")?;
        serde_json::from_slice(&bytes).context("the server's answer is not what this CLI expects (version mismatch?)")
    }
}

/// Turns a non-success response into an error carrying the server's message.
pub async fn check(resp: reqwest::Response) -> anyhow::Result<reqwest::Response> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = resp.text().await.unwrap_or_default();
    let message = serde_json::from_str::<ApiError>(&body).map(|e| e.message).unwrap_or(body);
    match status {
        StatusCode::UNAUTHORIZED => bail!("the server refused the token: {message} (check MUSTER_TOKEN)"),
        StatusCode::FORBIDDEN => bail!("not allowed: {message}"),
        _ => bail!("{message} (HTTP {})", status.as_u16()),
    }
}

/// The innermost cause of a transport error: that is where "certificate unknown" lives.
fn describe(e: &reqwest::Error) -> String {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    let mut last = e.to_string();
    while let Some(s) = source {
        last = s.to_string();
        source = s.source();
    }
    last
}
