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

/// Against dnsmasq, a server that shares no code with hickory: MX by preference, A and AAAA,
/// NXDOMAIN, the implicit MX of a name with only an address, and an MX answer far too big for
/// UDP, which only a TCP retry reads whole.
#[tokio::test]
async fn a_real_dns_server_with_an_answer_too_big_for_udp() {
    let mut records: Vec<String> = [
        "--mx-host=example.test,mx2.example.test,20",
        "--mx-host=example.test,mx1.example.test,10",
        "--host-record=mx1.example.test,127.0.0.1,::1",
        "--host-record=implicit.test,127.0.0.2",
        "--host-record=mx.big.test,127.0.0.3",
    ]
    .map(String::from)
    .to_vec();
    records.extend(common::dnsmasq::big_mx_answer(
        "big.test",
        150,
        "mx.big.test",
    ));
    let Some(dns) = common::dnsmasq::Dnsmasq::start(&records) else {
        return;
    };
    let r = Resolver::new(&[dns.nameserver()], Duration::from_secs(2)).unwrap();

    let hosts = r.mx("example.test").await.unwrap();
    let names: Vec<(u16, &str)> = hosts
        .iter()
        .map(|h| (h.preference, h.name.as_str()))
        .collect();
    assert_eq!(
        names,
        vec![(10, "mx1.example.test"), (20, "mx2.example.test")]
    );
    let mut ips = r.addresses("mx1.example.test").await.unwrap();
    ips.sort();
    assert_eq!(
        ips,
        vec![
            "127.0.0.1".parse::<std::net::IpAddr>().unwrap(),
            "::1".parse().unwrap()
        ]
    );
    assert_eq!(
        r.mx("nope.test").await,
        Err(DnsError::NoSuchDomain("nope.test".into()))
    );
    assert_eq!(
        r.mx("implicit.test").await.unwrap(),
        vec![MxHost {
            preference: 0,
            name: "implicit.test".into()
        }]
    );

    let big = r.mx("big.test").await.unwrap();
    assert_eq!(big.len(), 151, "every record of the big answer");
    assert_eq!(
        big[0],
        MxHost {
            preference: 1,
            name: "mx.big.test".into()
        },
        "the last record, sent only over TCP, sorts first"
    );
    assert!(
        dns.tcp_queries("MX", "big.test") >= 1,
        "the big answer came over TCP: {}",
        dns.log()
    );
    assert_eq!(
        dns.tcp_queries("MX", "example.test"),
        0,
        "small ones over UDP"
    );
}
