//! `doctor`'s TLS phase: a handshake with the agent's trust (the system store plus
//! `api.ca_file`), through a verifier that keeps the server's certificate so that a refused
//! handshake can still say whose certificate it was.

use super::Check;
use crate::config::Config;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// A server certificate expiring sooner than this is worth a warning.
const CERT_WARN: Duration = Duration::from_secs(14 * 86_400);

/// Delegates to the real verifier and keeps the server's certificate, so a failed handshake
/// can still say whose certificate it was.
#[derive(Debug)]
struct Recording {
    inner: Arc<WebPkiServerVerifier>,
    seen: Mutex<Option<CertificateDer<'static>>>,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(end_entity.clone().into_owned());
        }
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The trust the agent uses: the system store plus `api.ca_file`.
fn roots(cfg: &Config) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = &cfg.api.ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("api.ca_file = {}: {e}", path.display()))?;
        for cert in certs {
            let cert = cert.map_err(|e| format!("api.ca_file = {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("api.ca_file = {}: {e}", path.display()))?;
        }
    }
    Ok(roots)
}

/// Subject, issuer and expiry of a DER certificate, in one line.
pub fn describe(der: &[u8]) -> (String, Option<SystemTime>) {
    use x509_cert::der::Decode;
    match x509_cert::Certificate::from_der(der) {
        Ok(c) => {
            let tbs = c.tbs_certificate();
            let not_after = SystemTime::UNIX_EPOCH + tbs.validity().not_after.to_unix_duration();
            (
                format!("subject {}, issuer {}", tbs.subject(), tbs.issuer()),
                Some(not_after),
            )
        }
        Err(e) => (format!("unreadable certificate ({e})"), None),
    }
}

/// A client config with the agent's trust and a verifier that records the certificate.
fn client_config(cfg: &Config) -> Result<(rustls::ClientConfig, Arc<Recording>), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let inner =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots(cfg)?), provider.clone())
            .build()
            .map_err(|e| e.to_string())?;
    let recording = Arc::new(Recording {
        inner,
        seen: Mutex::new(None),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(recording.clone())
        .with_no_client_auth();
    Ok((config, recording))
}

/// The TLS phase; false when the later phases should be skipped.
pub(super) async fn tls(cfg: &Config, host: &str, addr: SocketAddr, out: &mut Vec<Check>) -> bool {
    let setup = client_config(cfg).and_then(|(config, recording)| {
        let name = ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
        Ok((config, recording, name))
    });
    let (config, recording, name) = match setup {
        Ok(s) => s,
        Err(e) => {
            out.push(Check::fail("tls", e, "fix api.ca_file"));
            return false;
        }
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let handshake = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())
    };
    let result = tokio::time::timeout(cfg.api.connect_timeout, handshake).await;
    let seen = recording.seen.lock().ok().and_then(|s| s.clone());
    let (cert, not_after) = seen
        .as_deref()
        .map_or_else(|| ("no certificate received".to_string(), None), describe);
    let check = match result {
        Ok(Ok(_)) => trusted(cfg, &cert, not_after),
        Ok(Err(e)) => refused(host, &e, &cert),
        Err(_) => Check::fail(
            "tls",
            format!(
                "no TLS handshake with {host} within {}s",
                cfg.api.connect_timeout.as_secs_f64()
            ),
            "something accepts the connection but does not speak TLS: check the port in api.url",
        ),
    };
    let passed = check.status != super::Status::Fail;
    out.push(check);
    passed
}

fn trusted(cfg: &Config, cert: &str, not_after: Option<SystemTime>) -> Check {
    let trust = if cfg.api.ca_file.is_some() {
        "the system store and api.ca_file"
    } else {
        "the system store"
    };
    let left = not_after.and_then(|t| t.duration_since(SystemTime::now()).ok());
    let until = not_after.map_or_else(String::new, |t| {
        format!(", valid until {}", crate::state::rfc3339(t))
    });
    match left {
        Some(l) if l < CERT_WARN => Check::warn(
            "tls",
            format!(
                "trusted ({trust}): {cert}{until}: expires in {} days",
                l.as_secs() / 86_400
            ),
            "the API's certificate is about to expire; tell exalsius (or your proxy's owner)",
        ),
        _ => Check::ok("tls", format!("trusted ({trust}): {cert}{until}")),
    }
}

fn refused(host: &str, e: &str, cert: &str) -> Check {
    let hint = if e.contains("UnknownIssuer") || e.contains("unknown issuer") {
        "the certificate is not signed by a CA this machine trusts: if a TLS-inspecting proxy or a private CA signs it, name that CA in api.ca_file"
    } else if e.contains("Expired") || e.contains("NotValidYet") {
        "check this machine's clock (timedatectl); if it is right, the server's certificate is out of date"
    } else if e.contains("NotValidForName") {
        "the certificate is for another name: check the host in api.url"
    } else {
        "check api.url (is it an HTTPS endpoint?) and any proxy or firewall in the way"
    };
    Check::fail(
        "tls",
        format!("handshake with {host} failed: {e}; {cert}"),
        hint,
    )
}
