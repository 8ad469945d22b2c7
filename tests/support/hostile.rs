//! Servers that misbehave on purpose, all on 127.0.0.1: TLS with a private CA (HTTP/1.1 and
//! HTTP/2), a self-signed certificate, raw TCP servers that drip, hang, reset or flood, and a
//! CONNECT proxy.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;

/// A private CA and a server certificate for `localhost` and `127.0.0.1` signed by it.
pub struct Pki {
    pub ca_pem: String,
    pub cert: rustls::pki_types::CertificateDer<'static>,
    pub key: rustls::pki_types::PrivateKeyDer<'static>,
}

pub fn private_ca() -> Pki {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "exalsius test CA");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();
    Pki {
        ca_pem: ca.pem(),
        cert: leaf.der().clone(),
        key: rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
    }
}

/// A certificate nobody trusts.
pub fn self_signed() -> Pki {
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let cert = params.self_signed(&key).unwrap();
    Pki {
        ca_pem: cert.pem(),
        cert: cert.der().clone(),
        key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    }
}

/// What the TLS server saw.
#[derive(Default)]
pub struct TlsSeen {
    /// `HTTP/1.1` or `HTTP/2.0` per request.
    pub versions: Vec<String>,
    pub auths: Vec<String>,
}

/// An HTTPS stand-in: answers every PATCH with a rotated token. `alpn` chooses the protocols
/// offered (`[b"h2", b"http/1.1"]` or just `[b"http/1.1"]`).
pub async fn tls_api(pki: &Pki, alpn: &[&[u8]]) -> (SocketAddr, Arc<Mutex<TlsSeen>>) {
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![pki.cert.clone()], pki.key.clone_key())
    .unwrap();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(TlsSeen::default()));
    let seen2 = seen.clone();
    let counter = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let seen = seen2.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let seen = seen.clone();
                    let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                    async move {
                        let node = req
                            .uri()
                            .path()
                            .rsplit('/')
                            .next()
                            .unwrap_or("")
                            .to_string();
                        {
                            let mut s = seen.lock().unwrap();
                            s.versions.push(format!("{:?}", req.version()));
                            s.auths.push(
                                req.headers()
                                    .get("authorization")
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_string(),
                            );
                        }
                        let body = serde_json::json!({
                            "node_id": node, "next_access_token": format!("tls-SECRET-{n}"),
                            "next_access_token_type": "Bearer"});
                        Ok::<_, std::convert::Infallible>(
                            Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(body.to_string())))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
            });
        }
    });
    (addr, seen)
}

/// How a raw TCP server misbehaves.
#[derive(Clone, Copy, Debug)]
pub enum Misbehaviour {
    /// Accept, read the request, never answer.
    Silent,
    /// Send the headers of a 200, then one body byte a second.
    Drip,
    /// Send headers and half a body, then reset the connection.
    ResetMidBody,
    /// A 200 with a 50 MB JSON-ish body, chunked (no length given up front).
    Huge,
    /// A 200 with an empty body.
    Empty,
}

/// A raw server; returns its address and the number of connections accepted.
pub async fn raw_server(how: Misbehaviour) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let conns2 = conns.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            conns2.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                read_request(&mut tcp).await;
                match how {
                    Misbehaviour::Silent => {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                    Misbehaviour::Drip => {
                        let _ = tcp
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n")
                            .await;
                        for _ in 0..100 {
                            if tcp.write_all(b" ").await.is_err() {
                                return;
                            }
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                    Misbehaviour::ResetMidBody => {
                        let _ = tcp
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n{\"node_id\": \"")
                            .await;
                        let _ = tcp.set_zero_linger();
                        drop(tcp); // RST
                    }
                    Misbehaviour::Huge => {
                        let _ = tcp
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
                            .await;
                        let chunk = vec![b' '; 64 * 1024];
                        let header = format!("{:x}\r\n", chunk.len());
                        for _ in 0..(50 * 1024 * 1024 / chunk.len()) {
                            if tcp.write_all(header.as_bytes()).await.is_err()
                                || tcp.write_all(&chunk).await.is_err()
                                || tcp.write_all(b"\r\n").await.is_err()
                            {
                                return;
                            }
                        }
                        let _ = tcp.write_all(b"0\r\n\r\n").await;
                    }
                    Misbehaviour::Empty => {
                        let _ = tcp
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n")
                            .await;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            });
        }
    });
    (addr, conns)
}

/// Reads one request's head and body (by content-length).
async fn read_request(tcp: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        let Ok(n) = tcp.read(&mut tmp).await else {
            return;
        };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let Ok(n) = tcp.read(&mut tmp).await else {
                    return;
                };
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&tmp[..n]);
            }
            return;
        }
    }
}

/// A CONNECT proxy; returns its address and the `host:port` of every CONNECT it served.
pub async fn connect_proxy() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let log2 = log.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            let log = log2.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match client.read(&mut tmp).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_string();
                let Some(target) = head
                    .lines()
                    .next()
                    .and_then(|l| l.strip_prefix("CONNECT "))
                    .and_then(|l| l.split_whitespace().next())
                else {
                    let _ = client
                        .write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                        .await;
                    return;
                };
                log.lock().unwrap().push(target.to_string());
                let Ok(mut upstream) = TcpStream::connect(target).await else {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                let _ = client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await;
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (addr, log)
}

/// Peak and current RSS (KiB) and open fds of a process.
pub fn proc_stats(pid: u32) -> (u64, u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    (field("VmHWM:"), field("VmRSS:"), fds)
}
