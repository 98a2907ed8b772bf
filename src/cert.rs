//! `shop-mesh cert`: a local certificate authority and one certificate it
//! signed, for trying TLS (and mutual TLS) on one machine in a minute.
//! Production certificates come from the operator's own CA; these are for
//! development: the CA's key sits beside its certificate.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use chrono::Datelike;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// `shop-mesh cert` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Where to write ca.pem, ca.key, node.pem and node.key; must not hold
    /// a CA yet.
    #[arg(long, default_value = "certs")]
    pub out: PathBuf,
    /// Names and addresses the certificate is good for, beside localhost,
    /// 127.0.0.1 and ::1; repeat for more.
    #[arg(long = "host", value_name = "NAME")]
    pub hosts: Vec<String>,
}

/// What [`make`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Made {
    /// The CA certificate: what every peer checks against (`tls.ca`).
    pub ca: PathBuf,
    /// The certificate every role serves and, under mutual TLS, shows
    /// (`tls.cert`).
    pub cert: PathBuf,
    /// Its private key (`tls.key`).
    pub key: PathBuf,
}

impl Made {
    /// The files in `dir`, made or not.
    pub fn in_dir(dir: &Path) -> Made {
        Made {
            ca: dir.join("ca.pem"),
            cert: dir.join("node.pem"),
            key: dir.join("node.key"),
        }
    }

    /// Whether all of them are there.
    pub fn exist(&self) -> bool {
        [&self.ca, &self.cert, &self.key].iter().all(|p| p.exists())
    }

    /// The `[connections.tls]` settings that use them, mutual.
    pub fn settings(&self) -> crate::server::Tls {
        crate::server::Tls {
            cert: self.cert.clone(),
            key: self.key.clone(),
            ca: self.ca.clone(),
            mutual: true,
            server_name: String::new(),
        }
    }
}

impl Args {
    /// Makes the files and says what to do with them.
    pub fn run(&self) -> anyhow::Result<()> {
        let made = make(&self.out, &self.hosts)?;
        println!(
            "made a development CA and a certificate it signed, for {}:\n\
             \x20 {}  the CA (tls.ca, grpcurl -cacert)\n\
             \x20 {}  the certificate (tls.cert)\n\
             \x20 {}  its key (tls.key)\n\n\
             Run every role with --tls-cert {} --tls-key {} --tls-ca {} (and --tls-mutual for mutual TLS).",
            hosts(&self.hosts).join(", "),
            made.ca.display(),
            made.cert.display(),
            made.key.display(),
            made.cert.display(),
            made.key.display(),
            made.ca.display(),
        );
        Ok(())
    }
}

fn hosts(extra: &[String]) -> Vec<String> {
    let mut all: Vec<String> = ["localhost", "127.0.0.1", "::1"].map(String::from).into();
    for host in extra {
        if !all.contains(host) {
            all.push(host.clone());
        }
    }
    all
}

/// Makes a CA (good for ten years) and a certificate it signed for
/// `extra` hosts beside the loopback ones (good for one year, for serving
/// and for calling), in `dir`; the keys readable by their owner only.
pub fn make(dir: &Path, extra: &[String]) -> anyhow::Result<Made> {
    let made = Made::in_dir(dir);
    anyhow::ensure!(
        !made.ca.exists(),
        "{} already holds a CA; give another --out",
        dir.display()
    );
    std::fs::create_dir_all(dir).with_context(|| format!("cannot make {}", dir.display()))?;
    let today = chrono::Utc::now().date_naive();
    // From yesterday (a peer's clock a little behind still takes it), for
    // whole years; the 28th at the latest, so every year has the day.
    let day = today.day().min(28) as u8;
    let years = |n: i32| rcgen::date_time_ymd(today.year() + n, today.month() as u8, day);
    let since = rcgen::date_time_ymd(
        today.year(),
        today.month() as u8,
        day.saturating_sub(1).max(1),
    );

    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "shop-mesh development CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = since;
    ca.not_after = years(10);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;

    let names = hosts(extra);
    let mut node = CertificateParams::new(Vec::<String>::new())?;
    node.distinguished_name
        .push(DnType::CommonName, "shop-mesh");
    node.subject_alt_names = names
        .iter()
        .map(|name| match name.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(name.clone().try_into()?)),
        })
        .collect::<Result<_, rcgen::Error>>()
        .context("a --host is neither an address nor a DNS name")?;
    node.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    node.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    node.not_before = since;
    node.not_after = years(1);
    let node_key = KeyPair::generate()?;
    let issuer = Issuer::new(ca, ca_key);
    let node_cert = node.signed_by(&node_key, &issuer)?;

    let write = |path: &Path, text: &str| {
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
    };
    let private = |path: &Path, text: &str| {
        crate::auth::write_private(path, text.trim_end())
            .with_context(|| format!("cannot write {}", path.display()))
    };
    write(&made.ca, &ca_cert.pem())?;
    private(&dir.join("ca.key"), &issuer.key().serialize_pem())?;
    write(&made.cert, &node_cert.pem())?;
    private(&made.key, &node_key.serialize_pem())?;
    Ok(made)
}
