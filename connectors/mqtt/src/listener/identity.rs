//! A device's identity from its TLS client certificate: the subject's common name.

use rustls::pki_types::CertificateDer;

/// The first common name (CN) of the certificate's subject, if it has one that is UTF-8.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let name = parsed
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    Some(name)
}
