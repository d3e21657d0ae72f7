//! Seal throughput of AEGIS-256X2 and AEGIS-256 against the 128-bit-key
//! AEGIS-128X2 and AEGIS-128L (libaegis through the aegis crate), 4 KiB and
//! 64 KiB units, one core. Evaluation for docs/BENCHMARKS.md (session 9: what
//! a 128-bit infrastructure key would buy); not used by atrest. Run:
//!   cargo run --release --bin key128

use aegis::aegis128l::Aegis128L;
use aegis::aegis128x2::Aegis128X2;
use aegis::aegis256::Aegis256;
use aegis::aegis256x2::Aegis256X2;
use std::time::Instant;

macro_rules! seal {
    ($t:ty, $key:expr, $nlen:expr, $buf:expr, $ad:expr, $rounds:expr) => {{
        let mut nonce = [0u8; $nlen];
        let t = Instant::now();
        for i in 0..$rounds {
            nonce[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let c = <$t>::new($key, &nonce);
            std::hint::black_box(c.encrypt_in_place(&mut $buf, &$ad));
        }
        ($rounds as f64 * $buf.len() as f64) / t.elapsed().as_secs_f64() / 1e6
    }};
}

fn main() {
    let k32 = [7u8; 32];
    let k16 = [7u8; 16];
    let ad = [1u8; 64];
    for size in [4048usize, 65488] {
        let mut buf = vec![0x5au8; size];
        let rounds = 400_000_000 / size;
        for round in 0..3 {
            let a = seal!(Aegis256X2::<16>, &k32, 32, buf, ad, rounds);
            let b = seal!(Aegis256::<16>, &k32, 32, buf, ad, rounds);
            let c = seal!(Aegis128X2::<16>, &k16, 16, buf, ad, rounds);
            let d = seal!(Aegis128L::<16>, &k16, 16, buf, ad, rounds);
            println!("size {size} round {round}: seal MB/s AEGIS-256X2 {a:.0} AEGIS-256 {b:.0} AEGIS-128X2 {c:.0} AEGIS-128L {d:.0}");
        }
    }
}
