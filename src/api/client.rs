//! The HTTP client: one `reqwest::Client` (rustls, no redirects, bounded bodies) and the
//! classification of every answer into an [`Outcome`] the heartbeat loop can act on.

use super::problem::Problem;
use super::transport::{BodyError, phase_message, read_limited, transport_error};
pub use super::transport::{MAX_RETRY_AFTER, retry_after};
use super::types::{Answer, TokenResponse};
use crate::config::ApiConfig;
use crate::secret::Secret;
use crate::text::one_line;
use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_TYPE, DATE, HeaderValue, LOCATION, RETRY_AFTER,
};
use reqwest::{Method, StatusCode};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

/// Response bodies larger than this are refused: the real answer is a few hundred bytes, and a
/// hostile or broken server must not make the agent allocate without bound.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// A failure's message at most this long: the phase, the status and the server's own words.
const MAX_MESSAGE_CHARS: usize = 1000;

/// `User-Agent` of every request.
pub fn user_agent() -> String {
    format!("exalsius-node-agent/{}", env!("CARGO_PKG_VERSION"))
}

/// Building the client failed (the CA file, in practice).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `api.ca_file` is missing or holds no certificate (the operator's to fix).
    #[error("api.ca_file = {path}: {message}")]
    CaFile { path: PathBuf, message: String },
    /// `api.ca_file` is there but cannot be read now (a fault of the machine).
    #[error("api.ca_file = {}: cannot read now: {source}", path.display())]
    CaFileUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// reqwest refused the settings.
    #[error("cannot build HTTP client: {0}")]
    Build(#[source] reqwest::Error),
}

impl ClientError {
    /// A fault of the machine (exit 1, retried), not something to edit (exit 78).
    pub fn is_machine_fault(&self) -> bool {
        matches!(self, ClientError::CaFileUnreadable { .. })
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Connect error, timeout, 5xx, 429, or a 2xx whose body is unusable: back off and retry.
    Retryable,
    /// 401/403: the token was rejected.
    Unauthorized,
    /// 404: the node is not in the pool.
    NotFound,
    /// 400/422/3xx and other answers that retrying soon will not change.
    Rejected,
    /// 409 (register only): the node exists already.
    Conflict,
}

/// A failed attempt, with everything worth logging.
#[derive(Debug, Clone)]
pub struct Failure {
    /// How to react.
    pub kind: FailureKind,
    /// HTTP status, when there was an answer.
    pub status: Option<u16>,
    /// One-line reason (status, problem title/detail, or transport error).
    pub message: String,
    /// `Retry-After`, when the server sent one.
    pub retry_after: Option<Duration>,
}

impl Failure {
    /// The message is one line however it was made (it carries the server's words, and goes
    /// to the log, the state file, `STATUS=` and `status`).
    fn new(kind: FailureKind, status: Option<u16>, message: impl Into<String>) -> Self {
        Self {
            kind,
            status,
            message: crate::text::one_line(&message.into(), MAX_MESSAGE_CHARS),
            retry_after: None,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A successful answer.
#[derive(Debug, Clone)]
pub struct Success {
    /// HTTP status (2xx).
    pub status: u16,
    /// Time from sending to the whole body.
    pub latency: Duration,
    /// The parsed body.
    pub body: Answer,
}

/// What an unauthenticated `GET` learned.
#[derive(Debug, Clone)]
pub struct Probe {
    /// Any HTTP status.
    pub status: u16,
    /// The server's `Date` header.
    pub date: Option<SystemTime>,
    /// Time to the response head.
    pub latency: Duration,
}

/// The result of one request.
pub type Outcome = Result<Success, Failure>;

/// The API client shared by heartbeats and `register`.
#[derive(Debug, Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    pub(super) timeout: Duration,
    pub(super) connect_timeout: Duration,
}

impl ApiClient {
    /// Names the phase a request failed in — resolving, connecting, the TLS handshake, waiting
    /// for the answer — with what an operator debugging DNS, a proxy or a CA needs to know.
    fn phase_error(&self, e: &reqwest::Error) -> String {
        let target = e.url().map_or_else(String::new, |u| {
            format!(
                "{}:{}",
                u.host_str().unwrap_or("?"),
                u.port_or_known_default().unwrap_or(0)
            )
        });
        let host = target.rsplit_once(':').map_or(target.as_str(), |(h, _)| h);
        phase_message(
            &transport_error(e),
            e.is_connect(),
            e.is_timeout(),
            &target,
            host,
            self.timeout,
            self.connect_timeout,
        )
    }

    /// Builds the client from `[api]`.
    pub fn new(cfg: &ApiConfig) -> Result<Self, ClientError> {
        let mut builder = reqwest::Client::builder()
            .user_agent(user_agent())
            .timeout(cfg.timeout)
            .connect_timeout(cfg.connect_timeout)
            // A redirect could carry the token to another host: never follow one.
            .redirect(reqwest::redirect::Policy::none())
            // getaddrinfo bounded in threads and time (see api::resolve).
            .dns_resolver(std::sync::Arc::new(super::resolve::BoundedResolver::new(
                cfg.connect_timeout,
            )))
            .use_rustls_tls();
        if let Some(path) = &cfg.ca_file {
            let ca_err = |message: String| ClientError::CaFile {
                path: path.clone(),
                message,
            };
            let pem = std::fs::read(path).map_err(|e| {
                if crate::config::is_operators_to_fix(&e) {
                    ca_err(e.to_string())
                } else {
                    ClientError::CaFileUnreadable {
                        path: path.clone(),
                        source: e,
                    }
                }
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| ca_err(format!("not a PEM certificate bundle: {e}")))?;
            if certs.is_empty() {
                return Err(ca_err("holds no PEM certificate".to_string()));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        Ok(Self {
            http: builder.build().map_err(ClientError::Build)?,
            timeout: cfg.timeout,
            connect_timeout: cfg.connect_timeout,
        })
    }

    /// `PATCH url` with a JSON body (empty: a pure heartbeat) and the token. The scheme is
    /// always spelled `Bearer`: schemes are case-insensitive (RFC 7235), but some gateways
    /// accept only the canonical spelling, whatever case the API used when it issued the token.
    pub async fn patch_node(&self, url: &str, token: &Secret, body: Vec<u8>) -> Outcome {
        let auth = format!("Bearer {}", token.expose());
        let Ok(mut auth) = HeaderValue::from_str(&auth) else {
            return Err(Failure::new(
                FailureKind::Unauthorized,
                None,
                "the access token contains characters that cannot be sent in a header",
            ));
        };
        // Keeps the value out of HPACK tables and out of hyper/h2 debug output.
        auth.set_sensitive(true);
        let req = self
            .http
            .request(Method::PATCH, url)
            .header(AUTHORIZATION, auth);
        self.send(req, body).await
    }

    /// `GET url` without a token, for `doctor`: any HTTP answer proves the path (proxy, DNS,
    /// TCP, TLS with the configured trust); the body is not read.
    pub async fn probe(&self, url: &str) -> Result<Probe, String> {
        let started = Instant::now();
        let resp = self
            .http
            .get(url)
            .header(ACCEPT, "application/json, application/problem+json")
            .send()
            .await
            .map_err(|e| self.phase_error(&e))?;
        let date = resp
            .headers()
            .get(DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| httpdate::parse_http_date(s).ok());
        Ok(Probe {
            status: resp.status().as_u16(),
            date,
            latency: started.elapsed(),
        })
    }

    /// `POST url` with a JSON body and no token (self-registration).
    pub async fn post_json(&self, url: &str, body: Vec<u8>) -> Outcome {
        self.send(self.http.post(url), body).await
    }

    async fn send(&self, req: reqwest::RequestBuilder, body: Vec<u8>) -> Outcome {
        let started = Instant::now();
        // An empty body is the spec's pure heartbeat: no body, so no content type either.
        let req = if body.is_empty() {
            req
        } else {
            req.header(CONTENT_TYPE, "application/json")
        };
        let resp = req
            .header(ACCEPT, "application/json, application/problem+json")
            .body(body)
            .send()
            .await
            .map_err(|e| Failure::new(FailureKind::Retryable, None, self.phase_error(&e)))?;
        let status = resp.status();
        let retry_after = retry_after(
            resp.headers().get(RETRY_AFTER),
            resp.headers().get(DATE),
            SystemTime::now(),
        );
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_ascii_lowercase);
        let location = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let code = status.as_u16();
        let body = read_limited(resp, MAX_BODY_BYTES)
            .await
            .map_err(|e| match e {
                BodyError::TooLarge(m) => m,
                BodyError::Transport(e) => {
                    format!("reading the body failed: {}", self.phase_error(&e))
                }
            });

        if status.is_success() {
            return success(code, content_type.as_deref(), body, started.elapsed());
        }
        Err(failure(status, location, body.ok().as_deref(), retry_after))
    }
}

/// A 2xx: usable only with a JSON body the lenient reading accepts.
fn success(
    code: u16,
    content_type: Option<&str>,
    body: Result<Vec<u8>, String>,
    latency: Duration,
) -> Outcome {
    let retryable = |m: String| Failure::new(FailureKind::Retryable, Some(code), m);
    let body = body.map_err(|m| retryable(format!("HTTP {code}: {m}")))?;
    if let Some(ct) = content_type
        && !ct.contains("json")
    {
        return Err(retryable(format!(
            "HTTP {code} with unexpected content type {ct:?}"
        )));
    }
    let parsed = serde_json::from_slice::<TokenResponse>(&body)
        .map_err(|e| format!("an unreadable body ({} bytes): {e}", body.len()))
        .and_then(TokenResponse::interpret)
        .map_err(|m| retryable(format!("HTTP {code} with {m}")))?;
    Ok(Success {
        status: code,
        latency,
        body: parsed,
    })
}

/// Any other status: classified, with the problem+json detail and a redirect's target.
fn failure(
    status: StatusCode,
    location: Option<String>,
    body: Option<&[u8]>,
    retry_after: Option<Duration>,
) -> Failure {
    let code = status.as_u16();
    let mut message = format!("HTTP {code}");
    if let Some(reason) = status.canonical_reason() {
        message.push(' ');
        message.push_str(reason);
    }
    if status.is_redirection() {
        message.push_str(": redirect not followed");
        if let Some(loc) = location {
            message.push_str(&format!(" (Location: {})", one_line(&loc, 200)));
        }
    }
    if let Some(problem) = body.and_then(Problem::parse) {
        message.push_str(&format!(": {}", one_line(&problem.to_string(), 500)));
    }
    let mut failure = Failure::new(classify(status), Some(code), message);
    failure.retry_after = retry_after;
    failure
}

fn classify(status: StatusCode) -> FailureKind {
    match status.as_u16() {
        401 | 403 => FailureKind::Unauthorized,
        404 => FailureKind::NotFound,
        409 => FailureKind::Conflict,
        408 | 429 => FailureKind::Retryable,
        s if s >= 500 => FailureKind::Retryable,
        _ => FailureKind::Rejected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::now();
        let ra = |v: &HeaderValue| retry_after(Some(v), None, now);
        let v = HeaderValue::from_static("120");
        assert_eq!(ra(&v), Some(Duration::from_secs(120)));
        let v = HeaderValue::from_static("999999");
        assert_eq!(ra(&v), Some(MAX_RETRY_AFTER));
        let future = now + Duration::from_secs(90);
        let v = HeaderValue::from_str(&httpdate::fmt_http_date(future)).unwrap();
        let d = ra(&v).unwrap();
        assert!(
            d > Duration::from_secs(85) && d <= Duration::from_secs(90),
            "{d:?}"
        );
        let past = HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT");
        assert_eq!(ra(&past), Some(Duration::ZERO));
        assert_eq!(ra(&HeaderValue::from_static("soon")), None);
        assert_eq!(retry_after(None, None, now), None);
    }

    /// A `Retry-After` date is measured against the response's `Date` (the server's clock on
    /// both sides), not the local clock: a node booted a day behind waits 2 s, not the 1-hour
    /// cap. Without `Date`, a date more than [`MAX_RETRY_AFTER`] from the local clock says
    /// more about that clock than about the server: ignored (the usual backoff applies).
    #[test]
    fn retry_after_dates_do_not_trust_the_local_clock() {
        let http = |t: SystemTime| HeaderValue::from_str(&httpdate::fmt_http_date(t)).unwrap();
        let server = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let day = Duration::from_secs(86_400);
        let when = http(server + Duration::from_secs(2));
        let date = http(server);
        for local in [server - day, server, server + day] {
            assert_eq!(
                retry_after(Some(&when), Some(&date), local),
                Some(Duration::from_secs(2)),
                "local clock {local:?}"
            );
        }
        // No Date: a day behind is not believed (not the hour cap); a plausible gap is.
        assert_eq!(retry_after(Some(&when), None, server - day), None);
        assert_eq!(
            retry_after(Some(&when), None, server),
            Some(Duration::from_secs(2))
        );
        // A Date that cannot be read counts as none.
        let bad = HeaderValue::from_static("yesterday");
        assert_eq!(retry_after(Some(&when), Some(&bad), server - day), None);
        // Seconds never depend on a clock.
        let v = HeaderValue::from_static("7");
        assert_eq!(
            retry_after(Some(&v), Some(&date), server - day),
            Some(Duration::from_secs(7))
        );
    }

    #[test]
    fn classification() {
        assert_eq!(
            classify(StatusCode::UNAUTHORIZED),
            FailureKind::Unauthorized
        );
        assert_eq!(classify(StatusCode::FORBIDDEN), FailureKind::Unauthorized);
        assert_eq!(classify(StatusCode::NOT_FOUND), FailureKind::NotFound);
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS),
            FailureKind::Retryable
        );
        assert_eq!(classify(StatusCode::BAD_GATEWAY), FailureKind::Retryable);
        assert_eq!(
            classify(StatusCode::UNPROCESSABLE_ENTITY),
            FailureKind::Rejected
        );
        assert_eq!(classify(StatusCode::FOUND), FailureKind::Rejected);
        assert_eq!(classify(StatusCode::BAD_REQUEST), FailureKind::Rejected);
    }

    #[test]
    fn each_failed_phase_is_named() {
        let m = |chain: &str, connect, timeout| {
            phase_message(
                chain,
                connect,
                timeout,
                "api.example:443",
                "api.example",
                Duration::from_secs(10),
                Duration::from_secs(5),
            )
        };
        assert_eq!(
            m(
                "cannot connect: error sending request: client error (Connect): resolving api.example timed out after 5s",
                true,
                false
            ),
            "resolving api.example timed out after 5s"
        );
        assert!(
            m("cannot connect: client error (Connect): tcp connect error: Connection refused (os error 111)", true, false)
                .starts_with("cannot connect to api.example:443: connection refused")
        );
        assert!(
            m(
                "timed out: client error (Connect): operation timed out",
                true,
                true
            )
            .starts_with("cannot connect to api.example:443: timed out after 5s")
        );
        for (chain, why) in [
            (
                "cannot connect: invalid peer certificate: UnknownIssuer",
                "not signed by a trusted CA",
            ),
            (
                "cannot connect: invalid peer certificate: NotValidForName",
                "name mismatch",
            ),
            (
                "cannot connect: invalid peer certificate: Expired",
                "expired",
            ),
            (
                "cannot connect: received fatal alert: HandshakeFailure",
                "handshake failed",
            ),
        ] {
            let got = m(chain, true, false);
            assert!(
                got.starts_with("TLS handshake with api.example failed: "),
                "{got}"
            );
            assert!(got.contains(why), "{got}");
        }
        assert!(
            m("timed out: operation timed out", false, true)
                .starts_with("no response within api.timeout (10s): timed out")
        );
    }

    #[test]
    fn token_plausibility() {
        use crate::api::types::implausible_token;
        assert!(implausible_token("abc.DEF-123_~+/=").is_none());
        assert!(implausible_token("").is_some());
        assert!(implausible_token("a b").is_some());
        assert!(implausible_token("a\r\nX-Evil: 1").is_some());
    }
}
