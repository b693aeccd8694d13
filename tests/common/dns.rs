//! An authoritative DNS server on 127.0.0.1 (UDP) for delivery tests, built on hickory-proto's
//! wire format: MX, A and AAAA records, null MX, NXDOMAIN and SERVFAIL on demand.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, MX};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// The records served. Names are lower case, without the trailing dot.
#[derive(Default)]
pub struct Zone {
    pub mx: HashMap<String, Vec<(u16, String)>>,
    pub addrs: HashMap<String, Vec<IpAddr>>,
    pub servfail: HashSet<String>,
}

/// A running DNS server; dropping it stops nothing (the task ends with the runtime).
pub struct DnsServer {
    pub addr: SocketAddr,
    pub zone: Arc<Mutex<Zone>>,
    /// Queries answered, for tests that check caching or routing.
    pub queries: Arc<Mutex<Vec<(String, RecordType)>>>,
}

impl DnsServer {
    pub async fn start() -> DnsServer {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind dns");
        let addr = socket.local_addr().unwrap();
        let zone = Arc::new(Mutex::new(Zone::default()));
        let queries = Arc::new(Mutex::new(Vec::new()));
        let (z, q) = (zone.clone(), queries.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(request) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let response = answer(&request, &z.lock().unwrap(), &q);
                if let Ok(bytes) = response.to_vec() {
                    let _ = socket.send_to(&bytes, peer).await;
                }
            }
        });
        DnsServer {
            addr,
            zone,
            queries,
        }
    }

    pub fn mx(&self, domain: &str, pref: u16, host: &str) {
        self.zone
            .lock()
            .unwrap()
            .mx
            .entry(domain.into())
            .or_default()
            .push((pref, host.into()));
    }

    pub fn addr(&self, host: &str, ip: &str) {
        self.zone
            .lock()
            .unwrap()
            .addrs
            .entry(host.into())
            .or_default()
            .push(ip.parse().unwrap());
    }

    pub fn servfail(&self, name: &str) {
        self.zone.lock().unwrap().servfail.insert(name.into());
    }

    /// The `dns.nameservers` value pointing at this server.
    pub fn nameserver(&self) -> String {
        self.addr.to_string()
    }
}

fn answer(request: &Message, zone: &Zone, log: &Mutex<Vec<(String, RecordType)>>) -> Message {
    let mut response = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
    response.metadata.authoritative = true;
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    let Some(query) = request.queries.first() else {
        response.metadata.response_code = ResponseCode::FormErr;
        return response;
    };
    response.add_query(query.clone());
    let name = query
        .name
        .to_ascii()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    log.lock().unwrap().push((name.clone(), query.query_type));
    if zone.servfail.contains(&name) {
        response.metadata.response_code = ResponseCode::ServFail;
        return response;
    }
    let exists = zone.mx.contains_key(&name) || zone.addrs.contains_key(&name);
    if !exists {
        response.metadata.response_code = ResponseCode::NXDomain;
        return response;
    }
    let owner = query.name.clone();
    match query.query_type {
        RecordType::MX => {
            for (pref, host) in zone.mx.get(&name).into_iter().flatten() {
                let exchange = if host == "." {
                    Name::root()
                } else {
                    Name::from_ascii(format!("{host}.")).unwrap()
                };
                response.add_answer(Record::from_rdata(
                    owner.clone(),
                    60,
                    RData::MX(MX::new(*pref, exchange)),
                ));
            }
        }
        RecordType::A | RecordType::AAAA => {
            for ip in zone.addrs.get(&name).into_iter().flatten() {
                let rdata = match (ip, query.query_type) {
                    (IpAddr::V4(v4), RecordType::A) => RData::A(A(*v4)),
                    (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(*v6)),
                    _ => continue,
                };
                response.add_answer(Record::from_rdata(owner.clone(), 60, rdata));
            }
        }
        _ => {}
    }
    response
}
