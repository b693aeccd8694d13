//! DKIM signing cost per message (criterion): RSA-2048 and Ed25519 over a 4 KiB message.
//!
//! `cargo bench --ignore-rust-version --bench dkim`. The per-core rate is 1 / time per
//! signature; signing runs on the blocking pool, so a 2-core machine signs about twice that.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use postern::config::Config;
use postern::dkim::{generate, Algorithm, Keys};

fn message() -> Vec<u8> {
    let mut m = b"From: App <app@example.test>\r\nTo: someone@dest.test\r\nSubject: Your order\r\nDate: Sun, 29 Nov 2026 08:00:00 +0000\r\nMessage-ID: <1@example.test>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n".to_vec();
    while m.len() < 4096 {
        m.extend_from_slice(
            b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n",
        );
    }
    m
}

fn keys(dir: &std::path::Path, alg: Algorithm) -> Keys {
    let path = dir.join(format!("{alg:?}.pem"));
    generate(alg, &path).expect("keygen");
    let text = format!(
        "[server]\nhostname = \"b.test\"\ndata_dir = \"d\"\n[[listener]]\naddr = \"127.0.0.1:0\"\nmode = \"relay\"\n[[dkim.key]]\ndomain = \"example.test\"\nselector = \"s\"\nalgorithm = \"{}\"\nprivate_key = \"{}\"\n",
        alg.config_name(),
        path.display()
    );
    let config = Config::parse(&text, "bench", dir).expect("config");
    Keys::load(&config).expect("keys")
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let msg = message();
    let mut group = c.benchmark_group("dkim-sign-4KiB");
    group.throughput(Throughput::Elements(1));
    for alg in [Algorithm::Rsa, Algorithm::Ed25519] {
        let keys = keys(dir.path(), alg);
        group.bench_function(alg.config_name(), |b| {
            b.iter(|| {
                let from = postern::dkim::from_domain(postern::bounce::headers(&msg));
                let signed = keys
                    .sign(&[&msg], from.as_deref(), "app@example.test")
                    .expect("sign");
                assert!(signed.domain.is_some());
                signed
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
