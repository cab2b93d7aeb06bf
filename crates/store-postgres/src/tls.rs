//! TLS to PostgreSQL, as libpq's `sslmode` and `sslrootcert` ask for it, over rustls.
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | absent, `disable` | no | |
//! | `prefer` | if the server offers it | not checked |
//! | `require` | yes | not checked (checked as for `verify-ca` when `sslrootcert` is given) |
//! | `verify-ca` | yes | signed by a root of `sslrootcert` |
//! | `verify-full` | yes | signed by a root of `sslrootcert`, and names the host connected to |
//!
//! `sslrootcert` is a file of PEM certificates, or `system` for the operating system's roots.
//! Unlike libpq, a connection string without `sslmode` does not try TLS: Farthing encrypts
//! when told to. The two settings are read here and taken out of the string before the rest
//! goes to `tokio_postgres::Config`, which does not know the last three modes or the root file.

use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{
    ClientConfig, DigitallySignedStruct, Error as TlsError, RootCertStore, SignatureScheme,
};
use tokio_postgres::Config;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::PgError;

/// A connection string read: what to connect to, and how to make its TLS.
pub(crate) struct Target {
    pub(crate) config: Config,
    pub(crate) tls: MakeRustlsConnect,
}

/// How much of the server's certificate is checked.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Check {
    Nothing,
    Chain,
    ChainAndName,
}

/// Reads a connection string (a `postgres://` URL or `key=value` pairs).
pub(crate) fn target(url: &str) -> Result<Target, PgError> {
    let (rest, sslmode, root) = take_tls_settings(url)?;
    let mut config = Config::from_str(&rest)?;
    let root = root.as_deref();
    let (mode, check) = match (sslmode.as_deref(), root) {
        (None | Some("disable"), _) => (SslMode::Disable, Check::Nothing),
        (Some("prefer"), _) => (SslMode::Prefer, Check::Nothing),
        (Some("require"), None) => (SslMode::Require, Check::Nothing),
        (Some("require" | "verify-ca"), Some(_)) => (SslMode::Require, Check::Chain),
        (Some("verify-full"), Some(_)) => (SslMode::Require, Check::ChainAndName),
        (Some(mode @ ("verify-ca" | "verify-full")), None) => {
            return Err(settings(format!(
                "sslmode={mode} needs sslrootcert: a file of CA certificates, or `system`"
            )));
        }
        (Some(other), _) => {
            return Err(settings(format!(
                "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
            )));
        }
    };
    config.ssl_mode(mode);
    let tls = MakeRustlsConnect::new(client_config(check, root)?);
    Ok(Target { config, tls })
}

fn settings(message: String) -> PgError {
    PgError::Settings(message)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_config(check: Check, root: Option<&str>) -> Result<ClientConfig, PgError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|error| settings(format!("TLS: {error}")))?;
    let config = match check {
        Check::Nothing => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unchecked(
                provider.signature_verification_algorithms,
            )))
            .with_no_client_auth(),
        Check::Chain => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly {
                roots: Arc::new(roots(root.unwrap_or("system"))?),
                signatures: Unchecked(provider.signature_verification_algorithms),
            }))
            .with_no_client_auth(),
        Check::ChainAndName => {
            let roots = Arc::new(roots(root.unwrap_or("system"))?);
            let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|error| settings(format!("TLS: {error}")))?;
            builder.with_webpki_verifier(verifier).with_no_client_auth()
        }
    };
    Ok(config)
}

/// The roots of `sslrootcert`: a PEM file, or the operating system's.
fn roots(root: &str) -> Result<RootCertStore, PgError> {
    let mut store = RootCertStore::empty();
    if root == "system" {
        let found = rustls_native_certs::load_native_certs();
        store.add_parsable_certificates(found.certs);
        if store.is_empty() {
            return Err(settings(
                "sslrootcert=system: no CA certificates found on this system".into(),
            ));
        }
        return Ok(store);
    }
    let certificates = CertificateDer::pem_file_iter(root)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .map_err(|error| settings(format!("sslrootcert={root}: {error}")))?;
    let (added, _) = store.add_parsable_certificates(certificates);
    if added == 0 {
        return Err(settings(format!(
            "sslrootcert={root}: no CA certificate in the file"
        )));
    }
    Ok(store)
}

/// `prefer` and `require` without roots: the connection is encrypted, and the handshake's
/// signatures are checked, but not who signed the certificate (libpq does the same).
#[derive(Debug)]
struct Unchecked(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// `verify-ca`: the certificate must chain to a root, whatever host it names; the handshake's
/// signatures are checked as for any connection.
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    signatures: Unchecked,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let certificate = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &certificate,
            &self.roots,
            intermediates,
            now,
            self.signatures.0.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.signatures.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.signatures.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.signatures.supported_verify_schemes()
    }
}

/// The connection string without its `sslmode` and `sslrootcert`, and their values.
type Taken = (String, Option<String>, Option<String>);

fn take_tls_settings(url: &str) -> Result<Taken, PgError> {
    if let Some(rest) = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
    {
        let scheme = &url[..url.len() - rest.len()];
        let Some((before, query)) = rest.split_once('?') else {
            return Ok((url.to_string(), None, None));
        };
        let (mut mode, mut root) = (None, None);
        let mut kept = Vec::new();
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("sslmode", value)) => mode = Some(percent_decoded(value)?),
                Some(("sslrootcert", value)) => root = Some(percent_decoded(value)?),
                _ => kept.push(pair),
            }
        }
        let mut rest = format!("{scheme}{before}");
        if !kept.is_empty() {
            rest.push('?');
            rest.push_str(&kept.join("&"));
        }
        return Ok((rest, mode, root));
    }
    // key=value pairs, values bare or in single quotes (with \' and \\ inside).
    let (mut mode, mut root) = (None, None);
    let mut rest = String::with_capacity(url.len());
    let mut chars = url.char_indices().peekable();
    while let Some(&(start, c)) = chars.peek() {
        if c.is_whitespace() {
            rest.push(c);
            chars.next();
            continue;
        }
        let mut key = String::new();
        while let Some(&(_, c)) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|(_, c)| c.is_whitespace()) {
            chars.next();
        }
        if chars.next_if(|&(_, c)| c == '=').is_none() {
            return Err(settings(format!(
                "`{key}` in the connection string has no value"
            )));
        }
        while chars.peek().is_some_and(|(_, c)| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.next_if(|&(_, c)| c == '\'').is_some() {
            loop {
                match chars.next() {
                    Some((_, '\'')) => break,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, escaped)) => value.push(escaped),
                        None => return Err(settings("an unfinished quote".into())),
                    },
                    Some((_, c)) => value.push(c),
                    None => return Err(settings("an unfinished quote".into())),
                }
            }
        } else {
            while let Some(&(_, c)) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        let end = chars.peek().map_or(url.len(), |&(at, _)| at);
        match key.as_str() {
            "sslmode" => mode = Some(value),
            "sslrootcert" => root = Some(value),
            _ => rest.push_str(&url[start..end]),
        }
    }
    Ok((rest, mode, root))
}

fn percent_decoded(value: &str) -> Result<String, PgError> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'%' {
            let hex = value
                .get(at + 1..at + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or_else(|| settings(format!("a bad %-escape in `{value}`")))?;
            out.push(hex);
            at += 3;
        } else {
            out.push(bytes[at]);
            at += 1;
        }
    }
    String::from_utf8(out).map_err(|_| settings(format!("`{value}` is not UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(url: &str) -> Taken {
        take_tls_settings(url).unwrap()
    }

    #[test]
    fn urls_give_up_their_tls_settings_and_keep_the_rest() {
        assert_eq!(
            taken(
                "postgres://u@db:5432/farthing?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem"
            ),
            (
                "postgres://u@db:5432/farthing?application_name=x".to_string(),
                Some("verify-full".to_string()),
                Some("/etc/ca.pem".to_string())
            )
        );
        assert_eq!(
            taken("postgresql://u@db/farthing?sslmode=require"),
            (
                "postgresql://u@db/farthing".to_string(),
                Some("require".to_string()),
                None
            )
        );
        assert_eq!(
            taken("postgres://u@db/farthing"),
            ("postgres://u@db/farthing".to_string(), None, None)
        );
    }

    #[test]
    fn key_value_strings_give_up_their_tls_settings_and_keep_the_rest_as_written() {
        assert_eq!(
            taken(
                "host=db  password='a b\\'c' sslmode = verify-ca sslrootcert='/my ca.pem' dbname=f"
            ),
            (
                "host=db  password='a b\\'c'   dbname=f".to_string(),
                Some("verify-ca".to_string()),
                Some("/my ca.pem".to_string())
            )
        );
        assert!(take_tls_settings("host=db sslmode").is_err());
        assert!(take_tls_settings("host=db password='open").is_err());
    }

    #[test]
    fn modes_that_check_certificates_need_roots_and_unknown_modes_are_refused() {
        let error = |url: &str| match target(url) {
            Err(PgError::Settings(message)) => message,
            Err(other) => panic!("{url}: {other:?}"),
            Ok(_) => panic!("{url} was accepted"),
        };
        assert!(error("postgres://db/f?sslmode=verify-full").contains("needs sslrootcert"));
        assert!(error("host=db sslmode=verify-ca").contains("needs sslrootcert"));
        assert!(error("postgres://db/f?sslmode=always").contains("not one of"));
        assert!(
            error("postgres://db/f?sslmode=require&sslrootcert=/no/such/file")
                .contains("/no/such/file")
        );
        for (url, mode) in [
            ("postgres://db/f", SslMode::Disable),
            ("postgres://db/f?sslmode=disable", SslMode::Disable),
            ("postgres://db/f?sslmode=prefer", SslMode::Prefer),
            ("postgres://db/f?sslmode=require", SslMode::Require),
        ] {
            assert_eq!(target(url).unwrap().config.get_ssl_mode(), mode, "{url}");
        }
    }
}
