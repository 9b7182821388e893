//! How to reach a verifier, parsed from what a user types.

use std::path::PathBuf;

use anyhow::{Context, bail};

/// How to reach a verifier.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// `host:port`.
    pub addr: String,
    /// TLS: PEM file of the CA that signed the server's certificate, and the server name
    /// to check; `None` for cleartext h2c.
    pub tls: Option<(PathBuf, String)>,
    /// Bearer token sent in the `Authorization` header.
    pub bearer: Option<String>,
}

impl Endpoint {
    /// A cleartext endpoint without a token.
    pub fn plain(addr: impl Into<String>) -> Self {
        Endpoint {
            addr: addr.into(),
            tls: None,
            bearer: None,
        }
    }

    /// Parses `http://HOST:PORT` (h2c), `https://HOST:PORT` (TLS, needs `tls_ca`: the CA
    /// that signed the verifier's certificate) or a bare `HOST:PORT`.
    pub fn parse(
        url: &str,
        tls_ca: Option<PathBuf>,
        bearer: Option<String>,
    ) -> anyhow::Result<Endpoint> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            (false, url)
        };
        let addr = rest.trim_end_matches('/').to_string();
        if addr.is_empty() || !addr.contains(':') {
            bail!("bad verifier address `{url}`: expected http://HOST:PORT or https://HOST:PORT");
        }
        let tls = if tls {
            let ca = tls_ca.context(
                "an https:// verifier needs --tls-ca FILE.pem (the CA that signed its certificate)",
            )?;
            let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
            Some((ca, host.trim_matches(['[', ']']).to_string()))
        } else {
            None
        };
        Ok(Endpoint { addr, tls, bearer })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_schemes_and_refuses_what_it_cannot_reach() {
        let e = Endpoint::parse("http://127.0.0.1:8080/", None, Some("t".into())).unwrap();
        assert_eq!(e.addr, "127.0.0.1:8080");
        assert!(e.tls.is_none());
        assert_eq!(e.bearer.as_deref(), Some("t"));
        let e = Endpoint::parse("https://[::1]:443", Some("ca.pem".into()), None).unwrap();
        assert_eq!(e.tls, Some((PathBuf::from("ca.pem"), "::1".to_string())));
        let e = Endpoint::parse("https://verifier.example:443", None, None).unwrap_err();
        assert!(format!("{e}").contains("--tls-ca"), "{e}");
        let e = Endpoint::parse("http://nohost", None, None).unwrap_err();
        assert!(format!("{e}").contains("HOST:PORT"), "{e}");
        assert!(Endpoint::parse("", None, None).is_err());
    }
}
