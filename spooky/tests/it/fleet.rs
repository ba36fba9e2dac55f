//! Fleet mode, piece by piece. QUIC-LB connection IDs: Spooky's codec against an independent
//! one (spooky/tests/peers/quic_lb.py, written from the draft on Python's `cryptography`), in
//! every mode and length.

use crate::support::*;
use spooky::quic::quic_lb::QuicLb;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn quic_lb_ids_agree_with_an_independent_implementation() {
    require_python("cryptography", "cryptography");
    let mut py = Command::new("python3")
        .arg(peers_dir().join("quic_lb.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut input = py.stdin.take().unwrap();
    let mut output = BufReader::new(py.stdout.take().unwrap());
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut byte = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed as u8
    };
    let mut checked = [0usize; 3];
    for sid_len in 1..=15usize {
        for nonce_len in 4..=(19 - sid_len) {
            for keyed in [false, true] {
                let key: Option<[u8; 16]> = keyed.then(|| std::array::from_fn(|_| byte()));
                let rotation = byte() % 7;
                let lb = QuicLb::new(rotation, sid_len, nonce_len, key, true).unwrap();
                let sid: Vec<u8> = (0..sid_len).map(|_| byte()).collect();
                let nonce: Vec<u8> = (0..nonce_len).map(|_| byte()).collect();
                let cid = lb.encode(&sid, &nonce, 0).unwrap();
                let q = serde_json::json!({
                    "rotation": rotation,
                    "sid": hex(&sid),
                    "nonce": hex(&nonce),
                    "key": key.map(|k| hex(&k)),
                    "cid": hex(&cid),
                });
                writeln!(input, "{q}").unwrap();
                let mut line = String::new();
                output.read_line(&mut line).unwrap();
                let a: serde_json::Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("python said {line:?}: {e}"));
                assert_eq!(a["cid"], hex(&cid), "python encodes as Spooky: {lb:?}");
                assert_eq!(a["sid"], hex(&sid), "python decodes Spooky's: {lb:?}");
                assert_eq!(a["nonce"], hex(&nonce), "{lb:?}");
                checked[lb.mode() as usize] += 1;
            }
        }
    }
    drop(input);
    assert!(py.wait().unwrap().success());
    // Plaintext, single pass, four passes: every one was exercised.
    assert!(checked.iter().all(|n| *n > 0), "{checked:?}");
}
