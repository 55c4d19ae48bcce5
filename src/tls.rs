//! TLS for every connection cutover opens, with rustls.
//!
//! The settings ride in the endpoint's URL, under the names each dialect's own
//! clients use: PostgreSQL `sslmode` (`disable`, `allow`, `prefer`, `require`,
//! `verify-ca`, `verify-full`) and `sslrootcert` (a PEM file, or `system`); MySQL
//! `ssl-mode` (`DISABLED`, `PREFERRED`, `REQUIRED`, `VERIFY_CA`, `VERIFY_IDENTITY`)
//! and `ssl-ca`. They are taken out of the URL before the driver sees it.
//!
//! As libpq does, `require` with a CA file verifies the chain (`verify-ca`), and the
//! default is `prefer`: TLS when the server offers it, unverified. Only the
//! `verify-*` modes protect against a man in the middle.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::Context as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// How much TLS a connection insists on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// Never.
    Disable,
    /// When the server offers it; the certificate is not checked.
    Prefer,
    /// Always; the certificate is not checked.
    Require,
    /// Always; the certificate chains to the CA (any host name).
    VerifyCa,
    /// Always; the certificate chains to the CA and names the host.
    VerifyFull,
}

/// An endpoint's TLS settings.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    pub mode: TlsMode,
    /// `sslrootcert` / `ssl-ca`: the CA certificates (PEM). `None`: the system's.
    pub ca_file: Option<PathBuf>,
}

/// Which driver's parameter names a URL uses (libpq's `sslmode`, or MySQL's `ssl-mode`).
#[derive(Clone, Copy)]
pub enum Driver {
    Postgres,
    Mysql,
}

impl TlsSettings {
    /// Takes the TLS parameters out of `url`: (the URL without them, the settings).
    pub fn from_url(url: &str, driver: Driver) -> anyhow::Result<(String, TlsSettings)> {
        let (mode_key, ca_key) = match driver {
            Driver::Postgres => ("sslmode", "sslrootcert"),
            Driver::Mysql => ("ssl-mode", "ssl-ca"),
        };
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut kept = Vec::new();
        let (mut mode, mut ca_file) = (None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if key == mode_key {
                mode = Some(parse_mode(&crate::config::percent_decode(value), driver)?);
            } else if key == ca_key {
                ca_file = Some(PathBuf::from(crate::config::percent_decode(value)));
            } else {
                kept.push(pair);
            }
        }
        let ca_file = ca_file.filter(|path| path.as_os_str() != "system");
        let mode = match (mode.unwrap_or(TlsMode::Prefer), &ca_file) {
            (TlsMode::Require, Some(_)) => TlsMode::VerifyCa,
            (mode, _) => mode,
        };
        let url = if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) };
        Ok((url, TlsSettings { mode, ca_file }))
    }

    /// The rustls client configuration for this mode; `None` for `Disable`.
    pub fn client_config(&self) -> anyhow::Result<Option<Arc<rustls::ClientConfig>>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("setting up TLS")?;
        let verifier: Arc<dyn ServerCertVerifier> = match self.mode {
            TlsMode::Disable => return Ok(None),
            TlsMode::Prefer | TlsMode::Require => Arc::new(LenientVerifier { provider, chain: None }),
            TlsMode::VerifyCa | TlsMode::VerifyFull => {
                let roots = Arc::new(self.root_store()?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .context("setting up TLS certificate verification")?;
                match self.mode {
                    TlsMode::VerifyCa => Arc::new(LenientVerifier { provider, chain: Some(webpki) }),
                    _ => webpki,
                }
            }
        };
        let config = builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth();
        Ok(Some(Arc::new(config)))
    }

    fn root_store(&self) -> anyhow::Result<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| anyhow::anyhow!("cannot read the CA file {}: {e}", path.display()))?;
                let (added, _) = roots.add_parsable_certificates(certs);
                anyhow::ensure!(added > 0, "the CA file {} holds no usable certificate", path.display());
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(native.certs);
                anyhow::ensure!(
                    !roots.is_empty(),
                    "no system CA certificates found to verify the server with: name a CA file \
                     (sslrootcert=/path/ca.pem for PostgreSQL, ssl-ca=/path/ca.pem for MySQL)"
                );
            }
        }
        Ok(roots)
    }
}

fn parse_mode(value: &str, driver: Driver) -> anyhow::Result<TlsMode> {
    Ok(match (driver, value) {
        (Driver::Postgres, "disable") => TlsMode::Disable,
        (Driver::Postgres, "allow" | "prefer") => TlsMode::Prefer,
        (Driver::Postgres, "require") => TlsMode::Require,
        (Driver::Postgres, "verify-ca") => TlsMode::VerifyCa,
        (Driver::Postgres, "verify-full") => TlsMode::VerifyFull,
        (Driver::Postgres, other) => {
            anyhow::bail!("sslmode={other} is not a mode: use disable, prefer, require, verify-ca or verify-full")
        }
        (Driver::Mysql, v) if v.eq_ignore_ascii_case("DISABLED") => TlsMode::Disable,
        (Driver::Mysql, v) if v.eq_ignore_ascii_case("PREFERRED") => TlsMode::Prefer,
        (Driver::Mysql, v) if v.eq_ignore_ascii_case("REQUIRED") => TlsMode::Require,
        (Driver::Mysql, v) if v.eq_ignore_ascii_case("VERIFY_CA") => TlsMode::VerifyCa,
        (Driver::Mysql, v) if v.eq_ignore_ascii_case("VERIFY_IDENTITY") => TlsMode::VerifyFull,
        (Driver::Mysql, other) => anyhow::bail!(
            "ssl-mode={other} is not a mode: use DISABLED, PREFERRED, REQUIRED, VERIFY_CA or VERIFY_IDENTITY"
        ),
    })
}

/// The lenient modes' certificate check: `require` / `prefer` accept any
/// certificate (encryption without authentication, as libpq does); `verify-ca`
/// (`chain` set) wants the chain to lead to the CA but not the host's name in it.
/// The handshake's own signatures are checked either way.
#[derive(Debug)]
struct LenientVerifier {
    provider: Arc<rustls::crypto::CryptoProvider>,
    chain: Option<Arc<WebPkiServerVerifier>>,
}

impl ServerCertVerifier for LenientVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else { return Ok(ServerCertVerified::assertion()) };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A PostgreSQL connection's TLS: the mode and, unless disabled, the rustls config.
#[derive(Clone)]
pub struct PostgresTls {
    pub mode: TlsMode,
    config: Option<Arc<rustls::ClientConfig>>,
}

impl PostgresTls {
    pub fn new(settings: &TlsSettings) -> anyhow::Result<PostgresTls> {
        Ok(PostgresTls { mode: settings.mode, config: settings.client_config()? })
    }

    /// tokio-postgres's own negotiation mode for this setting.
    pub fn driver_mode(&self) -> tokio_postgres::config::SslMode {
        match self.mode {
            TlsMode::Disable => tokio_postgres::config::SslMode::Disable,
            TlsMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        }
    }

    /// Negotiates TLS on a fresh PostgreSQL socket (`SSLRequest`), for connections
    /// cutover speaks the protocol on itself (the walsender connection).
    pub async fn negotiate(&self, mut stream: TcpStream, host: &str) -> std::io::Result<MaybeTls> {
        let Some(config) = &self.config else { return Ok(MaybeTls::Plain(stream)) };
        // SSLRequest: length 8, then the magic code 1234.5679.
        stream.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).await?;
        let mut answer = [0u8; 1];
        stream.read_exact(&mut answer).await?;
        match answer[0] {
            b'S' => {
                let name = server_name(host)?;
                let tls = tokio_rustls::TlsConnector::from(config.clone()).connect(name, stream).await?;
                Ok(MaybeTls::Tls(Box::new(tls)))
            }
            b'N' if self.mode == TlsMode::Prefer => Ok(MaybeTls::Plain(stream)),
            b'N' => Err(std::io::Error::other(
                "the server does not accept TLS connections (ssl = off), but sslmode asks for TLS",
            )),
            other => Err(std::io::Error::other(format!("unexpected answer {other:#x} to SSLRequest"))),
        }
    }
}

fn server_name(host: &str) -> std::io::Result<ServerName<'static>> {
    ServerName::try_from(host.to_string())
        .map_err(|e| std::io::Error::other(format!("`{host}` cannot be checked against a certificate: {e}")))
}

/// A socket, encrypted or not.
pub enum MaybeTls {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for MaybeTls {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MaybeTls {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for PostgresTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PostgresTlsStream<S>;
    type TlsConnect = PostgresTlsConnect;
    type Error = std::io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> std::io::Result<PostgresTlsConnect> {
        Ok(PostgresTlsConnect { config: self.config.clone(), name: server_name(domain)? })
    }
}

/// One tokio-postgres connection's TLS handshake (never asked for with `sslmode=disable`).
pub struct PostgresTlsConnect {
    config: Option<Arc<rustls::ClientConfig>>,
    name: ServerName<'static>,
}

impl<S> tokio_postgres::tls::TlsConnect<S> for PostgresTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PostgresTlsStream<S>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = std::io::Result<PostgresTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let config = self.config.ok_or_else(|| std::io::Error::other("TLS is disabled (sslmode=disable)"))?;
            let tls = tokio_rustls::TlsConnector::from(config).connect(self.name, stream).await?;
            Ok(PostgresTlsStream(Box::new(tls)))
        })
    }
}

/// An encrypted tokio-postgres socket.
pub struct PostgresTlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PostgresTlsStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(self.get_mut().0.as_mut()).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PostgresTlsStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(self.get_mut().0.as_mut()).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(self.get_mut().0.as_mut()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(self.get_mut().0.as_mut()).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for PostgresTlsStream<S> {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        tokio_postgres::tls::ChannelBinding::none()
    }
}

/// mysql_async's TLS options for these settings; `None` for no TLS.
pub fn mysql_ssl_opts(settings: &TlsSettings) -> Option<mysql_async::SslOpts> {
    let opts = mysql_async::SslOpts::default();
    let opts = match &settings.ca_file {
        Some(path) => opts.with_root_certs(vec![path.clone().into()]).with_disable_built_in_roots(true),
        None => opts,
    };
    match settings.mode {
        TlsMode::Disable => None,
        TlsMode::Prefer | TlsMode::Require => {
            Some(opts.with_danger_accept_invalid_certs(true).with_danger_skip_domain_validation(true))
        }
        TlsMode::VerifyCa => Some(opts.with_danger_skip_domain_validation(true)),
        TlsMode::VerifyFull => Some(opts),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_come_out_of_the_url() {
        let (url, tls) =
            TlsSettings::from_url("postgresql://u@h/db?sslmode=verify-full&application_name=x", Driver::Postgres)
                .expect("valid");
        assert_eq!(
            (url.as_str(), tls.mode, tls.ca_file),
            ("postgresql://u@h/db?application_name=x", TlsMode::VerifyFull, None)
        );
        let (url, tls) =
            TlsSettings::from_url("postgresql://u@h/db?sslmode=require&sslrootcert=%2Fetc%2Fca.pem", Driver::Postgres)
                .expect("valid");
        assert_eq!(url, "postgresql://u@h/db");
        // As libpq: a CA file makes `require` verify the chain.
        assert_eq!((tls.mode, tls.ca_file), (TlsMode::VerifyCa, Some(PathBuf::from("/etc/ca.pem"))));
        let (url, tls) =
            TlsSettings::from_url("mysql://u@h/shop?ssl-mode=verify_identity&ssl-ca=system", Driver::Mysql)
                .expect("valid");
        assert_eq!((url.as_str(), tls.mode, tls.ca_file), ("mysql://u@h/shop", TlsMode::VerifyFull, None));
        let (_, tls) = TlsSettings::from_url("mysql://u@h/shop", Driver::Mysql).expect("valid");
        assert_eq!(tls.mode, TlsMode::Prefer);
        let error = TlsSettings::from_url("postgresql://u@h/db?sslmode=verify_full", Driver::Postgres)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("verify-full"), "{error}");
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let tls = TlsSettings { mode: TlsMode::VerifyFull, ca_file: Some(PathBuf::from("/nonexistent/ca.pem")) };
        let error = tls.client_config().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.contains("/nonexistent/ca.pem"), "{error}");
    }
}
