//! The resolver against a DNS server on loopback.

mod common;

use std::time::Duration;

use common::dns::DnsServer;
use postern::dns::{DnsError, MxHost, Resolver};

#[tokio::test]
async fn mx_implicit_null_nxdomain_servfail() {
    let dns = DnsServer::start().await;
    dns.mx("example.test", 20, "mx2.example.test");
    dns.mx("example.test", 10, "mx1a.example.test");
    dns.mx("example.test", 10, "mx1b.example.test");
    dns.addr("mx1a.example.test", "127.0.0.1");
    dns.addr("mx1a.example.test", "::1");
    dns.addr("implicit.test", "127.0.0.2");
    dns.mx("nullmx.test", 0, ".");
    dns.servfail("broken.test");
    let r = Resolver::new(&[dns.nameserver()], Duration::from_secs(2)).unwrap();

    let mut seen_first = std::collections::HashSet::new();
    for _ in 0..20 {
        let hosts = r.mx("example.test").await.unwrap();
        assert_eq!(hosts.len(), 3);
        assert_eq!(hosts[0].preference, 10);
        assert_eq!(
            hosts[2],
            MxHost {
                preference: 20,
                name: "mx2.example.test".into()
            }
        );
        seen_first.insert(hosts[0].name.clone());
    }
    assert_eq!(
        seen_first.len(),
        2,
        "equal preferences are chosen at random"
    );

    let mut ips = r.addresses("mx1a.example.test").await.unwrap();
    ips.sort();
    assert_eq!(
        ips,
        vec![
            "127.0.0.1".parse::<std::net::IpAddr>().unwrap(),
            "::1".parse().unwrap()
        ]
    );

    assert_eq!(
        r.mx("implicit.test").await.unwrap(),
        vec![MxHost {
            preference: 0,
            name: "implicit.test".into()
        }]
    );
    assert_eq!(
        r.mx("nullmx.test").await,
        Err(DnsError::NullMx("nullmx.test".into()))
    );
    assert_eq!(
        r.mx("nope.test").await,
        Err(DnsError::NoSuchDomain("nope.test".into()))
    );
    let e = r.mx("broken.test").await.unwrap_err();
    assert!(e.is_temporary(), "{e:?}");
    assert_eq!(
        r.addresses("mx2.example.test").await,
        Err(DnsError::NoSuchDomain("mx2.example.test".into()))
    );
}
