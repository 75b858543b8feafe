//! TLS, all of it in one place: rustls 0.23 with the ring provider (no OpenSSL, no
//! aws-lc). The server serves HTTPS and WSS on its one port with `--tls-cert/--tls-key`;
//! the agent and `iac` verify the server against the system's roots plus an optional
//! private CA (`--ca-cert`), host name included, for HTTP (ureq) and WebSockets alike.
//! There is no fallback to plain text: an `https://` server is TLS or nothing. Mutual
//! TLS is optional: with `--client-ca` the server verifies any client certificate it is
//! given, the router demands one on agent endpoints, and the agent presents
//! `--client-cert/--client-key` ([`Identity`]).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, StreamOwned,
};

use crate::wsloop::Transport;

/// The one crypto provider.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_chain(path: &Path, flag: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{flag} {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{flag} {}: {e}", path.display()))?;
    if chain.is_empty() {
        return Err(format!("{flag} {}: no certificate in it", path.display()));
    }
    Ok(chain)
}

fn load_key(path: &Path, flag: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
}

/// The server's TLS settings from a PEM certificate chain and a PEM private key. With
/// `client_ca`, a client may present a certificate, which must then be signed by that
/// CA (mutual TLS); whether an endpoint demands one is the router's decision
/// ([`ServerStream::client_certified`]), since browsers share the port with agents.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, String> {
    let chain = load_chain(cert, "--tls-cert")?;
    let key = load_key(key, "--tls-key")?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut store = RootCertStore::empty();
            for c in load_chain(ca, "--client-ca")? {
                store
                    .add(c)
                    .map_err(|e| format!("--client-ca {}: {e}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(store),
                provider(),
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| format!("--client-ca {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("--tls-cert/--tls-key do not go together: {e}"))?;
    Ok(Arc::new(config))
}

/// A client's certificate chain and private key, for mutual TLS.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// The key file as read, for ureq, which takes keys as PEM or in its own types.
    key_pem: Vec<u8>,
}

impl Clone for Identity {
    fn clone(&self) -> Identity {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            key_pem: self.key_pem.clone(),
        }
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({} certificates, a key)", self.chain.len())
    }
}

impl Identity {
    /// Reads `--client-cert` (PEM chain) and `--client-key` (PEM private key).
    pub fn load(cert: &Path, key: &Path) -> Result<Identity, String> {
        let key_pem =
            std::fs::read(key).map_err(|e| format!("--client-key {}: {e}", key.display()))?;
        let parsed = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| format!("--client-key {}: {e}", key.display()))?;
        ureq::tls::PrivateKey::from_pem(&key_pem)
            .map_err(|e| format!("--client-key {}: {e}", key.display()))?;
        Ok(Identity {
            chain: load_chain(cert, "--client-cert")?,
            key: parsed,
            key_pem,
        })
    }
}

/// The roots a client trusts: the system's, plus every certificate in `ca` (PEM).
pub fn roots(ca: Option<&Path>) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut roots = Vec::new();
    let native = rustls_native_certs::load_native_certs();
    roots.extend(native.certs);
    if let Some(ca) = ca {
        roots.extend(load_chain(ca, "--ca-cert")?);
    }
    Ok(roots)
}

/// A client's TLS settings for WebSockets, with a client certificate when given.
pub fn client_config(
    roots: &[CertificateDer<'static>],
    identity: Option<&Identity>,
) -> Result<Arc<ClientConfig>, String> {
    let mut store = RootCertStore::empty();
    let (_added, _ignored) = store.add_parsable_certificates(roots.iter().cloned());
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(store);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => builder
            .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
            .map_err(|e| format!("--client-cert/--client-key do not go together: {e}"))?,
    };
    Ok(Arc::new(config))
}

/// ureq's TLS settings with the same roots, provider and client certificate.
pub fn ureq_config(
    roots: &[CertificateDer<'static>],
    identity: Option<&Identity>,
) -> ureq::tls::TlsConfig {
    let certs = roots
        .iter()
        .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    let client_cert = identity.map(|id| {
        use ureq::tls::{Certificate, PrivateKey};
        let chain: Vec<Certificate<'static>> = id
            .chain
            .iter()
            .map(|c| Certificate::from_der(c.as_ref()).to_owned())
            .collect();
        // The key was read from this PEM already, so it parses again.
        let key = PrivateKey::from_pem(&id.key_pem).expect("a key already parsed");
        ureq::tls::ClientCert::new_with_certs(&chain, key)
    });
    ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(provider())
        .root_certs(ureq::tls::RootCerts::Specific(Arc::new(certs)))
        .client_cert(client_cert)
        .build()
}

/// An error message, with a hint when it is a TLS problem.
pub fn describe(e: &dyn std::fmt::Display) -> String {
    let s = e.to_string();
    let tls_ish = [
        "certificate",
        "rustls",
        "tls",
        "TLS",
        "handshake",
        "CorruptMessage",
        "alert",
    ];
    if tls_ish.iter().any(|k| s.contains(k)) && !s.starts_with("TLS: ") {
        explain(&s)
    } else {
        s
    }
}

/// [`describe`], for a client that presents a certificate: a server that refuses it may
/// close the connection before its TLS alert can be read, so a connection cut right
/// there gets a hint too.
pub fn describe_with_identity(e: &dyn std::fmt::Display, presents_cert: bool) -> String {
    let s = describe(e);
    let cut = [
        "Broken pipe",
        "Connection reset",
        "UnexpectedEof",
        "unexpected end",
    ];
    if presents_cert && cut.iter().any(|c| s.contains(c)) {
        format!(
            "{s} (the server closed the connection: if it demands client certificates, it \
             may have refused this side's --client-cert; is it signed by the server's --client-ca?)"
        )
    } else {
        s
    }
}

/// Turns rustls' certificate errors into a sentence that says what to do.
pub fn explain(e: &dyn std::fmt::Display) -> String {
    let s = e.to_string();
    let hint = if s.contains("UnknownIssuer") {
        " (the server's certificate is not signed by a CA this side trusts: pass --ca-cert with the CA that signed it)"
    } else if s.contains("NotValidForName") || s.contains("not valid for name") {
        " (the server's certificate is not for the host name in the URL)"
    } else if s.contains("Expired") {
        " (the server's certificate has expired)"
    } else if [
        "UnknownCA",
        "BadCertificate",
        "CertificateRequired",
        "CertificateUnknown",
    ]
    .iter()
    .any(|a| s.contains(a))
    {
        " (the server refused this side's client certificate: --client-cert must be signed by the server's --client-ca)"
    } else if s.contains("CorruptMessage") || s.contains("InvalidContentType") {
        " (is the server speaking TLS? use http:// for a plain server)"
    } else {
        ""
    };
    format!("TLS: {s}{hint}")
}

/// What the server speaks on an accepted connection.
pub enum ServerStream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ServerConnection, TcpStream>>),
}

impl ServerStream {
    pub fn new(tcp: TcpStream, tls: Option<&Arc<ServerConfig>>) -> io::Result<ServerStream> {
        Ok(match tls {
            None => ServerStream::Plain(tcp),
            Some(config) => {
                let conn = ServerConnection::new(config.clone()).map_err(io::Error::other)?;
                ServerStream::Tls(Box::new(StreamOwned::new(conn, tcp)))
            }
        })
    }
}

impl ServerStream {
    /// Whether the client presented a certificate, which rustls has then verified
    /// against `--client-ca` (a client with a bad one never gets this far).
    pub fn client_certified(&self) -> bool {
        match self {
            ServerStream::Plain(_) => false,
            ServerStream::Tls(s) => s.conn.peer_certificates().is_some_and(|c| !c.is_empty()),
        }
    }
}

/// What a client speaks to the server.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl ClientStream {
    /// Connects to the server of `url` (10 s to connect, reads time out after 10 s until
    /// the caller changes that), with TLS when the URL is `https://`.
    pub fn connect(
        url: &crate::util::ServerUrl,
        config: Option<&Arc<ClientConfig>>,
    ) -> io::Result<ClientStream> {
        use std::net::ToSocketAddrs;
        use std::time::Duration;
        let addr = (url.host.as_str(), url.port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} has no address", url.host),
                )
            })?;
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        if url.tls && config.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an https:// server needs TLS settings",
            ));
        }
        ClientStream::new(tcp, &url.host, if url.tls { config } else { None })
    }

    /// Wraps `tcp` in TLS for `host` when `config` is given, and completes the handshake
    /// (so that certificate problems show up here, with a clear message).
    pub fn new(
        tcp: TcpStream,
        host: &str,
        config: Option<&Arc<ClientConfig>>,
    ) -> io::Result<ClientStream> {
        let Some(config) = config else {
            return Ok(ClientStream::Plain(tcp));
        };
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host}: {e}")))?;
        let conn = ClientConnection::new(config.clone(), name).map_err(io::Error::other)?;
        let mut stream = StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream
                .conn
                .complete_io(&mut stream.sock)
                .map_err(|e| io::Error::new(e.kind(), explain(&e)))?;
        }
        Ok(ClientStream::Tls(Box::new(stream)))
    }
}

macro_rules! stream_impls {
    ($t:ident) => {
        impl Read for $t {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                match self {
                    $t::Plain(s) => s.read(buf),
                    $t::Tls(s) => s.read(buf),
                }
            }
        }

        impl Write for $t {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                match self {
                    $t::Plain(s) => s.write(buf),
                    $t::Tls(s) => s.write(buf),
                }
            }

            fn flush(&mut self) -> io::Result<()> {
                match self {
                    $t::Plain(s) => s.flush(),
                    $t::Tls(s) => s.flush(),
                }
            }
        }

        impl Transport for $t {
            fn tcp(&self) -> &TcpStream {
                match self {
                    $t::Plain(s) => s,
                    $t::Tls(s) => &s.sock,
                }
            }
        }
    };
}

stream_impls!(ServerStream);
stream_impls!(ClientStream);
