//! The per-configuration snapshot: everything derived from one validated [`Config`] that the
//! workers and the control thread read. [`Snapshot::build`] makes all of it — the route
//! table, the rustls client configuration and server name of every TLS backend, the health
//! slot of every backend, and the QUIC settings, checked by building them — before anything is
//! published; a snapshot that exists is complete. It is shared read-only (`Arc`) and never
//! changes: a reload builds a new one beside it.
//!
//! What does not live here: state of the whole process (counters, the health board, keys),
//! and what each worker builds from a snapshot for itself (connection pools, balancers).

use crate::board::{BackendKey, BackendSlot, HealthBoard};
use crate::certs::{CertError, Certificates, TlsShared};
use crate::config::{BackendProtocol, BackendTls, Config, EarlyData};
use crate::keys::{KeyError, KeyRing, Keys};
use crate::routing::{RouteError, RouteTable};
use std::path::PathBuf;
use std::sync::Arc;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::ServerName;

/// The configuration in force, with everything derived from it.
pub struct Snapshot {
    pub config: Config,
    pub routes: RouteTable,
    /// `[upstream][backend]`, in the configuration's order.
    pub backends: Vec<Vec<BackendPlan>>,
    /// The stateless-reset and Retry-token keys (from `quic.key_file`).
    pub keys: KeyRing,
    /// 1 at start, +1 per successful reload.
    pub generation: u64,
    /// The listener's certificates, by SNI (both listeners).
    pub certs: Arc<Certificates>,
    /// The TLS server configuration of the TCP listener (ALPN h2 and http/1.1), when on.
    pub tcp_tls: Option<Arc<rustls::ServerConfig>>,
    /// The `alt-svc` field every response carries, when on: `h3=":PORT"; ma=SECONDS`.
    pub alt_svc: Option<http::HeaderValue>,
}

/// Told about every snapshot that becomes current (the health checker follows).
pub type Follower = Box<dyn Fn(&Arc<Snapshot>) + Send + Sync>;

/// What a worker needs to reach one backend, besides its address.
pub struct BackendPlan {
    /// Its published health.
    pub slot: Arc<BackendSlot>,
    /// TLS towards it, or `None` for h2c.
    pub tls: Option<TlsPlan>,
}

/// A TLS backend's client configuration (ALPN h2) and the name its certificate must carry.
#[derive(Clone)]
pub struct TlsPlan {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
}

/// Why a snapshot could not be built from a valid configuration.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("routing table: {0}")]
    Routes(#[from] RouteError),
    #[error("backend {backend}: TLS: {source}")]
    BackendTls {
        backend: String,
        #[source]
        source: TlsError,
    },
    #[error("listen.tls: {0}")]
    Quic(#[from] QuicConfigError),
    #[error("quic.key_file: {0}")]
    Keys(#[from] KeyError),
    #[error("listen.tls (TCP): {0}")]
    TcpTls(String),
    #[error("listen.tls: {0}")]
    Certificates(#[from] CertError),
}

/// Why a TLS backend's client configuration could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read CA file {}: {source}", path.display())]
    ReadCa {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CA file {}: {reason}", path.display())]
    BadCa { path: PathBuf, reason: String },
    #[error("server_name {0:?} is not a DNS name or IP address")]
    ServerName(String),
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

/// Why quiche refused the listener's QUIC/TLS settings.
#[derive(Debug, thiserror::Error)]
pub enum QuicConfigError {
    #[error("{0}")]
    Certificates(#[from] CertError),
    #[error("{0}")]
    Setting(#[from] quiche::Error),
    #[error("HTTP/3: {0}")]
    H3(#[from] quiche::h3::Error),
}

impl Snapshot {
    /// Builds the snapshot of `config`, taking each backend's health slot from `board`, each
    /// certificate's handshake counter from `tls`, and the keys from `quic.key_file` (created
    /// when missing) or, without one, `own_keys` (the process's random keys).
    ///
    /// # Errors
    /// [`SnapshotError`] naming the part that cannot be built: nothing is published then.
    pub fn build(
        config: Config,
        board: &HealthBoard,
        tls: &Arc<TlsShared>,
        own_keys: &Keys,
        generation: u64,
    ) -> Result<Self, SnapshotError> {
        let certs = Arc::new(Certificates::load(&config.listen.tls, tls)?);
        let keys = match &config.quic.key_file {
            Some(path) => Keys::load_or_create(path, &ring::rand::SystemRandom::new())?,
            None => own_keys.clone(),
        };
        let routes_in: Vec<(usize, &crate::config::Route)> = config
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, u)| (i, &u.route))
            .collect();
        let routes = RouteTable::new(&routes_in)?;
        let mut backends = Vec::with_capacity(config.upstreams.len());
        for up in &config.upstreams {
            let mut row = Vec::with_capacity(up.backends.len());
            for b in &up.backends {
                let tls = match &b.tls {
                    None => None,
                    Some(t) => {
                        if !t.verify {
                            tracing::warn!(backend = %b.id, "TLS certificate verification is DISABLED for this backend (tls.verify: false)");
                        }
                        Some(tls_plan(t, b.protocol).map_err(|source| {
                            SnapshotError::BackendTls {
                                backend: b.id.clone(),
                                source,
                            }
                        })?)
                    }
                };
                let slot = board.slot(BackendKey {
                    pool: up.name.clone(),
                    id: b.id.clone(),
                    address: b.address,
                });
                row.push(BackendPlan { slot, tls });
            }
            backends.push(row);
        }
        // Digits, quotes, `=`, `;` and spaces only: always a valid field value.
        let alt_svc = config.listen.alt_svc.and_then(|a| {
            http::HeaderValue::try_from(format!("h3=\":{}\"; ma={}", a.port, a.max_age.as_secs()))
                .ok()
        });
        let mut snapshot = Self {
            config,
            routes,
            backends,
            keys: KeyRing::from(&keys),
            generation,
            certs,
            tcp_tls: None,
            alt_svc,
        };
        // Proves the certificate, the key and every QUIC setting before anyone relies on them.
        snapshot.quic_config()?;
        snapshot.h3_config()?;
        if snapshot.config.listen.tcp.is_some() {
            snapshot.tcp_tls = Some(tcp_tls(&snapshot.certs, &snapshot.keys)?);
        }
        Ok(snapshot)
    }

    /// The plan of backend `b` of upstream `u`.
    pub fn backend(&self, u: usize, b: usize) -> Option<&BackendPlan> {
        self.backends.get(u)?.get(b)
    }

    /// A QUIC configuration for one worker (each worker gets its own: quiche's TLS context
    /// is per configuration).
    ///
    /// # Errors
    /// [`QuicConfigError`] naming what quiche refused.
    pub fn quic_config(&self) -> Result<quiche::Config, QuicConfigError> {
        let cfg = &self.config;
        let mut q = quiche::Config::with_boring_ssl_ctx_builder(
            quiche::PROTOCOL_VERSION,
            self.certs.quic_context()?,
        )?;
        q.set_application_protos(quiche::h3::APPLICATION_PROTOCOL)?;
        let quic = &cfg.quic;
        q.set_max_idle_timeout(quic.idle_timeout.as_millis() as u64);
        q.set_max_recv_udp_payload_size(65527);
        q.set_max_send_udp_payload_size(1350);
        q.set_initial_max_data(quic.initial_max_data);
        q.set_initial_max_stream_data_bidi_local(quic.initial_max_stream_data);
        q.set_initial_max_stream_data_bidi_remote(quic.initial_max_stream_data);
        q.set_initial_max_stream_data_uni(1 << 20);
        q.set_initial_max_streams_bidi(quic.max_concurrent_streams);
        q.set_initial_max_streams_uni(16);
        // quiche keeps one path per peer address it has seen, up to this limit, and never
        // frees a path it migrated away from (cloudflare/quiche#2743): a client whose NAT
        // rebinds gets `MAX_PATHS - 1` address changes before its packets are dropped. The
        // limit bounds what a client can make us hold (a path is a recovery state, about a
        // kilobyte); it is also how many connection IDs the client may give us.
        q.set_active_connection_id_limit(MAX_PATHS);
        q.set_disable_active_migration(false);
        q.set_max_connection_window(quic.initial_max_data.max(25 << 20));
        q.set_max_stream_window(quic.initial_max_stream_data.max(16 << 20));
        // One ticket key for every worker (and for a successor): a ticket resumes wherever
        // the new connection lands.
        q.set_ticket_key(&self.keys.ticket)?;
        if quic.early_data != EarlyData::Off {
            // How much a client may send in 0-RTT is what it remembers of our transport
            // parameters (`initial_max_data`, `initial_max_stream_data`): QUIC, not TLS,
            // bounds early data.
            q.enable_early_data();
        }
        Ok(q)
    }

    /// The HTTP/3 settings of every connection.
    ///
    /// # Errors
    /// [`QuicConfigError::H3`] when quiche cannot make one.
    pub fn h3_config(&self) -> Result<quiche::h3::Config, QuicConfigError> {
        let mut h3 = quiche::h3::Config::new()?;
        h3.set_max_field_section_size(hard_header_cap(self.config.proxy.max_header_list_size));
        // SETTINGS_ENABLE_CONNECT_PROTOCOL: WebSockets over HTTP/3 (RFC 9220).
        h3.enable_extended_connect(true);
        Ok(h3)
    }
}

/// The field-section size quiche enforces by closing the connection: well above the limit
/// Spooky answers with 431 per request, so that only absurd sections cost a connection.
fn hard_header_cap(limit: u64) -> u64 {
    limit.saturating_mul(4).max(256 * 1024)
}

/// Network paths a QUIC connection may have (see `set_active_connection_id_limit` above).
pub const MAX_PATHS: u64 = 32;

/// The TCP listener's rustls server configuration: the certificate by SNI, ALPN h2 then
/// http/1.1, TLS 1.2 and 1.3, stateless session tickets.
fn tcp_tls(
    certs: &Arc<Certificates>,
    keys: &KeyRing,
) -> Result<Arc<rustls::ServerConfig>, SnapshotError> {
    let err = |what: &str, e: &dyn std::fmt::Display| SnapshotError::TcpTls(format!("{what}: {e}"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err("protocol versions", &e))?
        .with_no_client_auth()
        .with_cert_resolver(certs.resolver());
    // `acme-tls/1` last: only ACME servers validating TLS-ALPN-01 offer it (alone).
    config.alpn_protocols = vec![
        b"h2".to_vec(),
        b"http/1.1".to_vec(),
        crate::certs::ACME_TLS_ALPN.to_vec(),
    ];
    // Sealed with the shared key (`keys.rs`): tickets resume on every worker, successor and
    // fleet member, as QUIC's do.
    config.ticketer = keys.tcp_tickets.clone();
    Ok(Arc::new(config))
}

/// The rustls client configuration (ALPN by protocol) and server name of a TLS backend.
fn tls_plan(tls: &BackendTls, protocol: BackendProtocol) -> Result<TlsPlan, TlsError> {
    let server_name = ServerName::try_from(tls.server_name.clone())
        .map_err(|_| TlsError::ServerName(tls.server_name.clone()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?;
    let mut config = if tls.verify {
        let mut roots = rustls::RootCertStore::empty();
        match &tls.ca {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|source| TlsError::ReadCa {
                    path: path.clone(),
                    source,
                })?;
                let bad = |reason: String| TlsError::BadCa {
                    path: path.clone(),
                    reason,
                };
                for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                    let cert = cert.map_err(|e| bad(e.to_string()))?;
                    roots.add(cert).map_err(|e| bad(e.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(bad("no certificate".into()));
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                for cert in native.certs {
                    let _ = roots.add(cert);
                }
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify))
            .with_no_client_auth()
    };
    config.alpn_protocols = protocol.alpn();
    Ok(TlsPlan {
        config: Arc::new(config),
        server_name,
    })
}

/// Accepts any certificate: only with `tls.verify: false`, which is logged loudly.
#[derive(Debug)]
struct NoVerify;

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
