//! `postern dns-records`: what an operator publishes for a sending domain.

use super::keygen::{public_key_record, public_of_pem, txt_chunks, Algorithm};
use super::DkimError;
use crate::config::Config;

/// The DKIM, SPF and DMARC records for `domain`, one explained line each.
pub fn dns_records(config: &Config, domain: &str) -> Result<String, DkimError> {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let mut out = String::new();
    let keys: Vec<_> = config
        .dkim
        .keys
        .iter()
        .filter(|k| k.domain.eq_ignore_ascii_case(&domain))
        .collect();
    if keys.is_empty() {
        out.push_str(&format!(
            "; No [[dkim.key]] for {domain}: create one with\n;   postern dkim keygen --domain {domain} --selector s1\n"
        ));
    }
    for k in keys {
        let path = config.path(&k.private_key);
        let algorithm = Algorithm::parse(&k.algorithm).ok_or_else(|| DkimError::Key {
            path: path.clone(),
            reason: format!("unknown algorithm {:?}", k.algorithm),
        })?;
        let pem = std::fs::read_to_string(&path).map_err(|e| DkimError::Key {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let public = public_of_pem(&pem, algorithm).ok_or_else(|| DkimError::Key {
            path: path.clone(),
            reason: "not a private key of that algorithm".into(),
        })?;
        out.push_str(&format!(
            "; DKIM ({}): receivers fetch this key to verify Postern's signatures for {domain}.\n",
            algorithm.config_name()
        ));
        out.push_str(&format!(
            "{}._domainkey.{domain}. IN TXT {}\n",
            k.selector,
            txt_chunks(&public_key_record(algorithm, &public))
        ));
    }
    let senders: Vec<String> = config
        .server
        .public_addresses
        .iter()
        .map(|ip| match ip {
            std::net::IpAddr::V4(v4) => format!("ip4:{v4}"),
            std::net::IpAddr::V6(v6) => format!("ip6:{v6}"),
        })
        .collect();
    let mechanisms = if senders.is_empty() {
        format!("a:{}", config.server.hostname)
    } else {
        senders.join(" ")
    };
    out.push_str("; SPF: the hosts allowed to send mail for the domain (set server.public_addresses to list them); ~all soft-fails the rest.\n");
    out.push_str(&format!("{domain}. IN TXT \"v=spf1 {mechanisms} ~all\"\n"));
    out.push_str("; DMARC: start with p=none and read the aggregate reports sent to rua before moving to quarantine or reject.\n");
    out.push_str(&format!(
        "_dmarc.{domain}. IN TXT \"v=DMARC1; p=none; rua=mailto:dmarc-reports@{domain}\"\n"
    ));
    Ok(out)
}
