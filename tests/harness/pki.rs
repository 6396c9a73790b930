//! Test certificates: a CA, a certificate for servers on this machine (`localhost` and
//! 127.0.0.1, usable as server and client) and two for clients, as PEM files in a directory,
//! each with its SHA-256 fingerprint as `openssl x509 -noout -fingerprint -sha256` prints it.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// Writes `ca.crt` and, for `server`, `client` and `other`, `<stem>.crt`, `<stem>.key` and
    /// `<stem>.sha256` into `dir`.
    pub fn write(dir: &Path, ca_name: &str) -> anyhow::Result<Self> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca_params
            .distinguished_name
            .push(DnType::CommonName, ca_name);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
        std::fs::write(dir.join("ca.crt"), ca.pem())?;
        for (stem, usages) in [
            (
                "server",
                vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ],
            ),
            ("client", vec![ExtendedKeyUsagePurpose::ClientAuth]),
            ("other", vec![ExtendedKeyUsagePurpose::ClientAuth]),
        ] {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
            params
                .subject_alt_names
                .push(SanType::IpAddress([127, 0, 0, 1].into()));
            params.distinguished_name.push(DnType::CommonName, stem);
            params.extended_key_usages = usages;
            let cert = params.signed_by(&key, &ca)?;
            std::fs::write(dir.join(format!("{stem}.crt")), cert.pem())?;
            let fingerprint: Vec<String> = Sha256::digest(cert.der())
                .iter()
                .map(|b| format!("{b:02X}"))
                .collect();
            std::fs::write(dir.join(format!("{stem}.sha256")), fingerprint.join(":"))?;
            std::fs::write(dir.join(format!("{stem}.key")), key.serialize_pem())?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}
